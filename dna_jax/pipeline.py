"""The DNA pipeline: teacher -> distill -> rate -> search -> retrain -> report, from one config.

Each stage reads its predecessors' artifacts and writes its own under `workdir/<stage>/`:

  teacher/   the teacher checkpoint (dna_jax.teacher format: teacher.json + Orbax variables),
             trained here for small data or referenced from converted weights
  distill/   the supernet variables (Orbax) and the distillation checkpoints / TensorBoard
  rate/      one `<block>.npz` table + `<block>.json` summary per block
  search/    the Pareto front, the chosen architecture(s) and the exported child network
  retrain/   the retrained winner (checkpoints, TensorBoard, figures.json)
  report/    summary.json, report.md and the plots

DNA++ (`supervision='ssl'`, dna_jax.ssl) has no teacher: its `ssl/` stage trains the supernet
by self-supervision and replaces teacher and distill; rate scores candidates by their SSL
loss; search, retrain and report follow unchanged (the search budget is then absolute).

A stage ends by writing `manifest.json` (its config hash, figures, versions, time), last and
atomically. On a re-run a stage whose manifest has the same hash is skipped; a stage that was
started but not finished resumes (its own checkpoints or per-block files); a stage whose
artifact was written by another config is reported with the keys that changed, and is only
recomputed with `on_change='rerun'` (the old artifact is moved aside, never deleted).
The hash of a stage covers its own config sections and the hashes of the stages it reads, so
changing the distillation config invalidates rating, search, retraining and the report.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from dna_jax import artifacts
from dna_jax import costs as costs_lib
from dna_jax import data as data_lib
from dna_jax import distill as distill_lib
from dna_jax import metrics as metrics_lib
from dna_jax import rate as rate_lib
from dna_jax import retrain as retrain_lib
from dna_jax import search as search_lib
from dna_jax import sharding as sharding_lib
from dna_jax import ssl as ssl_lib
from dna_jax import ssl_rating as ssl_rating_lib
from dna_jax import ssl_train as ssl_train_lib
from dna_jax import teacher as teacher_lib
from dna_jax import validate as validate_lib
from dna_jax import workdir as workdir_lib
from dna_jax.models.efficientnet import scaled_network_spec
from dna_jax.space import Arch, SearchSpace, align_space, get_space
from dna_jax.supernet import artifact as artifact_lib

STAGES = ("teacher", "distill", "rate", "search", "retrain", "report")
SSL_STAGES = ("ssl", "rate", "search", "retrain", "report")  # DNA++: no teacher
STAGE_ORDER = ("teacher", "distill", "ssl", "rate", "search", "retrain", "report")
SUPERVISIONS = ("teacher", "ssl")
ON_CHANGE = ("error", "rerun", "resume")
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
STARTED_FILE = "started.json"
COMPILATION_CACHE_BYTES = 8 << 30
RETRAINED_NETWORK = "network"  # retrain/network: the retrained winner, loadable as a teacher
RETRAINED_NETWORK_NAME = "winner"


class StageError(RuntimeError):
    """A stage cannot run: a missing upstream artifact, an impossible request, ..."""


# ---- configuration -----------------------------------------------------------------------------


def get_default_config() -> ml_collections.ConfigDict:
    """Every field the pipeline reads; experiment configs override them and lock the result.

    Every value that can be checked without running is checked before any work
    (`check_config`, dna_jax.validate): a run with a bad value stops naming each field, its
    value and the fix, before the workdir is touched.

    Sections:
      stages: comma-separated subset of STAGES to run, in pipeline order.
      on_change: 'error' (default) stops when an artifact was written by another config and
        names the keys that changed; 'rerun' moves the old artifact aside and recomputes;
        'resume' continues an unfinished stage of another config from its checkpoints (after
        a NaN stop: fix the learning rate and resume from the last good, finite checkpoint;
        a finished stage of another config is still an error).
      seed, distributed, mesh: as in the trainer (dna_jax.retrain).
      compilation_cache: directory of JAX's persistent compilation cache, so a resumed or
        repeated run does not compile its steps again (minutes on a CPU); 'auto' =
        <workdir>/compilation_cache, '' = off. Ignored when the process already has one.
      data: the distillation / rating data (dna_jax.data); `train_split` trains the
        supernet, `distill.val_split` validates it, `rate.split` rates it.
      teacher: `checkpoint` = a teacher checkpoint directory (converted timm weights, see
        dna_jax.porting.timm) with zoo name `name`; empty = train one with `teacher.train`
        (a full trainer config, dna_jax.retrain.get_default_config).
      distill: dna_jax.distill.get_default_config (includes the search space name).
      rate: dna_jax.rate.get_default_config plus `split`, `num_batches` (R rating batches),
        `batch_size`, and `recalibration_images`: how many training images recalibrate each
        candidate's BatchNorm ('recalibrate' mode; the first ones of the training stream).
        The original used one batch; on small maps fed by heavy-tailed teacher features one
        batch of 128 left every candidate of `small`'s 2x2 block 3 worse than a constant
        predictor (issue 19), so the default is 2,048; 0 = one training batch (the original).
      search: the budget: `budget` (absolute, in `cost` units) or, if 0, `budget_fraction` x
        the teacher's cost; optional `params_budget`; `combine`, `standardize`, `top_k`,
        `method` ('exact' or 'beam' with `beam_width`); `unfit_blocks` ('keep' or 'exclude':
        a block whose best candidate does not beat the constant predictor adds nothing to
        the sum) and `rank_normalize` (each block's scores replaced by their ranks), see
        dna_jax.search.prepare_tables and the README's "Does the rating work?".
      retrain: a full trainer config for the winner (its model section is replaced by the
        searched child network); `inherit_weights` starts it from the supernet's weights.
        The retrained winner is also saved as a teacher checkpoint in retrain/network.
      supervision: 'teacher' (DNA: teacher -> distill) or 'ssl' (DNA++: the `ssl` stage,
        configured by the `ssl` section, dna_jax.ssl.get_default_config; stages SSL_STAGES).
    DNA+ rounds (dna_jax.progressive) add to their per-round configs: `teacher.checkpoint`
    may start with '{workdir}' (this run's workdir), `teacher.align_space` (re-align the
    space's blocks to the teacher's stages), `teacher.upstream` (the hash of the round that
    made the teacher), `retrain.width_multiplier` / `depth_multiplier` (scale the winner).
    """
    config = ml_collections.ConfigDict()
    config.stages = ",".join(STAGES)
    config.on_change = "error"
    config.compilation_cache = "auto"
    config.seed = 0
    config.distributed = "auto"
    config.mesh = dict(shape=(-1,), axis_names=("data",), axis_types="auto",
                       num_devices=0)  # > 0: only the first num_devices devices
    config.data = data_lib.get_default_config()
    config.teacher = dict(name="fmnist_teacher", checkpoint="", num_classes=0,
                          train=retrain_lib.get_default_config())
    config.distill = distill_lib.get_default_config()
    rate = rate_lib.get_default_config()
    rate.unlock()  # the pipeline adds where its rating data comes from
    rate.split = "test"
    rate.num_batches = 1
    rate.batch_size = 64
    rate.recalibration_images = 2048
    config.rate = rate
    config.search = dict(cost="macs", budget=0.0, budget_fraction=0.5, params_budget=0.0,
                         combine="sum", standardize=False, top_k=5, method="exact",
                         beam_width=1024, unfit_blocks="keep", rank_normalize=False)
    config.retrain = retrain_lib.get_default_config()
    config.retrain.inherit_weights = False
    config.supervision = "teacher"
    config.ssl = ssl_lib.get_default_config()
    return config


def parse_stages(text: str | Sequence[str]) -> list[str]:
    """'rate,search' -> ['rate', 'search'] in pipeline order; unknown names are an error."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [s for s in names if s]
    unknown = [s for s in names if s not in STAGE_ORDER]
    if unknown or not names:
        raise ValueError(f"config.stages: unknown stage(s) {unknown or names!r}; choose from "
                         f"{', '.join(STAGES)} (DNA) or {', '.join(SSL_STAGES)} (DNA++) "
                         "(comma-separated)")
    return [s for s in STAGE_ORDER if s in names]


# What each stage reads: its config sections and the stages upstream of it.
_SECTIONS = {
    "teacher": ("teacher", "seed"),
    "distill": ("data", "distill", "seed"),
    "ssl": ("data", "ssl", "seed"),
    "rate": ("data", "rate", "distill.space"),
    "search": ("search",),
    "retrain": ("retrain",),
    "report": (),
}
_UPSTREAM = {
    "teacher": (),
    "distill": ("teacher",),
    "rate": ("teacher", "distill"),
    "search": ("teacher", "rate"),
    "retrain": ("search",),
    "report": ("teacher", "distill", "rate", "search", "retrain"),
}
_SSL_UPSTREAM = {  # DNA++: the ssl stage takes the place of teacher and distill
    "ssl": (), "rate": ("ssl",), "search": ("rate",), "retrain": ("search",),
    "report": ("ssl", "rate", "search", "retrain"),
}


def is_ssl(config: ml_collections.ConfigDict) -> bool:
    """Whether the config runs DNA++ (self-supervised blocks, no teacher)."""
    return config.get("supervision", "teacher") == "ssl"


def upstream_stages(config: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    """The stages whose artifacts `stage` reads, for this config's supervision."""
    if is_ssl(config):
        return _SSL_UPSTREAM.get(stage, ())
    return _UPSTREAM.get(stage, ())


def _section(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_config(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
    """The config values a stage's result depends on (what its hash covers)."""
    return {name: artifacts.to_jsonable(_section(config, name)) for name in _SECTIONS[stage]}


def stage_digests(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Config hash of every stage: its own sections plus its upstream stages' hashes."""
    digests: dict[str, str] = {}
    for stage in STAGE_ORDER:
        if stage == "ssl" and "ssl" not in config:
            continue
        digests[stage] = artifacts.config_hash(stage, stage_config(config, stage),
                                               [digests[u] for u in upstream_stages(config, stage)])
    return digests


# ---- the context shared by the stages ----------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What the stages share within one run: config, workdir, mesh and loaded artifacts."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    digests: dict[str, str]
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.workdir, stage)

    @property
    def space(self) -> SearchSpace:
        """The configured space; with `teacher.align_space` (DNA+ rounds, added by
        dna_jax.progressive) its blocks re-aligned to the teacher's stages (`align_space`)."""
        if not self.config.teacher.get("align_space", False):
            return get_space(space_name(self.config))
        if "space" not in self.cache:
            cfg = self.config.teacher
            teacher = teacher_lib.teacher_network_spec(
                cfg.name, _teacher_checkpoint_dir(self) if cfg.checkpoint else None)
            self.cache["space"] = align_space(get_space(space_name(self.config)), teacher)
        return self.cache["space"]

    def figures(self, stage: str) -> dict[str, Any]:
        """A completed stage's figures (from its manifest)."""
        return artifacts.read_manifest(self.stage_dir(stage)).get("figures", {})


def space_name(config: ml_collections.ConfigDict) -> str:
    """The search space: `ssl.space` for DNA++, else `distill.space`."""
    return config.ssl.space if is_ssl(config) else config.distill.space


def _is_main_process() -> bool:
    return jax.process_index() == 0


# ---- stage: teacher ----------------------------------------------------------------------------


WORKDIR_PLACEHOLDER = "{workdir}"  # in teacher.checkpoint: this run's workdir (DNA+ rounds)


def resolve_workdir_path(path: str, workdir: str) -> str:
    """`path` with a leading '{workdir}' replaced by `workdir` (keeps workdirs movable)."""
    if path.startswith(WORKDIR_PLACEHOLDER):
        return os.path.normpath(workdir + path[len(WORKDIR_PLACEHOLDER):])
    return path


def _teacher_checkpoint_dir(ctx: Context) -> str:
    configured = resolve_workdir_path(ctx.config.teacher.checkpoint, ctx.workdir)
    return configured if configured else os.path.join(ctx.stage_dir("teacher"), "checkpoint")


def load_stage_teacher(ctx: Context) -> tuple[Any, dict[str, Any]]:
    """The teacher module and its variables (replicated over the mesh), loaded once per run."""
    if "teacher" not in ctx.cache:
        cfg = ctx.config.teacher
        ctx.cache["teacher"] = teacher_lib.load_teacher(
            cfg.name, _teacher_checkpoint_dir(ctx), num_classes=cfg.num_classes or None,
            sharding=sharding_lib.replicated(ctx.mesh))
    return ctx.cache["teacher"]


def _network_cost_figures(spec, resolution: int, num_classes: int) -> dict[str, int]:
    total = costs_lib.network_costs(spec, resolution, num_classes).total
    return {"params": total.params, "macs": total.macs, "dna_flops": total.dna_flops}


def run_teacher(ctx: Context) -> dict[str, Any]:
    """Trains the teacher (small data) or checks and evaluates a converted checkpoint."""
    cfg, stage_dir = ctx.config.teacher, ctx.stage_dir("teacher")
    if cfg.checkpoint:
        module, variables = load_stage_teacher(ctx)
        eval_data = data_lib.make_dataset(ctx.config.data, ctx.config.data.eval_split,
                                          training=False, mesh=ctx.mesh)
        with jax.set_mesh(ctx.mesh):
            result = retrain_lib.evaluate(jax.jit(retrain_lib.make_eval_step(module)),
                                          variables, iter(eval_data))
        figures = {"test_accuracy": result["accuracy"], "test_top5": result["top5"],
                   "source": "checkpoint", "checkpoint": _teacher_checkpoint_dir(ctx)}
        resolution = eval_data.info.image_shape[0]
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
        if _is_main_process():
            checkpoint = _teacher_checkpoint_dir(ctx)
            teacher_lib.save_teacher(
                checkpoint, cfg.name, jax.device_get(variables), num_classes,
                source={"trained_by": "dna_jax.pipeline", "config_hash": ctx.digests["teacher"]},
                preprocessing={"resolution": int(train_cfg.data.image_size)}, overwrite=True)
        figures = {**figures, "source": "trained"}
        resolution = int(train_cfg.data.image_size) or 28
    module, _ = load_stage_teacher(ctx)
    figures.update(_network_cost_figures(module.spec, resolution, module.num_classes))
    figures["resolution"] = resolution
    return figures


# ---- stage: distill ----------------------------------------------------------------------------


def _supernet_dir(ctx: Context) -> str:
    return os.path.join(ctx.stage_dir("distill"), "supernet")


def run_distill(ctx: Context) -> dict[str, Any]:
    """Trains every supernet block from one teacher forward per step (dna_jax.distill)."""
    cfg = ctx.config
    module, variables = load_stage_teacher(ctx)
    train_data = data_lib.make_dataset(cfg.data, cfg.data.train_split, training=True,
                                       mesh=ctx.mesh, seed=cfg.seed)
    val_split = cfg.distill.val_split or cfg.data.eval_split
    val_data = data_lib.make_dataset(cfg.data, val_split, training=False, mesh=ctx.mesh)
    supernet, figures = distill_lib.train_supernet(
        cfg.distill, module, variables, train_data, val_data, ctx.stage_dir("distill"),
        mesh=ctx.mesh, space=ctx.space)
    artifact_lib.save_supernet(_supernet_dir(ctx), supernet)
    ctx.cache["supernet"] = supernet
    return figures


def _distiller(ctx: Context) -> distill_lib.Distiller:
    module, _ = load_stage_teacher(ctx)
    return distill_lib.make_distiller(ctx.config.distill, module, steps_per_epoch=1,
                                      space=ctx.space)


def load_stage_supernet(ctx: Context) -> dict[str, Any]:
    if is_ssl(ctx.config):
        return load_stage_ssl(ctx)[0]
    if "supernet" not in ctx.cache:
        ctx.cache["supernet"] = artifact_lib.load_supernet(_supernet_dir(ctx), _distiller(ctx),
                                                         mesh=ctx.mesh)
    return ctx.cache["supernet"]


# ---- stage: rate -------------------------------------------------------------------------------


def recalibration_images(data_cfg: Any, split: str, count: int, seed: int) -> np.ndarray:
    """The first `count` images of the training stream [count, H, W, C] (augmented as in
    training, seeded); `count` 0 = one training batch (the original's recalibration batch)."""
    train = data_lib.make_dataset(data_cfg, split, training=True, seed=seed)
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
    original: its first batch).
    """
    cfg = ctx.config
    rate_data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
    rate_data_cfg.eval_batch_size = cfg.rate.batch_size
    rate_data = data_lib.make_dataset(rate_data_cfg, cfg.rate.split, training=False)
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
                                 cfg.rate.get("recalibration_images", 0), cfg.seed)
    return np.stack(batches), recal


def _rating_summaries(ctx: Context, paths: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """{block name: candidates, best (top-1 entry), seconds} from the blocks' JSON summaries."""
    blocks = {}
    for (_, summary_path), block in zip(paths, ctx.space.blocks):
        summary = artifacts.read_json(summary_path)
        blocks[block.name] = {"candidates": summary["candidates"],
                              "best": summary["top_k"][0] if summary["top_k"] else None,
                              "seconds": summary["rating"].get("seconds"),
                              "fit_mse_var": summary["rating"].get("fit_mse_var")}
    return blocks


def run_rate(ctx: Context) -> dict[str, Any]:
    """Rates every candidate (or `rate.num_candidates` sampled ones) of every block."""
    if is_ssl(ctx.config):
        return run_ssl_rate(ctx)
    module, teacher_variables = load_stage_teacher(ctx)
    distiller = _distiller(ctx)
    images, recal = rating_images(ctx)
    watch = metrics_lib.Stopwatch()
    paths = rate_lib.rate_blocks(ctx.space, distiller.blocks, load_stage_supernet(ctx), module,
                                 teacher_variables, images, recal, ctx.config.rate,
                                 ctx.stage_dir("rate"), mesh=ctx.mesh)
    blocks = _rating_summaries(ctx, paths)
    total = sum(b["candidates"] for b in blocks.values())
    seconds = watch.elapsed()
    return {"blocks": blocks, "candidates": total, "seconds": seconds,
            "rating_batches": int(images.shape[0]), "batch_size": int(images.shape[1])}


# ---- stage: search -----------------------------------------------------------------------------


def load_tables(ctx: Context) -> list[search_lib.BlockTable]:
    """The rating tables, checked against the space (names the file and the problem)."""
    return search_lib.load_space_tables(ctx.stage_dir("rate"), ctx.space,
                                        resolution=_resolution(ctx))


def _resolution(ctx: Context) -> int:
    return int(ctx.config.rate.cost_resolution or ctx.config.data.image_size
               or ctx.space.resolution)


def search_budgets(ctx: Context) -> dict[str, float]:
    """The budgets of the search: absolute, or a fraction of the teacher's cost."""
    cfg = ctx.config.search
    budget = cfg.budget
    if not budget:
        if not 0 < cfg.budget_fraction:
            raise StageError("set search.budget (absolute) or search.budget_fraction > 0")
        if is_ssl(ctx.config):
            raise StageError("DNA++ has no teacher to take search.budget_fraction of: set an "
                             "absolute search.budget")
        teacher_cost = ctx.figures("teacher").get(cfg.cost)
        if teacher_cost is None:
            raise StageError(f"search.cost={cfg.cost!r}: the teacher has no such cost "
                             f"(known: params, macs, dna_flops)")
        budget = cfg.budget_fraction * teacher_cost
    budgets = {cfg.cost: float(budget)}
    if cfg.params_budget:
        budgets["params"] = float(cfg.params_budget)
    return budgets


def run_search(ctx: Context) -> dict[str, Any]:
    """The exact Pareto front, the best network(s) under the budget, the exported winner."""
    from dna_jax import export as export_lib  # pylint: disable=import-outside-toplevel

    cfg, space, stage_dir = ctx.config.search, ctx.space, ctx.stage_dir("search")
    tables = load_tables(ctx)
    fits = [rate_lib.block_fit(ctx.stage_dir("rate"), block.name) for block in space.blocks]
    tables = search_lib.prepare_tables(tables, fits, cfg.get("unfit_blocks", "keep"),
                                       cfg.get("rank_normalize", False))
    teacher_figures = {} if is_ssl(ctx.config) else ctx.figures("teacher")
    num_classes = _teacher_classes(ctx)
    fixed = search_lib.space_fixed_costs(space, _resolution(ctx), num_classes)
    budgets = search_budgets(ctx)
    kwargs = dict(fixed_cost=fixed, combine=cfg.combine, standardize=cfg.standardize)
    watch = metrics_lib.Stopwatch()
    if cfg.method == "exact":
        results = search_lib.search(tables, budgets, k=cfg.top_k, **kwargs)
    elif cfg.method == "beam":
        results = search_lib.beam_search(tables, budgets, width=cfg.beam_width, k=cfg.top_k,
                                         **kwargs)
    else:
        raise StageError(f"search.method must be 'exact' or 'beam', got {cfg.method!r}")
    search_seconds = watch.elapsed()
    front = search_lib.pareto_front(tables, cfg.cost, **kwargs)
    winner = results[0]
    arch = Arch.of(winner.encodings)
    if _is_main_process():
        search_lib.plot_pareto_front(front, os.path.join(stage_dir, "pareto_front.png"),
                                     chosen=results[:1])
        search_lib.plot_score_histograms(tables, os.path.join(stage_dir, "score_histograms.png"),
                                         names=[b.name for b in space.blocks])
        artifacts.write_json(os.path.join(stage_dir, "front.json"), {
            "cost_name": front.cost_name, "cost": front.cost, "score": front.score,
            "indices": front.indices})
        artifacts.write_json(os.path.join(stage_dir, "results.json"),
                             [r.to_dict() for r in results])
    supernet = load_stage_supernet(ctx) if ctx.config.retrain.inherit_weights else None
    exported = export_lib.export_winner(space, winner, os.path.join(stage_dir, "winner"),
                                        num_classes=num_classes, resolution=_resolution(ctx),
                                        supernet_variables=supernet, seed=ctx.config.seed)
    return {"budgets": budgets, "winner": winner.to_dict(), "arch": arch.to_json(space),
            "block_strings": space.to_network_spec(arch).to_strings(),
            "front_points": len(front), "search_seconds": search_seconds,
            "teacher_cost": teacher_figures.get(cfg.cost), "export": exported}


def _teacher_classes(ctx: Context) -> int:
    if is_ssl(ctx.config):  # DNA++: the classes of the data the ssl stage trained on
        return int(ctx.figures("ssl")["num_classes"])
    module, _ = load_stage_teacher(ctx)
    return int(module.num_classes)


def winner_arch(ctx: Context) -> Arch:
    return Arch.from_json(ctx.figures("search")["arch"])


# ---- stage: retrain ----------------------------------------------------------------------------


def run_retrain(ctx: Context) -> dict[str, Any]:
    """Trains the searched network from scratch (or from the supernet's weights)."""
    from dna_jax import export as export_lib  # pylint: disable=import-outside-toplevel

    cfg = ctx.config.retrain
    module, variables, arch = export_lib.load_exported(
        os.path.join(ctx.stage_dir("search"), "winner"), space=ctx.space)
    # DNA+ rounds (dna_jax.progressive) may scale the winner before retraining it.
    width, depth = cfg.get("width_multiplier", 1.0), cfg.get("depth_multiplier", 1.0)
    if (width, depth) != (1.0, 1.0):
        if cfg.inherit_weights:
            raise StageError("retrain.inherit_weights needs retrain.width_multiplier and "
                             f"depth_multiplier 1 (got {width}, {depth}): a scaled network "
                             "has no supernet weights")
        module = module.clone(spec=scale_network_spec(module.spec, width, depth))
    module = module.clone(drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
    init = variables if cfg.inherit_weights else None
    figures, trained = retrain_lib.train_and_evaluate(
        cfg, ctx.stage_dir("retrain"), model=module, init_variables=init, mesh=ctx.mesh,
        return_variables=True)
    resolution = int(cfg.data.image_size) or _resolution(ctx)
    figures.update(_network_cost_figures(module.spec, resolution, module.num_classes))
    figures["arch"] = arch.to_json(ctx.space)
    figures["width_multiplier"], figures["depth_multiplier"] = width, depth
    figures["block_strings"] = module.spec.to_strings()
    _save_retrained_network(ctx, module, trained, resolution)
    return figures


def scale_network_spec(spec, width_multiplier: float, depth_multiplier: float):
    """EfficientNet's compound scaling of any network: widths (stem, every layer, head)
    rounded to multiples of 8, each stage's depth scaled with ceil (timm's rules)."""
    scaled = scaled_network_spec(spec.name, spec.to_strings(), width_multiplier,
                                 depth_multiplier, stem_channels=spec.stem_channels,
                                 head_channels=spec.head_channels, stem_stride=spec.stem_stride)
    return dataclasses.replace(scaled, stem_kernel=spec.stem_kernel)


def _save_retrained_network(ctx: Context, module, variables, resolution: int) -> None:
    """retrain/network: the retrained winner as a teacher checkpoint (architecture stored),
    the next DNA+ round's teacher; single-process runs only (like the trained teacher)."""
    if jax.process_count() > 1:
        logging.warning("retrain: %s is not written in multi-process runs", RETRAINED_NETWORK)
        return
    spec = dataclasses.replace(module.spec, name=RETRAINED_NETWORK_NAME)
    teacher_lib.save_teacher(
        os.path.join(ctx.stage_dir("retrain"), RETRAINED_NETWORK), spec.name,
        jax.device_get(variables), int(module.num_classes),
        source={"trained_by": "dna_jax.pipeline retrain", "config_hash": ctx.digests["retrain"]},
        preprocessing={"resolution": resolution}, overwrite=True, spec=spec,
        layer_config=module.layer_config)


# ---- stage: report -----------------------------------------------------------------------------


def run_report(ctx: Context) -> dict[str, Any]:
    """summary.json and report.md: every stage's headline figures in one place."""
    stage_dir = ctx.stage_dir("report")
    ssl = is_ssl(ctx.config)
    search, retrain, rate = (ctx.figures(s) for s in ("search", "retrain", "rate"))
    teacher, distill = ({}, {}) if ssl else (ctx.figures("teacher"), ctx.figures("distill"))
    walls = {s: artifacts.read_manifest(ctx.stage_dir(s)).get("wall_seconds")
             for s in (SSL_STAGES if ssl else STAGES) if s != "report"}
    cost = ctx.config.search.cost
    summary = {
        "teacher_accuracy": teacher.get("test_accuracy"),
        "winner_accuracy": retrain.get("test_accuracy"),
        "teacher_macs": teacher.get("macs"), "winner_macs": retrain.get("macs"),
        "teacher_params": teacher.get("params"), "winner_params": retrain.get("params"),
        "teacher_dna_flops": teacher.get("dna_flops"), "winner_dna_flops": retrain.get("dna_flops"),
        "macs_ratio": _ratio(retrain.get("macs"), teacher.get("macs")),
        "accuracy_gap": _difference(teacher.get("test_accuracy"), retrain.get("test_accuracy")),
        "budget": search.get("budgets"), "search_cost": cost,
        "winner_block_strings": search.get("block_strings"),
        "winner_encoding": search.get("winner", {}).get("encodings"),
        "winner_score": search.get("winner", {}).get("score"),
        "best_per_block": {k: v.get("best") for k, v in rate.get("blocks", {}).items()},
        "candidates_rated": rate.get("candidates"),
        "fit_mse_var": {k: v.get("fit_mse_var") for k, v in rate.get("blocks", {}).items()},
        "distill_val_loss_ratio": distill.get("val_loss_ratio"),
        "distill_updates_per_op": distill.get("updates_per_op"),
        "stage_wall_seconds": walls,
        "wall_seconds": float(sum(v for v in walls.values() if v)),
    }
    if ssl:
        summary.update(ssl_report_figures(ctx))
    for name in ("pareto_front.png", "score_histograms.png"):
        source = os.path.join(ctx.stage_dir("search"), name)
        if os.path.exists(source) and _is_main_process():
            os.makedirs(stage_dir, exist_ok=True)
            shutil.copyfile(source, os.path.join(stage_dir, name))
    if _is_main_process():
        artifacts.write_json(os.path.join(ctx.workdir, SUMMARY_FILE), summary)
        artifacts.write_text(os.path.join(ctx.workdir, REPORT_FILE), render_report(summary, ctx))
    return summary


def _ratio(a, b):
    return float(a) / float(b) if a is not None and b else None


def _difference(a, b):
    return float(a) - float(b) if a is not None and b is not None else None


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    return format(value, spec) if spec else str(value)


def render_report(summary: Mapping[str, Any], ctx: Context) -> str:
    """The human-readable report (markdown)."""
    lines = [
        f"# DNA run: {os.path.abspath(ctx.workdir)}", "",
        f"Space `{space_name(ctx.config)}` ({ctx.space.size():,} architectures), "
        f"budget {summary['budget']}.", "",
        "| | teacher | winner |", "|---|---|---|",
        f"| test accuracy | {_fmt(summary['teacher_accuracy'], '.4f')} | "
        f"{_fmt(summary['winner_accuracy'], '.4f')} |",
        f"| multiply-adds | {_fmt(summary['teacher_macs'], ',')} | "
        f"{_fmt(summary['winner_macs'], ',')} |",
        f"| params | {_fmt(summary['teacher_params'], ',')} | "
        f"{_fmt(summary['winner_params'], ',')} |",
        f"| dna_flops | {_fmt(summary['teacher_dna_flops'], ',')} | "
        f"{_fmt(summary['winner_dna_flops'], ',')} |", "",
        "## Chosen architecture", "",
        f"Encoding {summary['winner_encoding']}, score {_fmt(summary['winner_score'], '.4f')}.",
        "", "```", *[" | ".join(stage) for stage in summary["winner_block_strings"] or []], "```",
        "", "## Best candidate per block", "", "| block | ops | score |", "|---|---|---|",
    ]
    for name, best in summary["best_per_block"].items():
        if best:
            lines.append(f"| {name} | {', '.join(best['ops'])} | {best['score']:.4f} |")
    fits = {k: v for k, v in (summary.get("fit_mse_var") or {}).items() if v}
    if fits:
        lines += ["", "## How well each block's candidates fit the target", "",
                  "mse / var(target) in the rating's BatchNorm mode: best, median and worst "
                  "candidate, and the constant predictor (the per-channel mean). A block whose "
                  "best candidate does not beat the constant is rated by noise.", "",
                  "| block | best | median | worst | constant | beats constant |",
                  "|---|---|---|---|---|---|"]
        for name, fit in fits.items():
            lines.append(f"| {name} | {fit['best']:.3f} | {fit['median']:.3f} | "
                         f"{fit['worst']:.3f} | {fit['constant']:.3f} | "
                         f"{'yes' if fit['beats_constant'] else '**no**'} |")
    lines += ["", f"Candidates rated: {summary['candidates_rated']}. Distillation validation "
              f"loss, final / initial per block: {summary['distill_val_loss_ratio']}; updates per op "
              f"per block: {summary.get('distill_updates_per_op')}.", "",
              *([f"DNA++ (no teacher, {summary.get('ssl_schedule')} schedule): final SSL "
                 f"loss per block {summary.get('ssl_loss_final')}, output std "
                 f"{summary.get('ssl_output_std_final')} (1 = spread, 0 = collapsed).", ""]
                if summary.get("supervision") == "ssl" else []),
              "![Pareto front](report/pareto_front.png)", "",
              "![Score histograms](report/score_histograms.png)", "",
              "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in summary["stage_wall_seconds"].items():
        lines.append(f"| {stage} | {_fmt(seconds, '.1f')} |")
    lines.append(f"| total | {summary['wall_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


# ---- DNA++ stages: ssl, and the SSL-aware rating ---------------------------------------------


def _ssl_trainer(ctx: Context, steps_per_epoch: int = 1) -> ssl_lib.SelfSupervised:
    return ssl_lib.make_trainer(ctx.config.ssl, steps_per_epoch, ctx.space)


def ssl_rating_views(ctx: Context) -> tuple[np.ndarray, np.ndarray | None]:
    """(two fixed views of the R rating batches [2, R, B, H, W, C], two views of the
    recalibration batch [2, B, H, W, C] or None in 'batch' mode), seeded by `config.seed`."""
    cfg = ctx.config
    from dna_jax.data import views as views_lib  # pylint: disable=import-outside-toplevel
    views = views_lib.fixed_views(cfg.data, cfg.rate.split, cfg.ssl.augment,
                                  cfg.rate.num_batches, cfg.rate.batch_size, cfg.seed)
    recal = None
    if cfg.rate.bn_mode == "recalibrate":
        count = cfg.rate.get("recalibration_images", 0) or cfg.data.batch_size
        recal = views_lib.fixed_views(cfg.data, cfg.data.train_split, cfg.ssl.augment, 1,
                                      count, cfg.seed + 1)[:, 0]
    return views, recal


def run_ssl(ctx: Context) -> dict[str, Any]:
    """DNA++: trains the supernet blocks by self-supervision (dna_jax.ssl), no teacher."""
    from dna_jax.data import views as views_lib  # pylint: disable=import-outside-toplevel
    cfg, stage_dir = ctx.config, ctx.stage_dir("ssl")
    train_data = views_lib.make_view_dataset(cfg.data, cfg.data.train_split, cfg.ssl.augment,
                                             2 * cfg.ssl.num_paths, mesh=ctx.mesh,
                                             seed=cfg.seed)
    rate_block = None
    if cfg.ssl.schedule == "sequential":
        views, recal = ssl_rating_views(ctx)
        rate_block = ssl_rating_lib.make_block_rater(views, recal, cfg.rate, ctx.mesh,
                                              os.path.join(stage_dir, "ratings"))
    state, _, figures = ssl_train_lib.train_ssl_supernet(cfg.ssl, train_data, stage_dir, ctx.mesh,
                                                   ctx.space, rate_block)
    ssl_train_lib.save_ssl_artifact(stage_dir, state)
    ctx.cache["ssl"] = (state.supernet_variables(), state.ssl_variables())
    figures["num_classes"] = int(train_data.info.num_classes)
    return figures


def load_stage_ssl(ctx: Context) -> tuple[dict, dict]:
    """(supernet variables, ssl variables) of the ssl stage, loaded once per run."""
    if "ssl" not in ctx.cache:
        ctx.cache["ssl"] = ssl_train_lib.load_ssl_artifact(ctx.stage_dir("ssl"), _ssl_trainer(ctx),
                                                     mesh=ctx.mesh)
    return ctx.cache["ssl"]


def run_ssl_rate(ctx: Context) -> dict[str, Any]:
    """DNA++ rating: every candidate's SSL loss against the population centre, block by
    block (block k fed through the best paths of blocks < k); DNA's tables."""
    supernet, ssl_variables = load_stage_ssl(ctx)
    views, recal = ssl_rating_views(ctx)
    watch = metrics_lib.Stopwatch()
    paths, chosen = ssl_rating_lib.rate_ssl_blocks(_ssl_trainer(ctx), supernet, ssl_variables, views,
                                            recal, ctx.config.rate, ctx.stage_dir("rate"),
                                            ctx.mesh)
    blocks = _rating_summaries(ctx, paths)
    trained_with = ctx.figures("ssl").get("chosen_paths") or []
    return {"blocks": blocks, "candidates": sum(b["candidates"] for b in blocks.values()),
            "seconds": watch.elapsed(), "rating_batches": int(views.shape[1]),
            "batch_size": int(views.shape[2]), "best_paths": chosen,
            "same_paths_as_training": chosen[:len(trained_with)] == trained_with}


def ssl_report_figures(ctx: Context) -> dict[str, Any]:
    """The DNA++ figures of the summary: loss curve ends, output std, schedule."""
    figures = ctx.figures("ssl")
    return {"supervision": "ssl", "ssl_schedule": figures.get("schedule"),
            "ssl_loss_final": figures.get("loss_final"),
            "ssl_output_std_final": figures.get("output_std_final"),
            "ssl_loss_ratio": [b.get("loss_ratio") for b in figures.get("blocks", {}).values()],
            "ssl_train_seconds": figures.get("train_time_s")}


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "teacher": run_teacher, "distill": run_distill, "rate": run_rate, "search": run_search,
    "retrain": run_retrain, "report": run_report, "ssl": run_ssl,
}


# ---- the driver --------------------------------------------------------------------------------


def _move_aside(stage_dir: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = f"{stage_dir}.replaced-{stamp}"
    os.replace(stage_dir, target)
    return target


def _check_started(ctx: Context, stage: str) -> None:
    """A half-done stage of another config must not be resumed with this one."""
    path = os.path.join(ctx.stage_dir(stage), STARTED_FILE)
    if not os.path.exists(path):
        return
    started = artifacts.read_json(path)
    if started.get("config_hash") == ctx.digests[stage]:
        return
    if ctx.config.on_change == "resume":  # run_stage then records this config as started
        logging.warning("%s: continuing an unfinished run of another config (%s) from its "
                        "checkpoints (on_change=resume).", stage, artifacts.config_changes(
                            started.get("config", {}), stage_config(ctx.config, stage)))
        return
    _changed(ctx, stage, started.get("config", {}), "an unfinished run of it")


def _changed(ctx: Context, stage: str, old_config: Any, what: str) -> None:
    """Handles an artifact made by another config: stop with the changes, or move it aside."""
    stage_dir = ctx.stage_dir(stage)
    detail = artifacts.config_changes(old_config, stage_config(ctx.config, stage))
    if ctx.config.on_change == "rerun":
        if _is_main_process():
            moved = _move_aside(stage_dir)
            logging.warning("%s: %s was made by another config (%s); moved to %s and rerun.",
                            stage, what, detail, moved)
        return
    raise artifacts.ConfigChangedError(
        f"stage {stage!r}: {stage_dir} holds {what} made by another config ({detail}). Use "
        f"another --workdir, or pass --config.on_change=rerun to move it aside and recompute"
        + (" (or --config.on_change=resume to continue it from its last checkpoint with this "
           "config)." if what.startswith("an unfinished") else "."))


def _require_complete(ctx: Context, stage: str, needed_by: str) -> None:
    status = artifacts.stage_status(ctx.stage_dir(stage), ctx.digests[stage])
    if status == "complete":
        return
    if status == "missing":
        raise StageError(f"stage {needed_by!r} needs the {stage!r} artifact, but "
                         f"{ctx.stage_dir(stage)} has none: add {stage!r} to config.stages")
    detail = artifacts.describe_change(ctx.stage_dir(stage), stage_config(ctx.config, stage))
    raise artifacts.ConfigChangedError(
        f"stage {needed_by!r} needs the {stage!r} artifact, but {ctx.stage_dir(stage)} was "
        f"made by another config ({detail}): add {stage!r} to config.stages to recompute it")


def run_stage(ctx: Context, stage: str) -> tuple[dict[str, Any], str]:
    """Runs one stage unless complete; returns (figures, 'ran' | 'skipped')."""
    stage_dir, digest = ctx.stage_dir(stage), ctx.digests[stage]
    status = artifacts.stage_status(stage_dir, digest)
    if status == "complete":
        logging.info("stage %s: complete for this config, skipped (%s)", stage, stage_dir)
        return ctx.figures(stage), "skipped"
    for upstream in upstream_stages(ctx.config, stage):  # first: a stale upstream is the thing to fix
        _require_complete(ctx, upstream, stage)
    if status == "changed":
        _changed(ctx, stage, artifacts.read_manifest(stage_dir).get("config", {}),
                 "an artifact")
    _check_started(ctx, stage)
    if _is_main_process():
        artifacts.write_json(os.path.join(stage_dir, STARTED_FILE),
                             {"stage": stage, "config_hash": digest,
                              "config": stage_config(ctx.config, stage)})
    logging.info("stage %s: running -> %s", stage, stage_dir)
    watch = metrics_lib.Stopwatch()
    figures = RUNNERS[stage](ctx)
    wall = watch.elapsed()
    if _is_main_process():
        artifacts.write_manifest(stage_dir, stage, digest, stage_config(ctx.config, stage),
                                 figures, wall)
    logging.info("stage %s: done in %.1f s", stage, wall)
    return figures, "ran"


def check_config(config: ml_collections.ConfigDict, workdir: str | None = None,
                 devices: int | None = None) -> None:
    """Fails early, naming the field, on values the stages would only reject much later.

    After the names below, every statically checkable value is checked in one pass
    (dna_jax.validate: finite floats, positive counts, batches that divide over the
    `devices` of the mesh, image sizes against the strides, the search budget against the
    space's cheapest network); `validate.ConfigError` lists every problem with its fix.
    """
    stages = parse_stages(config.stages)
    if config.on_change not in ON_CHANGE:
        raise ValueError(f"config.on_change must be one of {ON_CHANGE}, got {config.on_change!r}")
    if config.get("supervision", "teacher") not in SUPERVISIONS:
        raise ValueError(f"config.supervision must be one of {SUPERVISIONS}, got "
                         f"{config.supervision!r}")
    allowed = SSL_STAGES if is_ssl(config) else STAGES
    if set(stages) - set(allowed):
        raise ValueError(f"config.stages: {sorted(set(stages) - set(allowed))} do not belong "
                         f"to supervision={config.get('supervision', 'teacher')!r} (its "
                         f"stages: {', '.join(allowed)})")
    if is_ssl(config):
        ssl_lib.check_config(config.ssl)
    get_space(space_name(config))
    rate_lib.check_config(config.rate)
    if config.search.method not in ("exact", "beam"):
        raise ValueError(f"config.search.method must be 'exact' or 'beam', got "
                         f"{config.search.method!r}")
    if config.search.get("unfit_blocks", "keep") not in search_lib.UNFIT_BLOCKS:
        raise ValueError(f"config.search.unfit_blocks must be one of {search_lib.UNFIT_BLOCKS}, "
                         f"got {config.search.unfit_blocks!r}")
    if config.search.cost not in costs_lib.COST_NAMES:
        raise ValueError(f"config.search.cost must be one of {costs_lib.COST_NAMES}, got "
                         f"{config.search.cost!r}")
    if config.rate.get("recalibration_images", 0) < 0:
        raise ValueError("config.rate.recalibration_images must be >= 0 (0 = one training "
                         f"batch), got {config.rate.recalibration_images}")
    validate_lib.validate_pipeline_config(config, stages, workdir=workdir, devices=devices)


def _use_compilation_cache(setting: str, workdir: str) -> None:
    """Turns on JAX's persistent compilation cache unless off or already configured."""
    if not setting or jax.config.jax_compilation_cache_dir:
        return
    path = os.path.join(workdir, "compilation_cache") if setting == "auto" else setting
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # A size limit turns on JAX's file lock: without it a process sharing the cache (multi-
    # process runs on one host) can read another's half-written executable and abort.
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    logging.info("persistent compilation cache: %s", path)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str,
                 mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Runs the stages named in `config.stages`; returns the run's figures.

    Returns:
      {'stages': {stage: 'ran' | 'skipped'}, 'wall_seconds': this run's wall time, plus the
      report's summary when the report stage ran (teacher_accuracy, winner_accuracy,
      teacher_macs, winner_macs, ...), else the last stage's figures under its name}.
    """
    check_config(config, workdir=os.path.abspath(workdir),
                 devices=mesh.devices.size if mesh is not None else None)
    watch = metrics_lib.Stopwatch()
    mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
    ctx = Context(config=config, workdir=os.path.abspath(workdir), mesh=mesh,
                  digests=stage_digests(config))
    os.makedirs(ctx.workdir, exist_ok=True)
    _use_compilation_cache(config.compilation_cache, ctx.workdir)
    ran: dict[str, str] = {}
    figures: dict[str, Any] = {}
    with workdir_lib.workdir_lock(ctx.workdir):  # one run per workdir
        workdir_lib.clean_temporaries(ctx.workdir)
        for stage in parse_stages(config.stages):
            figures[stage], ran[stage] = run_stage(ctx, stage)
    result: dict[str, Any] = {"stages": ran}
    if "report" in figures:
        result.update(figures["report"])
        result["pipeline_wall_seconds"] = result.pop("wall_seconds")
    else:
        last = list(figures)[-1]
        result[last] = {k: v for k, v in figures[last].items() if not isinstance(v, dict)}
    result["wall_seconds"] = watch.elapsed()
    return result
