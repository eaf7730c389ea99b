"""What a rating measures: the five metrics of a block's output against the teacher's, the
fit summary against the constant predictor, and the leaf reduction the evaluator applies.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dna_jax.rating_table import BlockRating

PyTree = Any


# ---- the metrics -----------------------------------------------------------------------------


def teacher_batch_stats(targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per rating batch: var, std and mean |t| of the teacher output t [R, B, ..., C]
    (float64), and `constant_mse`: the mean squared error of the best CONSTANT predictor, the
    per-channel mean of t over all R batches (the baseline a candidate has to beat: a block
    whose best candidate does not is not rated by what it computes)."""
    targets = np.asarray(targets)
    channel_mean = targets.reshape(-1, targets.shape[-1]).mean(0, dtype=np.float64)
    var, std, mean_abs, constant = [], [], [], []
    for t in targets:
        t = np.asarray(t, np.float64)
        var.append(t.var())
        std.append(np.sqrt(var[-1]))
        mean_abs.append(np.abs(t).mean())
        constant.append(np.square(t - channel_mean).mean())
    return {"var": np.asarray(var), "std": np.asarray(std), "mean_abs": np.asarray(mean_abs),
            "constant_mse": np.asarray(constant)}


def fit_summary(mse_var: np.ndarray, constant_mse_var: float) -> dict[str, Any]:
    """How well a block's candidates fit the target, in units of var(target): the best,
    median and worst candidate's mse / var(t) against the constant predictor's (< 1: the
    per-channel mean explains part of the variance). `beats_constant` is False when even the
    best candidate is no better than predicting the per-channel mean."""
    mse_var = np.asarray(mse_var, np.float64)
    return {"best": float(mse_var.min()), "median": float(np.median(mse_var)),
            "worst": float(mse_var.max()), "constant": float(constant_mse_var),
            "beats_constant": bool(mse_var.min() < constant_mse_var)}


# The rank metrics: name -> the per-batch value [N, R] from a candidate's mean squared and
# mean absolute error per rating batch and the target's statistics (teacher_batch_stats).
# A rating stores every one as a column (the mean over the R batches); `rate.rank_metric`
# picks the score. A new metric is one line here.
METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray, Mapping[str, np.ndarray]],
                                     np.ndarray]] = {
    "mse": lambda mse, mae, t: mse,
    "mse_var": lambda mse, mae, t: mse / t["var"],
    "rmse_var": lambda mse, mae, t: np.sqrt(mse) / t["var"],
    "mae_rel": lambda mse, mae, t: mae / t["mean_abs"],
    "cl_loss": lambda mse, mae, t: mae / t["std"],  # what the original ranks by
}


def combine_metrics(batch_mse: np.ndarray, batch_mae: np.ndarray,
                    teacher: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every metric of METRIC_FUNCTIONS from per-batch errors [N, R]: the mean over the R
    batches of the per-batch values."""
    mse, mae = np.asarray(batch_mse, np.float64), np.asarray(batch_mae, np.float64)
    return {name: fn(mse, mae, teacher).mean(1) for name, fn in METRIC_FUNCTIONS.items()}


def batch_errors(student: jax.Array, target: jax.Array) -> jax.Array:
    """student [A, G, B, ...] vs target [G, B, ...] -> [A, G, 2]: (mean sq., mean abs.) error."""
    diff = student.astype(jnp.float32) - target.astype(jnp.float32)[None]
    axes = tuple(range(2, diff.ndim))
    return jnp.stack([jnp.mean(jnp.square(diff), axes), jnp.mean(jnp.abs(diff), axes)], -1)


@dataclasses.dataclass(frozen=True, eq=False)
class LeafReduction:
    """How the evaluator reduces a candidate's block output at a leaf of the trie.

    The default compares the output with the teacher's (`TEACHER_ERRORS`); DNA++
    (`dna_jax.ssl`) plugs in projection heads and a self-supervised loss instead.

    Attributes:
      name: identifies `fn` in the compile cache: two reductions with the same name must
        compute the same function (encode any static setting of `fn` in it).
      fn: `(y [A, G, B, ...] block outputs, target [G, ...] the walk's slice of the rating
        targets, params) -> float32 [A, G, M]`, M values per candidate and rating batch.
      params: a pytree of arrays `fn` reads (replicated on the mesh), e.g. head weights.
    """

    name: str
    fn: Callable[[jax.Array, jax.Array, PyTree], jax.Array]
    params: PyTree = None


TEACHER_ERRORS = LeafReduction("teacher_errors", lambda y, t, params: batch_errors(y, t))


def finish_rating(encodings, batch_mse, batch_mae, targets, rank_metric, info) -> BlockRating:
    stats = teacher_batch_stats(targets)
    metrics = combine_metrics(batch_mse, batch_mae, stats)
    info = {**info, "fit_mse_var": fit_summary(
        metrics["mse_var"], float((stats["constant_mse"] / stats["var"]).mean()))}
    return BlockRating(np.asarray(encodings, np.int32), batch_mse, batch_mae, metrics,
                       rank_metric, info)


def as_batches(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 5:
        raise ValueError(f"{name} must be [R, B, H, W, C] (R batches of B examples), "
                         f"got shape {x.shape}")
    return x


def warn_if_unfit(block_name: str, fit: Mapping[str, Any]) -> bool:
    """Logs a warning naming the block if its best candidate does not beat the constant
    predictor (its scores then measure noise, not what the candidates compute); returns
    whether it warned."""
    if fit["beats_constant"]:
        return False
    logging.warning(
        "%s: the best candidate's mse / var(target) is %.3f, no better than the constant "
        "predictor's %.3f: this block's scores do not say which candidate computes the target "
        "better (too few recalibration images? an undertrained supernet?). Consider "
        "search.unfit_blocks='exclude'.", block_name, fit["best"], fit["constant"])
    return True

