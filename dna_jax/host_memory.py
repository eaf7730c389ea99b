"""Keeping freed host memory in the process: XLA:CPU's big buffers without page faults.

XLA:CPU allocates every execution's temporaries and outputs with `malloc` and frees them
when the execution ends. With glibc's defaults a block this large (tens to hundreds of MB:
the rating's op applications take one 80 MB temporary block per candidate at batch 32) is
`mmap`ed on every call, because blocks over `M_MMAP_THRESHOLD` (at most 32 MB) always are and
because XLA's worker threads allocate from per-thread arenas whose heaps hold at most 64 MB.
The kernel then zeroes the fresh pages on first touch (one minor fault per 4 KiB) and takes
them back at `munmap`: measured on the project's 2-vCPU AMD EPYC machine (cpuinfo on the
day: family 25 model 1, Zen 3), rating one leaf op application
of block 1 made 20,000 page faults (80 MB) per call, and the whole block-1 rating spent a
quarter of its CPU time in the kernel.

`keep_freed_memory` sets three glibc options with `mallopt`: one arena (`M_ARENA_MAX`, so
XLA's threads allocate from the main heap, which can grow past 64 MB), no `mmap` for large
blocks (`M_MMAP_MAX` 0) and no automatic trimming of the heap's top (`M_TRIM_THRESHOLD` -1),
so a freed block is reused by the next call instead of being returned to the kernel. (A
threshold of 2 GiB, the largest positive value, was not enough: a training step of the
biggest `fmnist28` ground-truth network frees more than 2 GiB at the heap's top, so glibc
shrank and regrew the heap every step, 5.4M page faults and as much kernel as user time per
20 s.) Peak memory is
unchanged (what a call needs, it needs either way); the process keeps its high-water mark
instead of giving pages back between calls. It must run before JAX starts its CPU backend
(threads created earlier keep their arenas), so the entry points call it first thing. A no-op
off glibc, or with $DNA_JAX_KEEP_FREED_MEMORY=0. `release_free_memory` gives the free pages back
at the end of a job (the evaluator calls it after each rating).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_TRIM_THRESHOLD = -1  # glibc: -1 disables trimming (malloc_trim still works)
_applied: bool | None = None
_libc = None


def keep_freed_memory() -> bool:
    """Applies the glibc options above once per process; True if they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DNA_JAX_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        version = libc.gnu_get_libc_version  # glibc only
        version.restype = ctypes.c_char_p
        gnu = version()
    except (OSError, AttributeError):
        return False
    if not gnu:
        return False
    _applied = bool(mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0)
                    and mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    if _applied:
        global _libc
        _libc = libc
    return _applied


def release_free_memory() -> None:
    """Hands the heap's free pages back to the kernel (`malloc_trim(0)`) when the options of
    `keep_freed_memory` are in effect; call it after a large job (e.g. rating a block), so a
    process that goes on to other work does not hold the job's high-water mark and its
    fragmentation (measured: a second rating of block 1 in the same process grew the peak from
    4.5 to 5.9 GB without it). Costs the page faults of refilling the heap once, not per call."""
    if _libc is not None:
        _libc.malloc_trim(0)
