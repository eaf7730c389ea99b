"""`dna_jax.host_memory`: freed large blocks stay in the process (no page faults on reuse)."""

import os
import platform
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, writes and frees a 96 MiB block 5 times in a worker thread (XLA:CPU's pattern: one
# big temporary block per execution); prints whether the options applied and the page faults
# of calls 2-5.
_CHILD = """
import ctypes, resource, threading
from dna_jax import host_memory
applied = host_memory.keep_freed_memory()
assert host_memory.keep_freed_memory() == applied  # once per process
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 96 * 2 ** 20
faults = []

def calls():  # in a worker thread, as XLA's
    block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=calls); thread.start(); thread.join()
rss = lambda: int(open("/proc/self/statm").read().split()[1])
before = rss()
host_memory.release_free_memory()  # the freed 96 MiB block back to the kernel
print(applied, faults[0], before - rss())
"""


def _run(env_value):
    env = dict(os.environ, PYTHONPATH=_ROOT)
    env.pop("DNA_JAX_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["DNA_JAX_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                    reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults, released = _run(None)
    off, faults_off, _ = _run("0")
    assert applied and not off
    pages = 4 * 96 * 2 ** 20 // 4096  # 98,304 pages written in calls 2-5
    assert faults_off > pages // 2  # glibc's default: each block mmapped and faulted in again
    assert faults < pages // 20  # kept: the heap's freed block is reused
    assert released > 96 * 2 ** 20 // 4096 // 2  # release_free_memory returns the free pages
