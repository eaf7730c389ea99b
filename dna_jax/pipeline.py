"""The pipeline driver: one config, a supervision kind's stages, manifests, hashes, resume.

A run's stages are those of its supervision kind (dna_jax.supervision; `config.supervision`):

  DNA   (teacher)  teacher -> distill -> rate -> search -> retrain -> deploy -> report
  DNA++ (ssl)      ssl -> rate -> search -> retrain -> deploy -> report

The kind runs its own stages and `rate` (dna_jax.supervisions.*); search, retrain and
deploy are common (dna_jax.stages), and so is the report (dna_jax.report). Each stage reads its
predecessors' artifacts and writes its own under `workdir/<stage>/`.

A stage ends by writing `manifest.json` (its config hash, figures, versions, time), last and
atomically. On a re-run a stage whose manifest has the same hash is skipped; a stage that was
started but not finished resumes (its own checkpoints or per-block files); a stage whose
artifact was written by another config is reported with the keys that changed, and is only
recomputed with `on_change='rerun'` (the old artifact is moved aside, never deleted).
The hash of a stage covers its own config sections and the hashes of the stages it reads, so
changing the distillation config invalidates rating, search, retraining and the report.
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections

from dna_jax import artifacts
from dna_jax import data as data_lib
from dna_jax import files
from dna_jax import latency as latency_lib
from dna_jax import metrics as metrics_lib
from dna_jax import multihost
from dna_jax import rate as rate_lib
from dna_jax import report as report_lib
from dna_jax import retrain as retrain_lib
from dna_jax import search as search_lib
from dna_jax import sharding as sharding_lib
from dna_jax import stages as stages_lib
from dna_jax import supervision
from dna_jax import validate as validate_lib
from dna_jax import workdir as workdir_lib
from dna_jax.space import get_space
from dna_jax.stage_context import Context, StageError, is_main_process

ON_CHANGE = ("error", "rerun", "resume")
SUMMARY_FILE = report_lib.SUMMARY_FILE
REPORT_FILE = report_lib.REPORT_FILE
STARTED_FILE = "started.json"
STATUSES = ("missing", "complete", "changed")  # artifacts.stage_status
COMPILATION_CACHE_BYTES = 8 << 30
RETRAINED_NETWORK = stages_lib.RETRAINED_NETWORK
RETRAINED_NETWORK_NAME = stages_lib.RETRAINED_NETWORK_NAME

# The common field DNA+ rounds (dna_jax.progressive) set, at a plain run's value; a kind
# declares its own (`Supervision.neutral_defaults`). A config whose experiment file replaced
# such a section wholesale gets them from `complete_config`, and at these values they are
# left out of the stage hashes, so workdirs made before the fields existed (the demo's) keep
# their hashes.
ROUND_DEFAULTS = {"retrain": {"width_multiplier": 1.0, "depth_multiplier": 1.0}}
# Search fields added after workdirs existed, neutral (left out of the hash) at these values:
# `latency_table` is only read with search.cost='tflite_ms'.
SEARCH_DEFAULTS = {"search": {"latency_table": ""}}
SEARCH_COSTS = latency_lib.SEARCH_COSTS


def neutral_defaults(kind: supervision.Supervision) -> dict[str, dict[str, Any]]:
    """{section: {field: plain-run value}}: the pipeline's ROUND_DEFAULTS and SEARCH_DEFAULTS
    and the kind's."""
    return {**ROUND_DEFAULTS, **SEARCH_DEFAULTS, **kind.neutral_defaults}


# ---- configuration -----------------------------------------------------------------------------


def get_default_config() -> ml_collections.ConfigDict:
    """Every field the pipeline reads; experiment configs override them and lock the result.

    Every value that can be checked without running is checked before any work
    (`check_config`, dna_jax.validate): a run with a bad value stops naming each field, its
    value and the fix, before the workdir is touched.

    Sections:
      stages: comma-separated stages of the supervision kind to run (default: all of DNA's),
        in pipeline order.
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
      rate: dna_jax.rate.get_default_config plus `split`, `num_batches` (R rating batches),
        `batch_size`, and `recalibration_images`: how many training images recalibrate each
        candidate's BatchNorm ('recalibrate' mode; the first ones of the training stream).
        The original used one batch; on small maps fed by heavy-tailed teacher features one
        batch of 128 left every candidate of `small`'s 2x2 block 3 worse than a constant
        predictor (issue 19), so the default is 2,048; 0 = one training batch (the original).
      search: the budget: `budget` (absolute, in `cost` units) or, if 0, `budget_fraction` x
        the teacher's cost; `cost` is 'macs', 'params', 'dna_flops' or 'tflite_ms': the
        latency on the TFLite runtime from the table `latency_table` (a .csv / .json of
        `benchmarks/measure_latency.py --runtime tflite` for this space, resolution and
        number of classes; checked before any work; needs an absolute `budget` in ms);
        optional `params_budget`; `combine`, `standardize`, `top_k`,
        `method` ('exact' or 'beam' with `beam_width`); `unfit_blocks` ('keep' or 'exclude':
        a block whose best candidate does not beat the constant predictor adds nothing to
        the sum) and `rank_normalize` (each block's scores replaced by their ranks), see
        dna_jax.search.prepare_tables and the README's "Does the rating work?".
      retrain: a full trainer config for the winner (its model section is replaced by the
        searched child network); `inherit_weights` starts it from the supernet's weights.
        The retrained winner is also saved as a teacher checkpoint in retrain/network.
        `width_multiplier` / `depth_multiplier` scale the winner before it is retrained
        (DNA+ rounds; 1.0 otherwise).
      deploy: the retrained winner's deployable files, in deploy/ (dna_jax.deploy):
        `formats` ('all' = 'tflite,stablehlo', 'tflite', 'stablehlo' or 'none'; tflite
        writes model.tflite, float32, and model_int8.tflite, dynamic-range int8, and needs
        TensorFlow: a run without it that asks for tflite is refused before any work),
        `batch_size` (fixed in the files), `threads` and `timing_repeats` (the TFLite latency
        measurement: median of that many invocations on this machine's CPU; 0 = no timing),
        `parity_images` (standard-normal inputs each file is compared with the Flax model
        on; 0 = no check). Its own stage: changing it reruns only deploy and the report.
      supervision: the supervision kind (dna_jax.supervision): 'teacher' (DNA: the `teacher`
        and `distill` sections, dna_jax.supervisions.dna) or 'ssl' (DNA++: the `ssl`
        section, dna_jax.supervisions.dna_pp). Every kind adds its sections to this config.
    """
    config = ml_collections.ConfigDict()
    config.supervision = supervision.DEFAULT
    config.stages = ",".join(supervision.get(supervision.DEFAULT).stages)
    config.on_change = "error"
    config.compilation_cache = "auto"
    config.seed = 0
    config.distributed = "auto"
    config.mesh = dict(shape=(-1,), axis_names=("data",), axis_types="auto",
                       num_devices=0)  # > 0: only the first num_devices devices
    config.data = data_lib.get_default_config()
    rate = rate_lib.get_default_config()
    rate.unlock()  # the pipeline adds where its rating data comes from
    rate.split = "test"
    rate.num_batches = 1
    rate.batch_size = 64
    rate.recalibration_images = 2048
    config.rate = rate
    config.search = dict(cost="macs", budget=0.0, budget_fraction=0.5, params_budget=0.0,
                         combine="sum", standardize=False, top_k=5, method="exact",
                         beam_width=1024, unfit_blocks="keep", rank_normalize=False,
                         **SEARCH_DEFAULTS["search"])
    config.retrain = retrain_lib.get_default_config()
    config.retrain.inherit_weights = False
    config.retrain.update(ROUND_DEFAULTS["retrain"])
    config.deploy = dict(formats="all", batch_size=1, threads=1, timing_repeats=100,
                         parity_images=16)
    for kind in supervision.all_kinds():
        kind.add_config(config)
    return config


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` (locked) with the neutral-default fields its experiment file left out; the
    same object when it has them all."""
    defaults = neutral_defaults(supervision.of(config))
    missing = [(section, field, value) for section, fields in defaults.items()
               for field, value in fields.items() if field not in config[section]]
    if not missing:
        return config
    completed = copy.deepcopy(config)
    completed.unlock()
    for section, field, value in missing:
        completed[section][field] = value
    completed.lock()
    return completed


def parse_stages(text: str | Sequence[str],
                 kind: supervision.Supervision | None = None) -> list[str]:
    """'rate,search' -> ['rate', 'search'] in pipeline order; unknown names are an error
    (with `kind`: names outside its stages too)."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [s for s in names if s]
    order = supervision.stage_order()
    unknown = [s for s in names if s not in order]
    if unknown or not names:
        raise ValueError(f"config.stages: unknown stage(s) {unknown or names!r}; choose from "
                         f"{supervision.stages_text()} (comma-separated)")
    if kind is not None and set(names) - set(kind.stages):
        raise ValueError(f"config.stages: {sorted(set(names) - set(kind.stages))} do not belong "
                         f"to supervision={kind.name!r} (its stages: {', '.join(kind.stages)})")
    return [s for s in order if s in names]


# What the common stages' hashes cover; a kind's own stages and `rate` are in its `sections`.
_COMMON_SECTIONS = {"search": ("search",), "retrain": ("retrain",), "deploy": ("deploy",),
                    "report": ()}


def _section(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_config(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
    """The config values a stage's result depends on (what its hash covers); neutral-default
    fields at their plain-run values are left out."""
    kind = supervision.of(config)
    names = kind.sections[stage] if stage in kind.sections else _COMMON_SECTIONS[stage]
    values = {name: artifacts.to_jsonable(_section(config, name)) for name in names}
    for section, defaults in neutral_defaults(kind).items():
        if isinstance(values.get(section), dict):
            values[section] = {k: v for k, v in values[section].items()
                               if not (k in defaults and v == defaults[k])}
    return values


def stage_digests(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Config hash of every stage of the config's kind: its own sections plus its upstream
    stages' hashes."""
    kind = supervision.of(config)
    digests: dict[str, str] = {}
    for stage in kind.stages:
        digests[stage] = artifacts.config_hash(stage, stage_config(config, stage),
                                               [digests[u] for u in kind.upstream[stage]])
    return digests


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "search": stages_lib.run_search, "retrain": stages_lib.run_retrain,
    "deploy": stages_lib.run_deploy, "report": report_lib.run_report,
}


def runner(ctx: Context, stage: str) -> Callable[[Context], dict[str, Any]]:
    """The kind's runner for its own stages and `rate`, else the common one."""
    return ctx.kind.runners.get(stage) or RUNNERS[stage]


# ---- the driver --------------------------------------------------------------------------------


def _move_aside(stage_dir: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = f"{stage_dir}.replaced-{stamp}"
    files.move(stage_dir, target)
    return target


def _check_started(ctx: Context, stage: str) -> None:
    """A half-done stage of another config must not be resumed with this one."""
    path = os.path.join(ctx.stage_dir(stage), STARTED_FILE)
    if not files.exists(path):
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
        if is_main_process():
            moved = _move_aside(stage_dir)
            logging.warning("%s: %s was made by another config (%s); moved to %s and rerun.",
                            stage, what, detail, moved)
        multihost.barrier(f"{stage}: moved aside")
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
        damaged = artifacts.manifest_problem(ctx.stage_dir(stage))
        raise StageError(f"stage {needed_by!r} needs the {stage!r} artifact, but "
                         + (f"{damaged}: add {stage!r} to config.stages to run it again (it "
                            "resumes its own checkpoints)" if damaged else
                            f"{ctx.stage_dir(stage)} has none: add {stage!r} to config.stages"))
    detail = artifacts.describe_change(ctx.stage_dir(stage), stage_config(ctx.config, stage))
    raise artifacts.ConfigChangedError(
        f"stage {needed_by!r} needs the {stage!r} artifact, but {ctx.stage_dir(stage)} was "
        f"made by another config ({detail}): add {stage!r} to config.stages to recompute it")


def run_stage(ctx: Context, stage: str) -> tuple[dict[str, Any], str]:
    """Runs one stage unless complete; returns (figures, 'ran' | 'skipped')."""
    stage_dir, digest = ctx.stage_dir(stage), ctx.digests[stage]
    # Process 0 decides from the files and every host follows (dna_jax.multihost).
    status = multihost.agree(artifacts.stage_status(stage_dir, digest), STATUSES)
    if status == "complete":
        logging.info("stage %s: complete for this config, skipped (%s)", stage, stage_dir)
        return ctx.figures(stage), "skipped"
    for upstream in ctx.kind.upstream[stage]:  # first: a stale upstream is the thing to fix
        _require_complete(ctx, upstream, stage)
    if status == "changed":
        _changed(ctx, stage, artifacts.read_manifest(stage_dir).get("config", {}),
                 "an artifact")
    _check_started(ctx, stage)
    multihost.barrier(f"{stage}: started.json read")
    if is_main_process():
        artifacts.write_json(os.path.join(stage_dir, STARTED_FILE),
                             {"stage": stage, "config_hash": digest,
                              "config": stage_config(ctx.config, stage)})
    logging.info("stage %s: running -> %s", stage, stage_dir)
    watch = metrics_lib.Stopwatch()
    figures = runner(ctx, stage)(ctx)
    wall = watch.elapsed()
    multihost.barrier(f"{stage}: artifacts written")
    if is_main_process():
        artifacts.write_manifest(stage_dir, stage, digest, stage_config(ctx.config, stage),
                                 figures, wall)
    multihost.barrier(f"{stage}: manifest written")
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
    kind = supervision.of(config)
    config = complete_config(config)
    stages = parse_stages(config.stages, kind)
    if config.on_change not in ON_CHANGE:
        raise ValueError(f"config.on_change must be one of {ON_CHANGE}, got {config.on_change!r}")
    get_space(kind.space_name(config))
    rate_lib.check_config(config.rate)
    if config.search.method not in ("exact", "beam"):
        raise ValueError(f"config.search.method must be 'exact' or 'beam', got "
                         f"{config.search.method!r}")
    if config.search.unfit_blocks not in search_lib.UNFIT_BLOCKS:
        raise ValueError(f"config.search.unfit_blocks must be one of {search_lib.UNFIT_BLOCKS}, "
                         f"got {config.search.unfit_blocks!r}")
    if config.search.cost not in SEARCH_COSTS:
        raise ValueError(f"config.search.cost must be one of {SEARCH_COSTS}, got "
                         f"{config.search.cost!r}")
    if config.rate.recalibration_images < 0:
        raise ValueError("config.rate.recalibration_images must be >= 0 (0 = one training "
                         f"batch), got {config.rate.recalibration_images}")
    validate_lib.validate_pipeline_config(config, stages, kind, workdir=workdir, devices=devices)


def _use_compilation_cache(setting: str, workdir: str) -> None:
    """Turns on JAX's persistent compilation cache unless off or already configured."""
    if not setting or jax.config.jax_compilation_cache_dir:
        return
    path = os.path.join(workdir, "compilation_cache") if setting == "auto" else setting
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # A size limit turns on JAX's file lock: without it a process sharing the cache (multi-
    # process runs on one host) can read another's half-written executable and abort. On a
    # remote cache (gs://) that lock would be a local file named after the URL: no limit there
    # (objects are written whole).
    if not files.is_remote(path):
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
    check_config(config, workdir=files.absolute(workdir),
                 devices=mesh.devices.size if mesh is not None else None)
    config = complete_config(config)
    watch = metrics_lib.Stopwatch()
    mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
    ctx = Context(config=config, workdir=files.absolute(workdir), mesh=mesh,
                  digests=stage_digests(config), kind=supervision.of(config))
    files.makedirs(ctx.workdir)
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
