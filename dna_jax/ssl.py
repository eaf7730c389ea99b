"""DNA++: self-supervised block-wise training of the supernet (no teacher), after BossNAS.

Siamese supernets. The online side has, per block, the supernet block, a projector MLP
(global average pool -> hidden -> out) and a predictor MLP (out -> hidden -> out); the target
side has the block and the projector, and its weights are an exponential moving average of the
online ones with BYOL's momentum schedule m(t) = 1 - (1 - base) (cos(pi t / T) + 1) / 2
(base at the start of a block's training, 1 at its end). The MLPs use LayerNorm, not
BatchNorm, so a candidate's projection depends on its own example only: that keeps the
per-candidate BatchNorm recalibration of the rating confined to the supernet block.

One step of a block samples P paths (`num_paths`), each with its own pair of augmented views
(views 2p and 2p + 1 of the batch). With t_p(v) the L2-normalised target projection of path p
on its view v, the ensemble target of view v is T(v) = mean_p t_p(v): every path is pulled
toward the centre of the population. With q_p(v) the online prediction, the loss is the
normalised MSE, symmetrised over the two views and averaged over the paths:

  L = mean_p mean_b [ (2 - 2 cos(q_p(v1), T(v2))) + (2 - 2 cos(q_p(v2), T(v1))) ]

plus the collapse guards on u = sqrt(D) * z / |z|, z the online projections of each view
(VICReg's terms on the normalised output, so whitened unit-sphere outputs score 0):
  variance   = mean_d relu(variance_target - sqrt(Var_b(u_d) + 1e-4))   (per-dim std hinge)
  covariance = sum_{i != j} Cov(u)_ij^2 / D                               (decorrelation)
weighted by `variance_weight` and `covariance_weight`. `output_std` = mean_d Std_b(u_d) is
logged with them (1 for outputs spread over the sphere, 0 when collapsed).

Masked updates as in DNA (`dna_jax.distill.masked_block_update`): an op on none of the P
paths of a step keeps its online weights, its optimizer state and its target (EMA) weights
bitwise. The heads are always on the path.

Schedules (`schedule`):
  * 'sequential' (default, BossNAS): blocks are trained one after another; block k is fed
    by the views passed through the TARGET network's best paths of blocks < k, each chosen
    by rating that block (`rate_ssl_block`) when its training ends.
  * 'all_blocks': every block at once; for path p, block k is fed by the target network's
    block k - 1 on the same path (a stop-gradient chain of the target network).
The earlier blocks of a feeding chain normalise with the statistics of the batch at hand
(training-mode BatchNorm, statistics not stored): their running statistics mix every path.

Rating without a teacher (`rate_ssl_block`): first the target network rates every candidate
with the prefix-shared evaluator of `dna_jax.rate`, and the mean of their normalised
projections is the ensemble target ("the population centre"); then the online network rates
every candidate by its loss against that centre, on two fixed views of the rating batches,
BatchNorm recalibrated per candidate (`rate.bn_mode`). Both walks plug a `LeafReduction`
into `rate.BlockRater`. The tables have the DNA layout (`score` = `ssl_loss`, lower is
better), so search and export read them unchanged.

Artifacts: `supernet/` the online blocks in DNA's format ({'block<k>': {'params',
'batch_stats'}}, what retraining can inherit) and `ssl_variables/` the target blocks and the
heads ({'online_heads', 'target'}), both through `distill.save_supernet`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import artifacts
from dna_jax import checkpoint as checkpoint_lib
from dna_jax import distill
from dna_jax import metrics as metrics_lib
from dna_jax import rate as rate_lib
from dna_jax import sharding as sharding_lib
from dna_jax.data import views as views_lib
from dna_jax.models import cpu_conv
from dna_jax.models.layers import LayerConfig
from dna_jax.models.supernet import SupernetBlock
from dna_jax.space import SearchSpace, get_space

PyTree = Any
SCHEDULES = ("sequential", "all_blocks")
OPTIMIZERS = ("lars", "adam", "adamw", "sgd")
HEAD_GROUPS = ("projector", "predictor")
SCORE_METRIC = "ssl_loss"
CHECKPOINT_SUBDIR = "checkpoints"
HISTORY_FILE = "ssl_history.json"
PATHS_FILE = "chosen_paths.json"
FIGURES_FILE = "figures.json"
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def get_default_config() -> ml_collections.ConfigDict:
    """The `ssl` config section (DNA++); every field with its default and meaning.

    Fields:
      space: search-space preset (`dna_jax.space.get_space`); block k > 0 takes block k - 1's
        output (`out_channels` wide), so any preset works without a teacher.
      schedule: 'sequential' (BossNAS: block after block, fed through the best paths chosen
        so far) or 'all_blocks' (every block each step, fed by the target's previous block).
      num_epochs / num_steps: training length per block ('sequential') or in all
        ('all_blocks'); num_steps > 0 wins. steps_per_epoch > 0 overrides the dataset's.
      num_paths: P, paths sampled per step, each with its own two views.
      sampling: 'uniform' or 'fair' per path (as in `dna_jax.distill`).
      learning_rates: base rate per block, or one for all.
      warmup_epochs: linear warm-up, then cosine decay to 0 over the block's steps.
      optimizer: 'lars' (optax.lars, the large-batch SSL optimizer), 'adam', 'adamw' or
        'sgd'; optimizer_kwargs are passed on (LARS: momentum, trust_coefficient, eps).
      weight_decay: decoupled for 'lars' / 'adamw' (optax's), an L2 gradient term for
        'adam' / 'sgd'; exclude_bn_and_bias keeps it (and LARS's trust ratio) off
        one-dimensional parameters (BatchNorm scales and biases, LayerNorm, dense biases).
      base_momentum: EMA momentum of the target at the start of a block's training.
      projector_hidden, projector_dim, predictor_hidden: MLP sizes (BossNAS: 4096, 256, 4096).
      variance_weight, covariance_weight, variance_target: the collapse guards (module
        docstring). Defaults keep VICReg's variance : covariance ratio of 25 : 1.
      dtype, padding, bn_eps, bn_momentum: the supernet's LayerConfig.
      conv_impl: 'auto' ('taps' on CPU: XLA:CPU's conv gradients are slow), 'taps' or 'xla'.
      fast_compile: compile the step with XLA's cheap options (tests: compiling dominates).
      augment: the two-view recipe (`dna_jax.data.views.get_default_config`).
      seed: initialisation, path sampling, augmentation and data order.
      log_every_steps, checkpoint_every_steps, max_checkpoints: the loop.
    """
    return ml_collections.ConfigDict(dict(
        space="small",
        schedule="sequential",
        num_epochs=6.0,
        num_steps=0,
        steps_per_epoch=0,
        num_paths=4,
        sampling="uniform",
        learning_rates=(),
        warmup_epochs=0.5,
        optimizer="lars",
        optimizer_kwargs=ml_collections.ConfigDict(dict(momentum=0.9, trust_coefficient=0.001,
                                                        eps=0.0)),
        weight_decay=1e-6,
        exclude_bn_and_bias=True,
        base_momentum=0.99,
        projector_hidden=256,
        projector_dim=64,
        predictor_hidden=256,
        variance_weight=1.0,
        covariance_weight=0.04,
        variance_target=1.0,
        dtype="float32",
        padding="same",
        bn_eps=1e-3,
        bn_momentum=0.9,
        conv_impl="auto",
        fast_compile=False,
        augment=views_lib.get_default_config(),
        seed=0,
        log_every_steps=50,
        checkpoint_every_steps=1000,
        max_checkpoints=2,
    ))


def check_config(config: Any) -> None:
    """Raises ValueError naming the `ssl.<field>` to fix."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"ssl.{field} {what}, got {config[field]!r}")

    need(config.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
    need(config.sampling in distill.SAMPLINGS, "sampling", f"must be one of {distill.SAMPLINGS}")
    need(config.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
    need(config.num_paths >= 1, "num_paths", "must be >= 1")
    need(config.num_steps > 0 or config.num_epochs > 0, "num_epochs",
         "must be > 0 when ssl.num_steps is 0")
    need(0.0 <= config.base_momentum <= 1.0, "base_momentum", "must be in [0, 1]")
    need(config.variance_weight >= 0, "variance_weight", "must be >= 0")
    need(config.covariance_weight >= 0, "covariance_weight", "must be >= 0")
    need(config.dtype in distill.DTYPES, "dtype", f"must be one of {sorted(distill.DTYPES)}")
    need(config.conv_impl in cpu_conv.CONV_IMPLS, "conv_impl",
         f"must be one of {cpu_conv.CONV_IMPLS}")
    need(all(lr > 0 for lr in config.learning_rates), "learning_rates", "must all be > 0")
    need(config.log_every_steps >= 1, "log_every_steps", "must be >= 1")
    for name in ("projector_hidden", "projector_dim", "predictor_hidden"):
        need(config[name] >= 1, name, "must be >= 1")
    for name in ("blur_prob", "solarize_prob"):
        if len(config.augment[name]) != 2:
            raise ValueError(f"ssl.augment.{name} needs one probability per view type (2), "
                             f"got {config.augment[name]!r}")


# ---- heads and losses --------------------------------------------------------------------------


class MLPHead(nn.Module):
    """Dense -> LayerNorm -> ReLU -> Dense on the last axis (pool feature maps first with
    `global_pool`)."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = nn.Dense(self.hidden, name="hidden")(x)
        x = nn.relu(nn.LayerNorm(name="norm")(x))
        return nn.Dense(self.out, name="out")(x)


def global_pool(y: jax.Array) -> jax.Array:
    """[..., H, W, C] feature maps -> [..., C] float32 means."""
    return jnp.mean(y.astype(jnp.float32), axis=(-3, -2))


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / |x| along `axis` (0 stays 0)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis, keepdims=True), 1e-12))


def cosine_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """2 - 2 cos(prediction, target) per example ([..., D] -> [...]), target normalised too."""
    return 2.0 - 2.0 * jnp.sum(normalize(prediction) * normalize(target), axis=-1)


def ensemble_target(projections: jax.Array) -> jax.Array:
    """[P, B, D] target projections of P paths -> [B, D] mean of their L2-normalised rows."""
    return jnp.mean(normalize(projections.astype(jnp.float32)), axis=0)


def collapse_guards(z: jax.Array, variance_target: float = 1.0
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(variance hinge, covariance, output std) of projections z [B, D], on sqrt(D) z / |z|.

    Unbiased batch statistics (VICReg's); see the module docstring for the definitions.
    """
    batch, dim = z.shape
    u = math.sqrt(dim) * normalize(z.astype(jnp.float32))
    centred = u - jnp.mean(u, axis=0, keepdims=True)
    var = jnp.sum(jnp.square(centred), axis=0) / max(batch - 1, 1)
    variance = jnp.mean(jax.nn.relu(variance_target - jnp.sqrt(var + 1e-4)))
    cov = centred.T @ centred / max(batch - 1, 1)
    off_diagonal = cov - jnp.diag(jnp.diag(cov))
    covariance = jnp.sum(jnp.square(off_diagonal)) / dim
    return variance, covariance, jnp.mean(jnp.sqrt(var))


def momentum_schedule(base: float, step: jax.Array, total_steps: int) -> jax.Array:
    """BYOL's EMA momentum: base at step 0, rising to 1 at `total_steps` (cosine)."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema(target: PyTree, online: PyTree, momentum: jax.Array) -> PyTree:
    return jax.tree.map(lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype),
                        target, online)


def masked_ema(choice_table: Sequence[np.ndarray], target: PyTree, online: PyTree,
               branches: jax.Array, momentum: jax.Array) -> PyTree:
    """EMA of one block's target weights; ops on none of the paths keep theirs bitwise."""
    target_groups, online_groups = distill.op_groups(target), distill.op_groups(online)
    new = {}
    for group, subtree in target_groups.items():
        updated = ema(subtree, online_groups[group], momentum)
        where = distill.group_branch(group)
        if where is not None and len(choice_table[where[0]]) > 1:
            moved = distill.on_path(branches, *where)
            updated = jax.tree.map(lambda u, t: jnp.where(moved, u, t), updated, subtree)
        new[group] = updated
    return distill.merge_groups(new)


# ---- optimizers --------------------------------------------------------------------------------


def decay_mask(params: PyTree) -> PyTree:
    """True for parameters that take weight decay: more than one dimension (no BN/LN
    scales, no biases)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_ssl_optimizer(name: str, weight_decay: float = 0.0,
                       kwargs: Mapping[str, Any] | None = None,
                       exclude_bn_and_bias: bool = True) -> optax.GradientTransformation:
    """A learning-rate-free optimizer (the scheduled rate multiplies its updates outside).

    'lars': optax.lars with decoupled weight decay and the trust ratio masked to
    multi-dimensional parameters when `exclude_bn_and_bias`; 'adamw': optax.adamw with the
    same decay mask; 'adam' / 'sgd': `distill.make_optimizer` (L2 term added to the
    gradient, masked likewise).
    """
    kwargs = dict(kwargs or {})
    mask = decay_mask if exclude_bn_and_bias else None
    if name == "lars":
        return optax.lars(1.0, weight_decay=weight_decay, weight_decay_mask=mask or True,
                          trust_ratio_mask=mask or True, **kwargs)
    if name == "adamw":
        return optax.adamw(1.0, weight_decay=weight_decay, mask=mask, **kwargs)
    if name in ("adam", "sgd"):
        base = distill.make_optimizer(name, 0.0, kwargs)
        if weight_decay:
            base = optax.chain(optax.add_decayed_weights(weight_decay, mask), base)
        return base
    raise ValueError(f"ssl.optimizer must be one of {OPTIMIZERS}, got {name!r}")


# ---- the train state ---------------------------------------------------------------------------


class SSLState(struct.PyTreeNode):
    """Everything a DNA++ run carries from step to step.

    Attributes:
      step: global step.
      params: online {'block<k>': {'block': supernet block, 'projector', 'predictor'}}.
      batch_stats: online {'block<k>': block BatchNorm statistics}.
      target_params: {'block<k>': {'block', 'projector'}} (EMA of the online ones).
      target_batch_stats: {'block<k>': ...} from the target's own forward passes.
      opt_state: {'block<k>': {group: state}}: the block's op groups (`distill.op_groups`)
        and the head groups 'projector', 'predictor'.
      rng: base key (never changes; step keys are folded in).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    target_params: PyTree
    target_batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array

    def supernet_variables(self) -> dict[str, dict[str, PyTree]]:
        """The online blocks in DNA's supernet format (rating, export, inheritance)."""
        return {name: {"params": p["block"], "batch_stats": self.batch_stats[name]}
                for name, p in self.params.items()}

    def target_variables(self) -> dict[str, dict[str, PyTree]]:
        """The target blocks: {'block<k>': {'params', 'batch_stats'}}."""
        return {name: {"params": p["block"], "batch_stats": self.target_batch_stats[name]}
                for name, p in self.target_params.items()}

    def ssl_variables(self) -> dict[str, PyTree]:
        """What rating needs besides the supernet: online heads, target blocks and heads."""
        return {
            "online_heads": {name: {g: p[g] for g in HEAD_GROUPS}
                             for name, p in self.params.items()},
            "target": self.target_variables(),
            "target_heads": {name: {"projector": p["projector"]}
                             for name, p in self.target_params.items()},
        }


@dataclasses.dataclass(frozen=True)
class Phase:
    """Global steps [start, stop) training the blocks `active` with one compiled step."""

    active: tuple[int, ...]
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class SelfSupervised:
    """The static half of DNA++: modules, optimizer, schedules, path sampling.

    Build with `make_trainer`. Path sampling reuses `dna_jax.distill.Distiller`'s methods.
    """

    space: SearchSpace
    blocks: tuple[SupernetBlock, ...]
    projector: MLPHead
    predictor: MLPHead
    optimizer: optax.GradientTransformation
    learning_rates: tuple[float, ...]
    steps_per_block: int
    warmup_steps: int
    schedule: str
    num_paths: int
    base_momentum: float
    variance_weight: float
    covariance_weight: float
    variance_target: float
    conv_impl: str = "auto"
    sampling: str = "uniform"
    fast_compile: bool = False
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                       repr=False)

    choice_table = distill.Distiller.choice_table
    sample_branches = distill.Distiller.sample_branches
    branches_to_ops = distill.Distiller.branches_to_ops

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def names(self) -> list[str]:
        return [distill.block_name(k) for k in range(self.num_blocks)]

    def phases(self) -> list[Phase]:
        if self.schedule == "all_blocks":
            return [Phase(tuple(range(self.num_blocks)), 0, self.steps_per_block)]
        return [Phase((k,), k * self.steps_per_block, (k + 1) * self.steps_per_block)
                for k in range(self.num_blocks)]

    @property
    def total_steps(self) -> int:
        return self.phases()[-1].stop

    def learning_rate(self, k: int, local_step: jax.Array) -> jax.Array:
        """Linear warm-up over `warmup_steps`, then cosine decay to 0 at the block's end."""
        step = jnp.asarray(local_step, jnp.float32)
        warm = max(self.warmup_steps, 1)
        warmup = (step + 1.0) / warm
        decay_span = max(self.steps_per_block - self.warmup_steps, 1)
        cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip((step - self.warmup_steps) / decay_span,
                                                        0.0, 1.0)))
        factor = jnp.where(step < self.warmup_steps, warmup, cosine)
        return self.learning_rates[k] * factor

    def momentum(self, local_step: jax.Array) -> jax.Array:
        return momentum_schedule(self.base_momentum, local_step, self.steps_per_block)

    def sample_paths(self, rng: jax.Array, k: int, local_step: jax.Array) -> jax.Array:
        """int32 [P, L] branch positions of block k's P paths at `local_step`."""
        return jnp.stack([self.sample_branches(jax.random.fold_in(rng, 1000 + p), k,
                                               local_step) for p in range(self.num_paths)])

    # -- init --

    def block_input_shape(self, k: int, image_shape: Sequence[int]) -> tuple[int, ...]:
        if k == 0:
            return (1, *image_shape)
        stride = self.space.stem_stride * math.prod(b.stride for b in self.space.blocks[:k])
        return (1, max(1, image_shape[0] // stride), max(1, image_shape[1] // stride),
                self.blocks[k].in_channels)

    def init(self, rng: jax.Array, image_shape: Sequence[int]) -> SSLState:
        """Fresh state (pure; see `init_state`): the target starts equal to the online side."""
        params, batch_stats, opt_state = {}, {}, {}
        for k, block in enumerate(self.blocks):
            key = jax.random.fold_in(jax.random.fold_in(rng, 1), k)
            variables = block.init(jax.random.fold_in(key, 0),
                                   jnp.zeros(self.block_input_shape(k, image_shape)),
                                   jnp.zeros((block.num_layers,), jnp.int32), False)
            channels = self.space.blocks[k].out_channels
            projector = self.projector.init(jax.random.fold_in(key, 1),
                                            jnp.zeros((1, channels)))["params"]
            predictor = self.predictor.init(jax.random.fold_in(key, 2),
                                            jnp.zeros((1, self.projector.out)))["params"]
            name = distill.block_name(k)
            params[name] = {"block": variables["params"], "projector": projector,
                            "predictor": predictor}
            batch_stats[name] = variables.get("batch_stats", {})
            groups = distill.op_groups(variables["params"])
            groups.update(projector=projector, predictor=predictor)
            opt_state[name] = {g: self.optimizer.init(t) for g, t in groups.items()}
        target = {name: {"block": p["block"], "projector": p["projector"]}
                  for name, p in params.items()}
        return SSLState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                        target_params=target, target_batch_stats=dict(batch_stats),
                        opt_state=opt_state, rng=jax.random.fold_in(rng, 2))

    # -- forward pieces --

    def _block(self, k: int, params: PyTree, stats: PyTree, x: jax.Array,
               branches: jax.Array) -> tuple[jax.Array, PyTree]:
        """Training-mode forward of block k on path `branches`; (output, new statistics)."""
        y, updates = self.blocks[k].apply({"params": params, "batch_stats": stats}, x,
                                          self.branches_to_ops(k, branches), True,
                                          mutable=["batch_stats"])
        return y, updates["batch_stats"]

    def feed_forward(self, block_variables: Mapping[str, PyTree], x: jax.Array,
                     paths: Sequence[jax.Array]) -> jax.Array:
        """Images through blocks 0..len(paths)-1 (`block_variables`: {'block<j>': {'params',
        'batch_stats'}}, the target's) on fixed paths (op indices), batch-statistics
        BatchNorm, no gradient: the input of block len(paths)."""
        for j, ops in enumerate(paths):
            x = self.blocks[j].apply(block_variables[distill.block_name(j)], x, ops, True,
                                     mutable=["batch_stats"])[0]
        return jax.lax.stop_gradient(x)

    def _views_of(self, views: jax.Array, p: int) -> jax.Array:
        """The two views of path p, concatenated on the batch axis: [2B, H, W, C]."""
        return jnp.concatenate([views[:, 2 * p], views[:, 2 * p + 1]], axis=0)

    def block_inputs(self, state: SSLState, views: jax.Array, active: Sequence[int],
                     prefix_paths: Sequence[jax.Array], all_branches: Mapping[int, jax.Array]
                     ) -> dict[int, list[jax.Array]]:
        """{block: [input of path p, [2B, ...]] per path} (see the schedules)."""
        pair = [self._views_of(views, p) for p in range(self.num_paths)]
        if self.schedule == "sequential":
            (k,) = active
            if k == 0:
                return {0: pair}
            stacked = jnp.concatenate(pair, axis=0)
            fed = self.feed_forward(state.target_variables(), stacked, prefix_paths)
            return {k: jnp.split(fed, self.num_paths, axis=0)}
        inputs, chain = {}, pair
        for k in range(self.num_blocks):
            if k in active:
                inputs[k] = chain
            if k == self.num_blocks - 1:
                break
            name = distill.block_name(k)
            chain = [jax.lax.stop_gradient(self._block(
                k, state.target_params[name]["block"], state.target_batch_stats[name], x,
                all_branches[k][p])[0]) for p, x in enumerate(chain)]
        return inputs

    def block_loss(self, k: int, params: PyTree, state: SSLState, inputs: Sequence[jax.Array],
                   branches: jax.Array) -> tuple[jax.Array, dict]:
        """Block k's loss on its P paths; aux: metrics, new online and target statistics."""
        name = distill.block_name(k)
        target = state.target_params[name]
        stats, target_stats = state.batch_stats[name], state.target_batch_stats[name]

        def one_path(carry, path):  # one path's online and target forward
            stats, target_stats = carry
            x, path_branches = path
            y, stats = self._block(k, params["block"], stats, x, path_branches)
            z = self.projector.apply({"params": params["projector"]}, global_pool(y))
            q = self.predictor.apply({"params": params["predictor"]}, z)
            y_t, target_stats = self._block(k, target["block"], target_stats, x, path_branches)
            t = self.projector.apply({"params": target["projector"]}, global_pool(y_t))
            return (stats, target_stats), (z, q, t)

        # A scan over the paths compiles the block once, not P times; the BatchNorm running
        # statistics are carried from path to path as in a loop.
        (stats, target_stats), (projections, predictions, targets) = jax.lax.scan(
            one_path, (stats, target_stats), (jnp.stack(list(inputs)), branches))
        centre = jax.lax.stop_gradient(ensemble_target(targets))  # [2B, D]
        half = centre.shape[0] // 2
        swapped = jnp.concatenate([centre[half:], centre[:half]], axis=0)
        byol = 2.0 * jnp.mean(cosine_loss(predictions, swapped[None]))  # mean over paths
        views = jnp.concatenate([projections[:, :half], projections[:, half:]], axis=0)
        guards = jax.vmap(lambda z: collapse_guards(z, self.variance_target))(views)
        variance, covariance, output_std = (jnp.mean(g) for g in guards)
        loss = (byol + self.variance_weight * variance + self.covariance_weight * covariance)
        aux = {"loss": loss, "byol_loss": byol, "variance": variance, "covariance": covariance,
               "output_std": output_std}
        return loss, (aux, stats, target_stats)

    # -- the step --

    def train_step(self, state: SSLState, views: jax.Array,
                   prefix_paths: tuple[jax.Array, ...] = (), active: Sequence[int] = (0,),
                   start_step: int = 0) -> tuple[SSLState, dict]:
        """One DNA++ step of the `active` blocks.

        Args:
          state: the train state.
          views: [B, 2P, H, W, C] normalised views (2 per path).
          prefix_paths: 'sequential' only: op indices of the chosen paths of blocks < k.
          active: blocks trained by this step (static).
          start_step: global step at which this phase began (static).

        Returns:
          The new state and metrics per active block ([len(active)] each): loss, byol_loss,
          variance, covariance, output_std, lr, momentum, grad_norm; 'branches' {'block<k>':
          int32 [P, L]}.
        """
        active = tuple(active)
        local_step = state.step - start_step
        branches = {k: self.sample_paths(state.rng, k, local_step)
                    for k in range(self.num_blocks)
                    if k in active or self.schedule == "all_blocks"}
        inputs = self.block_inputs(state, views, active, prefix_paths, branches)
        names = [distill.block_name(k) for k in active]

        def loss_fn(params):
            total, aux = 0.0, {}
            for k, name in zip(active, names):
                loss, aux[name] = self.block_loss(k, params[name], state, inputs[k], branches[k])
                total = total + loss
            return total, aux

        grads, aux = jax.grad(loss_fn, has_aux=True)({n: state.params[n] for n in names})
        params, opt_state = dict(state.params), dict(state.opt_state)
        batch_stats, target_params = dict(state.batch_stats), dict(state.target_params)
        target_stats = dict(state.target_batch_stats)
        momentum = self.momentum(local_step + 1)
        records = []
        for k, name in zip(active, names):
            lr = self.learning_rate(k, local_step)
            new, new_opt = self._update(k, state.params[name], grads[name],
                                        state.opt_state[name], branches[k], lr)
            params[name], opt_state[name] = new, new_opt
            old_target = state.target_params[name]
            target_params[name] = {
                "block": masked_ema(self.choice_table(k), old_target["block"], new["block"],
                                    branches[k], momentum),
                "projector": ema(old_target["projector"], new["projector"], momentum)}
            metrics, batch_stats[name], target_stats[name] = aux[name]
            records.append({**metrics, "lr": lr, "momentum": momentum,
                            "grad_norm": optax.tree.norm(grads[name])})
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  target_params=target_params, target_batch_stats=target_stats,
                                  opt_state=opt_state)
        metrics = {key: jnp.stack([r[key] for r in records]) for key in records[0]}
        metrics["branches"] = {distill.block_name(k): branches[k] for k in active}
        return new_state, metrics

    def _update(self, k: int, params: PyTree, grads: PyTree, opt_state: PyTree,
                branches: jax.Array, lr: jax.Array) -> tuple[PyTree, PyTree]:
        """Masked update of the block (DNA's machinery) and a plain update of the heads."""
        block_opt = {g: s for g, s in opt_state.items() if g not in HEAD_GROUPS}
        block, block_opt = distill.masked_block_update(
            self.optimizer, self.choice_table(k), params["block"], grads["block"], block_opt,
            branches, lr)
        new, new_opt = {"block": block}, dict(block_opt)
        for group in HEAD_GROUPS:
            new[group], new_opt[group] = distill.optimizer_step(
                self.optimizer, params[group], grads[group], opt_state[group], lr)
        return new, new_opt

    def jit_train_step(self, mesh: Mesh, phase: Phase, donate: bool = True) -> Callable:
        replicated = NamedSharding(mesh, P())
        batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        step = cpu_conv.with_tap_convs(
            lambda s, v, paths: self.train_step(s, v, paths, phase.active, phase.start),
            self.conv_impl)
        return jax.jit(step, in_shardings=(replicated, batch, replicated),
                       out_shardings=(replicated, replicated),
                       donate_argnums=(0,) if donate else ())


def _per_block(values: Sequence[float], num_blocks: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values) or (0.05,)
    if len(values) == 1:
        values = values * num_blocks
    if len(values) != num_blocks:
        raise ValueError(f"ssl.learning_rates has {len(values)} entries for {num_blocks} "
                         "blocks (give one per block, or one for all)")
    return values


def block_input_channels(space: SearchSpace) -> list[int]:
    """Channels entering each block without a teacher: the image, then the previous block's
    output width."""
    return [3] + [b.out_channels for b in space.blocks[:-1]]


def build_ssl_blocks(space: SearchSpace, config: LayerConfig | None = None
                     ) -> list[SupernetBlock]:
    config = config or LayerConfig()
    return [SupernetBlock(space, k, c, config)
            for k, c in enumerate(block_input_channels(space))]


_TRAINERS: dict[Any, SelfSupervised] = {}


def make_trainer(config: Any, steps_per_epoch: int, space: SearchSpace | None = None
                 ) -> SelfSupervised:
    """The SelfSupervised of an `ssl` config, memoised (compiled steps are reused)."""
    check_config(config)
    space = space or get_space(config.space)
    steps_per_epoch = int(config.steps_per_epoch or steps_per_epoch)
    key = (json.dumps(artifacts.to_jsonable(config), sort_keys=True, default=str),
           steps_per_epoch, space)
    if key in _TRAINERS:
        return _TRAINERS[key]
    layer_config = LayerConfig(padding=config.padding, bn_eps=config.bn_eps,
                               bn_momentum=config.bn_momentum, dtype=distill.DTYPES[config.dtype])
    kwargs = config.optimizer_kwargs
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs or {})
    steps = int(config.num_steps or math.ceil(config.num_epochs * steps_per_epoch))
    trainer = SelfSupervised(
        space=space, blocks=tuple(build_ssl_blocks(space, layer_config)),
        projector=MLPHead(config.projector_hidden, config.projector_dim),
        predictor=MLPHead(config.predictor_hidden, config.projector_dim),
        optimizer=make_ssl_optimizer(config.optimizer, config.weight_decay, kwargs,
                                     config.exclude_bn_and_bias),
        learning_rates=_per_block(config.learning_rates, len(space.blocks)),
        steps_per_block=steps,
        warmup_steps=min(steps, round(config.warmup_epochs * steps_per_epoch)),
        schedule=config.schedule, num_paths=int(config.num_paths),
        base_momentum=float(config.base_momentum),
        variance_weight=float(config.variance_weight),
        covariance_weight=float(config.covariance_weight),
        variance_target=float(config.variance_target), conv_impl=config.conv_impl,
        sampling=config.sampling, fast_compile=bool(config.fast_compile))
    if len(_TRAINERS) >= 8:
        _TRAINERS.pop(next(iter(_TRAINERS)))
    _TRAINERS[key] = trainer
    return trainer


def init_state(trainer: SelfSupervised, seed: int, image_shape: Sequence[int],
               mesh: Mesh) -> SSLState:
    """The initial state replicated on `mesh` (jitted with cheap compiler options)."""
    cache_key = ("init", mesh, tuple(image_shape))
    if cache_key not in trainer.compiled:
        init = jax.jit(lambda key: trainer.init(key, image_shape),
                       out_shardings=NamedSharding(mesh, P()))
        lowered = init.lower(jax.random.key(seed))
        try:
            trainer.compiled[cache_key] = lowered.compile(compiler_options=_FAST_COMPILE)
        except Exception:  # pylint: disable=broad-except  # a backend without these options
            trainer.compiled[cache_key] = lowered.compile()
    return trainer.compiled[cache_key](jax.random.key(seed))


def compile_train_step(trainer: SelfSupervised, mesh: Mesh, phase: Phase, state: SSLState,
                       views_shape: Sequence[int]) -> Callable:
    """The phase's step compiled ahead (once per trainer, mesh, phase and shape)."""
    num_prefix = phase.active[0] if trainer.schedule == "sequential" else 0
    cache_key = ("train", mesh, phase, tuple(views_shape))
    if cache_key not in trainer.compiled:
        step = trainer.jit_train_step(mesh, phase)
        views = jax.ShapeDtypeStruct(tuple(views_shape), jnp.float32,
                                     sharding=sharding_lib.batch_sharding(mesh))
        paths = tuple(jax.ShapeDtypeStruct((trainer.blocks[j].num_layers,), jnp.int32,
                                           sharding=NamedSharding(mesh, P()))
                      for j in range(num_prefix))
        lowered = step.lower(state, views, paths)
        trainer.compiled[cache_key] = lowered.compile(
            compiler_options=_FAST_COMPILE if trainer.fast_compile else None)
    return trainer.compiled[cache_key]


# ---- rating without a teacher ------------------------------------------------------------------


def _pooled_projection(projector: MLPHead, y: jax.Array, params: PyTree) -> jax.Array:
    """Block outputs y [A, G, B, h, w, c] -> projections [A, G, B, D]."""
    return projector.apply({"params": params}, global_pool(y))


def centre_reduction(trainer: SelfSupervised, projector_params: PyTree) -> rate_lib.LeafReduction:
    """Leaf values: the L2-normalised target projections, flattened: [A, G, 2B * D]."""
    projector = trainer.projector

    def fn(y, target, params):
        del target
        z = normalize(_pooled_projection(projector, y, params))
        return z.reshape(*z.shape[:2], -1)

    return rate_lib.LeafReduction(f"ssl_centre_{projector.hidden}_{projector.out}", fn,
                                  projector_params)


def loss_reduction(trainer: SelfSupervised, head_params: PyTree) -> rate_lib.LeafReduction:
    """Leaf values per candidate and rating batch: [ssl_loss, output_std] ([A, G, 2]).

    ssl_loss = mean_b (2 - 2 cos(q(v1), C(v2))) + (2 - 2 cos(q(v2), C(v1))), C the centre
    (the walk's target [G, 2B, D]), normalised like the training target.
    """
    projector, predictor = trainer.projector, trainer.predictor

    def fn(y, centre, params):
        z = _pooled_projection(projector, y, params["projector"])
        q = predictor.apply({"params": params["predictor"]}, z)
        half = centre.shape[1] // 2
        swapped = jnp.concatenate([centre[:, half:], centre[:, :half]], axis=1)
        loss = 2.0 * jnp.mean(cosine_loss(q, swapped[None]), axis=-1)
        u = math.sqrt(z.shape[-1]) * normalize(z)
        std = jnp.mean(jnp.std(u, axis=2), axis=-1)
        return jnp.stack([loss, std], axis=-1)

    return rate_lib.LeafReduction(
        f"ssl_loss_{projector.hidden}_{projector.out}_{predictor.hidden}", fn, head_params)


def rate_ssl_block(trainer: SelfSupervised, k: int, supernet: Mapping[str, PyTree],
                   ssl_variables: Mapping[str, PyTree], views: np.ndarray,
                   recal_views: np.ndarray | None, config: Any,
                   prefix_paths: Sequence[Sequence[int]], encodings: np.ndarray | None = None,
                   mesh: Mesh | None = None) -> rate_lib.BlockRating:
    """Rates candidates of block k by their SSL loss against the population centre.

    Args:
      trainer: the SelfSupervised (modules).
      k: the block.
      supernet: online variables {'block<k>': {'params', 'batch_stats'}}.
      ssl_variables: {'online_heads', 'target'} (`SSLState.ssl_variables`).
      views: float [2, R, B, H, W, C] two fixed views of the R rating batches (images).
      recal_views: [2, B_r, H, W, C] views of the recalibration batch ('recalibrate' mode).
      config: a `rate` config (bn_mode, memory budget, conv_impl, fast_compile; its
        rank_metric does not apply: the score is the SSL loss).
      prefix_paths: op indices of the chosen paths of blocks < k (the feeding chain).
      encodings: candidates (default: every candidate of the block).
      mesh: devices (default: all).

    Returns:
      A BlockRating with metrics 'ssl_loss' (the score) and 'output_std'; `batch_mse` holds
      the per-batch SSL loss and `batch_mae` the per-batch output std (noted in `info`).
    """
    name = distill.block_name(k)
    target = ssl_variables["target"]
    paths = [jnp.asarray(p, jnp.int32) for p in prefix_paths]
    feed = jax.jit(cpu_conv.with_tap_convs(
        lambda variables, x: trainer.feed_forward(variables, x, paths), config.conv_impl))

    def block_input(pair):  # [2, B, ...] -> [2B, ...] block input, views on the batch axis
        return np.asarray(feed(target, jnp.concatenate([pair[0], pair[1]], axis=0)))

    inputs = np.stack([block_input(views[:, r]) for r in range(views.shape[1])])
    recal = block_input(recal_views) if recal_views is not None else None
    if encodings is None:
        encodings = rate_lib.select_candidates(trainer.space, k, config.num_candidates,
                                               config.seed)
    block = trainer.blocks[k]
    centre_leaf = centre_reduction(trainer, ssl_variables["target_heads"][name]["projector"])
    target_rater = rate_lib.BlockRater(block, target[name], config, mesh, leaf=centre_leaf)
    num_batches, rows = inputs.shape[:2]
    total = np.zeros((num_batches, rows * trainer.projector.out), np.float64)

    def add(ids, first, values):  # values [n, G, 2B * D] of n distinct candidates
        total[first:first + values.shape[1]] += values.sum(0)

    encodings, _, centre_info = target_rater.evaluate_leaves(
        inputs, np.zeros((num_batches, 1), np.float32), recal, encodings, accumulate=add)
    distinct = len(np.unique(encodings, axis=0))
    centre = (total / distinct).reshape(num_batches, rows, -1).astype(np.float32)
    online_rater = rate_lib.BlockRater(
        block, supernet[name], config, mesh,
        leaf=loss_reduction(trainer, ssl_variables["online_heads"][name]))
    encodings, values, info = online_rater.evaluate_leaves(inputs, centre, recal, encodings)
    metrics = {SCORE_METRIC: values[..., 0].mean(1), "output_std": values[..., 1].mean(1)}
    seconds = info["seconds"] + centre_info["seconds"]
    info = {**info, "score": "ssl loss against the population centre (DNA++)",
            "batch_mse": "per-batch ssl_loss", "batch_mae": "per-batch output_std",
            "centre_seconds": centre_info["seconds"], "seconds": seconds,
            "candidates_per_second": len(encodings) / max(seconds, 1e-9),
            "prefix_paths": [list(map(int, p)) for p in prefix_paths]}
    return rate_lib.BlockRating(encodings, values[..., 0], values[..., 1], metrics,
                                SCORE_METRIC, info)


def best_path(rating: rate_lib.BlockRating) -> list[int]:
    """Op indices of the lowest-scored candidate."""
    return [int(o) for o in rating.encodings[int(np.argmin(rating.score))]]


def rate_ssl_blocks(trainer: SelfSupervised, supernet: Mapping[str, PyTree],
                    ssl_variables: Mapping[str, PyTree], views: np.ndarray,
                    recal_views: np.ndarray | None, config: Any, out_dir: str,
                    mesh: Mesh | None = None) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """Rates every block in order (block k fed through the best paths of blocks < k) and
    writes DNA's `<block>.npz` / `.json` tables; blocks already rated with the same
    fingerprint are skipped.

    Returns:
      ([(npz path, json path)] per block, the best path of every block).
    """
    rate_lib.check_config(config)
    space = trainer.space
    data_digest = rate_lib.tree_digest({"rate": views, "recal": recal_views})
    variables_digest = rate_lib.tree_digest({"supernet": supernet, "ssl": ssl_variables})
    paths, chosen = [], []
    for k in range(trainer.num_blocks):
        name = space.blocks[k].name
        prefix = os.path.join(out_dir, name)
        encodings = rate_lib.select_candidates(space, k, config.num_candidates, config.seed)
        fingerprint = rate_lib.rating_fingerprint(
            config, space, k, encodings, variables_digest,
            artifacts.config_hash(data_digest, "ssl", chosen))
        paths.append((f"{prefix}.npz", f"{prefix}.json"))
        if rate_lib.rating_complete(prefix, fingerprint):
            logging.info("%s: SSL rating exists with the same fingerprint, skipped", name)
            rating = rate_lib.load_rating(prefix)
        else:
            rating = rate_ssl_block(trainer, k, supernet, ssl_variables, views, recal_views,
                                    config, chosen, encodings, mesh)
            rate_lib.save_rating(prefix, rating, space, k, fingerprint, config.top_k,
                                 config.cost_resolution)
            logging.info("%s: %d candidates rated by SSL loss in %.1f s; best %s = %.4f",
                         name, len(rating), rating.info["seconds"], best_path(rating),
                         float(np.min(rating.score)))
        chosen.append(best_path(rating))
    return paths, chosen


# ---- the loop ----------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """An SSL loss became NaN or infinite; the message names block and step."""


def _checkpoint_tree(state: SSLState) -> SSLState:
    return state.replace(rng=jax.random.key_data(state.rng))


def _state_from_checkpoint(tree: SSLState) -> SSLState:
    return tree.replace(rng=jax.random.wrap_key_data(tree.rng))


LOGGED = ("loss", "byol_loss", "variance", "covariance", "output_std", "grad_norm")


@dataclasses.dataclass
class _Loop:
    """What the step loop carries besides the state."""

    trainer: SelfSupervised
    config: Any
    mesh: Mesh
    checkpointer: checkpoint_lib.Checkpointer
    writer: Any
    history: dict
    history_path: str
    pending: list = dataclasses.field(default_factory=list)
    last_good: int | None = None

    def flush(self) -> None:
        """Fetches pending metrics, stops on NaN/inf, writes window means per block."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, _, m in self.pending])
        for (step, active, _), metrics in zip(self.pending, fetched):
            for position, k in enumerate(active):
                value = float(metrics["loss"][position])
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"SSL loss of block {k} (block{k}) is {value} at step {step}; the last "
                        f"good checkpoint is step {self.last_good} in "
                        f"{self.checkpointer.directory} (lower ssl.learning_rates)")
        step, active, _ = self.pending[-1]
        scalars, record = {}, {"step": step}
        for position, k in enumerate(active):
            name = distill.block_name(k)
            means = {key: float(np.mean([m[key][position] for m in fetched])) for key in LOGGED}
            means["lr"] = float(fetched[-1]["lr"][position])
            means["momentum"] = float(fetched[-1]["momentum"][position])
            scalars.update({f"train/{name}/{key}": v for key, v in means.items()})
            record[name] = means
        self.writer.write_scalars(step, scalars)
        self.history["train"].append(record)
        self.pending.clear()

    def save_history(self) -> None:
        metrics_lib.write_json(self.history_path, self.history)


def _load_history(path: str, resume_step: int) -> dict:
    history = {"train": [], "chosen_paths": {}}
    if resume_step and os.path.exists(path):
        saved = artifacts.read_json(path)
        history["train"] = [r for r in saved.get("train", []) if r["step"] <= resume_step]
        history["chosen_paths"] = saved.get("chosen_paths", {})
    return history


def train_ssl_supernet(config: Any, train_data: Any, workdir: str, mesh: Mesh | None = None,
                       space: SearchSpace | None = None,
                       rate_block: Callable[[SelfSupervised, int, SSLState, list], list[int]]
                       | None = None) -> tuple[SSLState, list[list[int]], dict]:
    """Trains the supernet blocks by self-supervision; resumes from workdir/checkpoints.

    Args:
      config: the `ssl` section (see `get_default_config`).
      train_data: a multi-view Dataset (`dna_jax.data.views.make_view_dataset`) with
        2 * num_paths views per image.
      workdir: checkpoints, TensorBoard events, ssl_history.json, figures.json.
      mesh: the device mesh (default: every device on one 'data' axis).
      space: the search space (default: `get_space(config.space)`).
      rate_block: 'sequential' only: `(trainer, k, state, chosen paths of blocks < k) ->
        best path of block k`, called when block k's training ends (see
        `make_block_rater`); required for 'sequential' with more than one block.

    Returns:
      (final state, the chosen path of each block trained sequentially (op indices),
       figures: steps, per-block first/final loss, byol_loss, output_std, variance,
       covariance, wall and train time, images per second; also in workdir/figures.json).

    Raises:
      NonFiniteLossError: a loss became NaN/inf (the last good checkpoint is named).
    """
    watch = metrics_lib.Stopwatch()
    mesh = mesh or sharding_lib.make_mesh()
    info = train_data.info
    trainer = make_trainer(config, info.num_batches, space)
    views_shape = (info.global_batch_size, 2 * trainer.num_paths, *info.image_shape)
    state = init_state(trainer, config.seed, info.image_shape, mesh)
    total = trainer.total_steps
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, CHECKPOINT_SUBDIR),
        save_every_steps=config.checkpoint_every_steps or total, keep=config.max_checkpoints)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state = _state_from_checkpoint(checkpointer.restore(_checkpoint_tree(state), start_step))
        logging.info("Resumed DNA++ training from step %d.", start_step)
    history_path = os.path.join(workdir, HISTORY_FILE)
    loop = _Loop(trainer, config, mesh, checkpointer, metrics_lib.create_writer(workdir),
                 _load_history(history_path, start_step), history_path,
                 last_good=start_step or None)
    chosen: list[list[int]] = []
    train_seconds = compile_seconds = 0.0
    try:
        with jax.set_mesh(mesh):
            for phase in trainer.phases():
                k = phase.active[0]
                if phase.stop > start_step:
                    prefix = tuple(jax.device_put(np.asarray(p, np.int32),
                                                  NamedSharding(mesh, P()))
                                   for p in (chosen if trainer.schedule == "sequential" else []))
                    clock = metrics_lib.Stopwatch()
                    step_fn = compile_train_step(trainer, mesh, phase, state, views_shape)
                    compile_seconds += clock.elapsed()
                    clock = metrics_lib.Stopwatch()
                    state = _run_phase(loop, phase, step_fn, state, train_data, prefix,
                                       max(phase.start, start_step))
                    train_seconds += clock.elapsed()
                if trainer.schedule == "sequential" and k < trainer.num_blocks - 1:
                    saved = loop.history["chosen_paths"].get(str(k))
                    if saved is None:
                        if rate_block is None:
                            raise ValueError("ssl.schedule='sequential' needs rate_block to "
                                             "choose each block's path for the next block")
                        saved = [int(o) for o in rate_block(trainer, k, state, list(chosen))]
                        loop.history["chosen_paths"][str(k)] = saved
                        loop.save_history()
                    chosen.append(saved)
            loop.save_history()
    finally:
        checkpointer.close()
        loop.writer.flush()
    figures = _figures(loop, info, start_step, watch.elapsed(), train_seconds, compile_seconds)
    figures["chosen_paths"] = chosen
    metrics_lib.write_json(os.path.join(workdir, FIGURES_FILE), figures)
    return state, chosen, figures


def _run_phase(loop: _Loop, phase: Phase, step_fn: Callable, state: SSLState, train_data: Any,
               prefix: tuple, first: int) -> SSLState:
    """Steps first+1 .. phase.stop: logging, NaN check, checkpoints, preemption."""
    config, total = loop.config, loop.trainer.total_steps
    every = config.checkpoint_every_steps
    progress = metrics_lib.report_progress(total, loop.writer)
    batches = train_data.global_batches(first)
    try:
        for step in range(first + 1, phase.stop + 1):
            state, metrics = step_fn(state, next(batches)["views"], prefix)
            loop.pending.append((step, phase.active, metrics))
            progress(step)
            save_due = step == phase.stop or bool(every and step % every == 0)
            if save_due or step % config.log_every_steps == 0:
                loop.flush()
            if save_due:
                loop.checkpointer.save(step, _checkpoint_tree(state), force=True)
                loop.save_history()
                loop.last_good = step
            elif loop.checkpointer.reached_preemption(step):
                loop.checkpointer.save(step, _checkpoint_tree(state), force=True)
                loop.checkpointer.wait()
                loop.save_history()
                raise SystemExit(f"Preempted at step {step}; checkpoint saved, rerun to resume.")
        jax.block_until_ready(state)
    finally:
        batches.close()
    return state


def _figures(loop: _Loop, info: Any, start_step: int, wall: float, train_seconds: float,
             compile_seconds: float) -> dict[str, Any]:
    """Headline figures: per block the first and last logged window means."""
    names = loop.trainer.names
    per_block: dict[str, dict[str, Any]] = {}
    for name in names:
        records = [r[name] for r in loop.history["train"] if name in r]
        if not records:
            continue
        per_block[name] = {f"{key}_{when}": records[index][key]
                           for key in LOGGED if key != "grad_norm"
                           for when, index in (("first", 0), ("final", -1))}
        per_block[name]["loss_ratio"] = (records[-1]["loss"] / records[0]["loss"]
                                         if records[0]["loss"] else None)
        per_block[name]["loss_curve"] = [[r["step"], r[name]["loss"]]
                                         for r in loop.history["train"] if name in r]
    steps_run = loop.trainer.total_steps - start_step
    return {
        "schedule": loop.trainer.schedule, "space": loop.trainer.space.name,
        "num_paths": loop.trainer.num_paths, "blocks": per_block,
        "steps": loop.trainer.total_steps, "steps_this_run": steps_run,
        "resumed_from_step": start_step, "global_batch_size": info.global_batch_size,
        "devices": int(loop.mesh.devices.size),
        "output_std_final": [per_block.get(n, {}).get("output_std_final") for n in names],
        "loss_final": [per_block.get(n, {}).get("loss_final") for n in names],
        "images_per_s": steps_run * info.global_batch_size / max(train_seconds, 1e-9),
        "train_time_s": train_seconds, "compile_time_s": compile_seconds, "wall_time_s": wall,
        "checkpoint_dir": loop.checkpointer.directory,
    }


def make_block_rater(views: np.ndarray, recal_views: np.ndarray | None, rate_config: Any,
                     mesh: Mesh | None = None, out_dir: str | None = None
                     ) -> Callable[[SelfSupervised, int, SSLState, list], list[int]]:
    """The `rate_block` of `train_ssl_supernet`: rates block k's candidates by SSL loss
    (`rate_ssl_block`), optionally saves the table under out_dir, returns the best path."""

    def rate_block(trainer, k, state, chosen):
        rating = rate_ssl_block(trainer, k, state.supernet_variables(), state.ssl_variables(),
                                views, recal_views, rate_config, chosen, mesh=mesh)
        if out_dir and jax.process_index() == 0:
            rate_lib.save_rating(os.path.join(out_dir, trainer.space.blocks[k].name), rating,
                                 trainer.space, k, top_k=rate_config.top_k,
                                 cost_resolution=rate_config.cost_resolution)
        best = best_path(rating)
        logging.info("block%d: chosen path %s (SSL loss %.4f) feeds block %d", k, best,
                     float(np.min(rating.score)), k + 1)
        return best

    return rate_block


# ---- the artifact ------------------------------------------------------------------------------

SUPERNET_DIR = "supernet"
SSL_VARIABLES_DIR = "ssl_variables"


def save_ssl_artifact(directory: str, state: SSLState) -> None:
    """`directory/supernet` (online blocks, DNA's format) and `directory/ssl_variables`."""
    distill.save_supernet(os.path.join(directory, SUPERNET_DIR), state.supernet_variables())
    distill.save_supernet(os.path.join(directory, SSL_VARIABLES_DIR), state.ssl_variables())


def abstract_state(trainer: SelfSupervised, image_shape: Sequence[int] = (64, 64, 3)) -> SSLState:
    return jax.eval_shape(lambda key: trainer.init(key, image_shape), jax.random.key(0))


def load_ssl_artifact(directory: str, trainer: SelfSupervised, mesh: Mesh | None = None
                      ) -> tuple[dict, dict]:
    """(supernet variables, ssl variables) written by `save_ssl_artifact`."""
    abstract = abstract_state(trainer)
    supernet = distill.load_supernet(os.path.join(directory, SUPERNET_DIR),
                                     abstract.supernet_variables(), mesh)
    extra = distill.load_supernet(os.path.join(directory, SSL_VARIABLES_DIR),
                                  abstract.ssl_variables(), mesh)
    return supernet, extra
