"""The `rate` config section and its checks."""

from __future__ import annotations

from typing import Any

import ml_collections

from dna_jax.models import cpu_conv
from dna_jax.rate.scores import METRIC_FUNCTIONS

METRICS = tuple(METRIC_FUNCTIONS)  # ("mse", "mse_var", "rmse_var", "mae_rel", "cl_loss")
BN_MODES = ("recalibrate", "batch")


def get_default_config() -> ml_collections.ConfigDict:
    """The `rate` config section.

    Fields:
      bn_mode: 'recalibrate' (BN statistics of each candidate from the recalibration batch,
        then evaluation mode; the paper's) or 'batch' (each rating batch normalised by its
        own statistics).
      rank_metric: the metric saved as `score` and used for the top-k: one of `METRICS`.
        Default 'cl_loss' = mean|s - t| / std(t), what the original ranks by.
      num_candidates: 0 rates every candidate of a block; n > 0 rates n distinct candidates
        sampled uniformly without replacement (seeded by `seed` and the block index).
      seed: sampling seed.
      memory_budget_bytes: estimated live activations per device during a walk; stacks and
        op applications are chunked to stay below it.
      rating_batches_per_pass: rating batches carried down the trie together; 0 = as many as
        fit the budget (all, if possible).
      top_k: candidates listed in the JSON summary.
      cost_resolution: image resolution of the child-network costs (0 = the space's).
      log_every_seconds: progress log period.
      max_traces: if > 0, every jitted function asserts it is traced at most this often
        (`chex.assert_max_traces`; tests).
      conv_impl: how convolutions run while rating (`dna_jax.models.cpu_conv`): 'xla'
        (XLA's convolutions), 'taps' (shifted slices and matmuls: same values, several times
        faster on XLA:CPU, whose grouped (depthwise) convolution is dense), or 'auto' ('taps'
        on the CPU backend, 'xla' elsewhere).
      fast_compile: compile with XLA's cheap backend options (several times faster to
        compile, slower to run): for tiny blocks, where compilation dominates (tests).
    """
    return ml_collections.ConfigDict(dict(
        bn_mode="recalibrate",
        rank_metric="cl_loss",
        num_candidates=0,
        seed=0,
        memory_budget_bytes=2 * 1024 ** 3,
        rating_batches_per_pass=0,
        top_k=10,
        cost_resolution=0,
        log_every_seconds=30.0,
        max_traces=0,
        conv_impl="auto",
        fast_compile=False,
    )).lock()


def check_config(config: Any) -> None:
    """Raises ValueError naming the bad field of a `rate` config."""
    if config.bn_mode not in BN_MODES:
        raise ValueError(f"rate.bn_mode must be one of {BN_MODES}, got {config.bn_mode!r}")
    if config.rank_metric not in METRICS:
        raise ValueError(f"rate.rank_metric must be one of {METRICS}, got "
                         f"{config.rank_metric!r}")
    if config.conv_impl not in cpu_conv.CONV_IMPLS:
        raise ValueError(f"rate.conv_impl must be one of {cpu_conv.CONV_IMPLS}, got "
                         f"{config.conv_impl!r}")
    if config.memory_budget_bytes <= 0:
        raise ValueError(f"rate.memory_budget_bytes must be positive, got "
                         f"{config.memory_budget_bytes}")
    for name in ("num_candidates", "rating_batches_per_pass", "max_traces", "top_k",
                 "cost_resolution"):
        if config[name] < 0:
            raise ValueError(f"rate.{name} must be >= 0, got {config[name]}")
    if config.log_every_seconds <= 0:
        raise ValueError(f"rate.log_every_seconds must be positive, got "
                         f"{config.log_every_seconds}")

