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

Masked updates (the supernet kit's `update.masked_block_update` and `masked_ema`): an op on
none of the P paths of a step keeps its online weights, its optimizer state and its target
(EMA) weights bitwise. The heads are always on the path.

Schedules (`schedule`):
  * 'sequential' (default, BossNAS): blocks are trained one after another; block k is fed
    by the views passed through the TARGET network's best paths of blocks < k, each chosen
    by rating that block (`ssl_rating.rate_ssl_block`) when its training ends.
  * 'all_blocks': every block at once; for path p, block k is fed by the target network's
    block k - 1 on the same path (a stop-gradient chain of the target network).
The earlier blocks of a feeding chain normalise with the statistics of the batch at hand
(training-mode BatchNorm, statistics not stored): their running statistics mix every path.

Rating without a teacher (the SSL loss against the population centre of the target's
candidates) lives in `dna_jax.ssl_rating`; its tables have the DNA layout.
The run (the kit's step loop around this step), its figures and artifacts: `ssl_train`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from jax.sharding import Mesh

from dna_jax import artifacts
from dna_jax import sharding as sharding_lib
from dna_jax.data import views as views_lib
from dna_jax.models import cpu_conv
from dna_jax.models.layers import LayerConfig
from dna_jax.models.supernet import SupernetBlock
from dna_jax.space import SearchSpace, get_space
from dna_jax.supernet import loop as loop_lib
from dna_jax.supernet import paths as paths_lib
from dna_jax.supernet import update as update_lib
from dna_jax.supernet.paths import DTYPES

PyTree = Any
SCHEDULES = ("sequential", "all_blocks")
OPTIMIZERS = ("lars", "adam", "adamw", "sgd")
HEAD_GROUPS = ("projector", "predictor")
LOGGED = ("loss", "byol_loss", "variance", "covariance", "output_std", "grad_norm")


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
    need = loop_lib.check_loop_config(config, "ssl", SCHEDULES)
    need(config.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
    need(config.num_paths >= 1, "num_paths", "must be >= 1")
    need(0.0 <= config.base_momentum <= 1.0, "base_momentum", "must be in [0, 1]")
    need(config.variance_weight >= 0, "variance_weight", "must be >= 0")
    need(config.covariance_weight >= 0, "covariance_weight", "must be >= 0")
    need(config.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
    need(config.conv_impl in cpu_conv.CONV_IMPLS, "conv_impl",
         f"must be one of {cpu_conv.CONV_IMPLS}")
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



# ---- optimizers --------------------------------------------------------------------------------



def make_ssl_optimizer(name: str, weight_decay: float = 0.0,
                       kwargs: Mapping[str, Any] | None = None,
                       exclude_bn_and_bias: bool = True) -> optax.GradientTransformation:
    """A learning-rate-free optimizer (the scheduled rate multiplies its updates outside).

    'lars': optax.lars with decoupled weight decay and the trust ratio masked to
    multi-dimensional parameters when `exclude_bn_and_bias`; 'adamw': optax.adamw with the
    same decay mask; 'adam' / 'sgd': the kit's `update.make_optimizer` (L2 term added to the
    gradient, masked likewise).
    """
    kwargs = dict(kwargs or {})
    mask = update_lib.decay_mask if exclude_bn_and_bias else None
    if name == "lars":
        return optax.lars(1.0, weight_decay=weight_decay, weight_decay_mask=mask or True,
                          trust_ratio_mask=mask or True, **kwargs)
    if name == "adamw":
        return optax.adamw(1.0, weight_decay=weight_decay, mask=mask, **kwargs)
    if name in ("adam", "sgd"):
        base = update_lib.make_optimizer(name, 0.0, kwargs)
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
      opt_state: {'block<k>': {group: state}}: the block's op groups (`paths.op_groups`)
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
class SelfSupervised(paths_lib.BlockPaths):
    """The static half of DNA++: modules, optimizer, schedules, path sampling.

    Build with `make_trainer`. Path sampling is the kit's (`paths.BlockPaths`).
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
    # Set by `for_mesh` where `sharding.flat_collectives`: blocks select their ops, the path
    # loop is unrolled, so no collective is nested in control flow.
    flat_collectives: bool = False
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, hash=False,
                                       repr=False)

    def for_mesh(self, mesh: Mesh) -> "SelfSupervised":
        """This trainer as its step runs on `mesh`: itself, or where
        `sharding.flat_collectives(mesh)` (multi-device XLA:CPU) a copy whose blocks run every
        op and select (`SupernetBlock.select_branches`) and whose loop over the paths is
        unrolled. The same step either way."""
        if not sharding_lib.flat_collectives(mesh) or self.flat_collectives:
            return self
        return dataclasses.replace(
            self, blocks=tuple(b.clone(select_branches=True) for b in self.blocks),
            flat_collectives=True)

    def phases(self) -> list[loop_lib.Phase]:
        return loop_lib.make_phases(self.schedule, self.num_blocks, self.steps_per_block)

    @property
    def total_steps(self) -> int:
        return self.phases()[-1].stop

    def learning_rate(self, k: int, local_step: jax.Array) -> jax.Array:
        """Linear warm-up over `warmup_steps`, then cosine decay to 0 at the block's end."""
        return update_lib.warmup_cosine(self.learning_rates[k], self.warmup_steps,
                                        self.steps_per_block, local_step)

    def momentum(self, local_step: jax.Array) -> jax.Array:
        return update_lib.momentum_schedule(self.base_momentum, local_step, self.steps_per_block)

    # -- init --

    def init(self, rng: jax.Array, image_shape: Sequence[int]) -> SSLState:
        """Fresh state (pure; `loop.init_state` jits it): the target starts as the online side."""
        params, batch_stats, opt_state = {}, {}, {}
        for k, name in enumerate(self.names):
            key = jax.random.fold_in(jax.random.fold_in(rng, 1), k)
            variables = self.init_block(k, jax.random.fold_in(key, 0), image_shape)
            channels = self.space.blocks[k].out_channels
            projector = self.projector.init(jax.random.fold_in(key, 1),
                                            jnp.zeros((1, channels)))["params"]
            predictor = self.predictor.init(jax.random.fold_in(key, 2),
                                            jnp.zeros((1, self.projector.out)))["params"]
            params[name] = {"block": variables["params"], "projector": projector,
                            "predictor": predictor}
            batch_stats[name] = variables.get("batch_stats", {})
            opt_state[name] = {**update_lib.init_op_states(self.optimizer, variables["params"]),
                               "projector": self.optimizer.init(projector),
                               "predictor": self.optimizer.init(predictor)}
        target = {name: {"block": p["block"], "projector": p["projector"]}
                  for name, p in params.items()}
        return SSLState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                        target_params=target, target_batch_stats=dict(batch_stats),
                        opt_state=opt_state, rng=jax.random.fold_in(rng, 2))

    # -- forward pieces --

    def _block(self, k: int, params: PyTree, stats: PyTree, x: jax.Array,
               branches: jax.Array) -> tuple[jax.Array, PyTree]:
        """Training-mode forward of block k on path `branches`; (output, new statistics:
        those of the ops on the path moved)."""
        y, updates = self.blocks[k].apply({"params": params, "batch_stats": stats}, x,
                                          self.branches_to_ops(k, branches), True,
                                          mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
        if self.flat_collectives:  # every op ran: keep the others' statistics
            new_stats = update_lib.keep_off_path_stats(self.choice_table(k), stats, new_stats,
                                                       branches)
        return y, new_stats

    def feed_forward(self, block_variables: Mapping[str, PyTree], x: jax.Array,
                     paths: Sequence[jax.Array]) -> jax.Array:
        """Images through blocks 0..len(paths)-1 (`block_variables`: {'block<j>': {'params',
        'batch_stats'}}, the target's) on fixed paths (op indices), batch-statistics
        BatchNorm, no gradient: the input of block len(paths)."""
        for j, ops in enumerate(paths):
            x = self.blocks[j].apply(block_variables[paths_lib.block_name(j)], x, ops, True,
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
            name = paths_lib.block_name(k)
            chain = [jax.lax.stop_gradient(self._block(
                k, state.target_params[name]["block"], state.target_batch_stats[name], x,
                all_branches[k][p])[0]) for p, x in enumerate(chain)]
        return inputs

    def block_loss(self, k: int, params: PyTree, state: SSLState, inputs: Sequence[jax.Array],
                   branches: jax.Array) -> tuple[jax.Array, dict]:
        """Block k's loss on its P paths; aux: metrics, new online and target statistics."""
        name = paths_lib.block_name(k)
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
        # statistics are carried from path to path as in a loop. Unrolled where collectives
        # must stay out of loops (`flat_collectives`).
        (stats, target_stats), (projections, predictions, targets) = jax.lax.scan(
            one_path, (stats, target_stats), (jnp.stack(list(inputs)), branches),
            unroll=self.num_paths if self.flat_collectives else 1)
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
        branches = {k: self.sample_paths(state.rng, k, local_step, self.num_paths)
                    for k in range(self.num_blocks)
                    if k in active or self.schedule == "all_blocks"}
        inputs = self.block_inputs(state, views, active, prefix_paths, branches)
        names = [paths_lib.block_name(k) for k in active]

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
                "block": update_lib.masked_ema(self.choice_table(k), old_target["block"],
                                               new["block"], branches[k], momentum),
                "projector": update_lib.ema(old_target["projector"], new["projector"],
                                            momentum)}
            metrics, batch_stats[name], target_stats[name] = aux[name]
            records.append({**metrics, "lr": lr, "momentum": momentum,
                            "grad_norm": optax.tree.norm(grads[name])})
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  target_params=target_params, target_batch_stats=target_stats,
                                  opt_state=opt_state)
        metrics = {key: jnp.stack([r[key] for r in records]) for key in records[0]}
        metrics["branches"] = {paths_lib.block_name(k): branches[k] for k in active}
        return new_state, metrics

    def _update(self, k: int, params: PyTree, grads: PyTree, opt_state: PyTree,
                branches: jax.Array, lr: jax.Array) -> tuple[PyTree, PyTree]:
        """Masked update of the block (DNA's machinery) and a plain update of the heads."""
        block_opt = {g: s for g, s in opt_state.items() if g not in HEAD_GROUPS}
        block, block_opt = update_lib.masked_block_update(
            self.optimizer, self.choice_table(k), params["block"], grads["block"], block_opt,
            branches, lr)
        new, new_opt = {"block": block}, dict(block_opt)
        for group in HEAD_GROUPS:
            new[group], new_opt[group] = update_lib.optimizer_step(
                self.optimizer, params[group], grads[group], opt_state[group], lr)
        return new, new_opt

    def jit_train_step(self, mesh: Mesh, phase: loop_lib.Phase, donate: bool = True) -> Callable:
        trainer = self.for_mesh(mesh)
        step = cpu_conv.with_tap_convs(
            lambda s, v, paths: trainer.train_step(s, v, paths, phase.active, phase.start),
            self.conv_impl)
        return loop_lib.jit_sharded(step, mesh, "rbr", donate)




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
    return loop_lib.memoised(_TRAINERS, key,
                             lambda: _build_trainer(config, steps_per_epoch, space))


def _build_trainer(config: Any, steps_per_epoch: int, space: SearchSpace) -> SelfSupervised:
    layer_config = LayerConfig(padding=config.padding, bn_eps=config.bn_eps,
                               bn_momentum=config.bn_momentum, dtype=DTYPES[config.dtype])
    kwargs = config.optimizer_kwargs
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs or {})
    steps = int(config.num_steps or math.ceil(config.num_epochs * steps_per_epoch))
    return SelfSupervised(
        space=space, blocks=tuple(build_ssl_blocks(space, layer_config)),
        projector=MLPHead(config.projector_hidden, config.projector_dim),
        predictor=MLPHead(config.predictor_hidden, config.projector_dim),
        optimizer=make_ssl_optimizer(config.optimizer, config.weight_decay, kwargs,
                                     config.exclude_bn_and_bias),
        learning_rates=update_lib.per_block(config.learning_rates, len(space.blocks), (0.05,),
                                            "ssl.learning_rates"),
        steps_per_block=steps,
        warmup_steps=min(steps, round(config.warmup_epochs * steps_per_epoch)),
        schedule=config.schedule, num_paths=int(config.num_paths),
        base_momentum=float(config.base_momentum),
        variance_weight=float(config.variance_weight),
        covariance_weight=float(config.covariance_weight),
        variance_target=float(config.variance_target), conv_impl=config.conv_impl,
        sampling=config.sampling, fast_compile=bool(config.fast_compile))
