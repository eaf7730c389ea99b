"""Paths through a block-wise supernet: sampling (uniform, fair) and per-op groups.

A path of block k is one branch position per layer (int32 [L]); `branches_to_ops` maps it to
the space's op indices, what `SupernetBlock` takes. Parameters and optimizer state are split
per op (`op_groups`) so that an op off the path can be left untouched (see `update`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
SAMPLINGS = ("uniform", "fair")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the configs' compute dtypes
SHARED_GROUP = "shared"


def block_name(index: int) -> str:
    return f"block{index}"


def choice_table(space: Any, k: int) -> list[np.ndarray]:
    """Legal op indices of every layer of block k (branch position -> op index)."""
    return [np.asarray(space.layer_choices(k, l), np.int32)
            for l in range(space.blocks[k].num_layers)]


def sample_branches(table: Sequence[Sequence[int]], block_key: jax.Array,
                    local_step: jax.Array, sampling: str = "uniform") -> jax.Array:
    """Branch positions (int32 [num_layers]) of one block's path at `local_step`.

    'uniform': independent uniform branches from a key folded in from (layer, step).
    'fair': layer l with K ops follows a random permutation of its K branches per window of K
    steps (key folded in from the window index), so every op is used exactly once per window.
    """
    branches = []
    for l, choices in enumerate(table):
        num = len(choices)
        layer_key = jax.random.fold_in(block_key, l)
        if num == 1:
            branches.append(jnp.zeros((), jnp.int32))
        elif sampling == "fair":
            window, position = jnp.divmod(local_step, num)
            order = jax.random.permutation(jax.random.fold_in(layer_key, window), num)
            branches.append(order[position].astype(jnp.int32))
        else:
            key = jax.random.fold_in(layer_key, local_step)
            branches.append(jax.random.randint(key, (), 0, num, jnp.int32))
    return jnp.stack(branches)


def sample_network_path(table: Sequence[Sequence[int]], rng: jax.Array, step: jax.Array
                        ) -> jax.Array:
    """Uniform branch positions of a whole-network path (SPOS): int32 [num_layers].

    The step is folded in before the layer (the other way round from `sample_branches`), so
    SPOS supernets keep the paths they were trained on.
    """
    key = jax.random.fold_in(rng, step)
    out = []
    for i, choices in enumerate(table):
        if len(choices) == 1:
            out.append(jnp.zeros((), jnp.int32))
        else:
            out.append(jax.random.randint(jax.random.fold_in(key, i), (), 0, len(choices),
                                          jnp.int32))
    return jnp.stack(out)


def branches_to_ops(table: Sequence[Sequence[int]], branches: jax.Array) -> jax.Array:
    """Branch positions -> op indices of the space."""
    return jnp.stack([jnp.asarray(np.asarray(choices, np.int32))[branches[l]]
                      for l, choices in enumerate(table)])


def on_path(branches: jax.Array, layer: int, branch: int) -> jax.Array:
    """Whether branch `branch` of layer `layer` is on the path `branches` [L], or on any of
    the paths `branches` [P, L] (DNA++ trains several paths per step)."""
    return jnp.any(jnp.atleast_2d(branches)[:, layer] == branch)


def op_groups(block_params: PyTree) -> dict[str, PyTree]:
    """Splits one block's params into optimizer groups: one per op, plus the shared rest.

    Op subtrees live under params['layers_<l>']['ops_<j>'] (branch j of layer l); everything
    else (block 0's stem and first layer) forms `SHARED_GROUP`. Empty groups are dropped.
    """
    groups: dict[str, PyTree] = {}
    shared = {key: value for key, value in block_params.items()
              if not key.startswith("layers_")}
    if shared:
        groups[SHARED_GROUP] = shared
    for layer_name, layer in block_params.items():
        if not layer_name.startswith("layers_"):
            continue
        for op_name, subtree in layer.items():
            groups[f"{layer_name}/{op_name}"] = subtree
    return groups


def merge_groups(groups: dict[str, PyTree]) -> dict[str, PyTree]:
    """Inverse of `op_groups`."""
    merged: dict[str, PyTree] = dict(groups.get(SHARED_GROUP, {}))
    for name, subtree in groups.items():
        if name == SHARED_GROUP:
            continue
        layer_name, op_name = name.split("/")
        merged.setdefault(layer_name, {})[op_name] = subtree
    return merged


def group_branch(name: str) -> tuple[int, int] | None:
    """(layer, branch) of an op group, None for the shared group."""
    if name == SHARED_GROUP:
        return None
    layer_name, op_name = name.split("/")
    return int(layer_name.removeprefix("layers_")), int(op_name.removeprefix("ops_"))


def updates_per_op(space: Any, steps: int) -> dict[str, float]:
    """Per block, the mean number of updates each (layer, op) gets in `steps` steps of
    uniform or fair path sampling (steps / choices per layer, averaged over the block's
    searched layers; the skip op has no weights but counts as a choice). The original
    trained ~8,300 updates per op (20 epochs of ImageNet at batch 64, 6 ops per layer)."""
    out = {}
    for b, block in enumerate(space.blocks):
        per_layer = [steps / len(space.layer_choices(b, l)) for l in range(block.num_layers)]
        out[block.name] = float(np.mean(per_layer))
    return out


class BlockPaths:
    """Path sampling of a block-wise supernet trainer (a mixin for its frozen dataclass).

    The trainer provides `space`, `blocks` (one SupernetBlock per space block) and
    `sampling` ('uniform' or 'fair').
    """

    space: Any
    blocks: tuple
    sampling: str

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [block_name(k) for k in range(self.num_blocks)]

    def choice_table(self, k: int) -> list[np.ndarray]:
        return choice_table(self.space, k)

    def sample_branches(self, rng: jax.Array, k: int, local_step: jax.Array) -> jax.Array:
        """Branch positions of block k's path at `local_step` (key folded in from k)."""
        return sample_branches(self.choice_table(k), jax.random.fold_in(rng, k), local_step,
                               self.sampling)

    def sample_paths(self, rng: jax.Array, k: int, local_step: jax.Array,
                     num_paths: int) -> jax.Array:
        """int32 [P, L] branch positions of block k's `num_paths` paths at `local_step`."""
        return jnp.stack([self.sample_branches(jax.random.fold_in(rng, 1000 + p), k,
                                               local_step) for p in range(num_paths)])

    def branches_to_ops(self, k: int, branches: jax.Array) -> jax.Array:
        return branches_to_ops(self.choice_table(k), branches)

    def init_block(self, k: int, key: jax.Array, image_shape: Sequence[int]) -> PyTree:
        """Variables of block k (parameter shapes depend on channels only)."""
        return self.blocks[k].init(key,
                                   jnp.zeros(self.block_input_shape(k, image_shape), jnp.float32),
                                   jnp.zeros((self.space.blocks[k].num_layers,), jnp.int32),
                                   False)

    def block_input_shape(self, k: int, image_shape: Sequence[int]) -> tuple[int, ...]:
        """A (1, H, W, C) input of block k that parameter shapes can be taken from."""
        if k == 0:
            return (1, *image_shape)
        height, width = image_shape[:2]
        stride = self.space.stem_stride * math.prod(b.stride for b in self.space.blocks[:k])
        return (1, max(1, height // stride), max(1, width // stride), self.blocks[k].in_channels)
