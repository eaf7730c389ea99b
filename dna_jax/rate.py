"""Rate every candidate of a supernet block: prefix-shared, vmapped, chunked and sharded.

A candidate's rating is its distillation error against the teacher's block output, averaged
over R rating batches (REFERENCE.md section 3). Per rating batch r, with s the student block
output and t the teacher's:

  mse      = mean (s - t)^2                (the training loss)
  mse_var  = mse / var(t)
  rmse_var = sqrt(mse) / var(t)
  mae_rel  = mean |s - t| / mean |t|
  cl_loss  = mean |s - t| / std(t)         (a scale-free L1 error)

and each metric is the mean over the R batches. The original ranks candidates by `cl_loss`
(it makes blocks and cells comparable), so that is the default `rank_metric`; any of the five
can be chosen, and all five are saved.

BatchNorm (`bn_mode`):
  * 'recalibrate' (default, what the paper measured): per candidate, BN statistics are the
    batch statistics of one training-mode forward pass over a fixed recalibration batch;
    the rating batches then run in evaluation mode with those statistics. Variances are
    Flax's (biased); PyTorch's running variance is unbiased, a relative difference of
    1 / (elements per channel - 1), negligible at any real batch size.
  * 'batch': each rating batch is normalised by its own statistics (training-mode BN).

Prefix sharing. The candidates form a trie over layers: a node of level l is a distinct prefix
of l + 1 ops. The evaluator walks the trie depth first; at each level it applies each op once
to the stack of the parent activations that take it (`jax.vmap` of `SupernetBlock.apply_op`
with static layer and op), so no prefix is computed twice and no branch that no candidate
takes is computed. Leaves are reduced to their per-batch errors inside the same jitted call.
In 'recalibrate' mode a first walk over the recalibration batch computes every node's BN
statistics once (training mode, momentum 0, so the stored statistics are exactly the batch's);
the rating walk gathers each node's statistics and applies it in evaluation mode, so a node's
statistics are computed once and reused by all its descendants. A walk carries all rating
batches at once when they fit the memory budget, else groups of them (`passes`).

Memory and sharding. Stacks hold S_l prefixes of level l and every op application A_l rows;
`plan_traversal` picks them (deepest and largest terms first) so that the estimated live
activations of a walk stay under `memory_budget_bytes` per device. The prefix axis of every
stack is sharded over the mesh: each device owns whole subtrees below a `split_level` (the
levels above it are small and computed on every device), so every gather is device-local
(`jax.shard_map`) and no activations cross devices. Every jitted function has fixed shapes:
one compilation per (walk kind, level, op), one per stack packing and one for the root.

Outputs (`rate_blocks`): per block `<block>.npz` with `encodings`, `score`, `cost_params`,
`cost_macs`, `cost_dna_flops` (the keys `dna_jax.search.load_block_table` reads),
`metric_<name>` for every metric, `batch_mse` / `batch_mae` [N, R], and a `<block>.json`
summary (top-k, statistics, throughput, fingerprint). Both are written atomically; a block
whose summary matches the fingerprint of the run is skipped, so rating resumes block by block.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import artifacts
from dna_jax.costs import candidate_costs, conv_bn_costs, layer_costs
from dna_jax.models import cpu_conv
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.supernet import SupernetBlock
from dna_jax.netspec import conv_output_size
from dna_jax.space import SearchSpace

PyTree = Any
METRICS = ("mse", "mse_var", "rmse_var", "mae_rel", "cl_loss")
BN_MODES = ("recalibrate", "batch")
TABLE_FORMAT_VERSION = 1  # the `format_version` of dna_jax.search block tables
from dna_jax.compile_options import FAST_COMPILE as _FAST_COMPILE  # noqa: E402
_SPLIT_FACTOR = 4
_RATER_IDS = itertools.count()
_SHARED_FUNCTIONS: dict[tuple, tuple[dict, collections.Counter, int]] = {}  # a level is split over devices once it has this many nodes per device


def get_default_config() -> ml_collections.ConfigDict:
    """The `rate` config section.

    Fields:
      bn_mode: 'recalibrate' (BN statistics of each candidate from the recalibration batch,
        then evaluation mode; the paper's) or 'batch' (each rating batch normalised by its
        own statistics).
      rank_metric: the metric saved as `score` and used for the top-k: one of `METRICS`.
        Default 'cl_loss' = mean|s - t| / std(t), what the original ranks by.
      num_candidates: 0 rates every candidate of a block; n > 0 rates n distinct candidates
        sampled uniformly without replacement (seeded by `seed` and the block index).
      seed: sampling seed.
      memory_budget_bytes: estimated live activations per device during a walk; stacks and
        op applications are chunked to stay below it.
      rating_batches_per_pass: rating batches carried down the trie together; 0 = as many as
        fit the budget (all, if possible).
      top_k: candidates listed in the JSON summary.
      cost_resolution: image resolution of the child-network costs (0 = the space's).
      log_every_seconds: progress log period.
      max_traces: if > 0, every jitted function asserts it is traced at most this often
        (`chex.assert_max_traces`; tests).
      conv_impl: how convolutions run while rating (`dna_jax.models.cpu_conv`): 'xla'
        (XLA's convolutions), 'taps' (shifted slices and matmuls: same values, several times
        faster on XLA:CPU, whose grouped (depthwise) convolution is dense), or 'auto' ('taps'
        on the CPU backend, 'xla' elsewhere).
      fast_compile: compile with XLA's cheap backend options (several times faster to
        compile, slower to run): for tiny blocks, where compilation dominates (tests).
    """
    return ml_collections.ConfigDict(dict(
        bn_mode="recalibrate",
        rank_metric="cl_loss",
        num_candidates=0,
        seed=0,
        memory_budget_bytes=2 * 1024 ** 3,
        rating_batches_per_pass=0,
        top_k=10,
        cost_resolution=0,
        log_every_seconds=30.0,
        max_traces=0,
        conv_impl="auto",
        fast_compile=False,
    )).lock()


def check_config(config: Any) -> None:
    """Raises ValueError naming the bad field of a `rate` config."""
    if config.bn_mode not in BN_MODES:
        raise ValueError(f"rate.bn_mode must be one of {BN_MODES}, got {config.bn_mode!r}")
    if config.rank_metric not in METRICS:
        raise ValueError(f"rate.rank_metric must be one of {METRICS}, got "
                         f"{config.rank_metric!r}")
    if config.conv_impl not in cpu_conv.CONV_IMPLS:
        raise ValueError(f"rate.conv_impl must be one of {cpu_conv.CONV_IMPLS}, got "
                         f"{config.conv_impl!r}")
    if config.memory_budget_bytes <= 0:
        raise ValueError(f"rate.memory_budget_bytes must be positive, got "
                         f"{config.memory_budget_bytes}")
    for name in ("num_candidates", "rating_batches_per_pass", "max_traces", "top_k",
                 "cost_resolution"):
        if config[name] < 0:
            raise ValueError(f"rate.{name} must be >= 0, got {config[name]}")
    if config.log_every_seconds <= 0:
        raise ValueError(f"rate.log_every_seconds must be positive, got "
                         f"{config.log_every_seconds}")


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


# ---- the metrics -----------------------------------------------------------------------------


def teacher_batch_stats(targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per rating batch: var, std and mean |t| of the teacher output t [R, B, ..., C]
    (float64), and `constant_mse`: the mean squared error of the best CONSTANT predictor, the
    per-channel mean of t over all R batches (the baseline a candidate has to beat: a block
    whose best candidate does not is not rated by what it computes)."""
    targets = np.asarray(targets)
    channel_mean = targets.reshape(-1, targets.shape[-1]).mean(0, dtype=np.float64)
    var, std, mean_abs, constant = [], [], [], []
    for t in targets:
        t = np.asarray(t, np.float64)
        var.append(t.var())
        std.append(np.sqrt(var[-1]))
        mean_abs.append(np.abs(t).mean())
        constant.append(np.square(t - channel_mean).mean())
    return {"var": np.asarray(var), "std": np.asarray(std), "mean_abs": np.asarray(mean_abs),
            "constant_mse": np.asarray(constant)}


def fit_summary(mse_var: np.ndarray, constant_mse_var: float) -> dict[str, Any]:
    """How well a block's candidates fit the target, in units of var(target): the best,
    median and worst candidate's mse / var(t) against the constant predictor's (< 1: the
    per-channel mean explains part of the variance). `beats_constant` is False when even the
    best candidate is no better than predicting the per-channel mean."""
    mse_var = np.asarray(mse_var, np.float64)
    return {"best": float(mse_var.min()), "median": float(np.median(mse_var)),
            "worst": float(mse_var.max()), "constant": float(constant_mse_var),
            "beats_constant": bool(mse_var.min() < constant_mse_var)}


def combine_metrics(batch_mse: np.ndarray, batch_mae: np.ndarray,
                    teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every metric of `METRICS` from per-batch errors [N, R]: the mean over the R batches of
    the per-batch values (see the module docstring)."""
    mse, mae = np.asarray(batch_mse, np.float64), np.asarray(batch_mae, np.float64)
    return {
        "mse": mse.mean(1),
        "mse_var": (mse / teacher["var"]).mean(1),
        "rmse_var": (np.sqrt(mse) / teacher["var"]).mean(1),
        "mae_rel": (mae / teacher["mean_abs"]).mean(1),
        "cl_loss": (mae / teacher["std"]).mean(1),
    }


def _batch_errors(student: jax.Array, target: jax.Array) -> jax.Array:
    """student [A, G, B, ...] vs target [G, B, ...] -> [A, G, 2]: (mean sq., mean abs.) error."""
    diff = student.astype(jnp.float32) - target.astype(jnp.float32)[None]
    axes = tuple(range(2, diff.ndim))
    return jnp.stack([jnp.mean(jnp.square(diff), axes), jnp.mean(jnp.abs(diff), axes)], -1)


@dataclasses.dataclass(frozen=True, eq=False)
class LeafReduction:
    """How the evaluator reduces a candidate's block output at a leaf of the trie.

    The default compares the output with the teacher's (`TEACHER_ERRORS`); DNA++
    (`dna_jax.ssl`) plugs in projection heads and a self-supervised loss instead.

    Attributes:
      name: identifies `fn` in the compile cache: two reductions with the same name must
        compute the same function (encode any static setting of `fn` in it).
      fn: `(y [A, G, B, ...] block outputs, target [G, ...] the walk's slice of the rating
        targets, params) -> float32 [A, G, M]`, M values per candidate and rating batch.
      params: a pytree of arrays `fn` reads (replicated on the mesh), e.g. head weights.
    """

    name: str
    fn: Callable[[jax.Array, jax.Array, PyTree], jax.Array]
    params: PyTree = None


TEACHER_ERRORS = LeafReduction("teacher_errors", lambda y, t, params: _batch_errors(y, t))


# ---- the result of rating one block ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BlockRating:
    """Ratings of a set of candidates of one block (rows follow `encodings`).

    Attributes:
      encodings: int32 [N, L].
      batch_mse, batch_mae: [N, R] per-rating-batch errors.
      metrics: metric name -> [N] (see `METRICS`).
      rank_metric: the metric used as the score.
      info: how it was computed (mode, plan, applications, wall time).
    """

    encodings: np.ndarray
    batch_mse: np.ndarray
    batch_mae: np.ndarray
    metrics: Mapping[str, np.ndarray]
    rank_metric: str
    info: Mapping[str, Any]

    @property
    def score(self) -> np.ndarray:
        return self.metrics[self.rank_metric]

    def __len__(self) -> int:
        return len(self.encodings)


def _finish_rating(encodings, batch_mse, batch_mae, targets, rank_metric, info) -> BlockRating:
    stats = teacher_batch_stats(targets)
    metrics = combine_metrics(batch_mse, batch_mae, stats)
    info = {**info, "fit_mse_var": fit_summary(
        metrics["mse_var"], float((stats["constant_mse"] / stats["var"]).mean()))}
    return BlockRating(np.asarray(encodings, np.int32), batch_mse, batch_mae, metrics,
                       rank_metric, info)


def _check_targets(inputs: np.ndarray, targets: np.ndarray, out_shape: Sequence[int],
                   block_index: int) -> None:
    """Raises ValueError unless targets are [R, B, *block output shape] like the inputs."""
    expected = (*inputs.shape[:2], *out_shape)
    if tuple(targets.shape) != expected:
        raise ValueError(f"block {block_index}: targets have shape {targets.shape}, but inputs "
                         f"{inputs.shape} give block outputs of shape {expected} "
                         f"([R, B, H, W, C] with the teacher stage's width)")


def _as_batches(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 5:
        raise ValueError(f"{name} must be [R, B, H, W, C] (R batches of B examples), "
                         f"got shape {x.shape}")
    return x


# ---- the prefix-shared evaluator ---------------------------------------------------------------


class _Walk:
    """Mutable state of one walk over the trie (one pass of batches)."""

    def __init__(self, kind: str, plan: TraversalPlan, variables: PyTree,
                 stats_tables: dict | None = None, targets: jax.Array | None = None):
        self.kind = kind
        self.plan = plan
        self.variables = variables
        self.stats_tables = stats_tables
        self.targets = targets
        self.stat_records: dict[tuple[int, int], list] = collections.defaultdict(list)
        self.leaf_records: list = []


class BlockRater:
    """Rates candidates of one supernet block with prefix sharing (see the module docstring).

    Raters of the same block, mesh and compile options share their compiled functions, so
    rating the same block again with the same shapes compiles nothing.

    Args:
      block: the supernet block.
      variables: its {'params', 'batch_stats'}.
      config: a `rate` config (see `get_default_config`).
      mesh: devices to shard the prefix axis over (default: all devices, one axis 'data');
        every axis of the mesh splits the prefixes.
    """

    def __init__(self, block: SupernetBlock, variables: PyTree, config: Any = None,
                 mesh: Mesh | None = None, leaf: LeafReduction = TEACHER_ERRORS):
        self.block = block
        self.leaf = leaf
        self.config = config if config is not None else get_default_config()
        check_config(self.config)
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.devices()), ("data",))
        self.num_devices = self.mesh.devices.size
        self._rows = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
        self._replicated = NamedSharding(self.mesh, P())
        recal_config = dataclasses.replace(block.config, bn_momentum=0.0)
        self._recal_block = block.clone(config=recal_config)
        self.variables = jax.device_put(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]},
            self._replicated)
        self.leaf_params = jax.device_put(leaf.params, self._replicated)
        # Raters of the same block, mesh and compile options share their jitted functions
        # (leaf functions also need the same leaf reduction).
        signature = (block.space, block.block_index, block.in_channels, block.config,
                     self.mesh, self.config.conv_impl, self.config.fast_compile,
                     self.config.max_traces)
        if signature not in _SHARED_FUNCTIONS:
            _SHARED_FUNCTIONS[signature] = ({}, collections.Counter(), next(_RATER_IDS))
        self._functions, self.trace_counts, self._uid = _SHARED_FUNCTIONS[signature]
        self.counters: collections.Counter = collections.Counter()

    # -- public entry point --

    def rate(self, inputs: Any, targets: Any, recal_inputs: Any = None,
             encodings: np.ndarray | None = None) -> BlockRating:
        """Rates `encodings` (default: every candidate of the block) against the teacher.

        Args:
          inputs: [R, B, H, W, C] block inputs of the R rating batches (images for block 0,
            else the teacher's stage `teacher_stage - 1` output).
          targets: [R, B, H', W', C'] the teacher's stage `teacher_stage` output.
          recal_inputs: [B_r, H, W, C] block input of the recalibration batch ('recalibrate'
            mode only).
          encodings: int [N, L] candidates (duplicates allowed; rows keep their order).

        Returns:
          A BlockRating whose rows follow `encodings`.
        """
        if self.leaf is not TEACHER_ERRORS:
            raise ValueError(f"BlockRater.rate compares with a teacher; this rater reduces "
                             f"leaves with {self.leaf.name!r}: use evaluate_leaves")
        inputs, targets = _as_batches(inputs, "inputs"), _as_batches(targets, "targets")
        encodings, values, info = self.evaluate_leaves(inputs, targets, recal_inputs,
                                                       encodings)
        return _finish_rating(encodings, values[..., 0], values[..., 1], targets,
                              self.config.rank_metric, info)

    def evaluate_leaves(self, inputs: Any, targets: Any, recal_inputs: Any = None,
                        encodings: np.ndarray | None = None,
                        accumulate: Callable[[np.ndarray, int, np.ndarray], None] | None = None
                        ) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """The prefix-shared walk with the rater's leaf reduction (see `LeafReduction`).

        Args:
          inputs, recal_inputs, encodings: as in `rate`.
          targets: [R, ...] what the leaf reduction compares with, one entry per rating
            batch (the teacher's block output for `TEACHER_ERRORS`).
          accumulate: if given, called as `accumulate(ids, first_batch, values)` with the
            leaf values float [n, G, M] of n distinct candidates (`ids` index the sorted
            unique encodings) for rating batches first_batch.. first_batch + G - 1, instead
            of collecting them; for reductions over candidates (e.g. a population mean).

        Returns:
          (encodings int32 [N, L], values float64 [N, R, M] with rows following `encodings`
           (None with `accumulate`), info: what the rating did).
        """
        start = time.perf_counter()
        space, b = self.block.space, self.block.block_index
        inputs = _as_batches(inputs, "inputs")
        targets = np.asarray(targets)
        if encodings is None:
            encodings = space.block_candidates(b)
        encodings = np.asarray(encodings)
        trie, inverse = build_trie(encodings)
        for l in range(trie.num_layers):
            illegal = set(trie.level_ops(l)) - set(space.layer_choices(b, l))
            if illegal:
                raise ValueError(f"block {b}, layer {l}: illegal op indices {sorted(illegal)}")
        owners = assign_owners(trie, split_level(trie, self.num_devices), self.num_devices)
        root, root_macs, root_work, levels = block_shapes(self.block, inputs.shape[2:])
        if self.leaf is TEACHER_ERRORS:
            _check_targets(inputs, targets, levels[-1].out_shape, b)
        elif len(targets) != len(inputs):
            raise ValueError(f"block {b}: {len(targets)} target entries for {len(inputs)} "
                             "rating batches")
        self.counters.clear()
        stats = None
        if self.config.bn_mode != "recalibrate":
            recal_inputs = None
        else:
            if recal_inputs is None:
                raise ValueError("bn_mode 'recalibrate' needs recal_inputs (the block input of "
                                 "the recalibration batch)")
            recal_inputs = np.asarray(recal_inputs)
            stats = self._recalibrate(trie, owners, recal_inputs, root, root_work, levels)
        values, rate_plan, group = self._rate_passes(
            trie, owners, inputs, targets, stats, root, root_work, levels, accumulate)
        seconds = time.perf_counter() - start
        info = self._info(trie, levels, root_macs, rate_plan, group, inputs.shape[1],
                          len(inputs), 0 if recal_inputs is None else len(recal_inputs), seconds)
        rows = None if values is None else values[inverse]
        return trie.encodings[inverse], rows, info

    # -- the two walks --

    def _recalibrate(self, trie, owners, recal_inputs, root, root_work, levels) -> tuple:
        """Walk over the recalibration batch: every node's BN statistics, computed once."""
        rows = recal_inputs.shape[0]
        item = jnp.dtype(self.block.config.dtype).itemsize
        plan = plan_traversal(
            trie, owners, self.num_devices,
            [rows * item * int(np.prod(s.out_shape)) for s in levels[:-1]],
            [rows * max(s.work_bytes.values()) for s in levels],
            recal_inputs.nbytes + rows * (root_work + item * int(np.prod(root))),
            self.config.memory_budget_bytes)
        self._check_plan(plan, "recalibration walk")
        start = time.perf_counter()
        x = jax.device_put(recal_inputs, self._replicated)
        root_stack, root_stats = self._function("recal", "root")(self.variables, x)
        walk = _Walk("recal", plan, self.variables)
        self._descend(walk, trie, owners, 0, root_stack, np.zeros((self.num_devices, 1), int))
        tables = self._stats_tables(trie, walk.stat_records)
        logging.info("block%d: BN statistics of %d trie nodes recalibrated in %.1f s",
                     self.block.block_index, sum(map(len, trie.op)), time.perf_counter() - start)
        return root_stats, tables

    def _rate_passes(self, trie, owners, inputs, targets, stats, root, root_work, levels,
                     accumulate=None):
        """Walks over the rating batches, `G` batches per walk; returns the leaf values
        [N, R, M] (None when `accumulate` takes them), the plan and G."""
        num_batches, batch = inputs.shape[:2]
        plan, group = self._rate_plan(trie, owners, inputs, targets, root, root_work, levels)
        kind = "eval" if stats is not None else "train"
        variables = self.variables
        if stats is not None:
            variables = {"params": self.variables["params"], "batch_stats": stats[0]}
        collected: list[np.ndarray] = []

        def collect(ids, first, values):
            if not collected:
                collected.append(np.zeros((len(trie.encodings), num_batches,
                                           values.shape[-1]), np.float64))
            collected[0][ids, first:first + values.shape[1]] = values

        accumulate = accumulate or collect
        passes = math.ceil(num_batches / group)
        progress = _Progress(self.block.block_index, len(trie.encodings) * passes,
                             self.config.log_every_seconds)
        for p in range(passes):
            chosen = np.minimum(np.arange(p * group, (p + 1) * group), num_batches - 1)
            x = jax.device_put(inputs[chosen], self._replicated)
            t = jax.device_put(targets[chosen], self._replicated)
            walk = _Walk(kind, plan, variables, stats[1] if stats else None, t)
            walk.progress = progress
            root_stack = self._function(kind, "root")(variables, x)
            self._descend(walk, trie, owners, 0, root_stack,
                          np.zeros((self.num_devices, 1), int))
            real = min(group, num_batches - p * group)
            for ids, values in walk.leaf_records:
                ids, values = ids.reshape(-1), _to_host(values)
                valid = ids >= 0
                if valid.any():
                    accumulate(ids[valid], p * group, values[valid, :real])
        progress.done()
        return (collected[0] if collected else None), plan, group

    def _rate_plan(self, trie, owners, inputs, targets, root, root_work, levels):
        """The largest number of rating batches per walk (<= the config's) that fits."""
        num_batches, batch = inputs.shape[:2]
        item = jnp.dtype(self.block.config.dtype).itemsize
        group = self.config.rating_batches_per_pass or num_batches
        group = min(group, num_batches)
        while True:
            rows = group * batch
            target_bytes = rows * int(np.prod(targets.shape[2:])) * 4
            plan = plan_traversal(
                trie, owners, self.num_devices,
                [rows * item * int(np.prod(s.out_shape)) for s in levels[:-1]],
                [rows * max(s.work_bytes.values()) for s in levels],
                rows * (int(np.prod(inputs.shape[2:])) * inputs.itemsize + root_work
                        + item * int(np.prod(root))) + target_bytes,
                self.config.memory_budget_bytes)
            if plan.fits or group == 1:
                break
            group = math.ceil(group / 2)
        self._check_plan(plan, f"rating walk ({group} batches per walk)")
        return plan, group

    def _check_plan(self, plan: TraversalPlan, what: str) -> None:
        logging.info("block%d %s: stacks %s, applications %s prefixes per device, about "
                     "%.0f MiB", self.block.block_index, what, plan.stack_rows, plan.app_rows,
                     plan.estimated_bytes / 2 ** 20)
        if not plan.fits:
            logging.warning("block%d %s: the smallest chunks need about %.0f MiB per device, "
                            "over the memory budget of %.0f MiB", self.block.block_index, what,
                            plan.estimated_bytes / 2 ** 20, plan.budget_bytes / 2 ** 20)

    # -- the depth-first walk --

    def _descend(self, walk: _Walk, trie: CandidateTrie, owners, level: int,
                 stack: jax.Array, rows: np.ndarray) -> None:
        """Applies every op of `level` to the parents in `stack` (node ids `rows` [D, S] of
        level - 1, -1 for padding) and recurses into the children, stack by stack."""
        leaf = level == trie.num_layers - 1
        app_rows = walk.plan.app_rows[level]
        per_stack = 0 if leaf else walk.plan.stack_rows[level] // app_rows
        pending, pending_ids = [], []
        for op, per_device in self._children_by_op(trie, owners, level, rows):
            count = max(len(children) for _, children in per_device)
            for first in range(0, count, app_rows):
                index = np.zeros((self.num_devices, app_rows), np.int32)
                ids = np.full((self.num_devices, app_rows), -1, np.int64)
                for d, (parents, children) in enumerate(per_device):
                    chunk = slice(first, first + app_rows)
                    index[d, :len(parents[chunk])] = parents[chunk]
                    ids[d, :len(children[chunk])] = children[chunk]
                out = self._apply(walk, trie, level, op, leaf, stack, index, ids)
                if leaf:
                    continue
                pending.append(out)
                pending_ids.append(ids)
                if len(pending) == per_stack:
                    self._pack_and_descend(walk, trie, owners, level, pending, pending_ids)
        if pending:
            self._pack_and_descend(walk, trie, owners, level, pending, pending_ids)

    def _pack_and_descend(self, walk, trie, owners, level, pending, pending_ids) -> None:
        per_stack = walk.plan.stack_rows[level] // walk.plan.app_rows[level]
        filler = np.full_like(pending_ids[0], -1)
        outputs = pending + [pending[-1]] * (per_stack - len(pending))
        ids = np.concatenate(pending_ids + [filler] * (per_stack - len(pending)), axis=1)
        pending.clear()
        pending_ids.clear()
        stack = self._function(walk.kind, "pack", level)(tuple(outputs))
        del outputs
        stack.block_until_ready()  # bounds the work queued ahead of the device
        self._descend(walk, trie, owners, level + 1, stack, ids)

    def _children_by_op(self, trie, owners, level, rows):
        """[(op, [(parent positions, child ids) per device])] for the parents in `rows`."""
        owner = owners[level]
        per_device = []
        for d in range(self.num_devices):
            positions = np.nonzero(rows[d] >= 0)[0]
            parents = rows[d][positions]
            start, stop = trie.child_start[level][parents], trie.child_start[level][parents + 1]
            counts = stop - start
            children = (np.repeat(stop - counts.cumsum(), counts)
                        + np.arange(counts.sum())) if counts.sum() else np.zeros(0, np.int64)
            parent_pos = np.repeat(positions, counts)
            if len(owner) and owner[0] >= 0:
                mine = owner[children] == d
                children, parent_pos = children[mine], parent_pos[mine]
            per_device.append((parent_pos, children))
        result = []
        for op in trie.level_ops(level):
            groups = [(p[trie.op[level][c] == op], c[trie.op[level][c] == op])
                      for p, c in per_device]
            if any(len(c) for _, c in groups):
                result.append((op, groups))
        return result

    def _apply(self, walk: _Walk, trie, level, op, leaf, stack, index, ids) -> jax.Array | None:
        """One op application: `op` of layer `level` on the parent rows `index` [D, A]."""
        function = self._function(walk.kind, "apply", level, op, leaf)
        index_array = self._put_rows(index)
        self.counters["applications"] += 1
        self.counters[f"rows_{walk.kind}_{level}_{op}"] += index.size
        self.counters[f"valid_{walk.kind}_{level}_{op}"] += int((ids >= 0).sum())
        if walk.kind == "recal":
            out = function(walk.variables, stack, index_array)
            stats, child = (out, None) if leaf else (out[1], out[0])
            walk.stat_records[(level, op)].append((ids, stats))
            return child
        args = [walk.variables, stack, index_array]
        if walk.kind == "eval":
            group_rows = trie.group_index[level][np.maximum(ids, 0)].astype(np.int32)
            args += [walk.stats_tables[(level, op)], self._put_rows(group_rows)]
        if leaf:
            out = function(*args, walk.targets, self.leaf_params)
            walk.leaf_records.append((ids, out))
            walk.progress.update(int((ids >= 0).sum()), out)
            return None
        return function(*args)

    def _stats_tables(self, trie, records) -> dict:
        """(level, op) -> replicated BN statistics [nodes of the level with that op, ...]."""
        tables = {}
        for (level, op), entries in records.items():
            host = [(ids.reshape(-1), jax.tree.map(_to_host, stats)) for ids, stats in entries]
            size = trie.group_size(level, op)
            table = jax.tree.map(lambda x: np.zeros((size, *x.shape[1:]), x.dtype), host[0][1])
            for ids, stats in host:
                valid = ids >= 0
                rank = trie.group_index[level][ids[valid]]
                for target, source in zip(jax.tree.leaves(table), jax.tree.leaves(stats)):
                    target[rank] = source[valid]
            tables[(level, op)] = jax.device_put(table, self._replicated)
        return tables

    def _put_rows(self, rows: np.ndarray) -> jax.Array:
        flat = np.ascontiguousarray(rows.reshape(-1))
        return jax.make_array_from_callback(flat.shape, self._rows, lambda i: flat[i])

    # -- the jitted functions --

    def _function(self, kind: str, part: str, level: int = -1, op: int = -1,
                  leaf: bool = False) -> Callable:
        key = (kind, part, level, op, leaf) + ((self.leaf.name,) if leaf else ())
        if key not in self._functions:
            body, in_specs, out_specs = self._body(kind, part, level, op, leaf)
            body = cpu_conv.with_tap_convs(body, self.config.conv_impl)

            def counted(*args, key=key, body=body):
                self.trace_counts[key] += 1
                return body(*args)

            if self.config.max_traces:
                import chex  # pylint: disable=import-outside-toplevel
                # chex counts traces per (definition site, name): one name per rater and key.
                counted.__name__ = "rate_" + "_".join(map(str, (self._uid, *key)))
                counted = chex.assert_max_traces(counted, n=self.config.max_traces)
            mapped = jax.shard_map(counted, mesh=self.mesh, in_specs=in_specs,
                                   out_specs=out_specs)
            options = _FAST_COMPILE if self.config.fast_compile else None
            self._functions[key] = jax.jit(mapped, compiler_options=options)
        return self._functions[key]

    def _body(self, kind, part, level, op, leaf):
        rows, rep = P(tuple(self.mesh.axis_names)), P()
        if part == "root":
            return self._root_body(kind), (rep, rep), ((rows, rep) if kind == "recal" else rows)
        if part == "pack":
            return (lambda outputs: jnp.concatenate(outputs, axis=0)), (rows,), rows
        return self._op_body(kind, level, op, leaf, rows, rep)

    def _root_body(self, kind: str) -> Callable:
        """`prepare_input` once per walk (block 0: the student stem): a stack of one prefix."""
        block, recal_block = self.block, self._recal_block
        prepare = SupernetBlock.prepare_input

        def recal(variables, x):  # x [B_r, ...] -> ([1, B_r, ...], batch_stats)
            y, updates = recal_block.apply(variables, x, True, method=prepare,
                                           mutable=["batch_stats"])
            return y[None], {**variables["batch_stats"], **updates["batch_stats"]}

        def evaluate(variables, x):  # x [G, B, ...] -> [1, G, B, ...]
            y = block.apply(variables, x.reshape(-1, *x.shape[2:]), False, method=prepare)
            return y.reshape(1, *x.shape[:2], *y.shape[1:])

        def train(variables, x):
            def one(batch):
                return block.apply(variables, batch, True, method=prepare,
                                   mutable=["batch_stats"])[0]
            return jax.vmap(one)(x)[None]

        return {"recal": recal, "eval": evaluate, "train": train}[kind]

    def _op_body(self, kind, level, op, leaf, rows, rep):
        """The shard_map body of one op application, its in_specs and out_specs."""
        block, recal_block = self.block, self._recal_block
        apply_op = SupernetBlock.apply_op
        reduce_leaf = self.leaf.fn
        branch = self.block.space.layer_choices(self.block.block_index, level).index(op)
        layer_key, op_key = f"layers_{level}", f"ops_{branch}"

        if kind == "recal":
            def one(variables, x):
                y, updates = recal_block.apply(variables, x, level, op, True, method=apply_op,
                                               mutable=["batch_stats"])
                return y, updates["batch_stats"].get(layer_key, {}).get(op_key, {})

            def body(variables, stack, index):  # -> ([A, B_r, ...],) [A, stats]
                y, stats = jax.vmap(one, in_axes=(None, 0))(variables, stack[index])
                return stats if leaf else (y, stats)

            return body, (rep, rows, rows), (rows if leaf else (rows, rows))

        if kind == "eval":
            def one(variables, x, stats):
                batch_stats = dict(variables["batch_stats"])
                batch_stats[layer_key] = {**batch_stats.get(layer_key, {}), op_key: stats}
                return block.apply({"params": variables["params"], "batch_stats": batch_stats},
                                   x, level, op, False, method=apply_op)

            def body(variables, stack, index, table, group_rows, *target):
                x = stack[index]  # [A, G, B, ...]
                stats = jax.tree.map(lambda t: t[group_rows], table)
                y = jax.vmap(one, in_axes=(None, 0, 0))(
                    variables, x.reshape(x.shape[0], -1, *x.shape[3:]), stats)
                y = y.reshape(*x.shape[:3], *y.shape[2:])
                return reduce_leaf(y, *target) if leaf else y

            in_specs = (rep, rows, rows, rep, rows) + ((rep, rep) if leaf else ())
            return body, in_specs, rows

        def one_batch(variables, x):
            return block.apply(variables, x, level, op, True, method=apply_op,
                               mutable=["batch_stats"])[0]

        def body(variables, stack, index, *target):  # batch-statistics BN
            y = jax.vmap(jax.vmap(one_batch, in_axes=(None, 0)), in_axes=(None, 0))(
                variables, stack[index])
            return reduce_leaf(y, *target) if leaf else y

        return body, (rep, rows, rows) + ((rep, rep) if leaf else ()), rows

    # -- reporting --

    def _info(self, trie, levels, root_macs, plan, group, batch, num_batches, recal_rows,
              seconds) -> dict:
        """What the rating did: calls, prefix rows executed, multiply-adds against naive."""
        walks = math.ceil(num_batches / group)
        executed = {"recal": 0, "rate": 0}
        for key, count in self.counters.items():
            if key.startswith("rows_"):
                _, kind, level, op = key.split("_")
                part = "recal" if kind == "recal" else "rate"
                executed[part] += count * levels[int(level)].macs[int(op)]
        executed["rate"] = (executed["rate"] + walks * self.num_devices * root_macs) * group * batch
        executed["recal"] = (executed["recal"] + self.num_devices * root_macs) * recal_rows
        shared = root_macs + sum(levels[l].macs[int(o)] for l in range(trie.num_layers)
                                 for o in trie.op[l])
        naive = sum(root_macs + sum(levels[l].macs[int(o)] for l, o in enumerate(row))
                    for row in trie.encodings)
        return {
            "bn_mode": self.config.bn_mode, "devices": self.num_devices,
            "candidates": int(len(trie.encodings)), "seconds": seconds,
            "candidates_per_second": len(trie.encodings) / seconds,
            "rating_batches": num_batches, "batch_size": batch,
            "recalibration_batch_size": recal_rows,
            "rating_batches_per_walk": group, "walks": walks,
            "split_level": plan.split_level, "app_rows": list(plan.app_rows),
            "stack_rows": list(plan.stack_rows), "estimated_bytes": plan.estimated_bytes,
            "trie_nodes": int(sum(trie.level_size(l) for l in range(trie.num_layers))),
            "naive_op_applications": int(trie.encodings.size),
            "jitted_calls": int(self.counters["applications"]),
            "macs_executed": int(executed["rate"] + executed["recal"]),
            "macs_needed": int(shared * (batch * num_batches + recal_rows)),
            "naive_macs": int(naive * (batch * num_batches + recal_rows)),
        }


class _Progress:
    """Candidates rated, candidates/s and ETA, logged every `every` seconds."""

    def __init__(self, block_index: int, total: int, every: float):
        self.block_index, self.total, self.every = block_index, total, every
        self.count = 0
        self.start = self.last = time.perf_counter()

    def update(self, count: int, latest: jax.Array) -> None:
        self.count += count
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        latest.block_until_ready()  # what was dispatched is done: the rate is real
        now = time.perf_counter()
        self.last = now
        rate = self.count / (now - self.start)
        logging.info("block%d: %d/%d candidate walks, %.1f candidates/s, ETA %.0f s",
                     self.block_index, self.count, self.total, rate,
                     (self.total - self.count) / max(rate, 1e-9))

    def done(self) -> None:
        seconds = time.perf_counter() - self.start
        logging.info("block%d: %d candidate walks in %.1f s (%.1f candidates/s)",
                     self.block_index, self.count, seconds, self.count / max(seconds, 1e-9))


def _to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process."""
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- the naive reference -------------------------------------------------------------------


def naive_errors_function(block: SupernetBlock, bn_mode: str = "recalibrate",
                          conv_impl: str = "auto") -> Callable:
    """The jitted whole-path forward of one candidate: `(variables, choices [L], x [R, B, ...],
    t [R, B, ...], recal_x [B_r, ...]) -> [R, 2]` (per batch: mean squared, mean abs error)."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    recal_block = block.clone(config=dataclasses.replace(block.config, bn_momentum=0.0))

    @jax.jit
    @functools.partial(cpu_conv.with_tap_convs, impl=conv_impl)
    def errors(variables, choices, x, t, recal_x):
        if bn_mode == "recalibrate":
            _, updates = recal_block.apply(variables, recal_x, choices, True,
                                           mutable=["batch_stats"])
            stats = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
            y = jax.vmap(lambda b: block.apply(stats, b, choices, False))(x)
        else:
            y = jax.vmap(lambda b: block.apply(variables, b, choices, True,
                                               mutable=["batch_stats"])[0])(x)
        return _batch_errors(y[None], t)[0]

    return errors


def rate_naive(block: SupernetBlock, variables: PyTree, inputs: Any, targets: Any,
               encodings: np.ndarray, bn_mode: str = "recalibrate", recal_inputs: Any = None,
               rank_metric: str = "cl_loss", conv_impl: str = "auto") -> BlockRating:
    """One jitted whole-path forward per candidate and batch (`SupernetBlock.__call__`).

    The reference the prefix-shared evaluator must equal, and the baseline of its benchmark.
    """
    inputs, targets = _as_batches(inputs, "inputs"), _as_batches(targets, "targets")
    errors = naive_errors_function(block, bn_mode, conv_impl)
    recal_x = jnp.asarray(recal_inputs if recal_inputs is not None else inputs[0])
    x, t = jnp.asarray(inputs), jnp.asarray(targets)
    out = np.stack([np.asarray(errors(variables, jnp.asarray(row, jnp.int32), x, t, recal_x))
                    for row in np.asarray(encodings)]).astype(np.float64)
    return _finish_rating(encodings, out[..., 0], out[..., 1], targets, rank_metric,
                          {"bn_mode": bn_mode, "naive": True})


# ---- teacher features ------------------------------------------------------------------------


def teacher_block_io(teacher: EfficientNet, teacher_variables: PyTree, space: SearchSpace,
                     images: Any, block_indices: Sequence[int] | None = None
                     ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Inputs and targets of blocks from the frozen teacher (inference-mode BN).

    Args:
      teacher: the teacher network (`forward_stages` gives its stage outputs).
      teacher_variables: its variables.
      space: the search space (each block names its `teacher_stage`).
      images: [R, B, H, W, C] (R batches) or [B, H, W, C] (one batch).
      block_indices: blocks wanted (default: all).

    Returns:
      block index -> (input, target) as numpy, batch axes as in `images`: the input is the
      image for block 0 and the teacher's stage `teacher_stage - 1` output otherwise; the target
      is the output of stage `teacher_stage`.
    """
    images = np.asarray(images)
    single = images.ndim == 4
    batches = images[None] if single else images
    block_indices = list(range(len(space.blocks))) if block_indices is None else block_indices
    stop = max(space.blocks[k].teacher_stage for k in block_indices) + 1
    forward = jax.jit(lambda v, x: teacher.apply(v, x, 0, stop, False,
                                                 method=EfficientNet.forward_stages))
    features = [jax.device_get(forward(teacher_variables, jnp.asarray(x))) for x in batches]
    result = {}
    for k in block_indices:
        stage = space.blocks[k].teacher_stage
        inputs = batches if k == 0 else np.stack([f[f"stage{stage - 1}"] for f in features])
        targets = np.stack([f[f"stage{stage}"] for f in features]).astype(np.float32)
        result[k] = (inputs[0], targets[0]) if single else (inputs, targets)
    return result


# ---- files: tables, summaries, resume --------------------------------------------------------


def save_rating(path_prefix: str, rating: BlockRating, space: SearchSpace, block_index: int,
                fingerprint: str = "", top_k: int = 10, cost_resolution: int = 0
                ) -> tuple[str, str]:
    """Writes `<prefix>.npz` (the block table) then `<prefix>.json` (summary), atomically.

    Returns:
      (npz path, json path).
    """
    costs = candidate_costs(space, block_index, rating.encodings, cost_resolution or None)
    arrays = {"encodings": rating.encodings, "score": rating.score,
              "format_version": np.asarray(TABLE_FORMAT_VERSION),
              "score_metric": np.asarray(rating.rank_metric),
              "batch_mse": rating.batch_mse, "batch_mae": rating.batch_mae}
    arrays.update({f"cost_{name}": values for name, values in costs.items()})
    arrays.update({f"metric_{name}": values for name, values in rating.metrics.items()})
    npz, summary = f"{path_prefix}.npz", f"{path_prefix}.json"
    artifacts.write_npz(npz, **arrays)
    artifacts.write_json(summary, rating_summary(rating, space, block_index, costs, fingerprint,
                                                 top_k))
    return npz, summary


def warn_if_unfit(block_name: str, fit: Mapping[str, Any]) -> bool:
    """Logs a warning naming the block if its best candidate does not beat the constant
    predictor (its scores then measure noise, not what the candidates compute); returns
    whether it warned."""
    if fit["beats_constant"]:
        return False
    logging.warning(
        "%s: the best candidate's mse / var(target) is %.3f, no better than the constant "
        "predictor's %.3f: this block's scores do not say which candidate computes the target "
        "better (too few recalibration images? an undertrained supernet?). Consider "
        "search.unfit_blocks='exclude'.", block_name, fit["best"], fit["constant"])
    return True


def rating_summary(rating: BlockRating, space: SearchSpace, block_index: int,
                   costs: Mapping[str, np.ndarray], fingerprint: str = "",
                   top_k: int = 10) -> dict:
    """Top-k candidates, per-metric statistics and rank correlations with the score."""
    order = np.argsort(rating.score, kind="stable")
    ranks = {name: _ranks(values) for name, values in rating.metrics.items()}
    top = [{"rank": r + 1, "encoding": rating.encodings[i].tolist(),
            "ops": [space.op_name(int(o)) for o in rating.encodings[i]],
            "score": float(rating.score[i]),
            "metrics": {n: float(v[i]) for n, v in rating.metrics.items()},
            "costs": {n: int(v[i]) for n, v in costs.items()}}
           for r, i in enumerate(order[:top_k])]
    return {
        "block": block_index, "name": space.blocks[block_index].name, "space": space.name,
        "candidates": len(rating), "rank_metric": rating.rank_metric,
        "fingerprint": fingerprint, "rating": dict(rating.info),
        "metrics": {name: {"min": float(v.min()), "max": float(v.max()),
                           "mean": float(v.mean()), "std": float(v.std()),
                           "median": float(np.median(v))}
                    for name, v in rating.metrics.items()},
        "spearman_with_score": {name: _correlation(ranks[name], ranks[rating.rank_metric])
                                for name in ranks},
        "top_k": top,
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 1.0
    return float(np.corrcoef(a, b)[0, 1])


def block_fit(out_dir: str, block_name: str) -> dict | None:
    """A rated block's `fit_summary` from its JSON summary (None if absent: e.g. a table
    written by an older version)."""
    path = os.path.join(out_dir, f"{block_name}.json")
    if not os.path.exists(path):
        return None
    return artifacts.read_json(path).get("rating", {}).get("fit_mse_var")


def load_rating(path_prefix: str) -> BlockRating:
    """Reads a rating written by `save_rating`."""
    summary = artifacts.read_json(f"{path_prefix}.json")
    with np.load(f"{path_prefix}.npz", allow_pickle=False) as data:
        metrics = {k.removeprefix("metric_"): data[k] for k in data.files
                   if k.startswith("metric_")}
        return BlockRating(data["encodings"], data["batch_mse"], data["batch_mae"], metrics,
                           str(data["score_metric"]), summary.get("rating", {}))


def tree_digest(tree: PyTree) -> str:
    """A short hash of the values of a pytree of arrays."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(value.dtype).encode() + str(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def rating_fingerprint(config: Any, space: SearchSpace, block_index: int,
                       encodings: np.ndarray, variables_digest: str, data_digest: str) -> str:
    """What a block's rating depends on; a saved rating with the same one is reused."""
    fields = {k: config[k] for k in ("bn_mode", "rank_metric", "num_candidates", "seed",
                                     "cost_resolution")}
    return artifacts.config_hash(fields, space.name, block_index, tree_digest(encodings),
                                 variables_digest, data_digest)


def rating_complete(path_prefix: str, fingerprint: str) -> bool:
    """Both files exist, the table is readable and the summary has this fingerprint."""
    try:
        summary = artifacts.read_json(f"{path_prefix}.json")
        with np.load(f"{path_prefix}.npz", allow_pickle=False) as data:
            readable = {"encodings", "score", "batch_mse"} <= set(data.files)
    except (OSError, ValueError):
        return False
    return readable and summary.get("fingerprint") == fingerprint


def rate_blocks(space: SearchSpace, blocks: Sequence[SupernetBlock],
                variables: Mapping[str, PyTree], teacher: EfficientNet,
                teacher_variables: PyTree, rating_images: Any, recal_images: Any,
                config: Any, out_dir: str, block_indices: Sequence[int] | None = None,
                mesh: Mesh | None = None) -> list[tuple[str, str]]:
    """Rates the candidates of every block (or `block_indices`) and writes their files.

    Args:
      space: the search space.
      blocks: the supernet blocks (`build_supernet_blocks`).
      variables: supernet variables {'block<k>': {'params', 'batch_stats'}}.
      teacher, teacher_variables: the frozen teacher (block inputs and targets).
      rating_images: [R, B, H, W, C] the rating batches (the original: validation batches).
      recal_images: [B_r, H, W, C] the recalibration batch (the original: the first training
        batch); unused in 'batch' mode.
      config: a `rate` config.
      out_dir: where `<block name>.npz` / `.json` go.
      block_indices: blocks to rate (default: all).
      mesh: devices to shard the prefixes over (default: all).

    Returns:
      [(npz path, json path)] per rated block, in order. Blocks whose files already hold a
      rating with the same fingerprint are skipped.
    """
    check_config(config)
    rating_images = _as_batches(rating_images, "rating_images")
    recal_images = np.asarray(recal_images) if config.bn_mode == "recalibrate" else None
    data_digest = tree_digest({"rate": rating_images, "recal": recal_images})
    block_indices = list(range(len(space.blocks))) if block_indices is None else block_indices
    paths, io = [], None
    for position, k in enumerate(block_indices):
        name = space.blocks[k].name
        prefix = os.path.join(out_dir, name)
        encodings = select_candidates(space, k, config.num_candidates, config.seed)
        fingerprint = rating_fingerprint(config, space, k, encodings,
                                         tree_digest(variables[name]), data_digest)
        paths.append((f"{prefix}.npz", f"{prefix}.json"))
        if rating_complete(prefix, fingerprint):
            logging.info("%s: rating exists with the same fingerprint, skipped", name)
            continue
        if io is None:  # the teacher runs once, for every block still to rate
            todo = list(block_indices[position:])
            io = teacher_block_io(teacher, teacher_variables, space, rating_images, todo)
            recal_io = (teacher_block_io(teacher, teacher_variables, space, recal_images, todo)
                        if recal_images is not None else None)
        inputs, targets = io[k]
        rater = BlockRater(blocks[k], variables[name], config, mesh)
        rating = rater.rate(inputs, targets, recal_io[k][0] if recal_io else None, encodings)
        save_rating(prefix, rating, space, k, fingerprint, config.top_k, config.cost_resolution)
        warn_if_unfit(name, rating.info["fit_mse_var"])
        best = int(np.argmin(rating.score))
        logging.info("%s: %d candidates in %.1f s (%.1f/s); best %s %s = %.4f", name,
                     len(rating), rating.info["seconds"], rating.info["candidates_per_second"],
                     rating.encodings[best].tolist(), rating.rank_metric, rating.score[best])
    return paths
