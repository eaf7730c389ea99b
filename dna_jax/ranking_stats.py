"""Rank statistics for rating fidelity, on scipy: Kendall tau-b, Spearman rho, partial Spearman
given cost, tau within cost bins, top-k overlap, regret under a budget, and percentile
bootstrap intervals over resampled architectures (`scipy.stats.bootstrap`), and a
permutation test of "the rating says nothing beyond cost" (the prediction shuffled within cost
bins).

Convention: every function compares a TRUTH (stand-alone accuracy, higher = better) with a
PREDICTION oriented the same way (higher = predicted better). A loss-like rating (the DNA
score, lower = better) must be negated before it is passed in. Undefined statistics (one side
constant) are NaN.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"need two equally long 1-D arrays, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("rank statistics need finite values")
    return x, y


def _constant(x: np.ndarray) -> bool:
    return len(x) < 2 or bool(np.all(x == x[0]))


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either variable corrected); NaN if one side is constant."""
    x, y = _pair(x, y)
    if _constant(x) or _constant(y):
        return float("nan")
    return float(stats.kendalltau(x, y).statistic)


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    return stats.rankdata(np.asarray(x, np.float64).reshape(-1), method="average")


def spearman_rho(x, y) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN if one side is constant."""
    x, y = _pair(x, y)
    if _constant(x) or _constant(y):
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def partial_spearman(x, y, control) -> float:
    """Spearman correlation of x and y with `control` partialled out: the Pearson correlation
    of the residuals of rank(x) and rank(y) after a least-squares fit on rank(control). With
    control = cost it asks what a rating says about accuracy BEYOND size (any monotone
    transform of the cost, e.g. log, gives the same value). `control` may also be [n, k]: k
    controls, each ranked, fitted together. NaN if undefined."""
    x, y = _pair(x, y)
    c = np.asarray(control, np.float64)
    c = c.reshape(-1, 1) if c.ndim == 1 else c
    if c.ndim != 2 or c.shape[0] != x.shape[0]:
        raise ValueError(f"control has shape {c.shape}, expected ({x.shape[0]},) or "
                         f"({x.shape[0]}, k)")
    if _constant(x) or _constant(y):
        return float("nan")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rc = np.stack([stats.rankdata(column) for column in c.T], axis=1)
    design = np.concatenate([np.ones((len(rx), 1)), rc], axis=1)
    residual = [r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in (rx, ry)]
    if min(np.std(r) for r in residual) < 1e-12:
        return float("nan")
    return float(stats.pearsonr(*residual).statistic)


def within_bin_tau(x, y, bins) -> float:
    """Kendall tau-b within groups of near-equal cost (`bins`: a group label per item): the
    per-bin tau values averaged with weights n_b (n_b - 1) / 2 (their pair counts), skipping
    bins where it is undefined. Size cannot explain it when a bin's costs are equal."""
    x, y = _pair(x, y)
    bins = np.asarray(bins).reshape(-1)
    values, weights = [], []
    for b in np.unique(bins):
        member = bins == b
        tau = kendall_tau(x[member], y[member]) if member.sum() >= 2 else float("nan")
        if np.isfinite(tau):
            values.append(tau)
            weights.append(member.sum() * (member.sum() - 1) / 2)
    if not values:
        return float("nan")
    return float(np.average(values, weights=weights))


def top_k_overlap(truth, prediction, k: int) -> float:
    """|best k by truth  ∩  best k by prediction| / k (higher = better on both sides).

    Ties are broken by position (earlier first) on both sides, so the value is deterministic.
    """
    truth, prediction = _pair(truth, prediction)
    if not 1 <= k <= len(truth):
        raise ValueError(f"k must be in 1..{len(truth)}, got {k}")
    best_truth = np.argsort(-truth, kind="stable")[:k]
    best_prediction = np.argsort(-prediction, kind="stable")[:k]
    return len(set(best_truth.tolist()) & set(best_prediction.tolist())) / k


def regret(truth, prediction, cost, budget: float) -> float:
    """Accuracy lost by trusting the prediction under a budget: the best true accuracy among
    items with cost <= budget minus the true accuracy of the prediction's best such item
    (0 = it picked the truly best; ties in the prediction go to the earlier item). NaN if
    nothing fits the budget."""
    truth, prediction = _pair(truth, prediction)
    fits = np.asarray(cost, np.float64).reshape(-1) <= budget
    if not fits.any():
        return float("nan")
    index = np.flatnonzero(fits)
    chosen = index[np.argmax(prediction[index])]
    return float(truth[index].max() - truth[chosen])


Statistic = Callable[[np.ndarray, np.ndarray], float]


RowStatistic = Callable[[np.ndarray], np.ndarray]


def bootstrap_interval(truth, prediction, statistic: Statistic, *, num_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0,
                       extra: Sequence[np.ndarray] = (),
                       rows: RowStatistic | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(truth, prediction, *extra)` over resampled
    architectures (`scipy.stats.bootstrap`, paired: an architecture's values move together).

    Resamples where the statistic is undefined (NaN, e.g. every value tied) are dropped.
    Deterministic for a given seed. `rows` (optional) computes the same statistic for a
    batch of resamples at once: index rows [R, n] -> [R] values (see `row_statistics`); it
    gives the same resamples and the same interval, in a fraction of the time, and is checked
    against `statistic` on the sample itself.

    Returns:
      (low, high); (nan, nan) if no resample gave a value.
    """
    truth, prediction = _pair(truth, prediction)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    extra = [np.asarray(e).reshape(-1) for e in extra]

    if rows is None:
        def resampled(index: np.ndarray) -> float:
            index = np.asarray(index, int)
            return statistic(truth[index], prediction[index], *(e[index] for e in extra))
    else:
        _check_rows(rows, statistic(truth, prediction, *extra), len(truth))

        def resampled(index: np.ndarray, axis: int = -1) -> np.ndarray:
            index = np.asarray(index, int)
            return rows(np.moveaxis(index, axis, -1).reshape(-1, len(truth))).reshape(
                np.delete(index.shape, axis % index.ndim))

    with warnings.catch_warnings():  # scipy warns about NaN resamples; they are dropped below
        warnings.simplefilter("ignore")
        result = stats.bootstrap((np.arange(len(truth)),), resampled, vectorized=rows is not None,
                                 n_resamples=num_resamples, method="percentile",
                                 confidence_level=confidence,
                                 random_state=np.random.default_rng(seed))
    sample = np.asarray(result.bootstrap_distribution, np.float64)
    sample = sample[np.isfinite(sample)]
    if not len(sample):
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(sample, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _check_rows(rows: RowStatistic, expected: float, n: int) -> None:
    value = float(rows(np.arange(n)[None, :])[0])
    if not (np.isnan(value) and np.isnan(expected)) and not np.isclose(
            value, expected, rtol=1e-9, atol=1e-9):
        raise RuntimeError(f"vectorised statistic gives {value} on the sample, scipy {expected}")


# ---- the statistics for many index rows at once (bootstrap resamples, permutations) -----------


def _signs(v: np.ndarray) -> np.ndarray:
    return np.sign(v[:, None] - v[None, :])


def _tau_b(gx: np.ndarray, gy: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Kendall tau-b from gathered sign matrices [R, n, n] (pairs where mask, if given):
    (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y), as scipy's."""
    if mask is not None:
        gx, gy = gx * mask, gy * mask
    untied_x = np.count_nonzero(gx, axis=(1, 2)) / 2.0
    untied_y = np.count_nonzero(gy, axis=(1, 2)) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = np.sum(gx * gy, axis=(1, 2)) / 2.0 / np.sqrt(untied_x * untied_y)
    return np.where((untied_x > 0) & (untied_y > 0), tau, np.nan)


def _pearson_rows(a: np.ndarray, b: np.ndarray, tol: float = 0.0) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sum(a * b, axis=1) / np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
    bad = (a.std(axis=1) <= tol) | (b.std(axis=1) <= tol)
    return np.where(bad, np.nan, np.clip(r, -1.0, 1.0))


def _residual_rows(r: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Residuals of each row of r after a least-squares fit on [1, rc] (same row)."""
    rc = rc - rc.mean(axis=1, keepdims=True)
    r = r - r.mean(axis=1, keepdims=True)
    ss = np.sum(rc * rc, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        beta = np.where(ss > 0, np.sum(r * rc, axis=1, keepdims=True) / ss, 0.0)
    return r - beta * rc


def row_statistics(truth, prediction, *, cost=None, bins=None) -> dict[str, RowStatistic]:
    """{name: index rows [R, n] -> [R] values} for 'kendall', 'spearman' and, given cost /
    bins, 'partial_spearman' and 'within_bin_kendall': each the function of the same name
    above applied to (truth[row], prediction[row], ...) for every row, computed for all rows
    at once (ranks by `scipy.stats.rankdata` along rows, Kendall tau-b from gathered sign
    matrices, residuals by the closed-form simple regression)."""
    truth, prediction = _pair(truth, prediction)
    sx, sy = _signs(truth), _signs(prediction)

    def gathered(index):
        return (sx[index[:, :, None], index[:, None, :]],
                sy[index[:, :, None], index[:, None, :]])

    def constant(v):
        return np.all(v == v[:, :1], axis=1)

    def kendall(index):
        return _tau_b(*gathered(index))

    def spearman(index):
        x, y = truth[index], prediction[index]
        out = _pearson_rows(stats.rankdata(x, axis=1), stats.rankdata(y, axis=1))
        return np.where(constant(x) | constant(y), np.nan, out)

    out = {"kendall": kendall, "spearman": spearman}
    if cost is not None:
        cost = np.asarray(cost, np.float64).reshape(-1)

        def partial(index):
            x, y = truth[index], prediction[index]
            rc = stats.rankdata(cost[index], axis=1)
            residual = [_residual_rows(stats.rankdata(v, axis=1), rc) for v in (x, y)]
            value = _pearson_rows(*residual, tol=1e-12)
            return np.where(constant(x) | constant(y), np.nan, value)
        out["partial_spearman"] = partial
    if bins is not None:
        bins = np.asarray(bins).reshape(-1)

        def within(index):
            gx, gy = gathered(index)
            member_bins = bins[index]
            total = np.zeros(len(index))
            weight = np.zeros(len(index))
            for b in np.unique(bins):
                member = member_bins == b
                mask = member[:, :, None] & member[:, None, :]
                tau = _tau_b(gx, gy, mask)
                count = member.sum(axis=1)
                ok = np.isfinite(tau) & (count >= 2)
                pairs = count * (count - 1) / 2.0
                total += np.where(ok, tau * pairs, 0.0)
                weight += np.where(ok, pairs, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(weight > 0, total / weight, np.nan)
        out["within_bin_kendall"] = within
    return out


PERMUTATION_STATISTICS = ("partial_spearman", "within_bin_kendall")


def within_bin_permutation_p(truth, prediction, bins, *, statistic: str, cost=None,
                             num_permutations: int = 2000, seed: int = 0) -> float:
    """One-sided p-value of `statistic` ('partial_spearman' given `cost`, or
    'within_bin_kendall') under the null that the prediction carries no information beyond
    cost: the prediction is shuffled WITHIN cost bins (groups of near-equal cost, so its
    relation to cost is kept and only its order among equal-cost networks is destroyed).
    p = (1 + #{permuted >= observed}) / (1 + #permutations); a permutation whose statistic is
    undefined counts as not exceeding. NaN if the observed statistic is undefined.

    Why beside the bootstrap: a percentile bootstrap interval of a correlation is too narrow
    on a few dozen networks (resamples repeat networks, which manufactures ties and agreement);
    a permutation test holds its level at any sample size.

    The observed value is the scipy-based function of this module; the permuted values use the
    same formula on permuted ranks, vectorised over permutations (thousands of scipy calls per
    method would take minutes). The two are checked to agree on the identity permutation.
    """
    if statistic not in PERMUTATION_STATISTICS:
        raise ValueError(f"statistic must be one of {PERMUTATION_STATISTICS}, got {statistic!r}")
    truth, prediction = _pair(truth, prediction)
    bins = np.asarray(bins).reshape(-1)
    if bins.shape != truth.shape:
        raise ValueError(f"bins has shape {bins.shape}, expected {truth.shape}")
    if statistic == "partial_spearman":
        if cost is None:
            raise ValueError("statistic 'partial_spearman' needs the cost")
        cost = np.asarray(cost, np.float64).reshape(-1)
        observed = partial_spearman(truth, prediction, cost)
        null = _partial_spearman_of_permutations(truth, prediction, cost)
    else:
        observed = within_bin_tau(truth, prediction, bins)
        null = _within_bin_tau_of_permutations(truth, prediction, bins)
    if not np.isfinite(observed):
        return float("nan")
    identity = null(np.arange(len(truth))[None, :])[0]
    if not np.isclose(identity, observed, rtol=1e-9, atol=1e-9):
        raise RuntimeError(f"vectorised {statistic} {identity} != scipy's {observed}")
    rng = np.random.default_rng(seed)
    order = np.tile(np.arange(len(truth)), (num_permutations, 1))
    for b in np.unique(bins):
        group = np.flatnonzero(bins == b)
        order[:, group] = group[rng.permuted(np.tile(np.arange(len(group)),
                                                     (num_permutations, 1)), axis=1)]
    values = null(order)
    exceed = int(np.sum(np.isfinite(values) & (values >= observed - 1e-12)))
    return float((1 + exceed) / (1 + num_permutations))


def _partial_spearman_of_permutations(truth, prediction, cost):
    """orders [P, n] -> partial_spearman(truth, prediction[order], cost) for each row."""
    rx, ry, rc = (stats.rankdata(v) for v in (truth, prediction, cost))
    design = np.stack([np.ones_like(rc), rc], axis=1)
    hat = design @ np.linalg.pinv(design)
    res_x = rx - hat @ rx

    def null(order: np.ndarray) -> np.ndarray:
        res_y = ry[order] - ry[order] @ hat.T
        norm = np.linalg.norm(res_y, axis=1) * np.linalg.norm(res_x)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = res_y @ res_x / norm
        bad = (np.std(res_y, axis=1) < 1e-12) | (np.std(res_x) < 1e-12)
        return np.where(bad, np.nan, value)
    return null


def _within_bin_tau_of_permutations(truth, prediction, bins):
    """orders [P, n] (permuting within bins) -> within_bin_tau(truth, prediction[order])."""
    parts = []
    for b in np.unique(bins):
        group = np.flatnonzero(bins == b)
        n = len(group)
        if n < 2:
            continue
        st = np.sign(truth[group][:, None] - truth[group][None, :])
        sp = np.sign(prediction[group][:, None] - prediction[group][None, :])
        pairs = n * (n - 1) / 2
        untied_t = pairs - np.sum(np.triu(st == 0, 1))
        untied_p = pairs - np.sum(np.triu(sp == 0, 1))
        if untied_t == 0 or untied_p == 0:
            continue  # undefined in this bin for every permutation (ties are kept)
        position = np.searchsorted(group, np.arange(len(truth)))  # global -> local index
        parts.append((group, st, sp, np.sqrt(untied_t * untied_p), pairs, position))

    def null(order: np.ndarray) -> np.ndarray:
        if not parts:
            return np.full(len(order), np.nan)
        total, weight = np.zeros(len(order)), 0.0
        for group, st, sp, denominator, pairs, position in parts:
            local = position[order[:, group]]  # [P, n_b] local indices
            permuted = sp[local[:, :, None], local[:, None, :]]
            total += 0.5 * np.sum(st[None] * permuted, axis=(1, 2)) / denominator * pairs
            weight += pairs
        return total / weight
    return null


def compare(truth, prediction, *, top_k: int, num_resamples: int = 1000,
            confidence: float = 0.95, seed: int = 0, cost=None, bins=None,
            budgets: Sequence[float] = (), num_permutations: int = 0) -> dict[str, float]:
    """Kendall tau-b, Spearman rho, top-k overlap (and, given `cost` / `bins` / `budgets`,
    partial Spearman given cost, within-bin tau, regret per budget), each with a bootstrap
    interval; with `bins` and `num_permutations` > 0 also the within-bin permutation p-values
    of partial Spearman and within-bin tau (`within_bin_permutation_p`).

    Returns:
      {'kendall', 'kendall_low', 'kendall_high', 'spearman', ..., 'top_k', ..., 'k': top_k,
      'partial_spearman', ..., 'within_bin_kendall', ..., 'regret@<budget>', ...,
      'partial_spearman_p', 'within_bin_kendall_p'}.
    """
    truth, prediction = _pair(truth, prediction)
    k = min(top_k, len(truth))
    statistics: dict[str, tuple[Statistic, tuple]] = {
        "kendall": (kendall_tau, ()), "spearman": (spearman_rho, ()),
        "top_k": (lambda a, b: top_k_overlap(a, b, k), ()),
    }
    if cost is not None:
        statistics["partial_spearman"] = (partial_spearman, (np.asarray(cost, np.float64),))
        for budget in budgets:
            statistics[f"regret@{budget:.6g}"] = (
                lambda a, b, c, budget=budget: regret(a, b, c, budget),
                (np.asarray(cost, np.float64),))
    if bins is not None:
        statistics["within_bin_kendall"] = (within_bin_tau, (np.asarray(bins),))
    vectorised = row_statistics(truth, prediction, cost=cost, bins=bins)
    out: dict[str, float] = {"k": k}
    for name, (statistic, extra) in statistics.items():
        out[name] = statistic(truth, prediction, *extra)
        out[f"{name}_low"], out[f"{name}_high"] = bootstrap_interval(
            truth, prediction, statistic, num_resamples=num_resamples, confidence=confidence,
            seed=seed, extra=extra, rows=vectorised.get(name))
    if bins is not None and num_permutations > 0:
        for name in PERMUTATION_STATISTICS:
            if name == "partial_spearman" and cost is None:
                continue
            out[f"{name}_p"] = within_bin_permutation_p(
                truth, prediction, bins, statistic=name, cost=cost,
                num_permutations=num_permutations, seed=seed)
    return out
