"""DNA: block-wise distillation of the supernet from a frozen teacher.

Student block k regresses the teacher's output of stage `space.blocks[k].teacher_stage` from
the teacher's output of the stage before it (block 0 starts from the image through the
student's stem). Blocks are independent given the teacher, so ONE jitted step runs the teacher
once (inference-mode BatchNorm, no gradient, optionally in bfloat16) and updates every block
from those features; the original trained the blocks one after another and paid for a teacher
forward per block. `schedule='sequential'` reproduces that schedule with the same step.

Each step samples one path per block inside the step (uniform, or "fair": every op of a layer
once per window of K steps) and runs it with `nn.switch`, so only the chosen ops compute.
Ops off the path must not move: their gradient is zero, but weight decay and Adam's moments
would still move them, so every op keeps its own optimizer state (`ops_<j>` subtree of each
`layers_<l>`), and both its parameter update and its optimizer-state update are skipped
(`lax.cond`) unless the op is on the path. Like PyTorch's Adam for a parameter without a
gradient, an op's Adam step count then advances only on the steps that train it; the learning
rate follows the global step.

Supernet variables (the artifact shared with rate.py and the pipeline):
  {'block0': {'params': ..., 'batch_stats': ...}, 'block1': {...}, ...}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.layers import LayerConfig
from dna_jax.models.supernet import SupernetBlock, build_supernet_blocks
from dna_jax.space import SearchSpace, get_space

PyTree = Any

# REFERENCE.md section 3: the authors' per-block learning rates for the six DNA blocks.
PAPER_LEARNING_RATES = (0.002, 0.005, 0.005, 0.005, 0.005, 0.002)
SAMPLINGS = ("uniform", "fair")
SCHEDULES = ("all_blocks", "sequential")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SHARED_GROUP = "shared"


def get_default_config() -> ml_collections.ConfigDict:
    """The `distill` config section; every field with its default and meaning.

    Fields:
      space: search-space preset name (`dna_jax.space.get_space`).
      num_epochs: epochs of the training split per block (all blocks train together in
        'all_blocks'; each block trains this long in turn in 'sequential').
      num_steps: if > 0, steps per block instead of `num_epochs` (tests, benchmarks).
      steps_per_epoch: if > 0, overrides the dataset's batches per epoch (lr decay period).
      schedule: 'all_blocks' (one teacher forward trains every block) or 'sequential'
        (the original: block 0 for the whole run, then block 1, ...; same step function).
      learning_rates: one per block, or one for all; () = the paper's
        [0.002, 0.005, 0.005, 0.005, 0.005, 0.002] (first/last 0.002, others 0.005 for
        other block counts).
      lr_decay: step decay factor applied every `lr_decay_epochs` epochs (0.9 as published).
      lr_decay_epochs: epochs between decays.
      optimizer: any optax optimizer taking `learning_rate` ('adam', 'adamw', 'sgd', ...);
        it is built with learning rate 1 and the scheduled rate is applied outside.
      optimizer_kwargs: extra arguments of that optimizer (Adam: b1, b2, eps).
      weight_decay: L2 term added to the gradient before the optimizer (PyTorch's
        `weight_decay` of Adam/SGD, 1e-4 as published). Decoupled decay: use 'adamw' and
        `optimizer_kwargs.weight_decay`.
      loss_weights: per-block weights of the MSE in the summed loss; () = all 1.
      sampling: 'uniform' (a fresh uniform op per layer every step) or 'fair' (each op of
        a layer exactly once in every window of K steps, K = the layer's number of ops).
      teacher_dtype: 'float32' or 'bfloat16' compute for the teacher forward.
      dtype: compute dtype of the student blocks (parameters stay float32).
      padding, bn_eps, bn_momentum: the student's LayerConfig (Flax momentum convention:
        0.9 is PyTorch's 0.1, the original's).
      seed: initialisation, path sampling and data order.
      val_split: held-out split for validation ('' = data.eval_split).
      val_every_steps: validation period in steps (0 = only at the start and the end).
      val_num_batches: validation batches per evaluation (0 = the whole split).
      val_num_paths: fixed random paths per block averaged in the validation loss.
      log_every_steps: training metrics period (clu writer).
      checkpoint_every_steps: Orbax checkpoint period (0 = only at the end).
      max_checkpoints: checkpoints kept.
    """
    return ml_collections.ConfigDict(dict(
        space="dna_released",
        num_epochs=20.0,
        num_steps=0,
        steps_per_epoch=0,
        schedule="all_blocks",
        learning_rates=(),
        lr_decay=0.9,
        lr_decay_epochs=1.0,
        optimizer="adam",
        optimizer_kwargs=ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8)),
        weight_decay=1e-4,
        loss_weights=(),
        sampling="uniform",
        teacher_dtype="float32",
        dtype="float32",
        padding="same",
        bn_eps=1e-3,
        bn_momentum=0.9,
        seed=42,
        val_split="",
        val_every_steps=0,
        val_num_batches=0,
        val_num_paths=4,
        log_every_steps=50,
        checkpoint_every_steps=1000,
        max_checkpoints=2,
    ))


# ---- train state ------------------------------------------------------------------------


class DistillState(struct.PyTreeNode):
    """Everything a distillation run carries from step to step.

    Attributes:
      step: global step (int32 scalar).
      params: {'block<k>': block params}.
      batch_stats: {'block<k>': block BatchNorm statistics}.
      opt_state: {'block<k>': {group name: optimizer state}}; groups are `SHARED_GROUP`
        (block 0's stem and first layer, always on the path) and 'layers_<l>/ops_<j>'.
      rng: base key; step keys are folded in from it, so it never changes.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array

    def variables(self) -> dict[str, dict[str, PyTree]]:
        """Supernet variables: {'block<k>': {'params': ..., 'batch_stats': ...}}."""
        return {name: {"params": self.params[name], "batch_stats": self.batch_stats[name]}
                for name in self.params}


def block_name(index: int) -> str:
    return f"block{index}"


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


def make_optimizer(name: str, weight_decay: float = 0.0,
                   kwargs: dict[str, Any] | None = None) -> optax.GradientTransformation:
    """A learning-rate-free optax optimizer: `optax.<name>(learning_rate=1, **kwargs)`.

    The scheduled learning rate multiplies its updates outside (see `Distiller`), so the
    schedule follows the global step even though each op's state advances only when trained.
    `weight_decay` adds `weight_decay * param` to the gradient first (PyTorch's L2 decay).

    Raises:
      ValueError: for a name optax does not have.
    """
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"unknown optax optimizer {name!r} (e.g. 'adam', 'adamw', 'sgd', "
                         "'rmsprop', 'lion')")
    base = factory(learning_rate=1.0, **(kwargs or {}))
    if weight_decay:
        base = optax.chain(optax.add_decayed_weights(weight_decay), base)
    return base


def _mse(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None
         ) -> tuple[jax.Array, jax.Array]:
    """(sum over examples of the per-example MSE, number of examples), masked if given."""
    per_example = jnp.mean(jnp.square(student.astype(jnp.float32) - teacher),
                           axis=tuple(range(1, student.ndim)))
    if mask is None:
        return jnp.sum(per_example), jnp.asarray(per_example.shape[0], jnp.float32)
    return jnp.sum(per_example * mask), jnp.sum(mask)


# ---- the distiller: static pieces and pure step functions -------------------------------


@dataclasses.dataclass(frozen=True)
class Distiller:
    """The static half of distillation: modules, optimizer, schedules, path sampling.

    Build with `make_distiller`. Its methods are pure functions of arrays; `jit_train_step`
    and `jit_eval_step` compile them for a mesh.

    Attributes:
      space: the search space.
      blocks: one SupernetBlock per space block.
      teacher: the teacher module (its compute dtype set to `teacher_dtype`).
      optimizer: learning-rate-free optax transformation, applied per op group.
      learning_rates: base rate per block.
      lr_decay: step-decay factor.
      decay_steps: steps between decays.
      loss_weights: weight of each block's MSE in the summed loss.
      sampling: 'uniform' or 'fair'.
    """

    space: SearchSpace
    blocks: tuple[SupernetBlock, ...]
    teacher: EfficientNet
    optimizer: optax.GradientTransformation
    learning_rates: tuple[float, ...]
    lr_decay: float
    decay_steps: int
    loss_weights: tuple[float, ...]
    sampling: str = "uniform"

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [block_name(k) for k in range(self.num_blocks)]

    def choice_table(self, k: int) -> list[np.ndarray]:
        """Legal op indices of every layer of block k (branch position -> op index)."""
        return [np.asarray(self.space.layer_choices(k, l), np.int32)
                for l in range(self.space.blocks[k].num_layers)]

    # -- schedules and sampling --

    def learning_rate(self, k: int, local_step: jax.Array) -> jax.Array:
        """Block k's rate: base x decay^(floor(step / decay_steps))."""
        periods = jnp.floor_divide(local_step, self.decay_steps).astype(jnp.float32)
        return self.learning_rates[k] * jnp.power(jnp.float32(self.lr_decay), periods)

    def sample_branches(self, rng: jax.Array, k: int, local_step: jax.Array) -> jax.Array:
        """Branch positions (int32 [num_layers]) of block k's path at `local_step`.

        'uniform': independent uniform branches from a key folded in from (block, layer,
        step). 'fair': layer l with K ops follows a random permutation of its K branches per
        window of K steps (key folded in from the window index), so every op is used exactly
        once per window.
        """
        branches = []
        block_key = jax.random.fold_in(rng, k)
        for l, choices in enumerate(self.choice_table(k)):
            num = len(choices)
            layer_key = jax.random.fold_in(block_key, l)
            if num == 1:
                branches.append(jnp.zeros((), jnp.int32))
            elif self.sampling == "fair":
                window, position = jnp.divmod(local_step, num)
                order = jax.random.permutation(jax.random.fold_in(layer_key, window), num)
                branches.append(order[position].astype(jnp.int32))
            else:
                key = jax.random.fold_in(layer_key, local_step)
                branches.append(jax.random.randint(key, (), 0, num, jnp.int32))
        return jnp.stack(branches)

    def branches_to_ops(self, k: int, branches: jax.Array) -> jax.Array:
        """Branch positions -> op indices of the space (what SupernetBlock takes)."""
        return jnp.stack([jnp.asarray(table)[branches[l]]
                          for l, table in enumerate(self.choice_table(k))])

    # -- forward pieces --

    def teacher_features(self, teacher_variables: PyTree, images: jax.Array,
                         stop: int) -> dict[str, jax.Array]:
        """Teacher stage outputs 0..stop-1 in inference mode, float32, without gradient."""
        teacher_variables = jax.lax.stop_gradient(teacher_variables)
        features = self.teacher.apply(teacher_variables, images, 0, stop, False,
                                      method=EfficientNet.forward_stages)
        return {name: jax.lax.stop_gradient(value.astype(jnp.float32))
                for name, value in features.items()}

    def teacher_stop(self, active: Sequence[int]) -> int:
        """One past the last teacher stage the `active` blocks need."""
        return max(self.space.blocks[k].teacher_stage for k in active) + 1

    def block_io(self, features: dict[str, jax.Array], images: jax.Array,
                 k: int) -> tuple[jax.Array, jax.Array]:
        """(input, target) of block k from the teacher features."""
        stage = self.space.blocks[k].teacher_stage
        block_input = images if k == 0 else features[f"stage{stage - 1}"]
        return block_input, features[f"stage{stage}"]

    # -- init --

    def init(self, rng: jax.Array, image_shape: Sequence[int],
             teacher_variables: PyTree) -> DistillState:
        """Fresh state. `image_shape` is one image's (H, W, C); block inputs follow the teacher."""
        images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        features = jax.eval_shape(
            lambda v, x: self.teacher_features(v, x, self.teacher_stop(range(self.num_blocks))),
            teacher_variables, images)
        params, batch_stats, opt_state = {}, {}, {}
        init_key = jax.random.fold_in(rng, 1)
        for k, block in enumerate(self.blocks):
            block_input, _ = self.block_io(features, images, k)
            variables = block.init(jax.random.fold_in(init_key, k),
                                   jnp.zeros(block_input.shape, jnp.float32),
                                   jnp.zeros((self.space.blocks[k].num_layers,), jnp.int32),
                                   False)
            name = block_name(k)
            params[name] = variables["params"]
            batch_stats[name] = variables.get("batch_stats", {})
            opt_state[name] = {group: self.optimizer.init(subtree)
                               for group, subtree in op_groups(params[name]).items()}
        return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=batch_stats, opt_state=opt_state,
                            rng=jax.random.fold_in(rng, 2))

    # -- the step --

    def _update_block(self, k: int, params: PyTree, grads: PyTree, opt_state: PyTree,
                      branches: jax.Array, lr: jax.Array) -> tuple[PyTree, PyTree]:
        """Masked optimizer update of block k: ops off the path keep params and state."""
        param_groups, grad_groups = op_groups(params), op_groups(grads)
        new_params, new_opt = {}, {}
        for group, group_params in param_groups.items():

            def update(operands, group=group):
                p, g, s = operands
                updates, s = self.optimizer.update(g, s, p)
                p = jax.tree.map(lambda w, u: w + (lr * u).astype(w.dtype), p, updates)
                return p, s

            operands = (group_params, grad_groups[group], opt_state[group])
            where = group_branch(group)
            if where is None or len(self.choice_table(k)[where[0]]) == 1:
                new_params[group], new_opt[group] = update(operands)
            else:
                layer, branch = where
                new_params[group], new_opt[group] = jax.lax.cond(
                    branches[layer] == branch, update, lambda o: (o[0], o[2]), operands)
        return merge_groups(new_params), new_opt

    def train_step(self, state: DistillState, teacher_variables: PyTree, images: jax.Array,
                   active: Sequence[int] | None = None, start_step: int = 0
                   ) -> tuple[DistillState, dict[str, jax.Array]]:
        """One distillation step of the `active` blocks (default: all) from one teacher forward.

        Args:
          state: the train state.
          teacher_variables: the frozen teacher's variables.
          images: the global batch [B, H, W, C].
          active: block indices to train (static); the others are carried unchanged.
          start_step: global step at which this schedule phase began (static): the learning
            rate and path sampling use `state.step - start_step`.

        Returns:
          The new state and metrics: 'loss', 'lr', 'grad_norm' (float32 [len(active)]) and
          'branches' ({'block<k>': int32 [num_layers]}, the sampled branch positions).
        """
        active = tuple(range(self.num_blocks)) if active is None else tuple(active)
        local_step = state.step - start_step
        features = self.teacher_features(teacher_variables, images, self.teacher_stop(active))
        names = [block_name(k) for k in active]
        branches = {name: self.sample_branches(state.rng, k, local_step)
                    for k, name in zip(active, names)}

        def loss_fn(params):
            losses, new_stats = [], {}
            for k, name in zip(active, names):
                block_input, target = self.block_io(features, images, k)
                output, updates = self.blocks[k].apply(
                    {"params": params[name], "batch_stats": state.batch_stats[name]},
                    block_input, self.branches_to_ops(k, branches[name]), True,
                    mutable=["batch_stats"])
                total, count = _mse(output, target)
                losses.append(total / count)
                new_stats[name] = updates["batch_stats"]
            losses = jnp.stack(losses)
            weights = jnp.asarray([self.loss_weights[k] for k in active], jnp.float32)
            return jnp.sum(weights * losses), (losses, new_stats)

        grads, (losses, new_stats) = jax.grad(loss_fn, has_aux=True)(
            {name: state.params[name] for name in names})
        params, opt_state = dict(state.params), dict(state.opt_state)
        batch_stats = dict(state.batch_stats)
        rates, norms = [], []
        for k, name in zip(active, names):
            lr = self.learning_rate(k, local_step)
            params[name], opt_state[name] = self._update_block(
                k, state.params[name], grads[name], state.opt_state[name], branches[name], lr)
            batch_stats[name] = new_stats[name]
            rates.append(lr)
            norms.append(optax.global_norm(grads[name]))
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        metrics = {"loss": losses, "lr": jnp.stack(rates), "grad_norm": jnp.stack(norms),
                   "branches": branches}
        return new_state, metrics

    def eval_step(self, state: DistillState, teacher_variables: PyTree, images: jax.Array,
                  mask: jax.Array, paths: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Validation MSE sums of every block, BatchNorm in inference mode.

        Args:
          paths: {'block<k>': int32 [num_paths, num_layers] op indices}; the paths are run
            one after another (`lax.map`, never a vmap over the switch index).
          mask: float [B], 0 for padding examples.

        Returns:
          (float32 [num_blocks] sum over examples and paths of the per-example MSE,
           float32 scalar: examples counted per block).
        """
        features = self.teacher_features(teacher_variables, images,
                                         self.teacher_stop(range(self.num_blocks)))

        def one_path(path):
            sums = []
            for k, name in enumerate(self.names):
                block_input, target = self.block_io(features, images, k)
                output = self.blocks[k].apply(
                    {"params": state.params[name], "batch_stats": state.batch_stats[name]},
                    block_input, path[name], False)
                sums.append(_mse(output, target, mask)[0])
            return jnp.stack(sums)

        sums = jax.lax.map(one_path, paths)
        num_paths = next(iter(paths.values())).shape[0]
        return jnp.sum(sums, axis=0), jnp.sum(mask) * num_paths

    # -- compiled versions --

    def jit_train_step(self, mesh: Mesh, active: Sequence[int] | None = None,
                       start_step: int = 0, donate: bool = True) -> Callable:
        """`train_step` compiled for `mesh`: batch split over every mesh axis, state replicated."""
        replicated = NamedSharding(mesh, P())
        batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        step = lambda s, t, x: self.train_step(s, t, x, active, start_step)
        return jax.jit(step, in_shardings=(replicated, replicated, batch),
                       out_shardings=(replicated, replicated),
                       donate_argnums=(0,) if donate else ())

    def jit_eval_step(self, mesh: Mesh) -> Callable:
        replicated = NamedSharding(mesh, P())
        batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        return jax.jit(self.eval_step,
                       in_shardings=(replicated, replicated, batch, batch, replicated),
                       out_shardings=replicated)


def _per_block(values: Sequence[float], num_blocks: int, default: Sequence[float],
               what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values) or tuple(default)
    if len(values) == 1:
        values = values * num_blocks
    if len(values) != num_blocks:
        raise ValueError(f"distill.{what} has {len(values)} entries for {num_blocks} blocks "
                         "(give one per block, or one for all)")
    return values


def default_learning_rates(num_blocks: int) -> tuple[float, ...]:
    """The paper's per-block rates; for other block counts 0.002 at both ends, 0.005 between."""
    if num_blocks == len(PAPER_LEARNING_RATES):
        return PAPER_LEARNING_RATES
    if num_blocks <= 2:
        return (0.002,) * num_blocks
    return (0.002,) + (0.005,) * (num_blocks - 2) + (0.002,)


def make_distiller(config: ml_collections.ConfigDict, teacher: EfficientNet,
                   steps_per_epoch: int, space: SearchSpace | None = None) -> Distiller:
    """Builds the Distiller of a `distill` config section (see `get_default_config`).

    Raises:
      ValueError: unknown options, per-block lists of the wrong length, or a space whose
        blocks do not align with the teacher's stages.
    """
    space = space or get_space(config.space)
    if config.sampling not in SAMPLINGS:
        raise ValueError(f"distill.sampling must be one of {SAMPLINGS}, got {config.sampling!r}")
    for field in ("teacher_dtype", "dtype"):
        if config[field] not in DTYPES:
            raise ValueError(f"distill.{field} must be one of {sorted(DTYPES)}, "
                             f"got {config[field]!r}")
    num_blocks = len(space.blocks)
    student_config = LayerConfig(padding=config.padding, bn_eps=config.bn_eps,
                                 bn_momentum=config.bn_momentum, dtype=DTYPES[config.dtype])
    blocks = tuple(build_supernet_blocks(space, teacher.spec, student_config))
    teacher = teacher.clone(layer_config=dataclasses.replace(
        teacher.layer_config, dtype=DTYPES[config.teacher_dtype]))
    kwargs = config.optimizer_kwargs
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs or {})
    return Distiller(
        space=space, blocks=blocks, teacher=teacher,
        optimizer=make_optimizer(config.optimizer, config.weight_decay, kwargs),
        learning_rates=_per_block(config.learning_rates, num_blocks,
                                  default_learning_rates(num_blocks), "learning_rates"),
        lr_decay=float(config.lr_decay),
        decay_steps=max(1, round(config.lr_decay_epochs * steps_per_epoch)),
        loss_weights=_per_block(config.loss_weights, num_blocks, (1.0,), "loss_weights"),
        sampling=config.sampling)
