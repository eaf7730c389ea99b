"""The prefix-shared evaluator (`BlockRater`); the walk is described in `dna_jax.rate`."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import host_memory
from dna_jax.compile_options import FAST_COMPILE
from dna_jax.models import cpu_conv
from dna_jax.models.supernet import SupernetBlock
from dna_jax.rate.config import check_config, get_default_config
from dna_jax.rate.plan import (CandidateTrie, TraversalPlan, assign_owners, block_shapes,
                               build_trie, plan_traversal, split_level)
from dna_jax.rate.scores import TEACHER_ERRORS, LeafReduction, as_batches, finish_rating
from dna_jax.rating_table import BlockRating

PyTree = Any
_RATER_IDS = itertools.count()
_SHARED_FUNCTIONS: dict[tuple, tuple[dict, collections.Counter, int]] = {}


def _check_targets(inputs: np.ndarray, targets: np.ndarray, out_shape: Sequence[int],
                   block_index: int) -> None:
    """Raises ValueError unless targets are [R, B, *block output shape] like the inputs."""
    expected = (*inputs.shape[:2], *out_shape)
    if tuple(targets.shape) != expected:
        raise ValueError(f"block {block_index}: targets have shape {targets.shape}, but inputs "
                         f"{inputs.shape} give block outputs of shape {expected} "
                         f"([R, B, H, W, C] with the teacher stage's width)")

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
        inputs, targets = as_batches(inputs, "inputs"), as_batches(targets, "targets")
        encodings, values, info = self.evaluate_leaves(inputs, targets, recal_inputs,
                                                       encodings)
        return finish_rating(encodings, values[..., 0], values[..., 1], targets,
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
        inputs = as_batches(inputs, "inputs")
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
        host_memory.release_free_memory()  # the walk's free blocks back to the kernel
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
            options = FAST_COMPILE if self.config.fast_compile else None
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

