"""The classifier trainer: trains any zoo or child network on a dataset, then evaluates it.

Used for teachers on small data, for retraining searched architectures, and as a library by
later stages: `train_and_evaluate(config, workdir)` returns the run's figures, and the pieces
(`build_model`, `make_optimizer`, `create_train_state`, `make_train_step`, `evaluate`) are
reusable on their own.

Run:
    python -m dna_jax.retrain --config configs/fashion_mnist_teacher.py --workdir /tmp/teacher
"""

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from dna_jax import checkpoint as checkpoint_lib
from dna_jax import data as data_lib
from dna_jax import files
from dna_jax import host_memory
from dna_jax import metrics as metrics_lib
from dna_jax import sharding as sharding_lib
from dna_jax.errors import NonFiniteLossError
from dna_jax.models import cpu_conv, zoo
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.layers import LayerConfig
from dna_jax.netspec import NetworkSpec

Batch = dict[str, jax.Array]
FIGURES_FILE = "figures.json"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TRAIN_SUMMARY_FILE = "train_summary.json"  # train_loss / accuracy at each checkpointed step


# ----------------------------------------------------------------------------------------------
# Configuration.


def get_default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with defaults; experiment configs override and lock it."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.distributed = "auto"  # auto | on | off (see sharding.initialize_distributed).
    config.mesh = dict(shape=(-1,), axis_names=("data",), axis_types="auto")
    config.data = data_lib.get_default_config()
    config.model = dict(
        name="fmnist_teacher",  # Zoo name; also the network's name when `stages` is given.
        stages=(),  # Optional timm-style block strings per stage: a custom network.
        stem_channels=32,  # Custom network only.
        stem_stride=2,  # Custom network only.
        head_channels=1280,  # Custom network only.
        drop_rate=0.0,
        drop_path_rate=0.0,
        dtype="float32",  # Compute dtype: float32 | bfloat16; parameters stay float32.
        padding="",  # '' = the architecture's default LayerConfig; else same | symmetric.
        bn_eps=0.0,  # 0 = default.
        bn_momentum=0.0,  # 0 = default (Flax convention: new = m * old + (1 - m) * batch).
        act="",  # '' = default.
        conv_impl="auto",  # auto (taps on CPU) | taps | xla: see dna_jax.models.cpu_conv.
    )
    config.optimizer = dict(
        name="rmsprop_tf",  # rmsprop_tf | sgd | adamw.
        learning_rate=0.016,  # Peak rate for a batch of lr_base_batch examples.
        lr_base_batch=256,  # Scale the rate by batch_size / lr_base_batch; 0 = no scaling.
        momentum=0.9,
        nesterov=False,
        rms_decay=0.9,
        eps=1e-3,
        b1=0.9,
        b2=0.999,
        weight_decay=1e-5,  # L2 on kernels (coupled for sgd/rmsprop, decoupled for adamw).
        grad_clip_norm=0.0,  # 0 = no clipping.
    )
    config.schedule = dict(
        name="cosine",  # cosine | exponential | constant (each after linear warmup).
        warmup_epochs=0.0,
        final_lr_fraction=0.0,  # Cosine end value as a fraction of the peak.
        decay_rate=0.97,  # Exponential: multiply by this every decay_epochs (staircase).
        decay_epochs=2.4,
    )
    config.num_epochs = 1.0
    config.total_steps = 0  # > 0 overrides num_epochs.
    config.label_smoothing = 0.1
    config.ema_decay = 0.0  # 0 = no weight EMA; else evaluate the EMA weights.
    config.ema_warmup = True  # TF-style: decay = min(ema_decay, (1 + t) / (10 + t)).
    config.log_every_steps = 100
    config.eval_every_steps = 0  # 0 = evaluate at the end only.
    # Checkpoints: a state with NaN/inf is never saved (NonFiniteLossError names the last
    # good one); a resumed run uses the newest checkpoint that restores and is finite.
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    config.async_checkpoint = True
    return config


# ----------------------------------------------------------------------------------------------
# Model, optimizer, state.


def layer_config_from(model_cfg: ml_collections.ConfigDict) -> LayerConfig:
    """The architecture's default LayerConfig with the config's overrides applied."""
    base = zoo.default_layer_config(model_cfg.name)
    overrides = {"dtype": _DTYPES[model_cfg.dtype]}
    for field in ("padding", "bn_eps", "bn_momentum", "act"):
        if model_cfg[field]:
            overrides[field] = model_cfg[field]
    return dataclasses.replace(base, **overrides)


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """A zoo network by name, or a custom one from `model_cfg.stages` block strings."""
    layer_config = layer_config_from(model_cfg)
    if len(model_cfg.stages):
        spec = NetworkSpec.from_strings(
            model_cfg.name or "custom", model_cfg.stem_channels,
            [list(stage) for stage in model_cfg.stages], model_cfg.head_channels,
            stem_stride=model_cfg.stem_stride)
        return EfficientNet(spec=spec, num_classes=num_classes, layer_config=layer_config,
                            drop_rate=model_cfg.drop_rate,
                            drop_path_rate=model_cfg.drop_path_rate)
    return zoo.get_model(model_cfg.name, num_classes=num_classes, layer_config=layer_config,
                         drop_rate=model_cfg.drop_rate, drop_path_rate=model_cfg.drop_path_rate)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup to the (batch-scaled) peak, then cosine, exponential or constant."""
    opt, sched = config.optimizer, config.schedule
    peak = opt.learning_rate
    if opt.lr_base_batch:
        peak *= config.data.batch_size / opt.lr_base_batch
    warmup = min(int(round(sched.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    if sched.name == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1),
                                            alpha=sched.final_lr_fraction)
    elif sched.name == "exponential":
        decay = optax.exponential_decay(
            peak, transition_steps=max(1, int(round(sched.decay_epochs * steps_per_epoch))),
            decay_rate=sched.decay_rate, staircase=True)
    elif sched.name == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"Unknown schedule {sched.name!r}: cosine | exponential | constant.")
    if not warmup:
        return decay
    ramp = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def _decay_mask(params: Any) -> Any:
    """Weight decay on conv/dense kernels only, never on biases or BatchNorm."""
    return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(opt_cfg: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    """rmsprop_tf (EfficientNet's TF RMSProp), sgd (momentum) or adamw, with weight decay.

    rmsprop_tf follows TF1/timm's RMSpropTF: mean square initialised to 1, epsilon inside the
    square root, learning rate applied before momentum.
    """
    name, wd = opt_cfg.name, opt_cfg.weight_decay
    if name == "adamw":
        tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                         weight_decay=wd, mask=_decay_mask)
    elif name in ("rmsprop_tf", "sgd"):
        if name == "sgd":
            base = optax.sgd(schedule, momentum=opt_cfg.momentum or None,
                             nesterov=opt_cfg.nesterov)
        else:
            base = optax.rmsprop(schedule, decay=opt_cfg.rms_decay, eps=opt_cfg.eps,
                                 initial_scale=1.0, eps_in_sqrt=True,
                                 momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov)
        tx = optax.chain(optax.add_decayed_weights(wd, mask=_decay_mask), base) if wd else base
    else:
        raise ValueError(f"Unknown optimizer {name!r}: rmsprop_tf | sgd | adamw.")
    if opt_cfg.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
    return tx


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs; the step's random key derives from `step`."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # Equal to params when no EMA is kept.
    ema_batch_stats: Any

    def eval_variables(self, use_ema: bool) -> dict[str, Any]:
        """The variables to evaluate: the EMA weights if kept, else the trained ones."""
        if use_ema:
            return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int], mesh: Mesh, seed: int,
                       init_variables: dict[str, Any] | None = None) -> TrainState:
    """Initialises the state directly into replicated shardings (shapes via eval_shape).

    Args:
        model: module called as model.apply(variables, images, train=...).
        tx: the optimizer.
        image_shape: (height, width, channels) of one input image.
        mesh: the device mesh; the state is replicated over it.
        seed: initialisation seed.
        init_variables: optional {'params', 'batch_stats'} to start from (inherited weights).
    """

    def init(key: jax.Array) -> TrainState:
        images = jnp.zeros((1, *image_shape), jnp.float32)
        variables = model.init({"params": key, "dropout": key}, images, train=False)
        if init_variables is not None:
            variables = {**variables, **init_variables}
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=batch_stats, opt_state=tx.init(params),
                          ema_params=params, ema_batch_stats=batch_stats)

    abstract = jax.eval_shape(init, jax.random.key(seed))
    shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def state_shardings(state: TrainState) -> Any:
    """The shardings of every leaf of a (concrete or abstract) state."""
    return jax.tree.map(lambda x: x.sharding, state)


# ----------------------------------------------------------------------------------------------
# Steps.


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy against label-smoothed one-hot targets (float32)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, label_smoothing: float, ema_decay: float,
                    ema_warmup: bool, conv_impl: str = "auto"
                    ) -> Callable[[TrainState, Batch, jax.Array],
                                  tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure step (state, batch, rng) -> (state, metrics).

    Dropout and drop-path draw from fold_in(rng, state.step): the same step of a resumed run
    draws the same masks. BatchNorm statistics are taken over the whole global batch.
    `conv_impl` picks how convolutions run (cpu_conv: XLA:CPU's conv gradients are slow).
    """
    apply = cpu_conv.with_tap_convs(model.apply, conv_impl)

    def train_step(state: TrainState, batch: Batch, rng: jax.Array
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
        step_rng = jax.random.fold_in(rng, state.step)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            (logits, _), updates = apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"],
                train=True, rngs={"dropout": step_rng}, mutable=["batch_stats"])
            loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if ema_decay:
            decay = jnp.asarray(ema_decay, jnp.float32)
            if ema_warmup:
                t = state.step.astype(jnp.float32)
                decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
            average = lambda e, p: decay * e + (1.0 - decay) * p  # noqa: E731
            ema_params = jax.tree.map(average, state.ema_params, params)
            ema_batch_stats = jax.tree.map(average, state.ema_batch_stats, batch_stats)
        else:
            ema_params, ema_batch_stats = params, batch_stats
        new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, ema_params=ema_params,
                               ema_batch_stats=ema_batch_stats)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
        }
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, state: TrainState, mesh: Mesh) -> Callable:
    """jit over the mesh: replicated state (donated), batch split over the data axes."""
    replicated = sharding_lib.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings(state), sharding_lib.batch_sharding(mesh), replicated),
        out_shardings=(state_shardings(state), replicated),
        donate_argnums=(0,))


def make_eval_step(model: nn.Module, conv_impl: str = "auto"
                   ) -> Callable[[dict[str, Any], Batch], dict[str, jax.Array]]:
    """Returns (variables, batch) -> masked sums of loss, top-1 and top-5 hits, and count."""
    apply = cpu_conv.with_tap_convs(model.apply, conv_impl)

    def eval_step(variables: dict[str, Any], batch: Batch) -> dict[str, jax.Array]:
        logits, _ = apply(variables, batch["image"], train=False)
        mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        labels = batch["label"]
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {
            "loss": jnp.sum(cross_entropy(logits, labels, 0.0) * mask),
            "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def evaluate(eval_step: Callable, variables: dict[str, Any],
             batches: Iterator[Batch]) -> dict[str, float]:
    """Runs a whole eval pass; sums stay on the device until one transfer at the end."""
    totals = None
    for batch in batches:
        sums = eval_step(variables, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("The eval dataset yielded no batches.")
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"accuracy": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count, "count": int(totals["count"])}


def _step_text(step: int | None) -> str:
    return "none (training restarts from step 0)" if step is None else f"step {step}"


def _summarise(pending: list[dict[str, jax.Array]], first_step: int,
               checkpoint_dir: str, last_good: int | None) -> dict[str, float]:
    """Means of the pending step metrics; raises at the first non-finite loss."""
    host = jax.device_get(pending)
    losses = np.asarray([m["loss"] for m in host], np.float64)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        step = first_step + int(bad[0])
        raise NonFiniteLossError(
            f"Training loss is {losses[bad[0]]} at step {step}; stopped. The last good "
            f"checkpoint is {_step_text(last_good)} in {checkpoint_dir} (nothing from step "
            f"{step} on was saved). Lower the learning rate, enable grad_clip_norm, or check the "
            "data; a rerun with the fixed config resumes from the last good checkpoint (dna-jax "
            "run: add --config.on_change=resume).")
    return {f"train_{k}": float(np.mean([m[k] for m in host])) for k in host[0]}


def _save_finite(checkpointer: checkpoint_lib.Checkpointer, step: int, state: TrainState,
                 force: bool) -> bool:
    """checkpointer.save, refusing a state with NaN/inf leaves (NonFiniteLossError)."""
    try:
        return checkpointer.save(step, state, force=force)
    except checkpoint_lib.NonFiniteStateError as error:
        raise NonFiniteLossError(
            f"Training made the parameters non-finite at step {step} (its loss was finite): "
            f"{error} Lower the learning rate or enable grad_clip_norm; a rerun with the fixed "
            "config resumes from the last good checkpoint (dna-jax run: add "
            "--config.on_change=resume).") from error


def _read_summaries(workdir: str) -> dict[str, dict[str, float]]:
    path = os.path.join(workdir, TRAIN_SUMMARY_FILE)
    if not files.exists(path):
        return {}
    try:
        return json.loads(files.read_text(path))
    except (OSError, ValueError):
        logging.warning("%s is unreadable; the train figures of a resumed run may be NaN.", path)
        return {}


def _record_summary(workdir: str, summaries: dict[str, dict[str, float]], step: int,
                    summary: dict[str, float], keep: int = 8) -> dict[str, dict[str, float]]:
    """Remembers the train figures of a checkpointed step (process 0 writes the file)."""
    summaries = {**summaries, str(step): dict(summary)}
    newest = sorted(summaries, key=int)[-keep:]
    summaries = {k: summaries[k] for k in newest}
    metrics_lib.write_json(os.path.join(workdir, TRAIN_SUMMARY_FILE), summaries)
    return summaries


# ----------------------------------------------------------------------------------------------
# The run.


def total_steps_for(config: ml_collections.ConfigDict, info: data_lib.DatasetInfo) -> int:
    """config.total_steps if set, else num_epochs over the training split."""
    if config.total_steps:
        return int(config.total_steps)
    return data_lib.steps_for_epochs(info, config.num_epochs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model: nn.Module | None = None,
                       train_data: data_lib.Dataset | None = None,
                       eval_data: data_lib.Dataset | None = None,
                       init_variables: dict[str, Any] | None = None,
                       mesh: Mesh | None = None,
                       return_variables: bool = False) -> Any:
    """Trains, checkpoints and evaluates; resumes from workdir/checkpoints if present.

    Args:
        config: a trainer config (see get_default_config).
        workdir: checkpoints, TensorBoard events and figures.json go here.
        model: a Flax module to train instead of config.model (e.g. a child network).
        train_data, eval_data: datasets to use instead of building them from config.data.
        init_variables: {'params', 'batch_stats'} to start from instead of random weights.
        mesh: the device mesh (default: from config.mesh).
        return_variables: also return the evaluated variables (EMA ones if kept).

    Returns:
        (figures, {'params', 'batch_stats'}) if return_variables, else the figures: test_accuracy (fraction), test_top5, test_loss, train_loss, steps,
        wall_time_s, images_per_s, num_params, ... (also written to workdir/figures.json).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
        DataNotFoundError: the dataset is not prepared.
    """
    watch = metrics_lib.Stopwatch()
    # Mesh and input pipeline.
    mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
    if train_data is None:
        train_data = data_lib.make_dataset(config.data, config.data.train_split, training=True,
                                           mesh=mesh, seed=config.seed)
    if eval_data is None:
        eval_data = data_lib.make_dataset(config.data, config.data.eval_split, training=False,
                                          mesh=mesh, seed=config.seed)
    info = train_data.info
    total_steps = total_steps_for(config, info)
    logging.info("Training %d steps (%.2f epochs of %d examples, global batch %d) on %s.",
                 total_steps, total_steps * info.global_batch_size / info.num_examples,
                 info.num_examples, info.global_batch_size, mesh)

    # Model, optimizer and state, created directly in their shardings.
    model = model or build_model(config.model, info.num_classes)
    schedule = make_schedule(config, total_steps, info.num_batches)
    tx = make_optimizer(config.optimizer, schedule)
    state = create_train_state(model, tx, info.image_shape, mesh, config.seed, init_variables)
    num_params = metrics_lib.log_parameter_overview(state.params)

    # Resume.
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpointer = checkpoint_lib.Checkpointer(
        checkpoint_dir, save_every_steps=config.checkpoint_every_steps,
        keep=config.keep_checkpoints, async_save=config.async_checkpoint)
    last_good = None
    if checkpointer.latest_step() is not None:  # the newest usable one (others set aside)
        state, last_good = checkpointer.restore_latest_good(state)
        if last_good is None:
            logging.warning("No usable checkpoint in %s: training from step 0.", checkpoint_dir)
        else:
            logging.info("Resumed from step %d in %s.", last_good, checkpoint_dir)
    start_step = int(jax.device_get(state.step))
    # The train figures of the resumed step (a run killed after its last checkpoint reports
    # them again instead of NaN).
    summaries = _read_summaries(workdir)
    summary: dict[str, float] = dict(summaries.get(str(start_step), {}))

    # Compiled steps.
    rng = jax.random.key(config.seed + 1)
    train_step = jit_train_step(
        make_train_step(model, tx, schedule, label_smoothing=config.label_smoothing,
                        ema_decay=config.ema_decay, ema_warmup=config.ema_warmup,
                        conv_impl=config.model.conv_impl),
        state, mesh)
    eval_step = jax.jit(make_eval_step(model, config.model.conv_impl))
    use_ema = bool(config.ema_decay)

    writer = metrics_lib.create_writer(workdir)
    if start_step == 0:
        writer.write_hparams(_flat_hparams(config))
    progress = metrics_lib.report_progress(total_steps, writer)
    train_seconds = 0.0
    try:
        with jax.set_mesh(mesh), checkpoint_lib.stop_on_sigterm():
            batches = train_data.global_batches(start_step)
            pending: list[dict[str, jax.Array]] = []
            loop_watch = metrics_lib.Stopwatch()
            for step in range(start_step + 1, total_steps + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, step_metrics = train_step(state, next(batches), rng)
                pending.append(step_metrics)
                progress(step)
                is_last = step == total_steps
                save_due = is_last or step % max(1, config.checkpoint_every_steps) == 0
                if save_due or step % max(1, config.log_every_steps) == 0:
                    summary = _summarise(pending, step - len(pending) + 1, checkpoint_dir,
                                         last_good)
                    writer.write_scalars(step, summary)
                    pending = []
                if config.eval_every_steps and step % config.eval_every_steps == 0 and not is_last:
                    with progress.timed("eval"):
                        result = evaluate(eval_step, state.eval_variables(use_ema), iter(eval_data))
                    writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items()})
                if save_due:  # first: a checkpoint is never without its train figures
                    summaries = _record_summary(workdir, summaries, step, summary)
                if _save_finite(checkpointer, step, state, is_last):
                    last_good = step
                if not is_last and checkpointer.reached_preemption(step):
                    summary = _summarise(pending, step - len(pending) + 1, checkpoint_dir,
                                         last_good) if pending else summary
                    pending = []
                    _record_summary(workdir, summaries, step, summary)
                    checkpointer.wait()
                    if checkpointer.latest_step() != step:  # not already saved as due
                        _save_finite(checkpointer, step, state, True)
                    checkpointer.wait()
                    raise SystemExit(f"Preempted at step {step}; checkpoint saved, rerun to resume.")
            jax.block_until_ready(state)
            train_seconds = loop_watch.elapsed()
            result = evaluate(eval_step, state.eval_variables(use_ema), iter(eval_data))
            figures = {"test_accuracy": result["accuracy"], "test_top5": result["top5"],
                       "test_loss": result["loss"], "test_examples": result["count"]}
            if use_ema:
                raw = evaluate(eval_step, state.eval_variables(False), iter(eval_data))
                figures["test_accuracy_no_ema"] = raw["accuracy"]
    finally:
        checkpointer.close()
    steps_run = total_steps - start_step
    figures.update({
        "model": getattr(getattr(model, "spec", None), "name", type(model).__name__),
        "num_params": num_params,
        "steps": total_steps,
        "steps_this_run": steps_run,
        "resumed_from_step": start_step,
        "epochs": total_steps * info.global_batch_size / info.num_examples,
        "global_batch_size": info.global_batch_size,
        "train_loss": summary.get("train_loss", float("nan")),
        "train_accuracy": summary.get("train_accuracy", float("nan")),
        "images_per_s": steps_run * info.global_batch_size / train_seconds if steps_run else 0.0,
        "train_time_s": train_seconds,
        "wall_time_s": watch.elapsed(),
        "devices": jax.device_count(),
        "checkpoint_dir": checkpoint_dir,
    })
    writer.write_scalars(total_steps, {k: v for k, v in figures.items()
                                       if isinstance(v, float) and math.isfinite(v)})
    writer.flush()
    metrics_lib.write_json(os.path.join(workdir, FIGURES_FILE), figures)
    if return_variables:
        return figures, state.eval_variables(use_ema)
    return figures


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
    flat = {}

    def visit(prefix: str, node: Any) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, (dict, ml_collections.ConfigDict)):
                visit(name + ".", value)
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit("", config)
    return flat


# ----------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str]) -> None:
    """absl entry: --config file.py[:arg] (any field overridable), --workdir."""
    del argv
    from absl import flags  # pylint: disable=import-outside-toplevel

    config = flags.FLAGS.config
    sharding_lib.initialize_distributed(config.distributed)
    figures = train_and_evaluate(config, flags.FLAGS.workdir)
    print(metrics_lib.final_line(figures), flush=True)


def run(argv: list[str] | None = None) -> None:
    """Defines the flags and runs main (python -m dna_jax.retrain, dna-jax train).

    Args:
        argv: the arguments without the program name (default: sys.argv).
    """
    import sys  # pylint: disable=import-outside-toplevel

    from absl import app  # pylint: disable=import-outside-toplevel

    define_flags()
    host_memory.keep_freed_memory()  # before JAX starts its CPU threads
    app.run(main, argv=sys.argv if argv is None else ["dna-jax train", *argv])


def define_flags() -> None:
    """--config and --workdir (once per process)."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    if "workdir" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", None, "Trainer config file (file.py[:arg]), e.g. "
        "configs/fashion_mnist_teacher.py:tiny.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, events and figures "
                        "(a rerun resumes from its checkpoints).")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    run()
