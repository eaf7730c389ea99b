"""Rank correlation statistics for ranking fidelity: Kendall tau-b, Spearman rho, top-k overlap,
and percentile bootstrap confidence intervals over resampled architectures (numpy only).

Convention: every function compares a TRUTH (stand-alone accuracy, higher = better) with a
PREDICTION oriented the same way (higher = predicted better). A loss-like rating (the DNA
score, lower = better) must be negated before it is passed in.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"need two equally long 1-D arrays, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("rank statistics need finite values")
    return x, y


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either variable corrected); NaN if one side is constant.

    tau_b = (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)) over all pairs,
    the same as scipy.stats.kendalltau's default. O(n^2) memory: for n up to a few thousand.
    """
    x, y = _pair(x, y)
    upper = np.triu_indices(len(x), k=1)
    sx = np.sign(x[:, None] - x[None, :])[upper]
    sy = np.sign(y[:, None] - y[None, :])[upper]
    denominator = np.sqrt(float(np.count_nonzero(sx)) * float(np.count_nonzero(sy)))
    if denominator == 0.0:
        return float("nan")
    return float(np.sum(sx * sy) / denominator)


def average_ranks(x) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy's 'average')."""
    x = np.asarray(x, np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        stop = start + 1
        while stop < len(x) and sorted_x[stop] == sorted_x[start]:
            stop += 1
        ranks[order[start:stop]] = 0.5 * (start + stop - 1) + 1.0
        start = stop
    return ranks


def spearman_rho(x, y) -> float:
    """Spearman's rho: Pearson correlation of average ranks; NaN if one side is constant."""
    x, y = _pair(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
    if denominator == 0.0:
        return float("nan")
    return float(np.sum(rx * ry) / denominator)


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


Statistic = Callable[[np.ndarray, np.ndarray], float]


def bootstrap_interval(truth, prediction, statistic: Statistic, *, num_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(truth, prediction)`.

    Resamples the architectures (pairs) with replacement; resamples where the statistic is
    undefined (NaN, e.g. every value tied) are dropped. Deterministic for a given seed.

    Returns:
      (low, high); (nan, nan) if no resample gave a value.
    """
    truth, prediction = _pair(truth, prediction)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    n = len(truth)
    values = []
    for _ in range(num_resamples):
        index = rng.integers(0, n, size=n)
        value = statistic(truth[index], prediction[index])
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values), [alpha, 1.0 - alpha])
    return float(low), float(high)


def compare(truth, prediction, *, top_k: int, num_resamples: int = 1000,
            confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Kendall tau-b, Spearman rho and top-k overlap with bootstrap intervals.

    Returns:
      {'kendall', 'kendall_low', 'kendall_high', 'spearman', ..., 'top_k', ...,
      'k': top_k}; the intervals share the resampled indices across the statistics only
      through the seed (each statistic gets its own draw from the same seed).
    """
    truth, prediction = _pair(truth, prediction)
    k = min(top_k, len(truth))
    statistics: dict[str, Statistic] = {
        "kendall": kendall_tau, "spearman": spearman_rho,
        "top_k": lambda a, b: top_k_overlap(a, b, k),
    }
    out: dict[str, float] = {"k": k}
    for name, statistic in statistics.items():
        out[name] = statistic(truth, prediction)
        out[f"{name}_low"], out[f"{name}_high"] = bootstrap_interval(
            truth, prediction, statistic, num_resamples=num_resamples, confidence=confidence,
            seed=seed)
    return out
