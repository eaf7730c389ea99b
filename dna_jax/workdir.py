"""One run per workdir, and no stale temporaries: the workdir lock and the start-up cleanup.

`workdir_lock(workdir)` holds `<workdir>/lock.json` for the length of a run: an exclusive
`fcntl.flock` on the file (released by the kernel when the holder exits, even after kill -9,
so a lock left by a dead process is simply taken over) plus the holder's host, pid, start
time and command written inside it, which a refused run reports. In a multi-process run only
process 0 takes the lock; the other processes learn its outcome from it (one broadcast).
A remote workdir (gs://) has no file lock: its lock.json only records the holder and names a
previous one in the log (`WorkdirLock._record_remote`).

`clean_temporaries(workdir)` removes what an interrupted write leaves behind: atomic-write
temporaries (`*.tmp` files), staging folders (`*.tmp`, `*.tmp-*`, `*.old`) and Orbax's
unfinished checkpoint folders (`*.orbax-checkpoint-tmp-*`). Call it only while holding the
lock (nobody else is writing then). Moved-aside artifacts (`*.replaced-*`) and the
compilation cache are left alone.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from typing import Any, Iterator

from dna_jax import files
from dna_jax import multihost

LOCK_FILE = "lock.json"
_SKIP_DIRS = ("compilation_cache",)


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir; the message names its host, pid and start time."""


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder:
        return "a run that has not written its details yet"
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
            f"{holder.get('started')} ({holder.get('command', '?')})")


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        holder = json.loads(data.decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


def _me() -> dict[str, Any]:
    """This run's details, written into the lock file."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "command": " ".join(os.path.basename(a) if i == 0 else a
                                for i, a in enumerate(sys.argv))[:300]}


class WorkdirLock:
    """An acquired lock on one workdir (process-local); `release` or use as a context."""

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(files.absolute(workdir), LOCK_FILE)
        self._fd: int | None = None
        self._remote = files.is_remote(self.path)

    def acquire(self) -> "WorkdirLock":
        """Takes the lock or raises WorkdirLockedError naming the holder."""
        if self._remote:
            return self._record_remote()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by another run: "
                f"{_holder_text(holder)}. Wait for it to finish (or stop it), or use another "
                "--workdir.") from None
        previous = _read_holder(fd)
        if previous:  # the file outlived its holder: a finished, killed or crashed run
            same_host = previous.get("host") == socket.gethostname()
            state = ("dead" if same_host and not _pid_alive(previous.get("pid"))
                     else "no longer holding it")
            logging.warning("workdir lock: taking over the stale lock of %s (%s).",
                            _holder_text(previous), state)
        me = _me()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me, indent=2) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _record_remote(self) -> "WorkdirLock":
        """A remote workdir (gs://) has no file lock: the holder is recorded in lock.json, a
        previous holder is named in the log, nothing is excluded (a preempted run must be able
        to rerun; two live runs on one remote workdir are the user's to avoid)."""
        previous: dict[str, Any] = {}
        if files.exists(self.path):
            try:
                loaded = json.loads(files.read_text(self.path) or "{}")
                previous = loaded if isinstance(loaded, dict) else {}
            except ValueError:
                previous = {}
        if previous:
            logging.warning("workdir lock: %s names %s; a remote workdir cannot be locked, so "
                            "this run continues (make sure that run has stopped).", self.path,
                            _holder_text(previous))
        files.write_text(self.path, json.dumps(_me(), indent=2) + "\n")
        self._fd = -1
        return self

    def release(self) -> None:
        """Empties the file and drops the lock (the file stays: a later run re-locks it)."""
        if self._fd is None:
            return
        if self._remote:
            self._fd = None
            files.write_text(self.path, "")
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "WorkdirLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[WorkdirLock | None]:
    """Holds the workdir for a run (process 0 takes it; every process waits for the outcome).

    Raises:
      WorkdirLockedError: another run holds the workdir (host, pid, start time named).
    """
    lock, error = None, None
    if multihost.is_writer():
        try:
            lock = WorkdirLock(workdir).acquire()
        except WorkdirLockedError as e:
            error = e
    if not multihost.agree(error is None, (False, True)):
        if lock is not None:
            lock.release()
        raise error or WorkdirLockedError(
            f"{workdir} is in use by another run (process 0 could not lock it; see its log)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _is_temporary(name: str) -> bool:
    return (name.endswith(".tmp") or ".tmp-" in name or name.endswith(".old")
            or ".orbax-checkpoint-tmp" in name)


def clean_temporaries(workdir: str) -> list[str]:
    """Removes interrupted writes' leftovers under `workdir` (see the module docstring);
    returns the removed paths. Every process calls it, holding the workdir lock: process 0
    cleans while the others wait, so none starts writing a temporary that is then removed."""
    removed = _remove_temporaries(workdir) if multihost.is_writer() else []
    multihost.barrier("workdir cleaned")
    return removed


def _remove_temporaries(workdir: str) -> list[str]:
    removed: list[str] = []
    if not files.isdir(workdir):
        return removed
    for root, dirs, names in files.walk(workdir):
        keep = []
        for name in dirs:
            path = os.path.join(root, name)
            if name in _SKIP_DIRS or ".replaced-" in name:
                continue
            if _is_temporary(name):
                with contextlib.suppress(OSError):
                    files.rmtree(path, missing_ok=True)
                removed.append(path)
            else:
                keep.append(name)
        dirs[:] = keep
        for name in names:
            if _is_temporary(name):
                path = os.path.join(root, name)
                files.remove(path, missing_ok=True)
                removed.append(path)
    for path in removed:
        logging.info("removed a stale temporary: %s", path)
    return removed
