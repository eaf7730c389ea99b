"""Single-path one-shot (SPOS, Guo et al. 2020): the baseline DNA is compared with.

ONE whole-network supernet (`models/single_path.py`) is trained on the labels; every step
samples a uniform random path (each searchable layer uniform over its legal ops, from a key
folded in from the step) and trains only that path. Path sampling and the masked per-op
update are the supernet kit's (`dna_jax.supernet`), as in DNA: ops off the path keep their
parameters and optimizer state; the learning rate follows the global step.

An architecture is then rated by its validation accuracy as a path of the trained supernet,
with its BatchNorm statistics recalibrated for that path first (one training-mode forward pass
over a recalibration batch with momentum 0, so the statistics are that batch's), as SPOS does.

The optimizer, schedule, label smoothing and data are the stand-alone trainer's
(`dna_jax.retrain` config), so the baseline gets the same recipe as the networks it ranks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dna_jax import checkpoint as checkpoint_lib
from dna_jax import data as data_lib
from dna_jax import metrics as metrics_lib
from dna_jax import retrain as retrain_lib
from dna_jax import sharding as sharding_lib
from dna_jax.errors import NonFiniteLossError
from dna_jax.models import cpu_conv
from dna_jax.models.single_path import SinglePathSupernet, branch_table, paths_array
from dna_jax.space import Arch, SearchSpace
from dna_jax.supernet import paths as paths_lib
from dna_jax.supernet import update as update_lib

PyTree = Any


def get_default_config() -> ml_collections.ConfigDict:
    """The `spos` section of a ranking config.

    Fields:
      total_steps: training steps of the supernet; 0 = as many as one stand-alone run.
      val_split: the split the paths are rated on (held out from stand-alone training).
      recal_split: where the BatchNorm recalibration batch comes from (its first batch).
      recal_batch_size: images in the recalibration batch.
      checkpoint_every_steps, log_every_steps: as in the trainer.
    """
    return ml_collections.ConfigDict(dict(
        total_steps=0,
        val_split="train[55000:]",
        recal_split="train[:55000]",
        recal_batch_size=1000,
        checkpoint_every_steps=200,
        log_every_steps=50,
    ))


@flax.struct.dataclass
class SposState:
    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree  # {op group name: optimizer state} (supernet.paths.op_groups)


@dataclasses.dataclass(frozen=True)
class SposTrainer:
    """The static pieces of SPOS training: module, optimizer (learning-rate free), schedule."""

    model: SinglePathSupernet
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    label_smoothing: float
    conv_impl: str = "auto"

    @property
    def table(self) -> list[tuple[int, ...]]:
        return branch_table(self.model.space)

    def init(self, key: jax.Array, image_shape: Sequence[int]) -> SposState:
        images = jnp.zeros((1, *image_shape), jnp.float32)
        path = jnp.asarray([c[0] for c in self.table], jnp.int32)
        variables = self.model.init({"params": key, "dropout": key}, images, path, train=False)
        params = variables["params"]
        opt_state = update_lib.init_op_states(self.optimizer, params)
        return SposState(step=jnp.zeros((), jnp.int32), params=params,
                         batch_stats=variables.get("batch_stats", {}), opt_state=opt_state)

    def train_step(self, state: SposState, batch: dict[str, jax.Array], rng: jax.Array
                   ) -> tuple[SposState, dict[str, jax.Array]]:
        """One step on one uniformly sampled path (pure)."""
        apply = cpu_conv.with_tap_convs(self.model.apply, self.conv_impl)
        branches = paths_lib.sample_network_path(self.table, rng, state.step)
        path = paths_lib.branches_to_ops(self.table, branches)
        dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), 1 << 20)

        def loss_fn(params):
            (logits, _), updates = apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], path,
                train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
            loss = retrain_lib.cross_entropy(logits, batch["label"],
                                             self.label_smoothing).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        lr = self.schedule(state.step)
        params, opt_state = update_lib.masked_block_update(
            self.optimizer, self.table, state.params, grads, state.opt_state, branches, lr)
        new_state = SposState(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
        return new_state, {"loss": loss, "learning_rate": lr,
                           "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    def recalibrate(self, variables: PyTree, images: jax.Array, path: jax.Array) -> PyTree:
        """BatchNorm statistics of `path` = the batch statistics of `images` (momentum 0)."""
        config = dataclasses.replace(self.model.config, bn_momentum=0.0)
        model = self.model.clone(config=config)
        apply = cpu_conv.with_tap_convs(model.apply, self.conv_impl)
        _, updates = apply(variables, images, path, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(0)})
        return {"params": variables["params"], "batch_stats": updates["batch_stats"]}

    def eval_step(self, variables: PyTree, batch: dict[str, jax.Array], path: jax.Array
                  ) -> dict[str, jax.Array]:
        """Masked sums of top-1 hits, loss and count of one path on one batch."""
        apply = cpu_conv.with_tap_convs(self.model.apply, self.conv_impl)
        logits, _ = apply(variables, batch["image"], path, train=False)
        mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        return {"top1": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
                "loss": jnp.sum(retrain_lib.cross_entropy(logits, batch["label"], 0.0) * mask),
                "count": jnp.sum(mask)}


def make_trainer(train_cfg: ml_collections.ConfigDict, space: SearchSpace, num_classes: int,
                 total_steps: int, steps_per_epoch: int) -> SposTrainer:
    """A trainer with the stand-alone recipe: its optimizer (run at rate 1, the schedule's rate
    multiplies the updates), schedule, label smoothing, layer options and dropout.

    `grad_clip_norm`, if set, clips each op group separately (an approximation).
    """
    model = SinglePathSupernet(space, num_classes, retrain_lib.layer_config_from(train_cfg.model),
                               drop_rate=train_cfg.model.drop_rate)
    schedule = retrain_lib.make_schedule(train_cfg, total_steps, steps_per_epoch)
    optimizer = retrain_lib.make_optimizer(train_cfg.optimizer, optax.constant_schedule(1.0))
    return SposTrainer(model, optimizer, schedule, float(train_cfg.label_smoothing),
                       train_cfg.model.conv_impl)


def _state_shardings(state: SposState, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: sharding_lib.replicated(mesh), state)


def train_supernet(trainer: SposTrainer, train_data: data_lib.Dataset, total_steps: int,
                   workdir: str, mesh: Mesh, seed: int, cfg: ml_collections.ConfigDict
                   ) -> tuple[PyTree, dict[str, Any]]:
    """Trains the supernet for `total_steps` (resumes from workdir/checkpoints).

    Returns:
      ({'params', 'batch_stats'}, figures: steps, final train loss, wall time).
    """
    watch = metrics_lib.Stopwatch()
    image_shape = train_data.info.image_shape
    abstract = jax.eval_shape(lambda k: trainer.init(k, image_shape), jax.random.key(seed))
    shardings = _state_shardings(abstract, mesh)
    state = jax.jit(lambda k: trainer.init(k, image_shape), out_shardings=shardings)(
        jax.random.key(seed))
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_every_steps=cfg.checkpoint_every_steps,
        keep=1, async_save=True)
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(state, latest)
        logging.info("spos: resumed from step %d.", latest)
    start = int(jax.device_get(state.step))
    replicated = sharding_lib.replicated(mesh)
    step_fn = jax.jit(trainer.train_step,
                      in_shardings=(shardings, sharding_lib.batch_sharding(mesh), replicated),
                      out_shardings=(shardings, replicated), donate_argnums=(0,))
    rng = jax.random.key(seed + 1)
    pending, losses = [], []
    try:
        with jax.set_mesh(mesh):
            batches = train_data.global_batches(start)
            for step in range(start + 1, total_steps + 1):
                state, step_metrics = step_fn(state, next(batches), rng)
                pending.append(step_metrics["loss"])
                if step % max(1, cfg.log_every_steps) == 0 or step == total_steps:
                    values = np.asarray(jax.device_get(pending), np.float64)
                    if not np.all(np.isfinite(values)):
                        raise NonFiniteLossError(
                            f"spos: non-finite training loss before step {step}")
                    losses.append(float(values.mean()))
                    logging.info("spos step %d/%d: train loss %.4f", step, total_steps,
                                 losses[-1])
                    pending = []
                checkpointer.save(step, state, force=step == total_steps)
            jax.block_until_ready(state)
    finally:
        checkpointer.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    figures = {"steps": total_steps, "resumed_from_step": start,
               "final_train_loss": losses[-1] if losses else None,
               "wall_seconds": watch.elapsed()}
    return variables, figures


def rate_paths(trainer: SposTrainer, variables: PyTree, archs: Sequence[Arch],
               recal_images: np.ndarray, val_data: data_lib.Dataset, mesh: Mesh
               ) -> list[dict[str, float]]:
    """Validation accuracy and loss of every architecture as a path, BN recalibrated first.

    One compilation each for recalibration and evaluation serves every path (traced).
    """
    replicated = sharding_lib.replicated(mesh)
    recal = jax.jit(trainer.recalibrate)
    evaluate = jax.jit(trainer.eval_step)
    paths = paths_array(archs)
    results = []
    with jax.set_mesh(mesh):
        images = sharding_lib.host_to_global({"image": recal_images}, mesh)["image"]
        for arch, path in zip(archs, paths):
            path = jax.device_put(path, replicated)
            calibrated = recal(variables, images, path)
            totals = None
            for batch in val_data:
                sums = evaluate(calibrated, batch, path)
                totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            totals = jax.device_get(totals)
            count = max(float(totals["count"]), 1.0)
            results.append({"val_accuracy": float(totals["top1"]) / count,
                            "val_loss": float(totals["loss"]) / count})
    return results


def recalibration_images(data_cfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                         seed: int) -> np.ndarray:
    """The first training-mode (augmented, shuffled) batch of `recal_split` [B, H, W, C]."""
    recal_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    recal_cfg.batch_size = cfg.recal_batch_size
    recal_cfg.train_split = cfg.recal_split
    dataset = data_lib.make_dataset(recal_cfg, cfg.recal_split, training=True, seed=seed)
    return next(iter(dataset.host_batches(0)))["image"]


def make_val_data(data_cfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                  mesh: Mesh) -> data_lib.Dataset:
    return data_lib.make_dataset(data_cfg, cfg.val_split, training=False, mesh=mesh)

