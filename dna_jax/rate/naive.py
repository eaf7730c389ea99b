"""The naive reference: one jitted whole-path forward per candidate, what the prefix-shared
evaluator must equal and the baseline of its benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dna_jax.models import cpu_conv
from dna_jax.models.supernet import SupernetBlock
from dna_jax.rate.config import BN_MODES
from dna_jax.rate.scores import as_batches, batch_errors, finish_rating
from dna_jax.rating_table import BlockRating

PyTree = Any


# ---- the naive reference -------------------------------------------------------------------


def naive_errors_function(block: SupernetBlock, bn_mode: str = "recalibrate",
                          conv_impl: str = "auto") -> Callable:
    """The jitted whole-path forward of one candidate: `(variables, choices [L], x [R, B, ...],
    t [R, B, ...], recal_x [B_r, ...]) -> [R, 2]` (per batch: mean squared, mean abs error)."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    recal_block = block.clone(config=dataclasses.replace(block.config, bn_momentum=0.0))

    @jax.jit
    @functools.partial(cpu_conv.with_tap_convs, impl=conv_impl)
    def errors(variables, choices, x, t, recal_x):
        if bn_mode == "recalibrate":
            _, updates = recal_block.apply(variables, recal_x, choices, True,
                                           mutable=["batch_stats"])
            stats = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
            y = jax.vmap(lambda b: block.apply(stats, b, choices, False))(x)
        else:
            y = jax.vmap(lambda b: block.apply(variables, b, choices, True,
                                               mutable=["batch_stats"])[0])(x)
        return batch_errors(y[None], t)[0]

    return errors


def rate_naive(block: SupernetBlock, variables: PyTree, inputs: Any, targets: Any,
               encodings: np.ndarray, bn_mode: str = "recalibrate", recal_inputs: Any = None,
               rank_metric: str = "cl_loss", conv_impl: str = "auto") -> BlockRating:
    """One jitted whole-path forward per candidate and batch (`SupernetBlock.__call__`).

    The reference the prefix-shared evaluator must equal, and the baseline of its benchmark.
    """
    inputs, targets = as_batches(inputs, "inputs"), as_batches(targets, "targets")
    errors = naive_errors_function(block, bn_mode, conv_impl)
    recal_x = jnp.asarray(recal_inputs if recal_inputs is not None else inputs[0])
    x, t = jnp.asarray(inputs), jnp.asarray(targets)
    out = np.stack([np.asarray(errors(variables, jnp.asarray(row, jnp.int32), x, t, recal_x))
                    for row in np.asarray(encodings)]).astype(np.float64)
    return finish_rating(encodings, out[..., 0], out[..., 1], targets, rank_metric,
                          {"bn_mode": bn_mode, "naive": True})

