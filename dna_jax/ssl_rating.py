"""DNA++ rating without a teacher: every candidate of a block scored by its SSL loss.

First the target network rates every candidate with the prefix-shared evaluator of
`dna_jax.rate`, and the mean of their normalised projections is the ensemble target ("the
population centre"); then the online network rates every candidate by its loss against that
centre, on two fixed views of the rating batches, BatchNorm recalibrated per candidate
(`rate.bn_mode`). Both walks plug a `LeafReduction` into `rate.BlockRater`. The tables have
the DNA layout (`score` = `ssl_loss`, lower is better), so search and export read them
unchanged. During 'sequential' training, `make_block_rater` chooses the path that feeds the
next block.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dna_jax import artifacts
from dna_jax import rate as rate_lib
from dna_jax import rating_table
from dna_jax.models import cpu_conv
from dna_jax.ssl import MLPHead, SelfSupervised, SSLState, cosine_loss, global_pool, normalize
from dna_jax.supernet.paths import block_name

PyTree = Any
SCORE_METRIC = "ssl_loss"


def _pooled_projection(projector: MLPHead, y: jax.Array, params: PyTree) -> jax.Array:
    """Block outputs y [A, G, B, h, w, c] -> projections [A, G, B, D]."""
    return projector.apply({"params": params}, global_pool(y))


def centre_reduction(trainer: SelfSupervised, projector_params: PyTree) -> rate_lib.LeafReduction:
    """Leaf values: the L2-normalised target projections, flattened: [A, G, 2B * D]."""
    projector = trainer.projector

    def fn(y, target, params):
        del target
        z = normalize(_pooled_projection(projector, y, params))
        return z.reshape(*z.shape[:2], -1)

    return rate_lib.LeafReduction(f"ssl_centre_{projector.hidden}_{projector.out}", fn,
                                  projector_params)


def loss_reduction(trainer: SelfSupervised, head_params: PyTree) -> rate_lib.LeafReduction:
    """Leaf values per candidate and rating batch: [ssl_loss, output_std] ([A, G, 2]).

    ssl_loss = mean_b (2 - 2 cos(q(v1), C(v2))) + (2 - 2 cos(q(v2), C(v1))), C the centre
    (the walk's target [G, 2B, D]), normalised like the training target.
    """
    projector, predictor = trainer.projector, trainer.predictor

    def fn(y, centre, params):
        z = _pooled_projection(projector, y, params["projector"])
        q = predictor.apply({"params": params["predictor"]}, z)
        half = centre.shape[1] // 2
        swapped = jnp.concatenate([centre[:, half:], centre[:, :half]], axis=1)
        loss = 2.0 * jnp.mean(cosine_loss(q, swapped[None]), axis=-1)
        u = math.sqrt(z.shape[-1]) * normalize(z)
        std = jnp.mean(jnp.std(u, axis=2), axis=-1)
        return jnp.stack([loss, std], axis=-1)

    return rate_lib.LeafReduction(
        f"ssl_loss_{projector.hidden}_{projector.out}_{predictor.hidden}", fn, head_params)


def rate_ssl_block(trainer: SelfSupervised, k: int, supernet: Mapping[str, PyTree],
                   ssl_variables: Mapping[str, PyTree], views: np.ndarray,
                   recal_views: np.ndarray | None, config: Any,
                   prefix_paths: Sequence[Sequence[int]], encodings: np.ndarray | None = None,
                   mesh: Mesh | None = None) -> rating_table.BlockRating:
    """Rates candidates of block k by their SSL loss against the population centre.

    Args:
      trainer: the SelfSupervised (modules).
      k: the block.
      supernet: online variables {'block<k>': {'params', 'batch_stats'}}.
      ssl_variables: {'online_heads', 'target'} (`SSLState.ssl_variables`).
      views: float [2, R, B, H, W, C] two fixed views of the R rating batches (images).
      recal_views: [2, B_r, H, W, C] views of the recalibration batch ('recalibrate' mode).
      config: a `rate` config (bn_mode, memory budget, conv_impl, fast_compile; its
        rank_metric does not apply: the score is the SSL loss).
      prefix_paths: op indices of the chosen paths of blocks < k (the feeding chain).
      encodings: candidates (default: every candidate of the block).
      mesh: devices (default: all).

    Returns:
      A BlockRating with metrics 'ssl_loss' (the score) and 'output_std'; `batch_mse` holds
      the per-batch SSL loss and `batch_mae` the per-batch output std (noted in `info`).
    """
    name = block_name(k)
    target = ssl_variables["target"]
    paths = [jnp.asarray(p, jnp.int32) for p in prefix_paths]
    feed = jax.jit(cpu_conv.with_tap_convs(
        lambda variables, x: trainer.feed_forward(variables, x, paths), config.conv_impl))

    def block_input(pair):  # [2, B, ...] -> [2B, ...] block input, views on the batch axis
        return np.asarray(feed(target, jnp.concatenate([pair[0], pair[1]], axis=0)))

    inputs = np.stack([block_input(views[:, r]) for r in range(views.shape[1])])
    recal = block_input(recal_views) if recal_views is not None else None
    if encodings is None:
        encodings = rate_lib.select_candidates(trainer.space, k, config.num_candidates,
                                               config.seed)
    block = trainer.blocks[k]
    centre_leaf = centre_reduction(trainer, ssl_variables["target_heads"][name]["projector"])
    target_rater = rate_lib.BlockRater(block, target[name], config, mesh, leaf=centre_leaf)
    num_batches, rows = inputs.shape[:2]
    total = np.zeros((num_batches, rows * trainer.projector.out), np.float64)

    def add(ids, first, values):  # values [n, G, 2B * D] of n distinct candidates
        total[first:first + values.shape[1]] += values.sum(0)

    encodings, _, centre_info = target_rater.evaluate_leaves(
        inputs, np.zeros((num_batches, 1), np.float32), recal, encodings, accumulate=add)
    distinct = len(np.unique(encodings, axis=0))
    centre = (total / distinct).reshape(num_batches, rows, -1).astype(np.float32)
    online_rater = rate_lib.BlockRater(
        block, supernet[name], config, mesh,
        leaf=loss_reduction(trainer, ssl_variables["online_heads"][name]))
    encodings, values, info = online_rater.evaluate_leaves(inputs, centre, recal, encodings)
    metrics = {SCORE_METRIC: values[..., 0].mean(1), "output_std": values[..., 1].mean(1)}
    seconds = info["seconds"] + centre_info["seconds"]
    info = {**info, "score": "ssl loss against the population centre (DNA++)",
            "batch_mse": "per-batch ssl_loss", "batch_mae": "per-batch output_std",
            "centre_seconds": centre_info["seconds"], "seconds": seconds,
            "candidates_per_second": len(encodings) / max(seconds, 1e-9),
            "prefix_paths": [list(map(int, p)) for p in prefix_paths]}
    return rating_table.BlockRating(encodings, values[..., 0], values[..., 1], metrics,
                                SCORE_METRIC, info)


def best_path(rating: rating_table.BlockRating) -> list[int]:
    """Op indices of the lowest-scored candidate."""
    return [int(o) for o in rating.encodings[int(np.argmin(rating.score))]]


def rate_ssl_blocks(trainer: SelfSupervised, supernet: Mapping[str, PyTree],
                    ssl_variables: Mapping[str, PyTree], views: np.ndarray,
                    recal_views: np.ndarray | None, config: Any, out_dir: str,
                    mesh: Mesh | None = None) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """Rates every block in order (block k fed through the best paths of blocks < k) and
    writes DNA's `<block>.npz` / `.json` tables; blocks already rated with the same
    fingerprint are skipped.

    Returns:
      ([(npz path, json path)] per block, the best path of every block).
    """
    rate_lib.check_config(config)
    space = trainer.space
    data_digest = rating_table.tree_digest({"rate": views, "recal": recal_views})
    variables_digest = rating_table.tree_digest({"supernet": supernet, "ssl": ssl_variables})
    paths, chosen = [], []
    for k in range(trainer.num_blocks):
        name = space.blocks[k].name
        prefix = os.path.join(out_dir, name)
        encodings = rate_lib.select_candidates(space, k, config.num_candidates, config.seed)
        fingerprint = rating_table.rating_fingerprint(
            config, space, k, encodings, variables_digest,
            artifacts.config_hash(data_digest, "ssl", chosen))
        paths.append((f"{prefix}.npz", f"{prefix}.json"))
        if rating_table.rating_complete(prefix, fingerprint):
            logging.info("%s: SSL rating exists with the same fingerprint, skipped", name)
            rating = rating_table.load_rating(prefix)
        else:
            rating = rate_ssl_block(trainer, k, supernet, ssl_variables, views, recal_views,
                                    config, chosen, encodings, mesh)
            rating_table.save_rating(prefix, rating, space, k, fingerprint, config.top_k,
                                 config.cost_resolution)
            logging.info("%s: %d candidates rated by SSL loss in %.1f s; best %s = %.4f",
                         name, len(rating), rating.info["seconds"], best_path(rating),
                         float(np.min(rating.score)))
        chosen.append(best_path(rating))
    return paths, chosen



def make_block_rater(views: np.ndarray, recal_views: np.ndarray | None, rate_config: Any,
                     mesh: Mesh | None = None, out_dir: str | None = None
                     ) -> Callable[[SelfSupervised, int, SSLState, list], list[int]]:
    """The `rate_block` of `train_ssl_supernet`: rates block k's candidates by SSL loss
    (`rate_ssl_block`), optionally saves the table under out_dir, returns the best path."""

    def rate_block(trainer, k, state, chosen):
        rating = rate_ssl_block(trainer, k, state.supernet_variables(), state.ssl_variables(),
                                views, recal_views, rate_config, chosen, mesh=mesh)
        if out_dir and jax.process_index() == 0:
            rating_table.save_rating(os.path.join(out_dir, trainer.space.blocks[k].name), rating,
                                 trainer.space, k, top_k=rate_config.top_k,
                                 cost_resolution=rate_config.cost_resolution)
        best = best_path(rating)
        logging.info("block%d: chosen path %s (SSL loss %.4f) feeds block %d", k, best,
                     float(np.min(rating.score)), k + 1)
        return best

    return rate_block
