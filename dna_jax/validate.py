"""One pass over a pipeline config before any work: every value that can be checked statically.

`validate_pipeline_config` collects every problem (not just the first) and raises one
`ConfigError` listing them, each as `field=value: what is wrong; the fix`. It checks:

  - every float anywhere in the config is finite (a NaN learning rate, an inf budget, ...);
  - counts and sizes are positive (batch sizes, epochs / steps, checkpoint and log periods);
  - global batch sizes divide over the mesh's devices;
  - image sizes are at least the networks' total stride (stem x every stride-2 layer);
  - the search budget: `search.budget_fraction` > 0 when no absolute budget is given, and a
    budget (absolute, or the fraction of the teacher's statically known cost) that no
    network of the space fits is refused, with the space's cheapest and dearest networks;
    with `search.cost='tflite_ms'`, the latency table is read and checked against the
    space (runtime, layers, resolution, classes, every entry present) and an absolute
    budget in ms is required;
  - the sections' own checks (dna_jax.distill / rate / ssl check_config);
  - the deploy formats, and TensorFlow being installed when TFLite files are asked for.

Only the sections of the stages that will run are checked (a `stages=search` run is not
refused for a retraining typo). Nothing here touches the workdir.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections

from dna_jax import costs as costs_lib
from dna_jax import deploy as deploy_lib
from dna_jax import files
from dna_jax import latency as latency_lib
from dna_jax import rate as rate_lib
from dna_jax import stage_context
from dna_jax.space import SearchSpace

NATIVE_SIZES = {"fashion_mnist": 28}  # data.image_size=0 means the source's native size
KNOWN_CLASSES = {"fashion_mnist": 10}


class ConfigError(ValueError):
    """Config values that cannot work; `problems` lists each (field, value, fix)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} bad config value(s), nothing was run:\n  "
                         + "\n  ".join(self.problems))


class Problems:
    """Collects `field=value: problem; fix` lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, field: str, value: Any, what: str) -> None:
        self.lines.append(f"config.{field}={value!r}: {what}")

    def need(self, ok: bool, field: str, value: Any, what: str) -> None:
        if not ok:
            self.add(field, value, what)

    def call(self, check: Callable[[Any], None], section: Any, prefix: str) -> None:
        """Runs a module's own check_config, recording its ValueError."""
        try:
            check(section)
        except ValueError as error:
            self.lines.append(f"config.{prefix}: {error}")


def _floats(node: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(dotted field, value) of every float in a config, lists and tuples included."""
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        for key, value in node.items():
            yield from _floats(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _floats(value, f"{prefix}[{index}]")
    elif isinstance(node, float):
        yield prefix, node


def required_fields(node: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields a config leaves unset: `config_dict.placeholder` fields
    still None (no default config holds a None), e.g. a bucket path only the user knows."""
    if isinstance(node, (ml_collections.ConfigDict, dict)):
        return [name for key, value in node.items()
                for name in required_fields(value, f"{prefix}.{key}" if prefix else str(key))]
    return [prefix] if node is None else []


def total_stride(spec_or_space: Any) -> int:
    """Stem stride x every layer's stride: a network's input-to-head downsampling."""
    if isinstance(spec_or_space, SearchSpace):
        space = spec_or_space
        return int(space.stem_stride * space.first_layer.stride
                   * math.prod(block.stride for block in space.blocks))
    spec = spec_or_space
    return int(spec.stem_stride * math.prod(layer.stride for stage in spec.stages
                                            for layer in stage))


def space_cost_range(space: SearchSpace, resolution: int, num_classes: int
                     ) -> dict[str, tuple[int, int]]:
    """{cost name: (cheapest, dearest)} over every network of the space (stem and head
    included): each block's layers cost independently, so the extremes are per-layer."""
    fixed = _space_fixed(space, resolution, num_classes)
    low, high = dict(fixed), dict(fixed)
    for b, block in enumerate(space.blocks):
        table = costs_lib.block_op_cost_table(space, b, resolution)
        for l in range(block.num_layers):
            choices = table[l, list(space.layer_choices(b, l))]  # [choices, costs]
            for i, name in enumerate(costs_lib.COST_NAMES):
                low[name] += int(choices[:, i].min())
                high[name] += int(choices[:, i].max())
    return {name: (low[name], high[name]) for name in costs_lib.COST_NAMES}


def _space_fixed(space: SearchSpace, resolution: int, num_classes: int) -> dict[str, int]:
    """Stem, first layer and head (fixed blocks are counted by their one-choice layers)."""
    from dna_jax import search as search_lib  # pylint: disable=import-outside-toplevel
    return search_lib.space_fixed_costs(space, resolution, num_classes)


def check_trainer(problems: Problems, cfg: Any, prefix: str, devices: int,
                  network_stride: int | None, network: str) -> None:
    """A classifier-trainer section (teacher.train, retrain): counts, lr, batches, size."""
    p = f"{prefix}."
    problems.need(cfg.total_steps >= 0, p + "total_steps", cfg.total_steps,
                  "must be >= 0 (0 = use num_epochs)")
    if cfg.num_epochs < 0:
        problems.add(p + "num_epochs", cfg.num_epochs, "must be >= 0")
    elif not (cfg.total_steps > 0 or cfg.num_epochs > 0):
        problems.add(p + "num_epochs", cfg.num_epochs, f"must be > 0 when {p}total_steps is 0 "
                     "(else training would run one step)")
    lr = cfg.optimizer.learning_rate
    problems.need(not lr <= 0, p + "optimizer.learning_rate", lr, "must be > 0 (e.g. 0.016)")
    for field in ("weight_decay", "grad_clip_norm"):
        value = cfg.optimizer[field]
        problems.need(value >= 0, f"{p}optimizer.{field}", value, "must be >= 0")
    problems.need(0 <= cfg.label_smoothing < 1, p + "label_smoothing", cfg.label_smoothing,
                  "must be in [0, 1)")
    problems.need(0 <= cfg.ema_decay < 1, p + "ema_decay", cfg.ema_decay,
                  "must be in [0, 1) (0 = no EMA)")
    problems.need(cfg.log_every_steps >= 1, p + "log_every_steps", cfg.log_every_steps,
                  "must be >= 1")
    problems.need(cfg.keep_checkpoints >= 1, p + "keep_checkpoints", cfg.keep_checkpoints,
                  "must be >= 1")
    for field in ("checkpoint_every_steps", "eval_every_steps"):
        problems.need(cfg[field] >= 0, p + field, cfg[field], "must be >= 0")
    check_data(problems, cfg.data, p + "data", devices, network_stride, network)


def check_data(problems: Problems, cfg: Any, prefix: str, devices: int,
               network_stride: int | None, network: str) -> None:
    """A data section: positive batch sizes dividing over the devices, a usable image size."""
    p = f"{prefix}."
    batch = cfg.batch_size
    if batch < 1:
        problems.add(p + "batch_size", batch, "must be >= 1 (the global batch, all devices)")
    elif batch % devices:
        problems.add(p + "batch_size", batch, f"must be divisible by the {devices} devices of "
                     f"the mesh: use {max(devices, batch - batch % devices)} or "
                     f"{batch + devices - batch % devices}, or set config.mesh.num_devices")
    eval_batch = cfg.eval_batch_size
    if eval_batch < 0:
        problems.add(p + "eval_batch_size", eval_batch, "must be >= 0 (0 = batch_size)")
    elif eval_batch and eval_batch % devices:
        problems.add(p + "eval_batch_size", eval_batch, f"must be divisible by the {devices} "
                     f"devices of the mesh: use {eval_batch + devices - eval_batch % devices}")
    size = cfg.image_size
    if size < 0:
        problems.add(p + "image_size", size, "must be >= 0 (0 = the source's native size)")
    resolution = size or NATIVE_SIZES.get(cfg.source, 0)
    if network_stride and resolution and resolution < network_stride:
        problems.add(p + "image_size", size, f"is {resolution} px, smaller than the total "
                     f"stride {network_stride} of {network}: use at least {network_stride}")


def _num_classes(config: Any) -> int | None:
    if config.teacher.get("num_classes", 0):
        return int(config.teacher.num_classes)
    if config.data.source == "synthetic":
        return int(config.data.num_classes)
    return KNOWN_CLASSES.get(config.data.source)


def _search(problems: Problems, config: Any, space: SearchSpace | None, kind: Any,
            reference, workdir: str | None = None) -> None:
    """search.*: method, counts, and the budget against the space's cheapest network."""
    cfg = config.search
    problems.need(cfg.top_k >= 1, "search.top_k", cfg.top_k, "must be >= 1")
    problems.need(cfg.beam_width >= 1, "search.beam_width", cfg.beam_width, "must be >= 1")
    problems.need(cfg.budget >= 0, "search.budget", cfg.budget,
                  "must be >= 0 (0 = search.budget_fraction x the teacher's cost)")
    problems.need(cfg.params_budget >= 0, "search.params_budget", cfg.params_budget,
                  "must be >= 0 (0 = none)")
    analytic = cfg.cost in costs_lib.COST_NAMES
    if cfg.cost == latency_lib.TFLITE_COST:
        _tflite_search(problems, config, space, workdir)
    elif not cfg.budget:
        if not kind.has_reference:
            problems.add("search.budget", cfg.budget, f"{kind.label} has no teacher to take "
                         "search.budget_fraction of: set an absolute search.budget")
            return
        if not cfg.budget_fraction > 0:
            problems.add("search.budget_fraction", cfg.budget_fraction, "must be > 0 (e.g. "
                         "0.5 = half the teacher's cost), or set an absolute search.budget")
            return
    num_classes = _num_classes(config)
    if space is None or num_classes is None:
        return
    resolution = _resolution(config, space)
    budgets = []  # a latency table's budget was checked above
    if analytic and cfg.budget:
        budgets.append(("search.budget", cfg.budget, cfg.cost, float(cfg.budget), None))
    elif analytic:
        teacher_cost = kind.reference_static_cost(config, reference, num_classes, cfg.cost)
        if teacher_cost:
            budgets.append(("search.budget_fraction", cfg.budget_fraction, cfg.cost,
                            cfg.budget_fraction * teacher_cost, teacher_cost))
    if cfg.params_budget:
        budgets.append(("search.params_budget", cfg.params_budget, "params",
                        float(cfg.params_budget), None))
    _check_budgets(problems, space, resolution, num_classes, budgets)


def _resolution(config: Any, space: SearchSpace) -> int:
    """The image size the search counts costs at (stage_context.resolution)."""
    return int(config.rate.cost_resolution or config.data.image_size or space.resolution)


def _check_budgets(problems: Problems, space: SearchSpace, resolution: int, num_classes: int,
                   budgets: Sequence[tuple]) -> None:
    """(field, value, cost, budget, teacher cost) budgets against the space's cost range."""
    ranges = space_cost_range(space, resolution, num_classes)
    for field, value, cost, budget, teacher_cost in budgets:
        low, high = ranges[cost]
        where = (f"space {space.name!r} at {resolution} px, {num_classes} classes: cheapest "
                 f"network {low:,} {cost}, dearest {high:,}")
        if budget < low:
            fix = (f"raise it to at least {math.ceil(1000 * low / teacher_cost) / 1000:g} "
                   f"(the teacher costs {teacher_cost:,} {cost})" if teacher_cost else
                   f"raise it to at least {low:,}")
            problems.add(field, value, f"gives a {cost} budget of {budget:,.0f}, below every "
                         f"network of {where}; {fix}")
        elif budget > high:
            logging.warning("config.%s=%r: a %s budget of %s is above the dearest network of "
                            "%s: every network fits.", field, value, cost, f"{budget:,.0f}",
                            where)


def _tflite_search(problems: Problems, config: Any, space: SearchSpace | None,
                   workdir: str | None) -> None:
    """search.cost='tflite_ms': an absolute budget (ms) and a TFLite latency table that fits
    the space, resolution and classes, with every entry; the budget against its range."""
    cfg, cost = config.search, latency_lib.TFLITE_COST
    num_classes = _num_classes(config)
    resolution = _resolution(config, space) if space is not None else None
    if not cfg.budget:
        problems.add("search.budget", cfg.budget, f"search.cost={cost!r} needs an absolute "
                     "budget in milliseconds (there is no teacher latency to take "
                     "search.budget_fraction of), e.g. --config.search.budget=0.2")
    if not cfg.latency_table:
        command = (latency_lib.measure_command(space, resolution, num_classes, "tflite",
                                               "<table>.csv") if space is not None else "")
        problems.add("search.latency_table", cfg.latency_table, f"search.cost={cost!r} reads "
                     f"a TFLite latency table: set its path. {command}")
        return
    if space is None:
        return
    path = stage_context.resolve_workdir_path(cfg.latency_table, workdir or "")
    try:
        table = latency_lib.load_space_latency(path, space, resolution, num_classes, "tflite")
    except ValueError as error:
        problems.add("search.latency_table", cfg.latency_table, str(error))
        return
    if not cfg.budget:
        return
    low, high = latency_lib.space_latency_range(table, space, resolution)
    where = (f"space {space.name!r} at {resolution} px by {cfg.latency_table}: cheapest "
             f"network {low:.4g} ms, dearest {high:.4g} ms")
    if cfg.budget < low:
        problems.add("search.budget", cfg.budget, f"is below every network of {where}; raise "
                     f"it to at least {math.ceil(low * 1e4) / 1e4:g}")
    elif cfg.budget > high:
        logging.warning("config.search.budget=%r ms is above the dearest network of %s: every "
                        "network fits.", cfg.budget, where)


def device_count(config: Any) -> int:
    """Devices of the run's mesh: mesh.num_devices, else every (global) device."""
    return int(config.mesh.get("num_devices", 0) or jax.device_count())


def validate_pipeline_config(config: ml_collections.ConfigDict, stages: Sequence[str],
                             kind: Any, workdir: str | None = None,
                             devices: int | None = None) -> None:
    """Checks every statically checkable value of a pipeline config, all in one pass.

    Args:
      config: the pipeline config (dna_jax.pipeline.get_default_config's fields).
      stages: the stages that will run (their sections are checked, and the search budget).
      kind: the config's supervision kind (dna_jax.supervision): checks its own sections and
        says which network a budget fraction is taken of.
      workdir: the run's workdir (resolves '{workdir}' teacher checkpoints), or None.
      devices: the mesh's device count (default: `device_count(config)`).

    Raises:
      ConfigError: one or more values cannot work; every one is listed with its fix.
    """
    problems = Problems()
    if workdir is not None and files.unsupported(workdir):
        problems.lines.append(f"--workdir={workdir!r}: {files.unsupported(workdir)}")
    for field in required_fields(config):
        problems.add(field, None, f"is required and has no default: pass --config.{field}=...")
    for field, value in _floats(config):
        problems.need(math.isfinite(value), field, value, "must be a finite number")
    num_devices = config.mesh.get("num_devices", 0)
    problems.need(num_devices >= 0, "mesh.num_devices", num_devices,
                  "must be >= 0 (0 = every device)")
    if num_devices > jax.device_count():
        problems.add("mesh.num_devices", num_devices,
                     f"only {jax.device_count()} devices exist: use at most that, or 0 (all)")
        devices = jax.device_count()
    elif num_devices > 0 and num_devices % jax.process_count():
        problems.add("mesh.num_devices", num_devices, f"does not split over the "
                     f"{jax.process_count()} processes (every host feeds its devices): use a "
                     f"multiple of {jax.process_count()}, or 0 (all)")
    devices = devices or max(1, device_count(config) if num_devices >= 0 else 1)
    space_name = kind.space_name(config)
    reference = kind.reference_spec(config, workdir)
    space = kind.static_space(config, reference)
    space_stride = total_stride(space) if space is not None else None
    space_label = f"space {space_name!r}"

    for field in ("num_batches", "batch_size"):  # rating batches (rate, ssl's sequential)
        problems.need(config.rate[field] >= 1, f"rate.{field}", config.rate[field],
                      "must be >= 1")
    if {"rate", *kind.data_stages} & set(stages):
        check_data(problems, config.data, "data", devices, space_stride, space_label)
    kind.validate(problems, config, stages, devices, workdir)
    if "rate" in stages:
        problems.call(rate_lib.check_config, config.rate, "rate")
        resolution = config.rate.cost_resolution
        problems.need(not (space_stride and 0 < resolution < space_stride),
                      "rate.cost_resolution", resolution,
                      f"is smaller than the total stride {space_stride} of {space_label}: "
                      f"use at least {space_stride} (or 0 = the space's)")
    if "search" in stages:
        _search(problems, config, space, kind, reference, workdir)
    if "retrain" in stages:
        check_trainer(problems, config.retrain, "retrain", devices, space_stride,
                      f"the searched network ({space_label})")
    if "deploy" in stages:
        check_deploy(problems, config.deploy)
    if problems.lines:
        raise ConfigError(problems.lines)


def check_deploy(problems: Problems, cfg: Any) -> None:
    """The deploy section: known formats, TensorFlow for TFLite, counts."""
    try:
        formats = deploy_lib.parse_formats(cfg.formats)
    except deploy_lib.DeployError as error:
        problems.add("deploy.formats", cfg.formats, str(error))
        formats = ()
    problem = deploy_lib.tensorflow_problem(formats, "--config.deploy.formats=stablehlo")
    if problem:
        problems.add("deploy.formats", cfg.formats, problem)
    for field, low in (("batch_size", 1), ("threads", 1), ("timing_repeats", 0),
                       ("parity_images", 0)):
        problems.need(cfg[field] >= low, f"deploy.{field}", cfg[field], f"must be >= {low}")


__all__ = ["ConfigError", "Problems", "check_deploy", "check_trainer", "check_data",
           "validate_pipeline_config", "required_fields", "space_cost_range", "total_stride",
           "device_count"]
