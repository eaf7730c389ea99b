"""The candidates of a block as a trie over layers, and the memory plan of a walk over it:
which device owns which subtree, how many prefixes a stack holds and an op application takes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from dna_jax.costs import conv_bn_costs, layer_costs
from dna_jax.models.supernet import SupernetBlock
from dna_jax.netspec import conv_output_size
from dna_jax.space import SearchSpace

_SPLIT_FACTOR = 4  # a level is split over devices once it has this many nodes per device


# ---- candidates and their trie -----------------------------------------------------------------


def select_candidates(space: SearchSpace, block_index: int, num_candidates: int = 0,
                      seed: int = 0) -> np.ndarray:
    """All candidates of a block (num_candidates=0), or that many distinct ones sampled
    uniformly without replacement; int32 [N, L] in lexicographic order."""
    every = space.block_candidates(block_index)
    if num_candidates <= 0 or num_candidates >= len(every):
        return every
    rng = np.random.default_rng([seed, block_index])
    chosen = np.sort(rng.choice(len(every), size=num_candidates, replace=False))
    return every[chosen]


@dataclasses.dataclass(frozen=True)
class CandidateTrie:
    """The prefixes of a set of distinct candidates, level by level.

    Node ids of a level follow the lexicographic order of their prefixes, so the children of
    a node are contiguous: `child_start[l][p]:child_start[l][p + 1]` at level l for parent p
    of level l - 1 (level 0 has the root, id 0, as its only parent). Leaf i is candidate i.

    Attributes:
      encodings: int32 [N, L], unique, lexicographically sorted.
      node_of: per level, [N] the node of each candidate's prefix.
      parent: per level, [n_l] the parent node at level l - 1 (0 at level 0: the root).
      op: per level, [n_l] the op index the node adds.
      child_start: per level, [n_{l-1} + 1] offsets of the children.
      group_index: per level, [n_l] rank of the node among the level's nodes with its op.
    """

    encodings: np.ndarray
    node_of: tuple[np.ndarray, ...]
    parent: tuple[np.ndarray, ...]
    op: tuple[np.ndarray, ...]
    child_start: tuple[np.ndarray, ...]
    group_index: tuple[np.ndarray, ...]

    @property
    def num_layers(self) -> int:
        return self.encodings.shape[1]

    def level_size(self, level: int) -> int:
        return len(self.op[level])

    def level_ops(self, level: int) -> list[int]:
        return sorted(int(o) for o in np.unique(self.op[level]))

    def group_size(self, level: int, op: int) -> int:
        return int(np.sum(self.op[level] == op))


def build_trie(encodings: np.ndarray) -> tuple[CandidateTrie, np.ndarray]:
    """The trie of `encodings` int [N, L] and, for every input row, its leaf (unique row)."""
    encodings = np.asarray(encodings, np.int64)
    if encodings.ndim != 2 or encodings.shape[0] == 0:
        raise ValueError(f"encodings must be a non-empty [N, L] array, got {encodings.shape}")
    unique, inverse = np.unique(encodings, axis=0, return_inverse=True)
    node_of, parent, op, child_start, group_index = [], [], [], [], []
    previous = np.zeros(len(unique), np.int64)
    for level in range(unique.shape[1]):
        new = np.ones(len(unique), bool)
        new[1:] = np.any(unique[1:, :level + 1] != unique[:-1, :level + 1], axis=1)
        nodes = np.cumsum(new) - 1
        first = np.nonzero(new)[0]
        parent.append(previous[first])
        op.append(unique[first, level])
        num_parents = 1 if level == 0 else len(parent[-2])
        child_start.append(np.searchsorted(parent[-1], np.arange(num_parents + 1)))
        rank = np.zeros(len(first), np.int64)
        for o in np.unique(op[-1]):
            members = op[-1] == o
            rank[members] = np.arange(members.sum())
        group_index.append(rank)
        node_of.append(nodes)
        previous = nodes
    trie = CandidateTrie(unique.astype(np.int32), tuple(node_of), tuple(parent), tuple(op),
                         tuple(child_start), tuple(group_index))
    return trie, inverse.reshape(-1)


def split_level(trie: CandidateTrie, num_devices: int) -> int:
    """First level with enough nodes to balance over the devices (levels above it are
    computed on every device)."""
    if num_devices == 1:
        return 0
    for level in range(trie.num_layers):
        if trie.level_size(level) >= _SPLIT_FACTOR * num_devices:
            return level
    return trie.num_layers - 1


def assign_owners(trie: CandidateTrie, split: int, num_devices: int) -> list[np.ndarray]:
    """Device of every node per level (-1 above `split`: on every device).

    At the split level, each op's nodes are spread evenly over the devices (heaviest subtree
    first, ties to the least loaded device); deeper nodes follow their parents.
    """
    owners = [np.full(trie.level_size(l), -1, np.int64) for l in range(split)]
    leaves = np.bincount(trie.node_of[split], minlength=trie.level_size(split))
    owner = np.zeros(trie.level_size(split), np.int64)
    load = np.zeros(num_devices, np.int64)
    for o in trie.level_ops(split):
        count = np.zeros(num_devices, np.int64)
        nodes = np.nonzero(trie.op[split] == o)[0]
        for node in nodes[np.argsort(-leaves[nodes], kind="stable")]:
            device = min(range(num_devices), key=lambda d: (count[d], load[d]))
            owner[node] = device
            count[device] += 1
            load[device] += leaves[node]
    owners.append(owner)
    for level in range(split + 1, trie.num_layers):
        owners.append(owners[-1][trie.parent[level]])
    return owners


# ---- shapes, costs and the memory plan ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LevelShape:
    """Per-example shapes and costs of one searchable layer of a supernet block.

    Attributes:
      in_shape, out_shape: (H, W, C) of one example.
      macs: op index -> multiply-adds per example.
      work_bytes: op index -> estimated peak intermediate bytes per example.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    macs: Mapping[int, int]
    work_bytes: Mapping[int, int]


def block_shapes(block: SupernetBlock, input_shape: Sequence[int]
                 ) -> tuple[tuple[int, ...], int, int, list[LevelShape]]:
    """(root shape, root macs, root work bytes, per-layer shapes) of one example.

    The root is `prepare_input` (block 0: the student's stem and first layer).
    """
    space, b = block.space, block.block_index
    spec = space.blocks[b]
    itemsize = jnp.dtype(block.config.dtype).itemsize
    height, width, channels = (int(n) for n in input_shape)
    root_macs, root_work = 0, 4 * int(np.prod(input_shape))
    if b == 0:  # the student's stem and first layer (shapes as in `costs.block_input_size`)
        height, width = (conv_output_size(n, space.stem_stride) for n in (height, width))
        first, _ = layer_costs(space.first_layer, space.stem_channels, height)
        root_macs = conv_bn_costs(channels, space.stem_channels, 3, height).macs + first.macs
        root_work += itemsize * 4 * space.stem_channels * height * width
        height, width = (conv_output_size(n, space.first_layer.stride) for n in (height, width))
        channels = space.first_layer.out_channels
    root = shape = (height, width, channels)
    levels = []
    for l in range(block.num_layers):
        stride = spec.stride if l == 0 else 1
        out_channels = spec.out_channels if l == block.num_layers - 1 else spec.hidden_channels
        out_shape = (conv_output_size(shape[0], stride), conv_output_size(shape[1], stride),
                     out_channels)
        macs, work = {}, {}
        for op in space.layer_choices(b, l):
            macs[op], work[op] = _op_costs(space, op, shape, out_shape, itemsize)
        levels.append(LevelShape(shape, out_shape, macs, work))
        shape = out_shape
    return root, root_macs, root_work, levels


def _op_costs(space: SearchSpace, op: int, in_shape, out_shape, itemsize: int) -> tuple[int, int]:
    in_size, in_ch = in_shape[0], in_shape[-1]
    out_size, out_ch = out_shape[0], out_shape[-1]
    stride = 1 if in_size == out_size else 2
    if op == space.skip_index:
        if in_shape == out_shape:
            return 0, itemsize * 2 * in_ch * in_size ** 2
        macs = conv_bn_costs(in_ch, out_ch, 1, out_size).macs
        return macs, itemsize * (in_ch * in_size ** 2 + 2 * out_ch * out_size ** 2)
    spec = space.ops[op].layer(stride, out_ch)
    mid = spec.mid_channels(in_ch)
    macs = layer_costs(spec, in_ch, in_size)[0].macs
    work = (in_ch * in_size ** 2 + 2 * mid * in_size ** 2 + 2 * mid * out_size ** 2
            + 2 * out_ch * out_size ** 2)
    return macs, itemsize * work


@dataclasses.dataclass(frozen=True)
class TraversalPlan:
    """How one walk over the trie is chunked (all row counts per device).

    Attributes:
      split_level: levels above it are computed on every device; from it on, each device
        owns whole subtrees.
      app_rows: per level, prefixes per op application (A_l).
      stack_rows: per non-leaf level, prefixes per stack (S_l, a multiple of A_l).
      estimated_bytes: estimated peak live bytes per device.
      budget_bytes: the budget it was planned for.
    """

    split_level: int
    app_rows: tuple[int, ...]
    stack_rows: tuple[int, ...]
    estimated_bytes: int
    budget_bytes: int

    @property
    def fits(self) -> bool:
        return self.estimated_bytes <= self.budget_bytes


def _level_demand(trie: CandidateTrie, owners: list[np.ndarray], num_devices: int
                  ) -> tuple[list[int], list[int]]:
    """Per level: nodes held per device for the whole level, and the most children of one op
    one device computes when its parent stack holds the whole parent level."""
    need, per_op = [], []
    for level in range(trie.num_layers):
        owner = owners[level]
        if owner[0] < 0:  # replicated level
            need.append(trie.level_size(level))
            per_op.append(max(trie.group_size(level, o) for o in trie.level_ops(level)))
            continue
        need.append(int(np.bincount(owner, minlength=num_devices).max()))
        per_op.append(max(int(np.bincount(owner[trie.op[level] == o],
                                          minlength=num_devices).max())
                          for o in trie.level_ops(level)))
    return need, per_op


def plan_traversal(trie: CandidateTrie, owners: list[np.ndarray], num_devices: int,
                   node_bytes: Sequence[int], work_bytes: Sequence[int], fixed_bytes: int,
                   budget_bytes: int) -> TraversalPlan:
    """Chooses A_l and S_l: whole levels if they fit, else halves the largest term.

    Args:
      node_bytes: per level, bytes of one prefix's activations (all batches of the walk).
      work_bytes: per level, peak intermediate bytes of one op application row.
      fixed_bytes: inputs, targets and the root, held for the whole walk.

    The estimate is fixed + sum_l 2 S_l node_l (a stack and the outputs being packed into
    the next) + max_l A_l work_l (one op application).
    """
    num_layers = trie.num_layers
    need, per_op = _level_demand(trie, owners, num_devices)
    cap_app, cap_stack = list(per_op), list(need[:-1])

    def derive():
        app, stack, fraction = [], [], 1.0
        for level in range(num_layers):
            app.append(max(1, min(cap_app[level], math.ceil(per_op[level] * fraction))))
            if level < num_layers - 1:
                per_stack = max(1, min(math.ceil(need[level] / app[-1]),
                                       cap_stack[level] // app[-1]))
                stack.append(per_stack * app[-1])
                fraction = min(1.0, stack[-1] / need[level])
        return app, stack

    def estimate(app, stack):
        return (fixed_bytes + sum(2 * s * node_bytes[l] for l, s in enumerate(stack))
                + max(a * work_bytes[l] for l, a in enumerate(app)))

    app, stack = derive()
    while estimate(app, stack) > budget_bytes:
        terms = [(2 * s * node_bytes[l], "stack", l) for l, s in enumerate(stack) if s > app[l]]
        terms += [(a * work_bytes[l], "app", l) for l, a in enumerate(app) if a > 1]
        if not terms:
            break
        _, kind, level = max(terms)
        if kind == "stack":
            cap_stack[level] = stack[level] // 2
        else:
            cap_app[level] = math.ceil(app[level] / 2)
        app, stack = derive()
    return TraversalPlan(split_level=int(np.argmax([o[0] >= 0 for o in owners])),
                         app_rows=tuple(app), stack_rows=tuple(stack),
                         estimated_bytes=int(estimate(app, stack)), budget_bytes=budget_bytes)

