"""The stages every supervision kind ends with: search, retrain and deploy (rate is the
kind's own runner, the report is dna_jax.report).

  search/   the Pareto front, the chosen architecture(s) and the exported child network
  retrain/  the retrained winner (checkpoints, TensorBoard, figures.json) and `network/`, the
            winner as a teacher checkpoint (the next DNA+ round's teacher)
  deploy/   the retrained winner's deployable files (`config.deploy.formats`: model.tflite,
            model_int8.tflite, model.stablehlo) and deploy.json (sealed: each file's SHA-256,
            size and input shape, parity with the Flax model, TFLite latency)

What differs between kinds is asked of `ctx.kind`: the number of classes, the costs a
`search.budget_fraction` is taken of, the supernet weights a winner can inherit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Sequence


from dna_jax import artifacts
from dna_jax import data as data_lib
from dna_jax import deploy as deploy_lib
from dna_jax import files
from dna_jax import latency as latency_lib
from dna_jax import metrics as metrics_lib
from dna_jax import multihost
from dna_jax import rating_table
from dna_jax import retrain as retrain_lib
from dna_jax import search as search_lib
from dna_jax import stage_context
from dna_jax import teacher as teacher_lib
from dna_jax.models.efficientnet import scaled_network_spec
from dna_jax.space import Arch
from dna_jax.stage_context import Context, StageError

RETRAINED_NETWORK = "network"  # retrain/network: the retrained winner, loadable as a teacher
RETRAINED_NETWORK_NAME = "winner"


def rating_summaries(ctx: Context, paths: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """{block name: candidates, best (top-1 entry), seconds, fit} from the blocks' JSON
    summaries: the rate stage's figures, whoever rated."""
    blocks = {}
    for (_, summary_path), block in zip(paths, ctx.space.blocks):
        summary = artifacts.read_json(summary_path)
        blocks[block.name] = {"candidates": summary["candidates"],
                              "best": summary["top_k"][0] if summary["top_k"] else None,
                              "seconds": summary["rating"].get("seconds"),
                              "fit_mse_var": summary["rating"].get("fit_mse_var")}
    return blocks


# ---- stage: search -----------------------------------------------------------------------------


def resolution(ctx: Context) -> int:
    return stage_context.resolution(ctx.config, ctx.space)


def load_tables(ctx: Context) -> list[rating_table.BlockTable]:
    """The rating tables, checked against the space (names the file and the problem)."""
    return rating_table.load_space_tables(ctx.stage_dir("rate"), ctx.space,
                                          resolution=resolution(ctx))


def search_budgets(ctx: Context) -> dict[str, float]:
    """The budgets of the search: absolute, or a fraction of the kind's reference network
    (DNA: the teacher)."""
    cfg = ctx.config.search
    budget = cfg.budget
    if not budget:
        if cfg.cost == latency_lib.TFLITE_COST:
            raise StageError(f"search.cost={cfg.cost!r} needs an absolute search.budget in "
                             "milliseconds (there is no teacher latency to take "
                             "search.budget_fraction of)")
        if not 0 < cfg.budget_fraction:
            raise StageError("set search.budget (absolute) or search.budget_fraction > 0")
        reference = ctx.kind.reference_costs(ctx)
        if reference is None:
            raise StageError(f"{ctx.kind.label} has no teacher to take search.budget_fraction "
                             "of: set an absolute search.budget")
        if reference.get(cfg.cost) is None:
            raise StageError(f"search.cost={cfg.cost!r}: the teacher has no such cost "
                             f"(known: params, macs, dna_flops)")
        budget = cfg.budget_fraction * reference[cfg.cost]
    budgets = {cfg.cost: float(budget)}
    if cfg.params_budget:
        budgets["params"] = float(cfg.params_budget)
    return budgets


def add_table_latency(ctx: Context, tables: Sequence[rating_table.BlockTable],
                      fixed: dict[str, float], num_classes: int
                      ) -> tuple[list[rating_table.BlockTable], dict[str, float], dict]:
    """With search.cost='tflite_ms': every block table with a `tflite_ms` column from the
    configured latency table (checked against the space first) and its `fixed_ms` as the
    fixed part; also what the search records about the table (path, SHA-256, how it was
    measured). Other costs: the inputs unchanged and {}."""
    cfg = ctx.config.search
    if cfg.cost != latency_lib.TFLITE_COST:
        return list(tables), fixed, {}
    if not cfg.latency_table:
        raise StageError("search.cost='tflite_ms' needs search.latency_table (a table of "
                         "benchmarks/measure_latency.py --runtime tflite)")
    path = stage_context.resolve_workdir_path(cfg.latency_table, ctx.workdir)
    try:
        table = latency_lib.load_space_latency(path, ctx.space, resolution(ctx), num_classes,
                                               runtime="tflite")
    except ValueError as error:
        raise StageError(str(error)) from error
    tables = latency_lib.add_space_latency(tables, table, ctx.space, resolution(ctx),
                                           name=latency_lib.TFLITE_COST)
    fixed = {**fixed, latency_lib.TFLITE_COST: latency_lib.fixed_latency_ms(table)}
    recorded = {"path": cfg.latency_table, "sha256": hashlib.sha256(
        files.read_bytes(path)).hexdigest(), **{key: table.meta[key] for key in (
            "runtime", "tensorflow", "threads", "batch", "machine", "date", "fixed_ms")
            if key in table.meta}}
    return tables, fixed, recorded


def run_search(ctx: Context) -> dict[str, Any]:
    """The exact Pareto front, the best network(s) under the budget, the exported winner."""
    from dna_jax import export as export_lib  # pylint: disable=import-outside-toplevel

    cfg, space, stage_dir = ctx.config.search, ctx.space, ctx.stage_dir("search")
    tables = load_tables(ctx)
    fits = [rating_table.block_fit(ctx.stage_dir("rate"), block.name)
            for block in space.blocks]
    tables = search_lib.prepare_tables(tables, fits, cfg.unfit_blocks, cfg.rank_normalize)
    reference = ctx.kind.reference_costs(ctx) or {}
    num_classes = ctx.kind.num_classes(ctx)
    fixed = search_lib.space_fixed_costs(space, resolution(ctx), num_classes)
    tables, fixed, latency_table = add_table_latency(ctx, tables, fixed, num_classes)
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
    if stage_context.is_main_process():
        search_lib.plot_pareto_front(front, os.path.join(stage_dir, "pareto_front.png"),
                                     chosen=results[:1])
        search_lib.plot_score_histograms(tables, os.path.join(stage_dir, "score_histograms.png"),
                                         names=[b.name for b in space.blocks])
        artifacts.write_json(os.path.join(stage_dir, "front.json"), {
            "cost_name": front.cost_name, "cost": front.cost, "score": front.score,
            "indices": front.indices})
        artifacts.write_json(os.path.join(stage_dir, "results.json"),
                             [r.to_dict() for r in results])
    supernet = ctx.kind.load_supernet(ctx) if ctx.config.retrain.inherit_weights else None
    exported = export_lib.export_winner(space, winner, os.path.join(stage_dir, "winner"),
                                        num_classes=num_classes, resolution=resolution(ctx),
                                        supernet_variables=supernet, seed=ctx.config.seed)
    return {"budgets": budgets, "winner": winner.to_dict(), "arch": arch.to_json(space),
            "block_strings": space.to_network_spec(arch).to_strings(),
            "front_points": len(front), "search_seconds": search_seconds,
            "teacher_cost": reference.get(cfg.cost), "export": exported,
            **({"latency_table": latency_table} if latency_table else {})}


# ---- stage: retrain ----------------------------------------------------------------------------


def run_retrain(ctx: Context) -> dict[str, Any]:
    """Trains the searched network from scratch (or from the supernet's weights)."""
    from dna_jax import export as export_lib  # pylint: disable=import-outside-toplevel

    cfg = ctx.config.retrain
    module, variables, arch = export_lib.load_exported(
        os.path.join(ctx.stage_dir("search"), "winner"), space=ctx.space)
    # DNA+ rounds (dna_jax.progressive) may scale the winner before retraining it.
    width, depth = cfg.width_multiplier, cfg.depth_multiplier
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
    image_size = int(cfg.data.image_size) or resolution(ctx)
    figures.update(stage_context.network_cost_figures(module.spec, image_size,
                                                      module.num_classes))
    figures["arch"] = arch.to_json(ctx.space)
    figures["width_multiplier"], figures["depth_multiplier"] = width, depth
    figures["block_strings"] = module.spec.to_strings()
    save_retrained_network(ctx, module, trained, image_size)
    return figures


def scale_network_spec(spec, width_multiplier: float, depth_multiplier: float):
    """EfficientNet's compound scaling of any network: widths (stem, every layer, head)
    rounded to multiples of 8, each stage's depth scaled with ceil (timm's rules)."""
    scaled = scaled_network_spec(spec.name, spec.to_strings(), width_multiplier,
                                 depth_multiplier, stem_channels=spec.stem_channels,
                                 head_channels=spec.head_channels, stem_stride=spec.stem_stride)
    return dataclasses.replace(scaled, stem_kernel=spec.stem_kernel)


def save_retrained_network(ctx: Context, module, variables, image_size: int) -> None:
    """retrain/network: the retrained winner as a teacher checkpoint (architecture stored),
    the next DNA+ round's teacher; written by process 0 (like the trained teacher)."""
    spec = dataclasses.replace(module.spec, name=RETRAINED_NETWORK_NAME)
    host_variables = multihost.replicated_to_host(variables)
    if stage_context.is_main_process():
        teacher_lib.save_teacher(
            os.path.join(ctx.stage_dir("retrain"), RETRAINED_NETWORK), spec.name,
            host_variables, int(module.num_classes),
            source={"trained_by": "dna_jax.pipeline retrain",
                    "config_hash": ctx.digests["retrain"]},
            preprocessing={"resolution": image_size}, overwrite=True, spec=spec,
            layer_config=module.layer_config)
    multihost.barrier("retrained network saved")


# ---- stage: deploy -----------------------------------------------------------------------------

DEPLOY_FIGURES = ("input", "files", "parity", "latency", "machine")


def deploy_options(cfg) -> deploy_lib.DeployOptions:
    """`config.deploy` as dna_jax.deploy's options."""
    return deploy_lib.DeployOptions(
        formats=deploy_lib.parse_formats(cfg.formats), batch_size=int(cfg.batch_size),
        threads=int(cfg.threads), timing_repeats=int(cfg.timing_repeats),
        parity_images=int(cfg.parity_images))


def run_deploy(ctx: Context) -> dict[str, Any]:
    """The retrained winner's deployable files (TFLite, StableHLO), checked and timed."""
    from dna_jax import export as export_lib  # pylint: disable=import-outside-toplevel

    network_dir = os.path.join(ctx.stage_dir("retrain"), RETRAINED_NETWORK)
    data = ctx.config.retrain.data
    preprocessing = {"source": data.source, "name": data.name,
                     **data_lib.input_normalisation(data, int(data.channels) or 3),
                     "pixels": "0..255 before normalising; grayscale tiled to the channels"}
    content = export_lib.deploy_network(
        network_dir, ctx.stage_dir("deploy"), deploy_options(ctx.config.deploy),
        preprocessing=preprocessing, redo="--config.deploy.formats=stablehlo")
    return {key: content.get(key) for key in DEPLOY_FIGURES}
