"""DNA: block-wise distillation of the supernet from a frozen teacher (the teacher loss).

Student block k regresses the teacher's output of stage `space.blocks[k].teacher_stage` from
the teacher's output of the stage before it (block 0 starts from the image through the
student's stem). Blocks are independent given the teacher, so ONE jitted step runs the teacher
once (inference-mode BatchNorm, no gradient, optionally in bfloat16) and updates every block
from those features; the original trained the blocks one after another and paid for a teacher
forward per block. `schedule='sequential'` reproduces that schedule with the same step.

Path sampling, the masked per-op update, the loop and the artifact are the supernet kit's
(`dna_jax.supernet`); this module adds the teacher, the MSE loss, validation and the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import metrics as metrics_lib
from dna_jax import sharding as sharding_lib
from dna_jax.models import cpu_conv
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.layers import LayerConfig
from dna_jax.models.supernet import SupernetBlock, build_supernet_blocks
from dna_jax.space import SearchSpace, get_space
from dna_jax.supernet import loop as loop_lib
from dna_jax.supernet import paths as paths_lib
from dna_jax.supernet import update as update_lib
from dna_jax.supernet.paths import DTYPES, SAMPLINGS

PyTree = Any

# REFERENCE.md section 3: the authors' per-block learning rates for the six DNA blocks.
PAPER_LEARNING_RATES = (0.002, 0.005, 0.005, 0.005, 0.005, 0.002)
SCHEDULES = ("all_blocks", "sequential")
HISTORY_FILE = "distill_history.json"


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
      opt_state: {'block<k>': {group name: optimizer state}}; groups are `paths.SHARED_GROUP`
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


def _per_example_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """float32 [B]: the MSE of each example."""
    return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher),
                    axis=tuple(range(1, student.ndim)))


def _mse(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None
         ) -> tuple[jax.Array, jax.Array]:
    """(sum over examples of the per-example MSE, number of examples), masked if given."""
    per_example = _per_example_mse(student, teacher)
    if mask is None:
        return jnp.sum(per_example), jnp.asarray(per_example.shape[0], jnp.float32)
    return jnp.sum(per_example * mask), jnp.sum(mask)


# ---- the distiller: static pieces and pure step functions -------------------------------


@dataclasses.dataclass(frozen=True)
class Distiller(paths_lib.BlockPaths):
    """The static half of distillation: modules, optimizer, schedules (paths: the kit's).

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

    def learning_rate(self, k: int, local_step: jax.Array) -> jax.Array:
        """Block k's rate: base x decay^(floor(step / decay_steps))."""
        return update_lib.step_decay(self.learning_rates[k], self.lr_decay, self.decay_steps,
                                     local_step)

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
        """Fresh state (pure; `loop.init_state` jits it).

        Parameter shapes depend on channels only, so `image_shape` (one image's H, W, C) just
        has to survive the strides; block k > 0 is initialised on a dummy input with the
        teacher's stage width. `teacher_variables` is unused (kept for older callers).
        """
        del teacher_variables
        params, batch_stats, opt_state = {}, {}, {}
        init_key = jax.random.fold_in(rng, 1)
        for k, name in enumerate(self.names):
            variables = self.init_block(k, jax.random.fold_in(init_key, k), image_shape)
            params[name] = variables["params"]
            batch_stats[name] = variables.get("batch_stats", {})
            opt_state[name] = update_lib.init_op_states(self.optimizer, params[name])
        return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=batch_stats, opt_state=opt_state,
                            rng=jax.random.fold_in(rng, 2))

    def abstract_variables(self, image_shape: Sequence[int] = (64, 64, 3)) -> PyTree:
        """ShapeDtypeStructs of the supernet variables {'block<k>': {'params','batch_stats'}}."""
        state = jax.eval_shape(lambda key: self.init(key, image_shape), jax.random.key(0))
        return state.variables()

    # -- the step --

    def train_step(self, state: DistillState, teacher_variables: PyTree, images: jax.Array,
                   active: Sequence[int] | None = None, start_step: int = 0,
                   select_branches: bool = False
                   ) -> tuple[DistillState, dict[str, jax.Array]]:
        """One distillation step of the `active` blocks (default: all) from one teacher forward.

        Args:
          state: the train state.
          teacher_variables: the frozen teacher's variables.
          images: the global batch [B, H, W, C].
          active: block indices to train (static); the others are carried unchanged.
          start_step: global step at which this schedule phase began (static): the learning
            rate and path sampling use `state.step - start_step`.
          select_branches: run every op of a layer and select the sampled one's output, not
            `lax.switch` (static; `jit_train_step` sets it where `sharding.flat_collectives`
            asks). The same step either way: ops off the path keep their statistics.

        Returns:
          The new state and metrics: 'loss', 'lr', 'grad_norm' (float32 [len(active)]) and
          'branches' ({'block<k>': int32 [num_layers]}, the sampled branch positions).
        """
        active = tuple(range(self.num_blocks)) if active is None else tuple(active)
        local_step = state.step - start_step
        features = self.teacher_features(teacher_variables, images, self.teacher_stop(active))
        names = [paths_lib.block_name(k) for k in active]
        branches = {name: self.sample_branches(state.rng, k, local_step)
                    for k, name in zip(active, names)}
        blocks = {k: self.blocks[k].clone(select_branches=True) if select_branches
                  else self.blocks[k] for k in active}

        def loss_fn(params):
            losses, new_stats = [], {}
            for k, name in zip(active, names):
                block_input, target = self.block_io(features, images, k)
                output, updates = self._apply(blocks[k])(
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
            params[name], opt_state[name] = update_lib.masked_block_update(
                self.optimizer, self.choice_table(k), state.params[name], grads[name],
                state.opt_state[name], branches[name], lr)
            batch_stats[name] = update_lib.keep_off_path_stats(
                self.choice_table(k), state.batch_stats[name], new_stats[name], branches[name])
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
            one after another (`lax.map`, never a vmap over the switch index), each giving
            per-example errors: the sums over the (split) batch happen after the loop, so no
            collective is nested in it (`sharding.flat_collectives`).
          mask: float [B], 0 for padding examples.

        Returns:
          (float32 [num_blocks] sum over examples and paths of the per-example MSE,
           float32 scalar: examples counted per block).
        """
        features = self.teacher_features(teacher_variables, images,
                                         self.teacher_stop(range(self.num_blocks)))

        def one_path(path):
            errors = []
            for k, name in enumerate(self.names):
                block_input, target = self.block_io(features, images, k)
                output = self._apply(self.blocks[k])(
                    {"params": state.params[name], "batch_stats": state.batch_stats[name]},
                    block_input, path[name], False)
                errors.append(_per_example_mse(output, target))
            return jnp.stack(errors)  # [num_blocks, B]

        errors = jax.lax.map(one_path, paths)  # [num_paths, num_blocks, B]
        sums = jnp.sum(errors * mask, axis=2)
        num_paths = next(iter(paths.values())).shape[0]
        return jnp.sum(sums, axis=0), jnp.sum(mask) * num_paths

    # -- compiled versions --

    def jit_train_step(self, mesh: Mesh, active: Sequence[int] | None = None,
                       start_step: int = 0, donate: bool = True) -> Callable:
        """`train_step` compiled for `mesh`: batch split over every mesh axis, state replicated
        (ops selected, not switched, where `sharding.flat_collectives(mesh)`)."""
        select = sharding_lib.flat_collectives(mesh)
        step = lambda s, t, x: self.train_step(s, t, x, active, start_step, select)
        return loop_lib.jit_sharded(step, mesh, "rrb", donate)

    def jit_eval_step(self, mesh: Mesh) -> Callable:
        return loop_lib.jit_sharded(self.eval_step, mesh, "rrbbr")


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
    return loop_lib.memoised(
        _DISTILLERS, key, lambda: _build_distiller(config, teacher, steps_per_epoch, space))


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
        optimizer=update_lib.make_optimizer(config.optimizer, config.weight_decay, kwargs),
        learning_rates=update_lib.per_block(config.learning_rates, num_blocks,
                                            default_learning_rates(num_blocks),
                                            "distill.learning_rates"),
        lr_decay=float(config.lr_decay),
        decay_steps=max(1, round(config.lr_decay_epochs * steps_per_epoch)),
        loss_weights=update_lib.per_block(config.loss_weights, num_blocks, (1.0,),
                                          "distill.loss_weights"),
        sampling=config.sampling,
        conv_impl=cpu_conv.resolve(config.conv_impl))


# ---- the loop -----------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `distill.<field>` to fix for values the loop cannot use."""
    need = loop_lib.check_loop_config(config, "distill", SCHEDULES)
    need(0 < config.lr_decay <= 1, "lr_decay", "must be in (0, 1]")
    need(config.lr_decay_epochs > 0, "lr_decay_epochs", "must be > 0")
    need(all(w >= 0 for w in config.loss_weights), "loss_weights", "must all be >= 0")
    need(config.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(config.val_num_paths >= 1, "val_num_paths", "must be >= 1")
    for field in ("val_every_steps", "val_num_batches"):
        need(config[field] >= 0, field, "must be >= 0")


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


def compile_train_step(distiller: Distiller, mesh: Mesh, phase: loop_lib.Phase,
                       state: DistillState, teacher_variables: PyTree,
                       batch_shape: Sequence[int]) -> Callable:
    """The phase's train step compiled ahead of time (once per distiller, mesh, phase, shape)."""
    cache_key = ("train", mesh, phase.active, phase.start, tuple(batch_shape),
                 tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(teacher_variables)))
    images = jax.ShapeDtypeStruct(tuple(batch_shape), jnp.float32,
                                  sharding=sharding_lib.batch_sharding(mesh))
    return loop_lib.compile_step(
        distiller, cache_key, lambda: distiller.jit_train_step(mesh, phase.active, phase.start),
        (state, teacher_variables, images))


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
        checkpoint is kept; on resume one that does not restore is set aside).
    """
    watch = metrics_lib.Stopwatch()
    check_config(config)
    mesh = mesh or sharding_lib.make_mesh()
    info = train_data.info
    steps_per_epoch = int(config.steps_per_epoch or info.num_batches)
    distiller = make_distiller(config, teacher, steps_per_epoch, space)
    steps_per_block = int(config.num_steps or math.ceil(config.num_epochs * steps_per_epoch))
    phases = loop_lib.make_phases(config.schedule, distiller.num_blocks, steps_per_block)
    total_steps = phases[-1].stop
    teacher_variables = jax.device_put(teacher_variables, NamedSharding(mesh, P()))
    validate = _validator(distiller, config, mesh, teacher_variables, val_data)

    def periodic_validation(step, state):
        if (validate and config.val_every_steps and step % config.val_every_steps == 0
                and step != total_steps):
            validate(step, state, loop)

    loop, state, start_step = loop_lib.start_loop(
        workdir, config, loop_lib.init_state(distiller, config.seed, info.image_shape, mesh),
        total_steps, HISTORY_FILE, {"validation": []}, section="distill", what="distillation",
        loss_name="distillation loss",
        nan_hint="lower distill.learning_rates or check the teacher and data",
        mean_keys=("loss", "grad_norm"), last_keys=("lr",),
        record=lambda step, means: {"step": step,
                                    "loss": {n: v["loss"] for n, v in means.items()}},
        after_step=periodic_validation)
    batch_shape = (info.global_batch_size, *info.image_shape)
    try:
        with jax.set_mesh(mesh):
            if validate and start_step == 0:
                validate(0, state, loop)
            for phase in phases:
                state = loop.run_phase(
                    phase, lambda phase=phase: _step_fn(
                        compile_train_step(distiller, mesh, phase, state, teacher_variables,
                                           batch_shape), teacher_variables),
                    state, train_data, start_step)
            if validate:
                validate(total_steps, state, loop)
            loop.history.save()
    finally:
        loop.close()
    figures = _figures(loop, distiller, config, mesh, info, start_step, watch.elapsed())
    metrics_lib.write_json(os.path.join(workdir, loop_lib.FIGURES_FILE), figures)
    return state.variables(), figures


def _step_fn(compiled: Callable, teacher_variables: PyTree) -> Callable:
    return lambda state, batch: compiled(state, teacher_variables, batch["image"])


def _validator(distiller: Distiller, config: ml_collections.ConfigDict, mesh: Mesh,
               teacher_variables: PyTree, val_data: Any | None) -> Callable | None:
    """(step, state, loop) -> None: the validation MSE per block (fixed paths) into the writer
    and the history; None without val_data."""
    if val_data is None:
        logging.warning("No validation data: distillation reports no validation loss.")
        return None
    eval_step = distiller.compiled.setdefault(("eval", mesh), distiller.jit_eval_step(mesh))
    paths = validation_paths(distiller, config.val_num_paths, config.seed)

    def validate(step: int, state: DistillState, loop: loop_lib.StepLoop) -> None:
        losses = evaluate(eval_step, state, teacher_variables, val_data, paths,
                          config.val_num_batches)
        loop.writer.write_scalars(step, {f"val/{name}/loss": float(v)
                                         for name, v in zip(distiller.names, losses)})
        records = [r for r in loop.history["validation"] if r["step"] != step]
        loop.history["validation"] = records + [{"step": step,
                                                 "loss": [float(v) for v in losses]}]
        logging.info("Step %d validation loss per block: %s", step,
                     ", ".join(f"{v:.5g}" for v in losses))

    return validate


def _figures(loop: loop_lib.StepLoop, distiller: Distiller, config: Any, mesh: Mesh,
             info: Any, start_step: int, wall_seconds: float) -> dict[str, Any]:
    """The run's headline figures (see `train_supernet`)."""
    names = distiller.names
    validation = loop.history["validation"]
    by_step = {r["step"]: r["loss"] for r in validation}
    init, final = by_step.get(0), by_step.get(loop.total_steps)
    ratio = ([f / i if i else float("inf") for i, f in zip(init, final)]
             if init and final else None)
    last: dict[str, float] = {}
    for record in loop.history["train"]:
        last.update(record["loss"])
    return {
        **loop.figures(info, mesh, start_step, wall_seconds),
        "updates_per_op": paths_lib.updates_per_op(distiller.space, loop.total_steps),
        "schedule": config.schedule, "space": distiller.space.name, "blocks": names,
        "train_loss_final": [last.get(name) for name in names],
        "val_loss_init": init, "val_loss_final": final, "val_loss_ratio": ratio,
        "val_loss_ratio_max": max(ratio) if ratio else None, "val_history": validation,
    }
