"""A thin Orbax CheckpointManager wrapper: async save every N steps, keep N, preemption, restore.

Every process calls every method (Orbax coordinates multi-host saves itself); restoring into
an abstract tree whose leaves carry shardings places the arrays directly on the mesh.

A state with a NaN or infinite floating-point leaf is never saved: `save` checks every leaf
first (one jitted reduction, only at steps that are due) and raises `NonFiniteStateError`,
so the newest checkpoint is always a finite one ("last good"). Once a save is on disk, the
SHA-256 of its files is recorded beside it (`<step>.sha256.json`, dna_jax.integrity). On
resume, `restore_latest_good` verifies those checksums (a flipped byte can restore into
finite nonsense) and checks the restored arrays again: a checkpoint whose files changed, that
does not restore, or that holds NaN/inf is set aside, never deleted, and the previous one is
used.
"""

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dna_jax import files
from dna_jax import integrity
from dna_jax import multihost


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be restored; the message names the directory."""


class NonFiniteStateError(FloatingPointError):
    """A state to be checkpointed holds NaN/inf; the message names the step and the leaves."""


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> tuple[list[str], int]:
    """(paths of the floating-point leaves holding NaN/inf, number of floating leaves)."""
    flat = [(jax.tree_util.keystr(path), x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not flat:
        return [], 0
    flags = np.asarray(jax.device_get(_finite_flags([x for _, x in flat])))
    return [name for (name, _), ok in zip(flat, flags) if not ok], len(flat)


def _absolute(directory: str) -> str:
    return files.absolute(directory)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


class Checkpointer:
    """Saves and restores one pytree (the train state) under `directory/<step>`.

    Args:
        directory: where the step folders live (local path or gs://).
        save_every_steps: `save` writes only at multiples of this (unless forced).
        keep: how many recent checkpoints to keep.
        async_save: write in a background thread after copying the arrays to the host.
    """

    def __init__(self, directory: str, *, save_every_steps: int = 1000, keep: int = 3,
                 async_save: bool = True) -> None:
        self.directory = _absolute(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, save_every_steps), max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started.

        Raises:
            NonFiniteStateError: a floating-point leaf of `state` is NaN/inf (nothing saved;
                the message names the last good checkpoint).
        """
        if not (force or self._manager.should_save(step)):
            return False
        self.record_checksums()
        bad, total = nonfinite_leaves(state)
        if bad:
            last = self.latest_step()
            raise NonFiniteStateError(
                f"the state of step {step} holds NaN/inf in {len(bad)} of {total} leaves "
                f"(first: {', '.join(bad[:3])}); it was not saved. The last good checkpoint is "
                + (f"step {last} in {self.directory}" if last is not None else
                   f"none ({self.directory} holds no checkpoint)") + ".")
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        if saved:
            logging.info("Checkpoint step %d -> %s%s.", step, self.directory,
                         " (async)" if self._manager._options.enable_async_checkpointing else "")
        return saved

    def reached_preemption(self, step: int) -> bool:
        """Whether the scheduler announced a preemption (all processes agree on the answer):
        JAX's preemption sync point in multi-process runs, a SIGTERM received inside
        `stop_on_sigterm` in a single-process one."""
        return _TERM_REQUESTED.is_set() or self._manager.reached_preemption(step)

    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restores `step` (default: latest) into the structure, dtypes and shardings of target.

        Args:
            target: pytree of jax.ShapeDtypeStruct with shardings (see abstract_like), or
                of arrays (their shardings are used).
            step: which checkpoint; None = the latest.

        Raises:
            CheckpointError: no checkpoint, or it is corrupt / does not match target.
        """
        if step is None:
            step = self.latest_step()
        if step is None:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        if step not in self.all_steps():
            raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {self.all_steps()}.")
        target = abstract_like(target)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as error:  # Orbax raises many types; all mean "unusable".
            raise CheckpointError(
                f"Checkpoint step {step} in {self.directory} cannot be restored "
                f"({type(error).__name__}: {error}). Delete {self.directory}/{step} to fall "
                f"back to an earlier step, or the whole directory to start afresh.") from error

    def restore_latest_good(self, target: Any) -> tuple[Any, int | None]:
        """The newest checkpoint that restores and holds only finite values, and its step.

        A checkpoint that cannot be restored or holds NaN/inf is set aside (renamed to
        `<step>.unusable-<time>` beside it, never deleted) with a warning naming it and the
        reason, and the previous one is tried. Returns (target, None) when none is usable.
        """
        for step in sorted(self.all_steps(), reverse=True):
            corrupt = self._verify(step)
            if corrupt:
                self._set_aside(step, corrupt)
                continue
            try:
                state = self.restore(target, step)
            except CheckpointError as error:
                problem = str(error.__cause__ or error)
            else:
                bad, total = nonfinite_leaves(state)
                if not bad:
                    return state, step
                problem = (f"NaN/inf in {len(bad)} of {total} leaves (first: "
                           f"{', '.join(bad[:3])})")
            self._set_aside(step, problem)
        return target, None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def record_checksums(self) -> None:
        """Records the checksums of every finished step that has none (process 0), after the
        pending async save is on disk; drops those of steps Orbax has deleted."""
        self._manager.wait_until_finished()
        if multihost.is_writer() and files.isdir(self.directory):
            steps = set(self.all_steps())
            for step in steps:
                if not integrity.sidecar(self._step_dir(step)).exists():
                    integrity.record_sidecar(self._step_dir(step))
            for name in files.listdir(self.directory):
                head, _, tail = name.partition(".")
                if tail == "sha256.json" and head.isdigit() and int(head) not in steps:
                    files.remove(os.path.join(self.directory, name))
        multihost.barrier("checkpoint checksums recorded")

    def _verify(self, step: int) -> str:
        """'' when step's files match their checksums (or none were recorded), else what
        differs; process 0 reads, every process gets its verdict."""
        problem = ""
        if multihost.is_writer():
            try:
                integrity.verify(self._step_dir(step),
                                 integrity.read_sidecar(self._step_dir(step)),
                                 f"checkpoint step {step}")
            except integrity.IntegrityError as error:
                problem = str(error)
        corrupt = multihost.agree(bool(problem), (False, True))
        return (problem or "its files differ from their recorded checksums") if corrupt else ""

    def _set_aside(self, step: int, problem: str) -> None:
        path = self._step_dir(step)
        stamp = time.strftime('%Y%m%d-%H%M%S')
        moved = f"{path}.unusable-{stamp}"
        if multihost.is_writer() and files.exists(path):
            files.move(path, moved)
            checksums = integrity.sidecar(path)
            if checksums.exists():  # kept with the step it describes
                checksums.rename(os.path.join(moved, "recorded.sha256.json"))
        multihost.barrier(f"checkpoint step {step} set aside")
        self._manager.reload()
        logging.warning("Checkpoint step %d in %s is unusable (%s); set aside as %s, trying "
                        "the previous one.", step, self.directory, problem[:500], moved)

    def wait(self) -> None:
        """Blocks until the pending async save is on disk (and its checksums recorded)."""
        self.record_checksums()

    def close(self) -> None:
        self.record_checksums()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_TERM_REQUESTED = threading.Event()


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside a training loop of a single-process run, SIGTERM (a spot VM's or a scheduler's
    preemption notice, `launch/worker_job.sh stop`) asks for a checkpoint at the end of the
    current step instead of killing the process mid-step: `Checkpointer.reached_preemption`
    answers True and the loop saves and exits ("Preempted at step N"). Multi-process runs keep
    JAX's preemption sync manager (every process must stop at the same step), so nothing is
    installed there. A second SIGTERM kills at once; outside the loop SIGTERM means what it
    meant before."""
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # pylint: disable=unused-argument
        if _TERM_REQUESTED.is_set():  # the second one: do what SIGTERM did before
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _TERM_REQUESTED.set()
        logging.warning("SIGTERM: a checkpoint is saved after the current step, then the run "
                        "stops; rerun the same command to resume (a second SIGTERM kills now).")

    _TERM_REQUESTED.clear()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _TERM_REQUESTED.clear()
