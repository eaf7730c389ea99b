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
import shutil
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import checkpoint as checkpoint_lib
from dna_jax import metrics as metrics_lib
from dna_jax import sharding as sharding_lib
from dna_jax.models import cpu_conv
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
      conv_impl: 'auto' (shifted slices / matmuls on CPU, XLA's convs elsewhere), 'taps' or
        'xla' (see dna_jax.models.cpu_conv: XLA:CPU's conv gradients are 10-30x slower).
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
        conv_impl="auto",
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
    `weight_decay` adds `weight_decay * param` to the gradient first (PyTorch's L2 decay),
    for kernels only (parameters of rank >= 2): BatchNorm scales / biases and SE biases are
    not decayed, as in the original (its `add_weight_decay` skips 1-D parameters).

    Raises:
      ValueError: for a name optax does not have.
    """
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"distill.optimizer: unknown optax optimizer {name!r} (e.g. 'adam', 'adamw', 'sgd', "
                         "'rmsprop', 'lion')")
    base = factory(learning_rate=1.0, **(kwargs or {}))
    if weight_decay:
        base = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base)
    return base


def decay_mask(params: PyTree) -> PyTree:
    """True for the parameters weight decay applies to: kernels (rank >= 2)."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def on_path(branches: jax.Array, layer: int, branch: int) -> jax.Array:
    """Whether branch `branch` of layer `layer` is on the path `branches` [L], or on any of
    the paths `branches` [P, L] (DNA++ trains several paths per step)."""
    return jnp.any(jnp.atleast_2d(branches)[:, layer] == branch)


def optimizer_step(optimizer: optax.GradientTransformation, params: PyTree, grads: PyTree,
                   opt_state: PyTree, lr: jax.Array) -> tuple[PyTree, PyTree]:
    """One update of a learning-rate-free optimizer, scaled by the scheduled `lr`."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = jax.tree.map(lambda w, u: w + (lr * u).astype(w.dtype), params, updates)
    return params, opt_state


def masked_block_update(optimizer: optax.GradientTransformation,
                        choice_table: Sequence[np.ndarray], params: PyTree, grads: PyTree,
                        opt_state: PyTree, branches: jax.Array, lr: jax.Array
                        ) -> tuple[PyTree, PyTree]:
    """Optimizer update of one supernet block in which ops off the path(s) keep their
    parameters and optimizer state bitwise (`lax.cond`: not even computed).

    Args:
      optimizer: learning-rate-free optax transformation, applied per op group.
      choice_table: legal op indices of each layer (a layer with one choice is always on).
      params, grads: the block's parameters and gradients.
      opt_state: {group name: optimizer state} (see `op_groups`).
      branches: int [L] branch positions of the path, or [P, L] of P paths (an op moves
        if any path takes it).
      lr: the scheduled learning rate.
    """
    param_groups, grad_groups = op_groups(params), op_groups(grads)
    new_params, new_opt = {}, {}
    for group, group_params in param_groups.items():

        def update(operands):
            return optimizer_step(optimizer, *operands, lr)

        operands = (group_params, grad_groups[group], opt_state[group])
        where = group_branch(group)
        if where is None or len(choice_table[where[0]]) == 1:
            new_params[group], new_opt[group] = update(operands)
        else:
            new_params[group], new_opt[group] = jax.lax.cond(
                on_path(branches, *where), update, lambda o: (o[0], o[2]), operands)
    return merge_groups(new_params), new_opt


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
      conv_impl: how convolutions run ('auto': tap convs on CPU, see models.cpu_conv).
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
    conv_impl: str = "auto"
    # Compiled steps, keyed by (kind, mesh, ...): repeated runs reuse them (see make_distiller).
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                       repr=False)

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

    def _apply(self, module: nn.Module) -> Callable:
        """`module.apply` with the configured convolution implementation."""
        return cpu_conv.with_tap_convs(module.apply, self.conv_impl)

    def teacher_features(self, teacher_variables: PyTree, images: jax.Array,
                         stop: int) -> dict[str, jax.Array]:
        """Teacher stage outputs 0..stop-1 in inference mode, float32, without gradient."""
        teacher_variables = jax.lax.stop_gradient(teacher_variables)
        features = self._apply(self.teacher)(teacher_variables, images, 0, stop, False,
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
             teacher_variables: PyTree | None = None) -> DistillState:
        """Fresh state (pure; jit it, see `init_state`).

        Parameter shapes depend on channels only, so `image_shape` (one image's H, W, C) just
        has to survive the strides; block k > 0 is initialised on a dummy input with the
        teacher's stage width. `teacher_variables` is unused (kept for older callers).
        """
        del teacher_variables
        params, batch_stats, opt_state = {}, {}, {}
        init_key = jax.random.fold_in(rng, 1)
        for k, block in enumerate(self.blocks):
            variables = block.init(jax.random.fold_in(init_key, k),
                                   jnp.zeros(self.block_input_shape(k, image_shape), jnp.float32),
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

    def block_input_shape(self, k: int, image_shape: Sequence[int]) -> tuple[int, ...]:
        """A (1, H, W, C) input of block k that parameter shapes can be taken from."""
        if k == 0:
            return (1, *image_shape)
        height, width = image_shape[:2]
        stride = self.space.stem_stride * math.prod(b.stride for b in self.space.blocks[:k])
        return (1, max(1, height // stride), max(1, width // stride), self.blocks[k].in_channels)

    def abstract_variables(self, image_shape: Sequence[int] = (64, 64, 3)) -> PyTree:
        """ShapeDtypeStructs of the supernet variables {'block<k>': {'params','batch_stats'}}."""
        state = jax.eval_shape(lambda key: self.init(key, image_shape), jax.random.key(0))
        return state.variables()

    # -- the step --

    def _update_block(self, k: int, params: PyTree, grads: PyTree, opt_state: PyTree,
                      branches: jax.Array, lr: jax.Array) -> tuple[PyTree, PyTree]:
        """Masked optimizer update of block k: ops off the path keep params and state."""
        return masked_block_update(self.optimizer, self.choice_table(k), params, grads,
                                   opt_state, branches, lr)

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
                output, updates = self._apply(self.blocks[k])(
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
                output = self._apply(self.blocks[k])(
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


# Config fields that change the Distiller (the math of a step); the others drive the loop.
DISTILLER_FIELDS = ("space", "learning_rates", "lr_decay", "lr_decay_epochs", "optimizer",
                    "optimizer_kwargs", "weight_decay", "loss_weights", "sampling",
                    "teacher_dtype", "conv_impl", "dtype", "padding", "bn_eps",
                    "bn_momentum")
_DISTILLERS: dict[Any, Distiller] = {}
_MAX_DISTILLERS = 8


def make_distiller(config: ml_collections.ConfigDict, teacher: EfficientNet,
                   steps_per_epoch: int, space: SearchSpace | None = None) -> Distiller:
    """The Distiller of a `distill` config section (see `get_default_config`), memoised.

    Equal inputs (the `DISTILLER_FIELDS` of the config, teacher, steps per epoch, space) give
    the same Distiller object, so its compiled steps serve every run of a process (resumes,
    DNA+ rounds, tests): on 2 CPU cores one compile of a supernet step takes minutes.

    Raises:
      ValueError: unknown options, per-block lists of the wrong length, or a space whose
        blocks do not align with the teacher's stages.
    """
    space = space or get_space(config.space)
    fields = json.dumps({f: config[f].to_dict() if hasattr(config[f], "to_dict") else config[f]
                         for f in DISTILLER_FIELDS}, sort_keys=True, default=str)
    key = (fields, teacher, int(steps_per_epoch), space)
    if key not in _DISTILLERS:
        if len(_DISTILLERS) >= _MAX_DISTILLERS:
            _DISTILLERS.pop(next(iter(_DISTILLERS)))
        _DISTILLERS[key] = _build_distiller(config, teacher, steps_per_epoch, space)
    return _DISTILLERS[key]


def _build_distiller(config: ml_collections.ConfigDict, teacher: EfficientNet,
                     steps_per_epoch: int, space: SearchSpace) -> Distiller:
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
        sampling=config.sampling,
        conv_impl=cpu_conv.resolve(config.conv_impl))


# ---- the loop -----------------------------------------------------------------------------

CHECKPOINT_SUBDIR = "checkpoints"
HISTORY_FILE = "distill_history.json"
FIGURES_FILE = "figures.json"
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class NonFiniteLossError(FloatingPointError):
    """A block's distillation loss became NaN or infinite; the message names block and step."""


class SupernetCheckpointError(ValueError):
    """A saved supernet is missing, corrupt, or does not match the expected variables."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """A run of global steps [start, stop) training the blocks `active` (one compiled step)."""

    active: tuple[int, ...]
    start: int
    stop: int


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `distill.<field>` to fix for values the loop cannot use."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"distill.{field} {what}, got {config[field]!r}")

    need(config.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
    need(config.sampling in SAMPLINGS, "sampling", f"must be one of {SAMPLINGS}")
    need(config.num_steps >= 0, "num_steps", "must be >= 0 (0 = use num_epochs)")
    need(config.num_steps > 0 or config.num_epochs > 0, "num_epochs",
         "must be > 0 when distill.num_steps is 0")
    need(config.steps_per_epoch >= 0, "steps_per_epoch", "must be >= 0 (0 = the dataset's)")
    need(0 < config.lr_decay <= 1, "lr_decay", "must be in (0, 1]")
    need(config.lr_decay_epochs > 0, "lr_decay_epochs", "must be > 0")
    need(all(lr > 0 for lr in config.learning_rates), "learning_rates", "must all be > 0")
    need(all(w >= 0 for w in config.loss_weights), "loss_weights", "must all be >= 0")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(config.val_num_paths >= 1, "val_num_paths", "must be >= 1")
    for field in ("val_every_steps", "val_num_batches", "checkpoint_every_steps"):
        need(config[field] >= 0, field, "must be >= 0")
    need(config.log_every_steps >= 1, "log_every_steps", "must be >= 1")
    need(config.max_checkpoints >= 1, "max_checkpoints", "must be >= 1")


def make_phases(schedule: str, num_blocks: int, steps_per_block: int) -> list[Phase]:
    """'all_blocks': one phase of every block; 'sequential': block 0, then block 1, ..."""
    if schedule == "all_blocks":
        return [Phase(tuple(range(num_blocks)), 0, steps_per_block)]
    return [Phase((k,), k * steps_per_block, (k + 1) * steps_per_block)
            for k in range(num_blocks)]


def init_state(distiller: Distiller, seed: int, image_shape: Sequence[int],
               mesh: Mesh) -> DistillState:
    """The initial state, replicated on `mesh`, jitted with cheap compiler options.

    Initialisation runs once; eager Flax init compiles every primitive separately (minutes on
    2 CPU cores), and a fully optimised compile is slower than the cheap one.
    """
    cache_key = ("init", mesh, tuple(image_shape))
    if cache_key not in distiller.compiled:
        replicated = NamedSharding(mesh, P())
        init = jax.jit(lambda key: distiller.init(key, image_shape), out_shardings=replicated)
        lowered = init.lower(jax.random.key(seed))
        try:
            distiller.compiled[cache_key] = lowered.compile(compiler_options=_FAST_COMPILE)
        except Exception:  # pylint: disable=broad-except  # a backend without these options
            distiller.compiled[cache_key] = lowered.compile()
    return distiller.compiled[cache_key](jax.random.key(seed))


def validation_paths(distiller: Distiller, num_paths: int, seed: int) -> dict[str, np.ndarray]:
    """Fixed random paths per block (op indices, int32 [num_paths, num_layers])."""
    rng = np.random.default_rng(seed)
    return {name: distiller.space.sample_block(k, num_paths, rng)
            for k, name in enumerate(distiller.names)}


def evaluate(eval_step: Callable, state: DistillState, teacher_variables: PyTree,
             val_data: Any, paths: dict[str, np.ndarray], num_batches: int = 0) -> np.ndarray:
    """Mean validation MSE of every block (float64 [num_blocks]) over `num_batches` batches."""
    sums, count = None, 0.0
    for index, batch in enumerate(val_data.global_batches()):
        if num_batches and index >= num_batches:
            break
        images = batch["image"]
        mask = batch.get("mask")
        if mask is None:
            mask = jnp.ones(images.shape[:1], jnp.float32)
        batch_sums, batch_count = eval_step(state, teacher_variables, images,
                                            mask.astype(jnp.float32), paths)
        batch_sums, batch_count = jax.device_get((batch_sums, batch_count))
        sums = batch_sums if sums is None else sums + batch_sums
        count += float(batch_count)
    if sums is None or count == 0:
        raise ValueError("the validation data gave no examples (check distill.val_split / "
                         "data.eval_split and distill.val_num_batches)")
    return np.asarray(sums, np.float64) / count


def _checkpoint_tree(state: DistillState) -> DistillState:
    """The state as Orbax stores it: the typed key as its raw uint32 data."""
    return state.replace(rng=jax.random.key_data(state.rng))


def _state_from_checkpoint(tree: DistillState) -> DistillState:
    return tree.replace(rng=jax.random.wrap_key_data(tree.rng))


class _History:
    """Validation and train-loss records, kept in workdir so a resumed run reports them all."""

    def __init__(self, path: str, resume_step: int) -> None:
        self.path = path
        self.validation: list[dict[str, Any]] = []
        self.train: list[dict[str, Any]] = []
        if resume_step and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            self.validation = [r for r in data["validation"] if r["step"] <= resume_step]
            self.train = [r for r in data["train"] if r["step"] <= resume_step]

    def save(self) -> None:
        metrics_lib.write_json(self.path, {"validation": self.validation, "train": self.train})

    def final_train_loss(self, names: Sequence[str]) -> list[float | None]:
        last: dict[str, float] = {}
        for record in self.train:
            last.update(record["loss"])
        return [last.get(name) for name in names]


def _flush(pending: list[tuple[int, tuple[int, ...], dict]], writer: Any, history: _History,
           last_good: int | None, checkpoint_dir: str) -> None:
    """Fetches pending step metrics, stops on NaN/inf, writes per-block scalars (window means)."""
    if not pending:
        return
    fetched = jax.device_get([metrics for _, _, metrics in pending])
    for (step, active, _), metrics in zip(pending, fetched):
        for position, k in enumerate(active):
            value = float(metrics["loss"][position])
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"distillation loss of block {k} (block{k}) is {value} at step {step}; "
                    f"the last good checkpoint is "
                    f"{'none' if last_good is None else f'step {last_good}'} in {checkpoint_dir} "
                    "(lower distill.learning_rates or check the teacher and data)")
    step, active, _ = pending[-1]
    scalars, losses = {}, {}
    for position, k in enumerate(active):
        mean = lambda key: float(np.mean([m[key][position] for m in fetched]))
        losses[block_name(k)] = mean("loss")
        scalars[f"train/block{k}/loss"] = losses[block_name(k)]
        scalars[f"train/block{k}/grad_norm"] = mean("grad_norm")
        scalars[f"train/block{k}/lr"] = float(fetched[-1]["lr"][position])
    writer.write_scalars(step, scalars)
    history.train.append({"step": step, "loss": losses})
    pending.clear()


def _validate(step: int, evaluate_fn: Callable[[DistillState], np.ndarray], state: DistillState,
              writer: Any, history: _History, names: Sequence[str]) -> None:
    losses = evaluate_fn(state)
    writer.write_scalars(step, {f"val/{name}/loss": float(v) for name, v in zip(names, losses)})
    history.validation = [r for r in history.validation if r["step"] != step]
    history.validation.append({"step": step, "loss": [float(v) for v in losses]})
    logging.info("Step %d validation loss per block: %s", step,
                 ", ".join(f"{v:.5g}" for v in losses))


def compile_train_step(distiller: Distiller, mesh: Mesh, phase: Phase, state: DistillState,
                       teacher_variables: PyTree, batch_shape: Sequence[int]) -> Callable:
    """The phase's train step compiled ahead of time (once per distiller, mesh, phase, shape).

    Compiling ahead keeps compile time out of the timing and out of the first step.
    """
    cache_key = ("train", mesh, phase.active, phase.start, tuple(batch_shape),
                 tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(teacher_variables)))
    if cache_key not in distiller.compiled:
        step = distiller.jit_train_step(mesh, phase.active, phase.start)
        images = jax.ShapeDtypeStruct(tuple(batch_shape), jnp.float32,
                                      sharding=sharding_lib.batch_sharding(mesh))
        distiller.compiled[cache_key] = step.lower(state, teacher_variables, images).compile()
    return distiller.compiled[cache_key]


@dataclasses.dataclass
class _Loop:
    """What the step loop needs besides the state (kept together so functions stay short)."""

    distiller: Distiller
    config: ml_collections.ConfigDict
    mesh: Mesh
    teacher_variables: PyTree
    checkpointer: checkpoint_lib.Checkpointer
    writer: Any
    history: _History
    evaluate_fn: Callable[[DistillState], np.ndarray] | None
    total_steps: int
    last_good: int | None = None
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    eval_seconds: float = 0.0


def _after_step(loop: _Loop, step: int, phase_stop: int, state: DistillState,
                pending: list) -> None:
    """Logging, the NaN check, validation and checkpointing due after `step`."""
    config, every = loop.config, loop.config.checkpoint_every_steps
    save_due = step == loop.total_steps or bool(every and step % every == 0)
    if save_due or step == phase_stop or step % config.log_every_steps == 0:
        _flush(pending, loop.writer, loop.history, loop.last_good, loop.checkpointer.directory)
    if (loop.evaluate_fn and config.val_every_steps and step % config.val_every_steps == 0
            and step != loop.total_steps):
        watch = metrics_lib.Stopwatch()
        _validate(step, loop.evaluate_fn, state, loop.writer, loop.history,
                  loop.distiller.names)
        loop.eval_seconds += watch.elapsed()
    if save_due:
        _save_finite(loop, step, state)
        loop.history.save()
        loop.last_good = step
    elif loop.checkpointer.reached_preemption(step):
        _flush(pending, loop.writer, loop.history, loop.last_good, loop.checkpointer.directory)
        _save_finite(loop, step, state)
        loop.checkpointer.wait()
        loop.history.save()
        raise SystemExit(f"Preempted at step {step}; checkpoint saved, rerun to resume.")


def _save_finite(loop: _Loop, step: int, state: DistillState) -> None:
    """Saves `state` unless it holds NaN/inf (NonFiniteLossError naming the last good one)."""
    try:
        loop.checkpointer.save(step, _checkpoint_tree(state), force=True)
    except checkpoint_lib.NonFiniteStateError as error:
        raise NonFiniteLossError(
            f"distillation made the supernet non-finite at step {step} (the losses were "
            f"finite): {error} Lower distill.learning_rates; a rerun with the fixed config "
            "resumes from the last good checkpoint (dna-jax run: add "
            "--config.on_change=resume).") from error


def _run_phases(loop: _Loop, phases: Sequence[Phase], state: DistillState, train_data: Any,
                start_step: int) -> DistillState:
    """Runs every phase's remaining steps from `start_step`; returns the final state."""
    progress = metrics_lib.report_progress(loop.total_steps, loop.writer)
    batch_shape = (train_data.info.global_batch_size, *train_data.info.image_shape)
    pending: list = []
    for phase in phases:
        if phase.stop <= start_step:
            continue
        first = max(phase.start, start_step)
        watch = metrics_lib.Stopwatch()
        step_fn = compile_train_step(loop.distiller, loop.mesh, phase, state,
                                     loop.teacher_variables, batch_shape)
        loop.compile_seconds += watch.elapsed()
        batches = train_data.global_batches(first)
        watch = metrics_lib.Stopwatch()
        try:
            for step in range(first + 1, phase.stop + 1):
                state, metrics = step_fn(state, loop.teacher_variables, next(batches)["image"])
                pending.append((step, phase.active, metrics))
                progress(step)
                _after_step(loop, step, phase.stop, state, pending)
            jax.block_until_ready(state)
        finally:
            loop.train_seconds += watch.elapsed()
            batches.close()
    return state


def train_supernet(config: ml_collections.ConfigDict, teacher: EfficientNet,
                   teacher_variables: PyTree, train_data: Any, val_data: Any | None,
                   workdir: str, mesh: Mesh | None = None,
                   space: SearchSpace | None = None) -> tuple[dict, dict]:
    """Distils every supernet block from the frozen teacher; resumes from workdir/checkpoints.

    Args:
      config: the `distill` section (see `get_default_config`).
      teacher: the teacher module; `teacher_variables` its frozen variables.
      train_data: a training `dna_jax.data.Dataset` (batches with 'image').
      val_data: held-out `Dataset` for the per-block validation loss (at the start, every
        `val_every_steps` and at the end), or None for no validation.
      workdir: checkpoints, TensorBoard events, history and figures.json go here.
      mesh: the device mesh (default: every device on one 'data' axis).
      space: the search space (default: `get_space(config.space)`).

    Returns:
      (supernet variables {'block<k>': {'params', 'batch_stats'}} replicated on the mesh,
       figures: steps, wall/train/compile time, images_per_s, per-block train_loss_final,
       val_loss_init, val_loss_final, val_loss_ratio, ...; also in workdir/figures.json).

    Raises:
      ValueError: a bad config value (naming the field) or an unaligned space.
      NonFiniteLossError: a block's loss became NaN/inf (block and step named; the last good
        checkpoint is kept).
      (A checkpoint that cannot be restored or holds NaN/inf is set aside and the previous
      one used: checkpoint.Checkpointer.restore_latest_good.)
    """
    watch = metrics_lib.Stopwatch()
    check_config(config)
    mesh = mesh or sharding_lib.make_mesh()
    info = train_data.info
    steps_per_epoch = int(config.steps_per_epoch or info.num_batches)
    distiller = make_distiller(config, teacher, steps_per_epoch, space)
    steps_per_block = int(config.num_steps or math.ceil(config.num_epochs * steps_per_epoch))
    phases = make_phases(config.schedule, distiller.num_blocks, steps_per_block)
    total_steps = phases[-1].stop
    teacher_variables = jax.device_put(teacher_variables, NamedSharding(mesh, P()))
    state = init_state(distiller, config.seed, info.image_shape, mesh)

    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, CHECKPOINT_SUBDIR),
        save_every_steps=config.checkpoint_every_steps or total_steps,
        keep=config.max_checkpoints)
    start_step = 0
    if checkpointer.latest_step():  # the newest usable one (others are set aside)
        tree, good = checkpointer.restore_latest_good(_checkpoint_tree(state))
        if good:
            state, start_step = _state_from_checkpoint(tree), good
            logging.info("Resumed distillation from step %d.", start_step)
    loop = _Loop(distiller, config, mesh, teacher_variables, checkpointer,
                 metrics_lib.create_writer(workdir),
                 _History(os.path.join(workdir, HISTORY_FILE), start_step),
                 _evaluate_fn(distiller, config, mesh, teacher_variables, val_data),
                 total_steps, last_good=start_step or None)
    try:
        with jax.set_mesh(mesh):
            if loop.evaluate_fn and start_step == 0:
                _validate(0, loop.evaluate_fn, state, loop.writer, loop.history, distiller.names)
            state = _run_phases(loop, phases, state, train_data, start_step)
            if loop.evaluate_fn:
                _validate(total_steps, loop.evaluate_fn, state, loop.writer, loop.history,
                          distiller.names)
            loop.history.save()
    finally:
        checkpointer.close()
        loop.writer.flush()
    figures = _figures(loop, info, start_step, watch.elapsed())
    metrics_lib.write_json(os.path.join(workdir, FIGURES_FILE), figures)
    return state.variables(), figures


def _evaluate_fn(distiller: Distiller, config: ml_collections.ConfigDict, mesh: Mesh,
                 teacher_variables: PyTree, val_data: Any | None
                 ) -> Callable[[DistillState], np.ndarray] | None:
    """state -> mean validation MSE per block, on fixed paths; None without val_data."""
    if val_data is None:
        logging.warning("No validation data: distillation reports no validation loss.")
        return None
    eval_step = distiller.compiled.setdefault(("eval", mesh), distiller.jit_eval_step(mesh))
    paths = validation_paths(distiller, config.val_num_paths, config.seed)
    return lambda state: evaluate(eval_step, state, teacher_variables, val_data, paths,
                                  config.val_num_batches)


def _figures(loop: _Loop, info: Any, start_step: int, wall_seconds: float) -> dict[str, Any]:
    """The run's headline figures (see `train_supernet`)."""
    names = loop.distiller.names
    by_step = {r["step"]: r["loss"] for r in loop.history.validation}
    init, final = by_step.get(0), by_step.get(loop.total_steps)
    ratio = ([f / i if i else float("inf") for i, f in zip(init, final)]
             if init and final else None)
    train_seconds = max(loop.train_seconds - loop.eval_seconds, 1e-9)
    steps_run = loop.total_steps - start_step
    space = loop.distiller.space
    return {
        "updates_per_op": updates_per_op(space, loop.total_steps),
        "schedule": loop.config.schedule, "space": loop.distiller.space.name,
        "blocks": names, "steps": loop.total_steps, "steps_this_run": steps_run,
        "resumed_from_step": start_step, "global_batch_size": info.global_batch_size,
        "devices": int(loop.mesh.devices.size),
        "train_loss_final": loop.history.final_train_loss(names),
        "val_loss_init": init, "val_loss_final": final, "val_loss_ratio": ratio,
        "val_loss_ratio_max": max(ratio) if ratio else None,
        "val_history": loop.history.validation,
        "images_per_s": steps_run * info.global_batch_size / train_seconds if steps_run else 0.0,
        "train_time_s": train_seconds, "compile_time_s": loop.compile_seconds,
        "wall_time_s": wall_seconds, "checkpoint_dir": loop.checkpointer.directory,
    }


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


# ---- the supernet artifact ----------------------------------------------------------------

SUPERNET_ITEM = "variables"
SUPERNET_MANIFEST = "supernet.json"


def _flat_shapes(tree: PyTree) -> dict[str, list]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): [list(x.shape), str(np.dtype(x.dtype))]
            for path, x in leaves}


def save_supernet(directory: str, variables: dict) -> None:
    """Saves supernet variables (Orbax) and a shape manifest, atomically.

    Everything is written to `directory.tmp`, then renamed to `directory` (an older artifact
    there is replaced only once the new one is complete). Every process calls this.
    """
    directory = os.path.abspath(directory)
    tmp, old = directory + ".tmp", directory + ".old"
    if jax.process_index() == 0:
        for path in (tmp, old):
            shutil.rmtree(path, ignore_errors=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(tmp, SUPERNET_ITEM), variables)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() != 0:
        return
    with open(os.path.join(tmp, SUPERNET_MANIFEST), "w") as f:
        json.dump({"format": "dna_jax.supernet/1", "shapes": _flat_shapes(variables)}, f)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _shape_differences(found: dict[str, list], expected: dict[str, list]) -> list[str]:
    problems = [f"missing {key}" for key in expected if key not in found]
    problems += [f"unexpected {key}" for key in found if key not in expected]
    problems += [f"{key}: saved {found[key]}, expected {value}"
                 for key, value in expected.items() if key in found and found[key] != value]
    return problems


def _redo_hint(directory: str) -> str:
    """How to make the supernet again (a pipeline's distill stage is skipped while its
    manifest says complete: remove the manifest and the stage resumes from its checkpoints)."""
    manifest = os.path.join(os.path.dirname(directory), "manifest.json")
    if os.path.exists(manifest):
        return (f"remove {manifest} (nothing else) and rerun: the distill stage then resumes "
                "from its checkpoints and saves the supernet again")
    return "distil it again"


def load_supernet(directory: str, distiller_or_abstract: Distiller | PyTree,
                  mesh: Mesh | None = None) -> dict:
    """Restores variables written by `save_supernet`.

    Args:
      directory: the artifact directory.
      distiller_or_abstract: the Distiller whose supernet is expected, or a tree of arrays /
        ShapeDtypeStructs with the expected structure, shapes and dtypes.
      mesh: restore replicated on this mesh (default: on the first device).

    Raises:
      SupernetCheckpointError: the directory or its manifest is missing, the saved shapes do
        not match the expected ones (the first differences are named), or Orbax cannot read it.
    """
    directory = os.path.abspath(directory)
    abstract = (distiller_or_abstract.abstract_variables()
                if isinstance(distiller_or_abstract, Distiller) else distiller_or_abstract)
    manifest_path = os.path.join(directory, SUPERNET_MANIFEST)
    if not os.path.exists(manifest_path):
        raise SupernetCheckpointError(
            f"no supernet in {directory} (missing {SUPERNET_MANIFEST}); run the distill stage "
            "or point to its output directory")
    try:
        with open(manifest_path) as f:
            found = json.load(f)["shapes"]
    except (OSError, ValueError, KeyError) as error:
        raise SupernetCheckpointError(f"{manifest_path} is corrupt ({error}); "
                                      + _redo_hint(directory)) from error
    problems = _shape_differences(found, _flat_shapes(abstract))
    if problems:
        raise SupernetCheckpointError(
            f"the supernet in {directory} does not match the expected space/teacher: "
            + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5
                                         else ""))
    sharding = (NamedSharding(mesh, P()) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          abstract)
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore(os.path.join(directory, SUPERNET_ITEM), target)
    except Exception as error:  # Orbax raises many types; all mean "unusable".
        raise SupernetCheckpointError(
            f"the supernet in {directory} cannot be restored ({type(error).__name__}: "
            f"{error}); " + _redo_hint(directory)) from error
    finally:
        checkpointer.close()
