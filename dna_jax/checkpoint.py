"""A thin Orbax CheckpointManager wrapper: async save every N steps, keep N, preemption, restore.

Every process calls every method (Orbax coordinates multi-host saves itself); restoring into
an abstract tree whose leaves carry shardings places the arrays directly on the mesh.
"""

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint is missing or cannot be restored; the message names the directory."""


def _absolute(directory: str) -> str:
    return directory if "://" in directory else os.path.abspath(directory)


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
        """Saves if `step` is due (or `force`); returns whether a save started."""
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        if saved:
            logging.info("Checkpoint step %d -> %s%s.", step, self.directory,
                         " (async)" if self._manager._options.enable_async_checkpointing else "")
        return saved

    def reached_preemption(self, step: int) -> bool:
        """Whether the scheduler announced a preemption (all processes agree on the answer)."""
        return self._manager.reached_preemption(step)

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

    def wait(self) -> None:
        """Blocks until the pending async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
