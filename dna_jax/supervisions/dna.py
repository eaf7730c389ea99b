"""DNA as a supervision kind: teacher -> distill, candidates rated against the teacher.

  teacher/   the teacher checkpoint (dna_jax.teacher format: teacher.json + Orbax variables),
             trained here for small data or referenced from converted weights
  distill/   the supernet variables (Orbax) and the distillation checkpoints / TensorBoard
  rate/      one `<block>.npz` table + `<block>.json` summary per block: each candidate's
             error against the teacher's block output (dna_jax.rate)

DNA+ rounds (dna_jax.progressive) are DNA runs whose teacher is the previous round's winner:
`teacher.align_space` re-aligns the space's blocks to that teacher's stages, and
`teacher.checkpoint` may start with '{workdir}'.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from dna_jax import data as data_lib
from dna_jax import distill as distill_lib
from dna_jax import files
from dna_jax import metrics as metrics_lib
from dna_jax import multihost
from dna_jax import rate as rate_lib
from dna_jax import retrain as retrain_lib
from dna_jax import sharding as sharding_lib
from dna_jax import stage_context
from dna_jax import supervision
from dna_jax import teacher as teacher_lib
from dna_jax import validate as validate_lib
from dna_jax.models import zoo
from dna_jax.space import SearchSpace, align_space, get_space
from dna_jax.stage_context import Context, StageError
from dna_jax.supernet import artifact as artifact_lib


# ---- config -------------------------------------------------------------------------------------

# What DNA+ rounds (dna_jax.progressive) set, at a plain run's values: `align_space` re-aligns
# the space's blocks to the teacher's stages, `upstream` is the hash of the round that made
# the teacher (so a changed round invalidates the next).
NEUTRAL_DEFAULTS = {"teacher": {"align_space": False, "upstream": ""}}


def add_config(config: ml_collections.ConfigDict) -> None:
    """teacher: `checkpoint` = a teacher checkpoint directory (converted timm weights, see
    dna_jax.porting.timm, or '{workdir}/...') of zoo network `name`; empty = train one with
    `train` (a full trainer config, dna_jax.retrain.get_default_config); `num_classes` 0 =
    the checkpoint's. distill: dna_jax.distill.get_default_config (includes the space)."""
    config.teacher = dict(name="fmnist_teacher", checkpoint="", num_classes=0,
                          train=retrain_lib.get_default_config(), **NEUTRAL_DEFAULTS["teacher"])
    config.distill = distill_lib.get_default_config()


# ---- stage: teacher ----------------------------------------------------------------------------


def teacher_checkpoint_dir(ctx: Context) -> str:
    """The configured checkpoint ('{workdir}' resolved), else the one the stage trains."""
    configured = stage_context.resolve_workdir_path(ctx.config.teacher.checkpoint, ctx.workdir)
    return configured if configured else os.path.join(ctx.stage_dir("teacher"), "checkpoint")


def load_teacher(ctx: Context) -> tuple[Any, dict[str, Any]]:
    """The teacher module and its variables (replicated over the mesh), loaded once per run."""
    if "teacher" not in ctx.cache:
        cfg = ctx.config.teacher
        try:
            ctx.cache["teacher"] = teacher_lib.load_teacher(
                cfg.name, teacher_checkpoint_dir(ctx), num_classes=cfg.num_classes or None,
                sharding=sharding_lib.replicated(ctx.mesh))
        except teacher_lib.TeacherCheckpointError as error:
            if cfg.checkpoint or "is corrupt" not in str(error):
                raise
            stage_dir = ctx.stage_dir("teacher")  # trained here: the stage makes it again
            raise StageError(f"{error}. The teacher stage trained it: move {stage_dir} aside "
                             f"(`mv {stage_dir} {stage_dir}.corrupt`) and run the same command "
                             "again to retrain it") from error
    return ctx.cache["teacher"]


def run_teacher(ctx: Context) -> dict[str, Any]:
    """Trains the teacher (small data) or checks and evaluates a converted checkpoint."""
    cfg, stage_dir = ctx.config.teacher, ctx.stage_dir("teacher")
    if cfg.checkpoint:
        module, variables = load_teacher(ctx)
        eval_data = data_lib.make_dataset(ctx.config.data, ctx.config.data.eval_split,
                                          training=False, mesh=ctx.mesh)
        with jax.set_mesh(ctx.mesh):
            result = retrain_lib.evaluate(jax.jit(retrain_lib.make_eval_step(module)),
                                          variables, iter(eval_data))
        figures = {"test_accuracy": result["accuracy"], "test_top5": result["top5"],
                   "source": "checkpoint", "checkpoint": teacher_checkpoint_dir(ctx)}
        image_size = eval_data.info.image_shape[0]
    else:
        train_cfg = cfg.train
        if train_cfg.model.name != cfg.name or len(train_cfg.model.stages):
            raise StageError(f"teacher.train.model must be the zoo network teacher.name="
                             f"{cfg.name!r} (got name {train_cfg.model.name!r}, stages "
                             f"{tuple(train_cfg.model.stages)!r}): the teacher checkpoint "
                             "is saved and reloaded by zoo name")
        figures, variables = retrain_lib.train_and_evaluate(
            train_cfg, os.path.join(stage_dir, "train"), mesh=ctx.mesh, return_variables=True)
        num_classes = cfg.num_classes or int(
            jax.tree.leaves(variables["params"]["classifier"])[0].shape[-1])
        host_variables = multihost.replicated_to_host(variables)
        if stage_context.is_main_process():
            teacher_lib.save_teacher(
                teacher_checkpoint_dir(ctx), cfg.name, host_variables, num_classes,
                source={"trained_by": "dna_jax.pipeline", "config_hash": ctx.digests["teacher"]},
                preprocessing={"resolution": int(train_cfg.data.image_size)}, overwrite=True)
        multihost.barrier("teacher saved")  # every process loads it next
        figures = {**figures, "source": "trained"}
        image_size = int(train_cfg.data.image_size) or 28
    module, _ = load_teacher(ctx)
    figures.update(stage_context.network_cost_figures(module.spec, image_size,
                                                      module.num_classes))
    figures["resolution"] = image_size
    return figures


# ---- stage: distill ----------------------------------------------------------------------------


def supernet_dir(ctx: Context) -> str:
    return os.path.join(ctx.stage_dir("distill"), "supernet")


def run_distill(ctx: Context) -> dict[str, Any]:
    """Trains every supernet block from one teacher forward per step (dna_jax.distill)."""
    cfg = ctx.config
    module, variables = load_teacher(ctx)
    train_data = data_lib.make_dataset(cfg.data, cfg.data.train_split, training=True,
                                       mesh=ctx.mesh, seed=cfg.seed)
    val_split = cfg.distill.val_split or cfg.data.eval_split
    val_data = data_lib.make_dataset(cfg.data, val_split, training=False, mesh=ctx.mesh)
    supernet, figures = distill_lib.train_supernet(
        cfg.distill, module, variables, train_data, val_data, ctx.stage_dir("distill"),
        mesh=ctx.mesh, space=ctx.space)
    artifact_lib.save_supernet(supernet_dir(ctx), supernet)
    ctx.cache["supernet"] = supernet
    return figures


def distiller(ctx: Context) -> distill_lib.Distiller:
    module, _ = load_teacher(ctx)
    return distill_lib.make_distiller(ctx.config.distill, module, steps_per_epoch=1,
                                      space=ctx.space)


def load_supernet(ctx: Context) -> dict[str, Any]:
    if "supernet" not in ctx.cache:
        ctx.cache["supernet"] = artifact_lib.load_supernet(supernet_dir(ctx), distiller(ctx),
                                                          mesh=ctx.mesh)
    return ctx.cache["supernet"]


# ---- stage: rate -------------------------------------------------------------------------------


# The rating's images are the same global arrays on every host (each reads them as process 0
# of 1), so the replicated teacher and candidates see one batch set on a pod.
EVERY_HOST_READS_ALL = dict(process_index=0, process_count=1)


def recalibration_images(data_cfg: Any, split: str, count: int, seed: int) -> np.ndarray:
    """The first `count` images of the training stream [count, H, W, C] (augmented as in
    training, seeded); `count` 0 = one training batch (the original's recalibration batch)."""
    train = data_lib.make_dataset(data_cfg, split, training=True, seed=seed,
                                  **EVERY_HOST_READS_ALL)
    images, total = [], 0
    for batch in train.host_batches(0):
        images.append(batch["image"])
        total += len(batch["image"])
        if total >= max(count, 1):
            break
    return np.concatenate(images)[:count] if count else images[0]


def rating_images(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """(R rating batches [R, B, H, W, C] of `rate.split`, the recalibration images [N, H, W, C]).

    The rating batches are the first R (whole) batches of the held-out split; the
    recalibration images the first `rate.recalibration_images` of the training stream (the
    original: its first batch). Identical on every host (EVERY_HOST_READS_ALL).
    """
    cfg = ctx.config
    rate_data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
    rate_data_cfg.eval_batch_size = cfg.rate.batch_size
    rate_data = data_lib.make_dataset(rate_data_cfg, cfg.rate.split, training=False,
                                      **EVERY_HOST_READS_ALL)
    batches = []
    for batch in rate_data.host_batches():
        if len(batches) == cfg.rate.num_batches:
            break
        if "mask" in batch and not np.all(batch["mask"]):
            break  # a padded last batch is not a rating batch
        batches.append(batch["image"])
    if len(batches) < cfg.rate.num_batches:
        raise StageError(f"rate.split={cfg.rate.split!r} has {len(batches)} whole batches of "
                         f"{cfg.rate.batch_size}, rate.num_batches asks for "
                         f"{cfg.rate.num_batches}: lower one of them or use a larger split")
    recal = recalibration_images(cfg.data, cfg.data.train_split,
                                 cfg.rate.recalibration_images, cfg.seed)
    return np.stack(batches), recal


def run_rate(ctx: Context) -> dict[str, Any]:
    """Rates every candidate (or `rate.num_candidates` sampled ones) of every block."""
    from dna_jax import stages  # pylint: disable=import-outside-toplevel
    module, teacher_variables = load_teacher(ctx)
    images, recal = rating_images(ctx)
    watch = metrics_lib.Stopwatch()
    paths = rate_lib.rate_blocks(ctx.space, distiller(ctx).blocks, load_supernet(ctx), module,
                                 teacher_variables, images, recal, ctx.config.rate,
                                 ctx.stage_dir("rate"), mesh=ctx.mesh)
    blocks = stages.rating_summaries(ctx, paths)
    return {"blocks": blocks, "candidates": sum(b["candidates"] for b in blocks.values()),
            "seconds": watch.elapsed(), "rating_batches": int(images.shape[0]),
            "batch_size": int(images.shape[1])}


# ---- what the common stages ask --------------------------------------------------------------


def configured_space(config: ml_collections.ConfigDict, teacher_spec) -> SearchSpace:
    """`distill.space`; with `teacher.align_space` (DNA+ rounds) its blocks re-aligned to the
    stages of `teacher_spec` (`align_space`)."""
    base = get_space(config.distill.space)
    return align_space(base, teacher_spec) if config.teacher.align_space else base


def space(ctx: Context) -> SearchSpace:
    """The run's space (the teacher's architecture read only when the space is aligned)."""
    cfg = ctx.config.teacher
    teacher = (teacher_lib.teacher_network_spec(
        cfg.name, teacher_checkpoint_dir(ctx) if cfg.checkpoint else None)
        if cfg.align_space else None)
    return configured_space(ctx.config, teacher)


def num_classes(ctx: Context) -> int:
    module, _ = load_teacher(ctx)
    return int(module.num_classes)


def reference_costs(ctx: Context) -> Mapping[str, float]:
    """The teacher's costs: `search.budget_fraction` is a fraction of them."""
    return ctx.figures("teacher")


def report_figures(ctx: Context) -> dict[str, Any]:
    teacher, retrain, distill = (ctx.figures(s) for s in ("teacher", "retrain", "distill"))
    ratio = lambda a, b: float(a) / float(b) if a is not None and b else None  # noqa: E731
    gap = (None if teacher.get("test_accuracy") is None or retrain.get("test_accuracy") is None
           else float(teacher["test_accuracy"]) - float(retrain["test_accuracy"]))
    return {"teacher_accuracy": teacher.get("test_accuracy"),
            "teacher_macs": teacher.get("macs"), "teacher_params": teacher.get("params"),
            "teacher_dna_flops": teacher.get("dna_flops"),
            "macs_ratio": ratio(retrain.get("macs"), teacher.get("macs")),
            "accuracy_gap": gap,
            "distill_val_loss_ratio": distill.get("val_loss_ratio"),
            "distill_updates_per_op": distill.get("updates_per_op")}


def report_lines(summary: Mapping[str, Any]) -> list[str]:
    return [f"Distillation validation loss, final / initial per block: "
            f"{summary['distill_val_loss_ratio']}; updates per op per block: "
            f"{summary.get('distill_updates_per_op')}.", ""]


# ---- static validation -------------------------------------------------------------------------


def reference_spec(config: ml_collections.ConfigDict, workdir: str | None):
    """The teacher's NetworkSpec when it is known before running (zoo name or an existing
    checkpoint), else None."""
    cfg = config.teacher
    try:
        if cfg.checkpoint:
            if cfg.checkpoint.startswith(stage_context.WORKDIR_PLACEHOLDER) and workdir is None:
                return None
            path = stage_context.resolve_workdir_path(cfg.checkpoint, workdir or "")
            if not files.isdir(path):
                return None
            return teacher_lib.teacher_network_spec(cfg.name, path)
        return zoo.get_network_spec(cfg.name)
    except Exception:  # pylint: disable=broad-except  # an unknown name fails in its stage
        return None


def static_space(config: ml_collections.ConfigDict, teacher_spec) -> SearchSpace | None:
    """`configured_space`, or None when it cannot be known yet (an aligned space whose
    teacher is not made yet) or is wrong (reported by the pipeline's own check)."""
    if config.teacher.align_space and teacher_spec is None:
        return None
    try:
        return configured_space(config, teacher_spec)
    except Exception:  # pylint: disable=broad-except
        return None


def reference_static_cost(config: ml_collections.ConfigDict, teacher_spec, classes: int,
                          cost: str) -> int | None:
    """A teacher trained here: its cost at its training size; a checkpoint's: not yet known."""
    if teacher_spec is None or config.teacher.checkpoint:
        return None
    size = int(config.teacher.train.data.image_size) or validate_lib.NATIVE_SIZES.get(
        config.teacher.train.data.source, 0)
    if not size:
        return None
    return stage_context.network_cost_figures(teacher_spec, size, classes)[cost]


def validate(problems: validate_lib.Problems, config: ml_collections.ConfigDict,
             stages: Sequence[str], devices: int, workdir: str | None) -> None:
    """teacher.train (a teacher trained here) and the distillation section."""
    checkpoint = config.teacher.checkpoint
    if checkpoint and files.unsupported(checkpoint):
        problems.add("teacher.checkpoint", checkpoint, files.unsupported(checkpoint))
    if "teacher" in stages and not config.teacher.checkpoint:
        spec = reference_spec(config, workdir)
        validate_lib.check_trainer(problems, config.teacher.train, "teacher.train", devices,
                                   validate_lib.total_stride(spec) if spec is not None else None,
                                   f"teacher {config.teacher.name!r}")
    if "distill" in stages:
        problems.call(distill_lib.check_config, config.distill, "distill")


KIND = supervision.register(supervision.Supervision(
    name="teacher", label="DNA", example_config="configs/fashion_mnist_dna.py:tiny",
    add_config=add_config, neutral_defaults=NEUTRAL_DEFAULTS,
    data_stages=("distill",),
    own_stages=("teacher", "distill"),
    upstream={"teacher": (), "distill": ("teacher",), "rate": ("teacher", "distill"),
              "search": ("teacher", "rate"), "retrain": ("search",), "deploy": ("retrain",),
              "report": ("teacher", "distill", "rate", "search", "retrain", "deploy")},
    sections={"teacher": ("teacher", "seed"), "distill": ("data", "distill", "seed"),
              "rate": ("data", "rate", "distill.space")},
    runners={"teacher": run_teacher, "distill": run_distill, "rate": run_rate},
    space_name=lambda config: config.distill.space,
    space=space, num_classes=num_classes, load_supernet=load_supernet,
    reference_costs=reference_costs, report_figures=report_figures, report_lines=report_lines,
    validate=validate, reference_spec=reference_spec, static_space=static_space,
    reference_static_cost=reference_static_cost, has_reference=True))
