"""DNA++ as a supervision kind: self-supervised blocks, no teacher (dna_jax.ssl).

  ssl/   the supernet trained by self-supervision (the online blocks in DNA's format, the
         target blocks and heads), checkpoints, TensorBoard, the paths chosen while training
  rate/  DNA's table layout, `score` = each candidate's SSL loss against the population
         centre, block k fed through the best paths of blocks < k

With no teacher there is no network to take a budget fraction of: the search budget is
absolute (`search.budget`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from dna_jax import metrics as metrics_lib
from dna_jax import ssl as ssl_lib
from dna_jax import ssl_rating as ssl_rating_lib
from dna_jax import ssl_train as ssl_train_lib
from dna_jax import supervision
from dna_jax import validate as validate_lib
from dna_jax.data import views as views_lib
from dna_jax.space import SearchSpace, get_space
from dna_jax.stage_context import Context, StageError


def add_config(config: ml_collections.ConfigDict) -> None:
    """ssl: dna_jax.ssl.get_default_config (includes the space)."""
    config.ssl = ssl_lib.get_default_config()


def trainer(ctx: Context, steps_per_epoch: int = 1) -> ssl_lib.SelfSupervised:
    return ssl_lib.make_trainer(ctx.config.ssl, steps_per_epoch, ctx.space)


def rating_views(ctx: Context) -> tuple[np.ndarray, np.ndarray | None]:
    """(two fixed views of the R rating batches [2, R, B, H, W, C], two views of the
    recalibration images [2, N, H, W, C] or None in 'batch' mode), seeded by `config.seed`."""
    cfg = ctx.config
    views = views_lib.fixed_views(cfg.data, cfg.rate.split, cfg.ssl.augment,
                                  cfg.rate.num_batches, cfg.rate.batch_size, cfg.seed)
    recal = None
    if cfg.rate.bn_mode == "recalibrate":
        count = cfg.rate.recalibration_images or cfg.data.batch_size
        try:
            recal = views_lib.fixed_views(cfg.data, cfg.data.train_split, cfg.ssl.augment, 1,
                                          count, cfg.seed + 1)[:, 0]
        except ValueError as error:
            raise StageError(f"rate.recalibration_images={cfg.rate.recalibration_images}: "
                             f"{error} Lower it to at most the size of data.train_split (0 = "
                             "one training batch).") from error
    return views, recal


def run_ssl(ctx: Context) -> dict[str, Any]:
    """Trains the supernet blocks by self-supervision (dna_jax.ssl), no teacher."""
    cfg, stage_dir = ctx.config, ctx.stage_dir("ssl")
    train_data = views_lib.make_view_dataset(cfg.data, cfg.data.train_split, cfg.ssl.augment,
                                             2 * cfg.ssl.num_paths, mesh=ctx.mesh,
                                             seed=cfg.seed)
    rate_block = None
    if cfg.ssl.schedule == "sequential":
        views, recal = rating_views(ctx)
        rate_block = ssl_rating_lib.make_block_rater(views, recal, cfg.rate, ctx.mesh,
                                              os.path.join(stage_dir, "ratings"))
    state, _, figures = ssl_train_lib.train_ssl_supernet(cfg.ssl, train_data, stage_dir,
                                                         ctx.mesh, ctx.space, rate_block)
    ssl_train_lib.save_ssl_artifact(stage_dir, state)
    ctx.cache["ssl"] = (state.supernet_variables(), state.ssl_variables())
    figures["num_classes"] = int(train_data.info.num_classes)
    return figures


def load_ssl(ctx: Context) -> tuple[dict, dict]:
    """(supernet variables, ssl variables) of the ssl stage, loaded once per run."""
    if "ssl" not in ctx.cache:
        ctx.cache["ssl"] = ssl_train_lib.load_ssl_artifact(ctx.stage_dir("ssl"), trainer(ctx),
                                                           mesh=ctx.mesh)
    return ctx.cache["ssl"]


def run_rate(ctx: Context) -> dict[str, Any]:
    """Every candidate's SSL loss against the population centre, block by block (block k
    fed through the best paths of blocks < k); DNA's tables."""
    from dna_jax import stages  # pylint: disable=import-outside-toplevel
    supernet, ssl_variables = load_ssl(ctx)
    views, recal = rating_views(ctx)
    watch = metrics_lib.Stopwatch()
    paths, chosen = ssl_rating_lib.rate_ssl_blocks(trainer(ctx), supernet, ssl_variables,
                                                   views, recal, ctx.config.rate,
                                                   ctx.stage_dir("rate"), ctx.mesh)
    blocks = stages.rating_summaries(ctx, paths)
    trained_with = ctx.figures("ssl").get("chosen_paths") or []
    return {"blocks": blocks, "candidates": sum(b["candidates"] for b in blocks.values()),
            "seconds": watch.elapsed(), "rating_batches": int(views.shape[1]),
            "batch_size": int(views.shape[2]), "best_paths": chosen,
            "same_paths_as_training": chosen[:len(trained_with)] == trained_with}


def report_figures(ctx: Context) -> dict[str, Any]:
    """The loss curve ends, the output std (collapse), the schedule."""
    figures = ctx.figures("ssl")
    return {"supervision": "ssl", "ssl_schedule": figures.get("schedule"),
            "ssl_loss_final": figures.get("loss_final"),
            "ssl_output_std_final": figures.get("output_std_final"),
            "ssl_loss_ratio": [b.get("loss_ratio") for b in figures.get("blocks", {}).values()],
            "ssl_train_seconds": figures.get("train_time_s")}


def report_lines(summary: Mapping[str, Any]) -> list[str]:
    return [f"DNA++ (no teacher, {summary.get('ssl_schedule')} schedule): final SSL loss per "
            f"block {summary.get('ssl_loss_final')}, output std "
            f"{summary.get('ssl_output_std_final')} (1 = spread, 0 = collapsed).", ""]


def validate(problems: validate_lib.Problems, config: ml_collections.ConfigDict,
             stages: Sequence[str], devices: int, workdir: str | None) -> None:
    del devices, workdir  # the data section is checked by the pipeline
    if "ssl" in stages:
        problems.call(ssl_lib.check_config, config.ssl, "ssl")


def static_space(config: ml_collections.ConfigDict, reference: Any) -> SearchSpace | None:
    del reference
    try:
        return get_space(config.ssl.space)
    except Exception:  # pylint: disable=broad-except  # reported by the pipeline's own check
        return None


KIND = supervision.register(supervision.Supervision(
    name="ssl", label="DNA++", example_config="configs/fashion_mnist_dna_pp.py:tiny",
    add_config=add_config, neutral_defaults={},
    data_stages=("ssl",),
    own_stages=("ssl",),
    upstream={"ssl": (), "rate": ("ssl",), "search": ("rate",), "retrain": ("search",),
              "deploy": ("retrain",), "report": ("ssl", "rate", "search", "retrain", "deploy")},
    sections={"ssl": ("data", "ssl", "seed"), "rate": ("data", "rate")},
    runners={"ssl": run_ssl, "rate": run_rate},
    space_name=lambda config: config.ssl.space,
    space=lambda ctx: get_space(ctx.config.ssl.space),
    num_classes=lambda ctx: int(ctx.figures("ssl")["num_classes"]),
    load_supernet=lambda ctx: load_ssl(ctx)[0],
    reference_costs=lambda ctx: None,
    report_figures=report_figures, report_lines=report_lines, validate=validate,
    reference_spec=lambda config, workdir: None, static_space=static_space,
    reference_static_cost=lambda config, spec, classes, cost: None,
    has_reference=False))
