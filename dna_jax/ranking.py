r"""Ranking fidelity: does a rating rank architectures the way stand-alone training does?

    python -m dna_jax.ranking --config configs/fashion_mnist_ranking.py --workdir W

1. M architectures are sampled from the space with a fixed seed, spread over the cost range:
   a pool of random architectures is sorted by `dna_flops` and cut into M equal-count bins
   (cost quantiles), one architecture drawn from each.
2. Each is trained stand-alone with the classifier trainer (`dna_jax.retrain`) for a fixed
   budget (`config.standalone`) and its test accuracy recorded: the truth.
3. Ratings compared with it:
   - dna: the sum over blocks of the candidates' scores in the DNA rating tables
     (`<dna workdir>/rate/`, made by the pipeline's teacher, distill and rate stages, which
     run here unless complete; `rate.rank_metric`, a loss: lower = better). Every other
     metric stored in the tables is reported too (`dna_metrics`).
   - spos: single-path one-shot (`dna_jax.spos`): one whole-network supernet trained on the
     labels with a uniform random path per step, each architecture rated by its validation
     accuracy with recalibrated BatchNorm (higher = better).
   - flops, params: the architecture's `dna_flops` / parameter count (bigger = better), the
     trivial baseline a rating has to beat.
4. Kendall tau-b, Spearman rho and top-k overlap of each rating with the test accuracy, with
   percentile bootstrap intervals over resampled architectures (`dna_jax.ranking_stats`).
   SIGN CONVENTION: a rating is oriented so that higher = predicted better before it is
   correlated with accuracy: the DNA score (a loss) is NEGATED, the others are used as they
   are. A perfect rating has tau = rho = +1.

Artifacts under `workdir/ranking/`: `archs.json` (the sample), `archs/<i>/` (each stand-alone
run: checkpoints, TensorBoard, `figures.json`, `result.json`), `spos/` (checkpoints,
`result.json`), `results.json` (every figure, per architecture and per method) and
`ranking.png` (rating against accuracy, one panel per method). Every finished piece is
reused by a re-run, so a killed run resumes without retraining finished architectures (and an
unfinished one resumes from its last checkpoint). A piece made by another config is an error
that names the file.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from dna_jax import artifacts
from dna_jax import costs as costs_lib
from dna_jax import data as data_lib
from dna_jax import files
from dna_jax import metrics as metrics_lib
from dna_jax import pipeline
from dna_jax import ranking_stats
from dna_jax import rating_table
from dna_jax import retrain as retrain_lib
from dna_jax import sharding as sharding_lib
from dna_jax import spos as spos_lib
from dna_jax.models.childnet import build_childnet
from dna_jax.space import Arch, SearchSpace, get_space

DNA_STAGES = "teacher,distill,rate"
METHODS = ("dna", "spos", "flops", "params")
SIGN_CONVENTION = ("correlations are between stand-alone test accuracy and each rating "
                   "oriented so that higher = predicted better: dna = the NEGATED sum of block "
                   "scores (a loss, lower = better), spos = +validation accuracy, flops = "
                   "+dna_flops, params = +params (bigger = better); a perfect rating has "
                   "tau = rho = +1")
RESULT_FILE = "result.json"


class RankingError(RuntimeError):
    """A ranking run cannot continue (an artifact of another config, a missing table row)."""


# ---- configuration -----------------------------------------------------------------------------


def get_default_config() -> ml_collections.ConfigDict:
    """Every field a ranking run reads.

    Sections:
      seed, mesh: as in the trainer.
      dna: a full pipeline config (dna_jax.pipeline); its teacher, distill and rate stages
        are run (or reused when complete) in `dna_workdir` for the DNA ratings.
      dna_workdir: where the DNA stages live; '' = <workdir>/dna. Point it at an existing
        pipeline workdir made with the same `dna` config to reuse its ratings.
      ranking: num_archs (M), seed and pool_size of the stratified sample, stratify_cost
        (the cost the bins cut), top_k of the overlap, bootstrap_resamples, confidence,
        bootstrap_seed.
      standalone: a full trainer config (dna_jax.retrain) for every sampled architecture
        (its model section gives the layer options and dropout; the network is the child).
      spos: dna_jax.spos.get_default_config (its recipe is `standalone`'s).
    """
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.mesh = dict(shape=(-1,), axis_names=("data",), axis_types="auto")
    config.dna = pipeline.get_default_config()
    config.dna_workdir = ""
    config.ranking = dict(num_archs=20, seed=0, pool_size=5000, stratify_cost="dna_flops",
                          top_k=5, bootstrap_resamples=1000, confidence=0.95,
                          bootstrap_seed=0)
    config.standalone = retrain_lib.get_default_config()
    config.spos = spos_lib.get_default_config()
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the field."""
    pipeline.check_config(config.dna)
    cfg = config.ranking
    if cfg.num_archs < 3:
        raise ValueError(f"config.ranking.num_archs must be >= 3, got {cfg.num_archs}")
    if cfg.stratify_cost not in costs_lib.COST_NAMES:
        raise ValueError(f"config.ranking.stratify_cost must be one of {costs_lib.COST_NAMES}, "
                         f"got {cfg.stratify_cost!r}")
    if cfg.top_k < 1:
        raise ValueError(f"config.ranking.top_k must be >= 1, got {cfg.top_k}")
    if not 0.0 < cfg.confidence < 1.0:
        raise ValueError(f"config.ranking.confidence must be in (0, 1), got {cfg.confidence}")


def space_of(config: ml_collections.ConfigDict) -> SearchSpace:
    return get_space(config.dna.distill.space)


def cost_resolution(config: ml_collections.ConfigDict) -> int:
    """The resolution the stand-alone networks run at (their costs are counted there)."""
    return int(config.standalone.data.image_size or config.dna.data.image_size
               or space_of(config).resolution)


def _dna_resolution(config: ml_collections.ConfigDict) -> int:
    """The resolution of the costs stored in the rating tables (as stage_context.resolution)."""
    return int(config.dna.rate.cost_resolution or config.dna.data.image_size
               or space_of(config).resolution)


# ---- sampling ----------------------------------------------------------------------------------


def architecture_costs(space: SearchSpace, arch: Arch, resolution: int,
                       num_classes: int) -> dict[str, int]:
    """params, macs and dna_flops of an architecture's child network."""
    return costs_lib.network_costs(space.to_network_spec(arch), resolution,
                                   num_classes).total.as_dict()


def distinct_pool(space: SearchSpace, pool_size: int, rng: np.random.Generator,
                  resolution: int, cost: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """`pool_size` uniform architectures (each layer uniform over its legal ops).

    Returns:
      (per block the pool's candidates [pool_size, L], the indices of the first occurrence of
      each distinct architecture in pool order, the searched blocks' `cost` of every pool
      member [pool_size]; the fixed part is the same for all).
    """
    blocks = [space.sample_block(b, pool_size, rng) for b in range(len(space.blocks))]
    _, first = np.unique(np.concatenate(blocks, axis=1), axis=0, return_index=True)
    block_costs = sum(costs_lib.candidate_costs(space, b, blocks[b], resolution)[cost]
                      for b in range(len(space.blocks)))
    return blocks, np.sort(first), block_costs


def stratified_sample(space: SearchSpace, num_archs: int, *, seed: int, pool_size: int,
                      resolution: int, cost: str = "dna_flops") -> list[Arch]:
    """`num_archs` distinct architectures spread over the cost range.

    Draws `pool_size` uniform architectures (each layer uniform over its legal ops), drops
    repeats, sorts them by `cost` (the searched blocks' part; the fixed part is the same for
    all), cuts the order into `num_archs` equal-count bins (cost quantiles) and draws one
    architecture per bin. Returned in bin order (cheapest first). Deterministic given `seed`.

    Raises:
      ValueError: if the pool has fewer than `num_archs` distinct architectures.
    """
    rng = np.random.default_rng(seed)
    pool_size = max(pool_size, num_archs)
    blocks, first, block_costs = distinct_pool(space, pool_size, rng, resolution, cost)
    if len(first) < num_archs:
        raise ValueError(f"space {space.name!r}: {len(first)} distinct architectures in a pool "
                         f"of {pool_size}, fewer than the {num_archs} asked for")
    order = first[np.argsort(block_costs[first], kind="stable")]
    chosen = [int(part[rng.integers(len(part))]) for part in np.array_split(order, num_archs)]
    return [Arch.of(block[i] for block in blocks) for i in chosen]


def _sample_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    cfg = config.ranking
    return {"space": config.dna.distill.space, "num_archs": cfg.num_archs, "seed": cfg.seed,
            "pool_size": cfg.pool_size, "stratify_cost": cfg.stratify_cost,
            "resolution": cost_resolution(config)}


def sampled_archs(config: ml_collections.ConfigDict, ranking_dir: str) -> list[Arch]:
    """The sample, written to `archs.json` on the first run and checked on later ones."""
    space = space_of(config)
    record = _sample_record(config)
    path = os.path.join(ranking_dir, "archs.json")
    archs = stratified_sample(space, config.ranking.num_archs, seed=config.ranking.seed,
                              pool_size=config.ranking.pool_size,
                              resolution=record["resolution"], cost=config.ranking.stratify_cost)
    encodings = [[list(b) for b in a.blocks] for a in archs]
    if files.exists(path):
        saved = artifacts.read_json(path)
        if saved.get("sample") != record or saved.get("archs") != encodings:
            raise RankingError(
                f"{path} holds another sample ({artifacts.config_changes(saved.get('sample'), record)}); "
                "use another --workdir or delete the ranking folder")
    elif jax.process_index() == 0:
        artifacts.write_json(path, {"sample": record, "archs": encodings,
                                    "block_strings": [space.to_network_spec(a).to_strings()
                                                      for a in archs]})
    return archs


# ---- stand-alone training ----------------------------------------------------------------------


def _check_or_none(path: str, key: dict[str, Any]) -> dict[str, Any] | None:
    """A finished piece's result if it was made by the same config, None if absent."""
    if not files.exists(path):
        return None
    saved = artifacts.read_json(path)
    if saved.get("key") != artifacts.to_jsonable(key):
        raise RankingError(f"{path} was made by another config "
                           f"({artifacts.config_changes(saved.get('key'), key)}); use another "
                           "--workdir or delete it to recompute")
    return saved


def train_standalone(config: ml_collections.ConfigDict, space: SearchSpace, arch: Arch,
                     index: int, arch_dir: str, train_data: data_lib.Dataset,
                     eval_data: data_lib.Dataset, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Trains one architecture stand-alone (or reuses its result); returns the result."""
    cfg = config.standalone
    key = {"arch": [list(b) for b in arch.blocks], "standalone": cfg}
    path = os.path.join(arch_dir, RESULT_FILE)
    saved = _check_or_none(path, key)
    if saved is not None:
        logging.info("ranking: architecture %d already trained (%s)", index, path)
        return saved
    num_classes = train_data.info.num_classes
    model = build_childnet(space, arch, num_classes, retrain_lib.layer_config_from(cfg.model),
                           drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate,
                           name=f"arch{index}")
    logging.info("ranking: training architecture %d %s", index, arch)
    figures = retrain_lib.train_and_evaluate(cfg, arch_dir, model=model, train_data=train_data,
                                             eval_data=eval_data, mesh=mesh)
    result = {"key": artifacts.to_jsonable(key), "index": index,
              "test_accuracy": figures["test_accuracy"], "test_loss": figures["test_loss"],
              "train_loss": figures["train_loss"], "steps": figures["steps"],
              "wall_time_s": figures["wall_time_s"], "train_time_s": figures["train_time_s"]}
    if jax.process_index() == 0:
        artifacts.write_json(path, result)
    return result


# ---- the ratings -------------------------------------------------------------------------------


def run_dna_stages(config: ml_collections.ConfigDict, dna_workdir: str,
                   mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The pipeline's teacher, distill and rate stages (each skipped when complete)."""
    dna = ml_collections.ConfigDict(config.dna.to_dict())
    dna.stages = DNA_STAGES
    dna.lock()
    return pipeline.run_pipeline(dna, dna_workdir, mesh=mesh)


def dna_scores(table_dir: str, space: SearchSpace, archs: Sequence[Arch],
               resolution: int) -> dict[str, np.ndarray]:
    """Per architecture, the sum over blocks of its candidates' ratings.

    Returns:
      {'score': the tables' `score` (the rank metric) [M], 'metric_<name>': [M] for every
      other metric the tables store}; all losses (lower = better).

    Raises:
      RankingError: if an architecture's candidate of some block was not rated.
    """
    tables = rating_table.load_space_tables(table_dir, space, resolution=resolution)
    columns: dict[str, list[np.ndarray]] = {"score": [t.score for t in tables]}
    for b, table in enumerate(tables):
        if table.source.endswith(".npz") and files.exists(table.source):
            for name, values in rating_table.load_metrics(table.source).items():
                columns.setdefault(f"metric_{name}", [None] * len(tables))[b] = values
    columns = {k: v for k, v in columns.items() if all(c is not None for c in v)}
    rows = [{tuple(int(o) for o in enc): i for i, enc in enumerate(t.encodings)} for t in tables]
    out = {name: np.zeros(len(archs)) for name in columns}
    for a, arch in enumerate(archs):
        for b, ops in enumerate(arch.blocks):
            row = rows[b].get(tuple(ops))
            if row is None:
                raise RankingError(f"{tables[b].source}: block {b} candidate {list(ops)} of "
                                   f"architecture {a} was not rated (rate.num_candidates > 0?)")
            for name, values in columns.items():
                out[name][a] += values[b][row]
    return out


def run_spos(config: ml_collections.ConfigDict, space: SearchSpace, archs: Sequence[Arch],
             spos_dir: str, train_data: data_lib.Dataset, mesh: jax.sharding.Mesh
             ) -> dict[str, Any]:
    """Trains the SPOS supernet (or reuses it) and rates every architecture as a path."""
    total_steps = config.spos.total_steps or retrain_lib.total_steps_for(config.standalone,
                                                                         train_data.info)
    key = {"archs": [[list(b) for b in a.blocks] for a in archs], "spos": config.spos,
           "standalone": config.standalone, "total_steps": total_steps}
    path = os.path.join(spos_dir, RESULT_FILE)
    saved = _check_or_none(path, key)
    if saved is not None:
        return saved
    info = train_data.info
    trainer = spos_lib.make_trainer(config.standalone, space, info.num_classes, total_steps,
                                    info.num_batches)
    variables, figures = spos_lib.train_supernet(trainer, train_data, total_steps, spos_dir,
                                                 mesh, config.standalone.seed, config.spos)
    watch = metrics_lib.Stopwatch()
    recal = spos_lib.recalibration_images(config.standalone.data, config.spos,
                                          config.standalone.seed)
    val_data = spos_lib.make_val_data(config.standalone.data, config.spos, mesh)
    ratings = spos_lib.rate_paths(trainer, variables, archs, recal, val_data, mesh)
    result = {"key": artifacts.to_jsonable(key), **figures, "rate_seconds": watch.elapsed(),
              "val_accuracy": [r["val_accuracy"] for r in ratings],
              "val_loss": [r["val_loss"] for r in ratings]}
    if jax.process_index() == 0:
        artifacts.write_json(path, result)
    return result


# ---- comparison, plot --------------------------------------------------------------------------


def compare_methods(accuracy: np.ndarray, predictions: dict[str, np.ndarray],
                    cfg: ml_collections.ConfigDict) -> dict[str, dict[str, float]]:
    """ranking_stats.compare of every (higher = better) prediction with the accuracy."""
    return {name: ranking_stats.compare(
        accuracy, values, top_k=cfg.top_k, num_resamples=cfg.bootstrap_resamples,
        confidence=cfg.confidence, seed=cfg.bootstrap_seed)
        for name, values in predictions.items()}


_PANELS = (("dna", "DNA score (sum of block losses; lower = better)", "dna_score"),
           ("spos", "SPOS validation accuracy (higher = better)", "spos_val_accuracy"),
           ("flops", "dna_flops (cost alone)", "dna_flops"),
           ("params", "params (cost alone)", "params"))


def plot_ranking(per_arch: Sequence[dict[str, Any]], stats: dict[str, dict[str, float]],
                 path: str) -> None:
    """rating (x) against stand-alone test accuracy (y), one panel per method, PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=(4.2 * len(_PANELS), 3.8))
    FigureCanvasAgg(fig)
    accuracy = [a["test_accuracy"] for a in per_arch]
    for p, (method, label, field) in enumerate(_PANELS):
        ax = fig.add_subplot(1, len(_PANELS), p + 1)
        ax.scatter([a[field] for a in per_arch], accuracy, s=16)
        s = stats[method]
        ax.set_title(f"{method}: tau {s['kendall']:+.2f} [{s['kendall_low']:+.2f}, "
                     f"{s['kendall_high']:+.2f}], rho {s['spearman']:+.2f}", fontsize=9)
        ax.set_xlabel(label, fontsize=8)
        if p == 0:
            ax.set_ylabel("stand-alone test accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    artifacts.write_bytes(path, buffer.getvalue())


# ---- the run -----------------------------------------------------------------------------------


def run_ranking(config: ml_collections.ConfigDict, workdir: str,
                mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """The whole comparison (see the module docstring); returns the headline figures.

    Returns:
      kendall_<method>, spearman_<method>, top_k_<method> and their `_ci` intervals for
      every method, num_archs, sign_convention, wall_seconds (this run), seconds per part,
      and the paths of results.json and ranking.png.
    """
    check_config(config)
    watch = metrics_lib.Stopwatch()
    mesh = mesh or sharding_lib.mesh_from_config(config.mesh)
    workdir = files.absolute(workdir)
    ranking_dir = os.path.join(workdir, "ranking")
    files.makedirs(ranking_dir)
    space = space_of(config)
    seconds: dict[str, float] = {}

    # DNA: the pipeline's teacher, distill and rate stages (reused when complete).
    part = metrics_lib.Stopwatch()
    dna_workdir = files.absolute(config.dna_workdir or os.path.join(workdir, "dna"))
    run_dna_stages(config, dna_workdir, mesh)
    seconds["dna"] = part.elapsed()

    # The sample and the data of the stand-alone runs.
    archs = sampled_archs(config, ranking_dir)
    cfg = config.standalone
    train_data = data_lib.make_dataset(cfg.data, cfg.data.train_split, training=True,
                                       mesh=mesh, seed=cfg.seed)
    eval_data = data_lib.make_dataset(cfg.data, cfg.data.eval_split, training=False, mesh=mesh)
    num_classes = train_data.info.num_classes
    dna = dna_scores(os.path.join(dna_workdir, "rate"), space, archs, _dna_resolution(config))

    # SPOS: one supernet on the labels, every architecture rated as a path.
    part = metrics_lib.Stopwatch()
    spos = run_spos(config, space, archs, os.path.join(ranking_dir, "spos"), train_data, mesh)
    seconds["spos"] = part.elapsed()

    # The truth: every architecture trained stand-alone.
    part = metrics_lib.Stopwatch()
    standalone = [train_standalone(config, space, arch, i,
                                   os.path.join(ranking_dir, "archs", str(i)), train_data,
                                   eval_data, mesh)
                  for i, arch in enumerate(archs)]
    seconds["standalone"] = part.elapsed()

    # Compare.
    resolution = cost_resolution(config)
    per_arch = []
    for i, arch in enumerate(archs):
        costs = architecture_costs(space, arch, resolution, num_classes)
        per_arch.append({
            "index": i, "blocks": [list(b) for b in arch.blocks],
            "block_strings": space.to_network_spec(arch).to_strings(),
            "test_accuracy": standalone[i]["test_accuracy"],
            "dna_score": float(dna["score"][i]),
            **{f"dna_{k}": float(v[i]) for k, v in dna.items() if k != "score"},
            "spos_val_accuracy": spos["val_accuracy"][i],
            "dna_flops": costs["dna_flops"], "macs": costs["macs"], "params": costs["params"],
            "standalone_seconds": standalone[i]["wall_time_s"],
        })
    accuracy = np.asarray([a["test_accuracy"] for a in per_arch])
    predictions = {"dna": -dna["score"], "spos": np.asarray(spos["val_accuracy"]),
                   "flops": np.asarray([a["dna_flops"] for a in per_arch], np.float64),
                   "params": np.asarray([a["params"] for a in per_arch], np.float64)}
    stats = compare_methods(accuracy, predictions, config.ranking)
    metric_stats = compare_methods(
        accuracy, {k.removeprefix("metric_"): -v for k, v in dna.items() if k != "score"},
        config.ranking)
    results_path = os.path.join(ranking_dir, "results.json")
    plot_path = os.path.join(ranking_dir, "ranking.png")
    summary: dict[str, Any] = {"num_archs": len(archs), "sign_convention": SIGN_CONVENTION,
                               "rank_metric": config.dna.rate.rank_metric}
    for method, s in stats.items():
        for name in ("kendall", "spearman", "top_k"):
            summary[f"{name}_{method}"] = s[name]
            summary[f"{name}_{method}_ci"] = [s[f"{name}_low"], s[f"{name}_high"]]
    summary.update({
        "top_k": stats["dna"]["k"], "confidence": config.ranking.confidence,
        "kendall_dna_metrics": {k: v["kendall"] for k, v in metric_stats.items()},
        "accuracy_range": [float(accuracy.min()), float(accuracy.max())],
        "standalone_steps": standalone[0]["steps"], "spos_steps": spos["steps"],
        "standalone_seconds_per_arch": float(np.mean([a["standalone_seconds"]
                                                      for a in per_arch])),
        "seconds": seconds, "results": results_path, "plot": plot_path,
        "dna_workdir": dna_workdir,
    })
    summary["wall_seconds"] = watch.elapsed()
    summary = finite_or_null(summary)
    if jax.process_index() == 0:
        artifacts.write_json(results_path, finite_or_null({
            "summary": summary, "stats": stats, "dna_metric_stats": metric_stats,
            "architectures": per_arch, "spos": {k: v for k, v in spos.items() if k != "key"}}))
        plot_ranking(per_arch, stats, plot_path)
    return summary


def finite_or_null(obj: Any) -> Any:
    """NaN / inf floats (an undefined statistic, e.g. every accuracy tied) -> None, so the
    JSON written is strict JSON (null)."""
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None
    return obj


# ---- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.INFO)
    config = flags.FLAGS.config
    summary = run_ranking(config, flags.FLAGS.workdir)
    print(metrics_lib.final_line(summary), flush=True)


def define_flags() -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    config_flags.DEFINE_config_file("config", None, "Ranking config file (file.py[:arg]).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory of the run's artifacts.")
    flags.mark_flags_as_required(["config", "workdir"])


def run(argv: Sequence[str] | None = None) -> None:
    """python -m dna_jax.ranking --config ... --workdir ..."""
    import sys  # pylint: disable=import-outside-toplevel

    from absl import app  # pylint: disable=import-outside-toplevel

    define_flags()
    app.run(main, argv=sys.argv if argv is None else ["dna_jax.ranking", *argv])


if __name__ == "__main__":
    run()
