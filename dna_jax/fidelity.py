r"""Does the rating work? Every rating method against one ground truth, size-controlled.

    python benchmarks/rating_fidelity.py --ground_truth results/fmnist28_ground_truth.json \
        --rate_dir workdir/fmnist28_dna/rate --out results/fmnist28_fidelity.json

Inputs: a ground-truth file written by `dna_jax.ground_truth` (architectures in cost bins,
stand-alone test accuracies, some with several seeds), or several of the same bins read as one
(`GroundTruth.merged`: a file and its confirmation sample), and, per DNA variant, a folder of
rating tables (`rate/` of a pipeline run on the same space). The truth of an architecture is
its mean test accuracy over the seeds it has.

Methods (each oriented so that higher = predicted better; see ranking_stats):
  dna[<metric>, <aggregation>]: the rating tables' metric summed over blocks, NEGATED (a loss);
    aggregations: `sum` (the paper's), `fit_blocks` (blocks whose best candidate does not beat
    the constant predictor left out), `zscore` (each block's scores standardised over its
    candidates first), `rank` (each block's scores replaced by their rank among its
    candidates, as a fraction).
  macs, effective_macs (padding taps excluded), params, dna_flops: size (bigger = better).
  depth, mean_expansion, mean_kernel: the searched layers' shape (identity ops excluded: how
    many layers, their mean expansion ratio and mean depthwise kernel; bigger = better, the
    size convention), exploratory baselines added after the pre-registered test (see
    `shape_features`): is what a rating says beyond size something a hand-made feature says?
  synflow: the zero-cost proxy of Tanaka et al. 2020 on the randomly initialised child
    network (sum |theta * dR/dtheta|, R the summed output for an all-ones input with |theta|).
  random: a seeded random score (what chance looks like at this sample size).

Statistics per method: Kendall tau-b and Spearman rho with accuracy, tau within cost bins,
partial Spearman given log(cost), top-k overlap and regret at two budgets, each with a
bootstrap interval over architectures (95% unless `compare_all(confidence=...)`), and for what
a rating says beyond size (partial Spearman, tau within cost bins) a permutation p-value (the
rating shuffled within cost bins, `ranking_stats.within_bin_permutation_p`); plus the
seed-noise ceiling (what a perfect predictor of the mean accuracy would score against
single-seed accuracies, simulated with the measured seed SD, and tau between two seeds where
they exist).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from dna_jax import ground_truth, ranking_stats, rating_table
from dna_jax.space import Arch, SearchSpace, get_space

AGGREGATIONS = ("sum", "fit_blocks", "zscore", "rank")
SIZE_METHODS = ("macs", "effective_macs", "params", "dna_flops")


# ---- the ground truth --------------------------------------------------------------------------


class GroundTruth:
    """The architectures of a ground-truth file (or of several: `merged`) and their mean
    accuracies (trained ones only)."""

    def __init__(self, data: Mapping[str, Any]):
        self.data = data
        archs = data["sample"]["archs"]
        by_arch: dict[int, dict[int, float]] = {}
        for run in data["runs"]:
            by_arch.setdefault(run["arch"], {})[run["seed"]] = run["test_accuracy"]
        self.indices = sorted(by_arch)
        self.seeds = [by_arch[i] for i in self.indices]
        self.accuracy = np.asarray([np.mean(list(s.values())) for s in self.seeds])
        self.archs = [Arch.of(archs[i]["blocks"]) for i in self.indices]
        self.bins = np.asarray([archs[i]["bin"] for i in self.indices])
        self.costs = {name: np.asarray([archs[i][name] for i in self.indices], np.float64)
                      for name in SIZE_METHODS if name in archs[0]}
        self.space = get_space(data["sample"]["record"]["space"])
        self.resolution = int(data["sample"]["record"]["resolution"])

    @classmethod
    def merged(cls, files: Sequence[Mapping[str, Any]]) -> "GroundTruth":
        """Several ground-truth files of one space, resolution and set of bins as one truth,
        e.g. a file and its confirmation sample (`ground_truth`'s `sample.exclude`).

        Each file's architectures are numbered after the previous files' (its runs with them),
        so the seed noise pools every file's runs without mixing two files' runs as one
        architecture; `bins` stay the shared bin index. One file: `GroundTruth(files[0])`.

        Raises:
          ValueError: no file; the files differ in space, resolution or bin centres
            (`sample.archs[*].bin_centre` per bin, relative tolerance 1e-9); or two files
            sampled the same architecture (it would count as two independent networks).
        """
        if not files:
            raise ValueError("GroundTruth.merged needs at least one ground-truth file")
        if len(files) == 1:
            return cls(files[0])
        first = files[0]["sample"]["record"]
        centres = _bin_centres(files[0], 0)
        archs: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        owner: dict[Arch, int] = {}
        for f, data in enumerate(files):
            record = data["sample"]["record"]
            for name in ("space", "resolution"):
                if record[name] != first[name]:
                    raise ValueError(f"ground-truth file {f} has {name} {record[name]!r}, file 0 "
                                     f"{first[name]!r}: only files of one space and resolution "
                                     "merge")
            theirs = _bin_centres(data, f)
            if sorted(theirs) != sorted(centres) or not all(
                    np.isclose(theirs[b], centres[b], rtol=1e-9, atol=0.0) for b in centres):
                raise ValueError(f"ground-truth file {f} has bin centres {theirs}, file 0 "
                                 f"{centres}: only files of the same bins merge")
            offset = len(archs)
            for i, arch in enumerate(data["sample"]["archs"]):
                key = Arch.of(arch["blocks"])
                if owner.setdefault(key, f) != f:
                    raise ValueError(f"architecture {arch['blocks']} is in ground-truth files "
                                     f"{owner[key]} and {f}: merged files must sample distinct "
                                     "architectures (sample.exclude)")
                archs.append({**arch, "index": offset + i, "file": f})
            runs += [{**run, "arch": run["arch"] + offset, "file": f} for run in data["runs"]]
        return cls({"format_version": files[0].get("format_version"), "merged_files": len(files),
                    "sample": {"record": {"space": first["space"],
                                          "resolution": first["resolution"]},
                               "archs": archs},
                    "runs": runs})

    def __len__(self) -> int:
        return len(self.indices)

    def seed_sd(self) -> float:
        """Pooled seed-to-seed SD over architectures with >= 2 seeds (NaN if none)."""
        return float(ground_truth.seed_noise(self.data["runs"]).get("seed_sd", float("nan")))

    def noise_ceiling(self, num_draws: int = 2000, seed: int = 0) -> dict[str, float]:
        """What seed noise alone costs a perfect predictor.

        `simulated_kendall`: median (and 95% range) of tau between the mean accuracies and
        the means plus Gaussian noise of the measured seed SD (per architecture divided by
        sqrt(its seed count)), i.e. the tau a predictor that knew each network's expected
        accuracy would score against this file. `two_seed_kendall`: tau between seed 0 and
        seed 1 over the architectures that have both.
        """
        sd = self.seed_sd()
        out: dict[str, float] = {"seed_sd": sd, "spread": float(np.ptp(self.accuracy))
                                 if len(self) else float("nan")}
        if np.isfinite(sd) and len(self) >= 3:
            rng = np.random.default_rng(seed)
            counts = np.asarray([len(s) for s in self.seeds], np.float64)
            taus = [ranking_stats.kendall_tau(
                self.accuracy, self.accuracy + rng.normal(size=len(self)) * sd / np.sqrt(counts))
                for _ in range(num_draws)]
            out["simulated_kendall"] = float(np.nanmedian(taus))
            out["simulated_kendall_low"], out["simulated_kendall_high"] = (
                float(v) for v in np.nanquantile(taus, [0.025, 0.975]))
        both = [(s[0], s[1]) for s in self.seeds if 0 in s and 1 in s]
        if len(both) >= 3:
            a, b = np.asarray(both).T
            out["two_seed_kendall"] = ranking_stats.kendall_tau(a, b)
            out["two_seed_archs"] = len(both)
        return out


def _bin_centres(data: Mapping[str, Any], f: int) -> dict[int, float]:
    """{bin: centre} of a ground-truth file's sample (one centre per bin, or a ValueError)."""
    centres: dict[int, float] = {}
    for arch in data["sample"]["archs"]:
        if centres.setdefault(arch["bin"], arch["bin_centre"]) != arch["bin_centre"]:
            raise ValueError(f"ground-truth file {f}: bin {arch['bin']} has two centres, "
                             f"{centres[arch['bin']]} and {arch['bin_centre']}")
    return centres


# ---- the ratings -------------------------------------------------------------------------------


def load_block_tables(rate_dir: str, space: SearchSpace) -> list[dict[str, Any]]:
    """Per block: {'rows': encoding -> row, 'metrics': {name: [N]}, 'fit': summary or None}."""
    tables = []
    for block in space.blocks:
        rating = rating_table.load_rating(os.path.join(rate_dir, block.name))
        tables.append({"rows": {tuple(int(o) for o in e): i
                                for i, e in enumerate(rating.encodings)},
                       "metrics": {k: np.asarray(v, np.float64)
                                   for k, v in rating.metrics.items()},
                       "fit": rating.info.get("fit_mse_var")})
    return tables


def _normalise(values: np.ndarray, aggregation: str) -> np.ndarray:
    if aggregation == "zscore":
        sd = values.std()
        return (values - values.mean()) / sd if sd > 0 else np.zeros_like(values)
    if aggregation == "rank":
        from scipy import stats  # pylint: disable=import-outside-toplevel
        return stats.rankdata(values) / len(values)
    return values


def dna_predictions(tables: Sequence[Mapping[str, Any]], archs: Sequence[Arch]
                    ) -> dict[str, np.ndarray]:
    """{'dna[<metric>,<aggregation>]': NEGATED aggregated block losses [M]} for every metric
    the tables hold and every aggregation."""
    out = {}
    metrics = sorted(set.intersection(*(set(t["metrics"]) for t in tables)))
    for metric in metrics:
        for aggregation in AGGREGATIONS:
            total = np.zeros(len(archs))
            for b, table in enumerate(tables):
                if aggregation == "fit_blocks" and table["fit"] and not table["fit"]["beats_constant"]:
                    continue
                column = _normalise(table["metrics"][metric], aggregation)
                for a, arch in enumerate(archs):
                    row = table["rows"].get(tuple(arch.blocks[b]))
                    if row is None:
                        raise ValueError(f"block {b}: candidate {list(arch.blocks[b])} of "
                                         f"architecture {a} is not in the rating table")
                    total[a] += column[row]
            out[f"dna[{metric},{aggregation}]"] = -total
    return out


def shape_features(space: SearchSpace, archs: Sequence[Arch]) -> dict[str, np.ndarray]:
    """Per architecture: `depth` (searched layers that are not the identity op),
    `mean_expansion` and `mean_kernel` (over those layers).

    Cheap, hand-made descriptors of where a network spends its multiply-adds (deep or wide,
    big kernels or not). They are not in `SIZE_METHODS`: the pre-registered test compares
    against size alone, and these were added afterwards as exploratory rows.
    """
    depth, expansion, kernel = [], [], []
    for arch in archs:
        layers = [layer for stage in space.to_network_spec(arch).stages[1:] for layer in stage]
        depth.append(len(layers))
        expansion.append(float(np.mean([layer.expansion for layer in layers])))
        kernel.append(float(np.mean([layer.kernel for layer in layers])))
    return {"depth": np.asarray(depth, np.float64),
            "mean_expansion": np.asarray(expansion, np.float64),
            "mean_kernel": np.asarray(kernel, np.float64)}


def synflow_scores(space: SearchSpace, archs: Sequence[Arch], resolution: int,
                   num_classes: int = 10, seed: int = 0) -> np.ndarray:
    """SynFlow (Tanaka et al. 2020) of each architecture's randomly initialised child
    network: with every parameter replaced by its absolute value and BatchNorm in inference
    mode at its initial statistics, R = sum of the logits for an all-ones image, score =
    sum over parameters of |theta * dR/dtheta| (float32 gradients, summed in float64)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from dna_jax.models.childnet import build_childnet  # pylint: disable=import-outside-toplevel
    from dna_jax.models.layers import LayerConfig  # pylint: disable=import-outside-toplevel

    scores = []
    x = jnp.ones((1, resolution, resolution, 3), jnp.float32)
    for arch in archs:
        model = build_childnet(space, arch, num_classes, LayerConfig(), name="synflow")
        variables = model.init(jax.random.PRNGKey(seed), x, train=False)
        params = jax.tree_util.tree_map(jnp.abs, variables["params"])

        def total(p, model=model, variables=variables):
            y = model.apply({**variables, "params": p}, x, train=False)
            return jnp.sum(y[0] if isinstance(y, tuple) else y)

        grads = jax.grad(total)(params)
        leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda p, g: jnp.sum(jnp.abs(p * g)), params, grads))
        scores.append(float(sum(np.float64(v) for v in leaves)))
    return np.asarray(scores)


# ---- the comparison ----------------------------------------------------------------------------


def arch_score_predictions(scores: Mapping[str, Any], truth: "GroundTruth") -> np.ndarray:
    """A per-architecture rating file (e.g. benchmarks/spos_scores.py's) as a prediction for
    the truth's trained architectures, oriented higher = better.

    Raises:
      ValueError: a trained architecture has no score in the file (rated another sample).
    """
    by_blocks = {tuple(tuple(b) for b in blocks): float(score)
                 for blocks, score in zip(scores["archs"], scores["scores"])}
    sign = 1.0 if scores.get("higher_is_better", True) else -1.0
    values = []
    for arch in truth.archs:
        key = tuple(tuple(b) for b in arch.blocks)
        if key not in by_blocks:
            raise ValueError(f"architecture {list(map(list, key))} of the ground truth has no "
                             f"{scores.get('method', 'score')} score: the file rated another "
                             "sample (rerun it on this ground truth)")
        values.append(sign * by_blocks[key])
    return np.asarray(values)


def compare_all(truth: GroundTruth, predictions: Mapping[str, np.ndarray], *, top_k: int = 5,
                budget_quantiles: Sequence[float] = (0.33, 0.67), cost: str = "macs",
                num_resamples: int = 1000, num_permutations: int = 2000,
                seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """Every method's statistics against the truth (see the module docstring), the bootstrap
    intervals at `confidence` (stored in the result: `verdict` checks it against its alpha)."""
    cost_values = truth.costs[cost]
    budgets = [float(np.quantile(cost_values, q)) for q in budget_quantiles]
    methods = {}
    for name, prediction in predictions.items():
        methods[name] = ranking_stats.compare(
            truth.accuracy, prediction, top_k=top_k, num_resamples=num_resamples, seed=seed,
            cost=cost_values, bins=truth.bins, budgets=budgets,
            num_permutations=num_permutations, confidence=confidence)
    return {"num_archs": len(truth), "num_bins": int(len(np.unique(truth.bins))),
            "cost": cost, "budgets": budgets, "top_k": top_k,
            "num_resamples": num_resamples, "num_permutations": num_permutations,
            "confidence": confidence,
            "noise": truth.noise_ceiling(seed=seed), "methods": methods}


def beyond_controls(truth: GroundTruth, predictions: Mapping[str, np.ndarray],
                    controls: Sequence[str], *, num_resamples: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict[str, Any]:
    """What each rating says beyond SEVERAL controls (exploratory): partial Spearman with
    accuracy given every prediction named in `controls` at once (e.g. macs and
    mean_expansion: size and the shape feature that ranks best), with a paired bootstrap
    interval. Rows: every prediction that is not a control, DNA rows in the `sum`
    aggregation only (the other aggregations move with it)."""
    for name in controls:
        if name not in predictions:
            raise ValueError(f"control {name!r} is not a prediction (have: "
                             f"{', '.join(sorted(predictions))})")
    columns = [np.asarray(predictions[name], np.float64) for name in controls]

    def statistic(t, p, *c):
        return ranking_stats.partial_spearman(t, p, np.stack(c, axis=1))

    rows = {}
    for name, prediction in predictions.items():
        if name in controls or ("[" in name and not name.endswith(",sum]")):
            continue
        value = statistic(truth.accuracy, prediction, *columns)
        low, high = ranking_stats.bootstrap_interval(
            truth.accuracy, prediction, statistic, num_resamples=num_resamples,
            confidence=confidence, seed=seed, extra=columns)
        rows[name] = {"partial_spearman": value, "partial_spearman_low": low,
                      "partial_spearman_high": high}
    return {"controls": list(controls), "confidence": confidence, "methods": rows}


def render_beyond(beyond: Mapping[str, Any]) -> str:
    lines = [f"Exploratory: partial Spearman given {' and '.join(beyond['controls'])} "
             f"({_percent(beyond['confidence'])} bootstrap)", "",
             "| method | partial Spearman |", "|---|---|"]
    for name, row in beyond["methods"].items():
        value = row["partial_spearman"]
        lines.append(f"| {name} | " + ("n/a" if not np.isfinite(value) else
                     f"{value:+.2f} [{row['partial_spearman_low']:+.2f}, "
                     f"{row['partial_spearman_high']:+.2f}]") + " |")
    return "\n".join(lines) + "\n"


PRIMARY = "dna[cl_loss,sum]"  # the pre-registered test (README "Does the rating work?")


def verdict(result: Mapping[str, Any], primary: str = PRIMARY, alpha: float = 0.05
            ) -> dict[str, Any]:
    """The pre-registered test, applied mechanically to one row of `compare_all`'s result.

    Passes if (a) the row's Kendall tau is at least the best size baseline's (SIZE_METHODS
    present in the result) and (b) its partial Spearman given cost has a bootstrap interval
    above 0 and a within-bin permutation p-value below `alpha`. Every other row is exploratory.
    The interval is the result's, so it must be at confidence 1 - alpha (`compare_all(...,
    confidence=1 - alpha)`; a result that records another `confidence` is a ValueError; one
    without the key is taken to be at 1 - alpha).
    """
    confidence = result.get("confidence")
    if confidence is not None and abs(confidence - (1.0 - alpha)) > 1e-9:
        raise ValueError(f"the result's intervals are at confidence {confidence}, the test's "
                         f"alpha={alpha} needs {1.0 - alpha:g}: compare_all(..., "
                         f"confidence={1.0 - alpha:g})")
    methods = result["methods"]
    if primary not in methods:
        raise ValueError(f"the pre-registered row {primary!r} is not in the result (methods: "
                         f"{sorted(methods)}); rate with --rate_dir dna=...")
    sizes = {m: methods[m]["kendall"] for m in SIZE_METHODS if m in methods}
    if not sizes:
        raise ValueError(f"no size baseline ({', '.join(SIZE_METHODS)}) in the result")
    best_size = max(sizes, key=sizes.get)
    row = methods[primary]
    tau_ok = bool(row["kendall"] >= sizes[best_size])
    interval_ok = bool(row.get("partial_spearman_low", float("nan")) > 0)
    permutation_ok = bool(row.get("partial_spearman_p", float("nan")) < alpha)
    return {"primary": primary, "kendall": row["kendall"], "best_size": best_size,
            "best_size_kendall": sizes[best_size], "tau_at_least_size": tau_ok,
            "partial_spearman": row.get("partial_spearman"),
            "partial_spearman_low": row.get("partial_spearman_low"),
            "partial_spearman_p": row.get("partial_spearman_p"),
            "partial_interval_above_zero": interval_ok,
            "permutation_p_below_alpha": permutation_ok, "alpha": alpha,
            "confidence": 1.0 - alpha if confidence is None else confidence,
            "passed": tau_ok and interval_ok and permutation_ok}


def kendall_difference(truth: GroundTruth, a: np.ndarray, b: np.ndarray, *,
                       num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
                       ) -> dict[str, float]:
    """tau(a) - tau(b) against the truth, with a paired bootstrap interval (the same resampled
    networks for both), for "does a rank better than b?": two overlapping intervals of the
    taus alone say little, because both ratings are scored on the same networks."""
    def difference(t, x, y):
        return ranking_stats.kendall_tau(x, t) - ranking_stats.kendall_tau(y, t)

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    low, high = ranking_stats.bootstrap_interval(
        truth.accuracy, a, difference, num_resamples=num_resamples, confidence=confidence,
        seed=seed, extra=(b,))
    return {"value": difference(truth.accuracy, a, b), "low": low, "high": high}


def render_verdict(v: Mapping[str, Any]) -> str:
    """One line per condition of the pre-registered test."""
    mark = {True: "yes", False: "NO"}
    level = _percent(v.get("confidence", 1.0 - v["alpha"]))
    return (f"Pre-registered test, {v['primary']}: {'PASSED' if v['passed'] else 'NOT PASSED'}\n"
            f"- (a) Kendall tau {v['kendall']:+.3f} >= best size baseline {v['best_size']} "
            f"{v['best_size_kendall']:+.3f}: {mark[v['tau_at_least_size']]}"
            + (f" (paired difference {v['kendall_difference']['value']:+.3f}, {level} interval "
               f"[{v['kendall_difference']['low']:+.3f}, {v['kendall_difference']['high']:+.3f}])"
               if v.get("kendall_difference") else "") + "\n"
            f"- (b1) partial Spearman {v['partial_spearman']:+.3f}, {level} interval low end "
            f"{v['partial_spearman_low']:+.3f} > 0: {mark[v['partial_interval_above_zero']]}\n"
            f"- (b2) within-bin permutation p {v['partial_spearman_p']:.3f} < {v['alpha']}: "
            f"{mark[v['permutation_p_below_alpha']]}\n")


def _percent(confidence: float) -> str:
    return f"{100.0 * confidence:.4g}%"


def render_table(result: Mapping[str, Any]) -> str:
    """A markdown table: one row per method, the headline statistics with bootstrap intervals
    (at the result's `confidence`), and the within-bin permutation p-values (one-sided: the
    rating adds nothing beyond cost) of tau within bins and of partial Spearman. Regret is in
    accuracy points (x100: the accuracies differ in the third decimal). A first line gives the
    sample size, the seed-noise ceiling the correlations are bounded by and the intervals'
    confidence."""
    def cell(stats: Mapping[str, float], name: str, scale: float = 1.0) -> str:
        value = stats.get(name)
        if value is None or not np.isfinite(value):
            return "n/a"
        low, high = stats[f"{name}_low"] * scale, stats[f"{name}_high"] * scale
        return f"{value * scale:+.2f} [{low:+.2f}, {high:+.2f}]"

    budgets = [k for k in next(iter(result["methods"].values())) if k.startswith("regret@")
               and not k.endswith(("_low", "_high"))]
    def p_value(stats: Mapping[str, float], name: str) -> str:
        value = stats.get(f"{name}_p")
        return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"

    def budget_name(key: str) -> str:
        value = float(key.removeprefix("regret@"))
        shown = f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:.4g}"
        return f"regret (points) at {result['cost']} <= {shown}"

    noise = result.get("noise") or {}
    lines = [f"{result['num_archs']} architectures in {result.get('num_bins', '?')} cost bins"]
    if noise.get("simulated_kendall") is not None:
        lines[0] += (f"; seed SD {100 * noise['seed_sd']:.2f} points, spread "
                     f"{100 * noise['spread']:.2f}; noise ceiling (the Kendall tau a predictor "
                     f"of each net's expected accuracy would score against this file) "
                     f"{noise['simulated_kendall']:+.2f} [{noise['simulated_kendall_low']:+.2f}, "
                     f"{noise['simulated_kendall_high']:+.2f}]")
    if noise.get("two_seed_kendall") is not None:
        lines[0] += (f"; seed 0 vs seed 1 over {noise['two_seed_archs']} architectures: tau "
                     f"{noise['two_seed_kendall']:+.2f}")
    if result.get("confidence") is not None:
        lines[0] += f"; intervals: {_percent(result['confidence'])} bootstrap"
    lines += [""]
    header = ["method", "Kendall tau", "Spearman rho", "tau within cost bins", "p",
              f"partial Spearman given {result['cost']}", "p", f"top-{result['top_k']} overlap",
              *[budget_name(b) for b in budgets]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stats in result["methods"].items():
        cells = [cell(stats, "kendall"), cell(stats, "spearman"),
                 cell(stats, "within_bin_kendall"), p_value(stats, "within_bin_kendall"),
                 cell(stats, "partial_spearman"), p_value(stats, "partial_spearman"),
                 cell(stats, "top_k"), *(cell(stats, b, 100.0) for b in budgets)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(truth: GroundTruth, predictions: Mapping[str, np.ndarray], methods: Sequence[str],
         path: str) -> None:
    """Rating against stand-alone accuracy, one panel per method, colour = cost bin."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.4), squeeze=False)
    for ax, name in zip(axes[0], methods):
        values = np.asarray(predictions[name], np.float64)
        ax.scatter(values, truth.accuracy, c=truth.bins, cmap="viridis", s=18)
        if np.all(values > 0) and values.max() > 1e3 * values.min():  # e.g. SynFlow
            ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("rating (higher = predicted better)", fontsize=8)
    axes[0][0].set_ylabel("stand-alone test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
