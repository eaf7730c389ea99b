"""Who writes, and when the others may read: the one multi-host rule of the library.

On a pod every host runs the same program on one shared workdir. The rule:
  * small files (manifests, JSON, npz tables, plots, started.json) are written by process 0
    only (`is_writer`); Orbax array trees are saved by every process (Orbax coordinates);
  * after a write that another host will read, every host passes a `barrier` before it reads;
  * a decision made from files (skip / resume / run a stage) is taken by process 0 and
    broadcast (`agree`), so no host acts on a read that raced a write.
In a single process every function is a no-op or the identity.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def is_writer() -> bool:
    """Whether this process writes the small files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (multi-process runs only)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(f"dna_jax: {name}")


def agree(choice: T, options: Sequence[T]) -> T:
    """Process 0's `choice` (one of `options`) on every process."""
    if jax.process_count() == 1:
        return choice
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    index = int(multihost_utils.broadcast_one_to_all(np.int32(list(options).index(choice))))
    return options[index]


def replicated_to_host(tree: Any) -> Any:
    """Numpy copies of a tree of REPLICATED arrays (a trained state's variables), on every
    process: each reads its own local copy (jax.device_get refuses arrays that span hosts)."""
    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)
