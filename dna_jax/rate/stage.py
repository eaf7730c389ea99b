"""The rate stage: the teacher's block inputs and targets, then every block rated and its
table written (`dna_jax.rating_table`), block by block, resumable.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dna_jax import rating_table
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.supernet import SupernetBlock
from dna_jax.rate.config import check_config
from dna_jax.rate.evaluator import BlockRater
from dna_jax.rate.plan import select_candidates
from dna_jax.rate.scores import as_batches, warn_if_unfit
from dna_jax.space import SearchSpace

PyTree = Any


# ---- teacher features ------------------------------------------------------------------------


def teacher_block_io(teacher: EfficientNet, teacher_variables: PyTree, space: SearchSpace,
                     images: Any, block_indices: Sequence[int] | None = None
                     ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Inputs and targets of blocks from the frozen teacher (inference-mode BN).

    Args:
      teacher: the teacher network (`forward_stages` gives its stage outputs).
      teacher_variables: its variables.
      space: the search space (each block names its `teacher_stage`).
      images: [R, B, H, W, C] (R batches) or [B, H, W, C] (one batch).
      block_indices: blocks wanted (default: all).

    Returns:
      block index -> (input, target) as numpy, batch axes as in `images`: the input is the
      image for block 0 and the teacher's stage `teacher_stage - 1` output otherwise; the target
      is the output of stage `teacher_stage`.
    """
    images = np.asarray(images)
    single = images.ndim == 4
    batches = images[None] if single else images
    block_indices = list(range(len(space.blocks))) if block_indices is None else block_indices
    stop = max(space.blocks[k].teacher_stage for k in block_indices) + 1
    forward = jax.jit(lambda v, x: teacher.apply(v, x, 0, stop, False,
                                                 method=EfficientNet.forward_stages))
    features = [jax.device_get(forward(teacher_variables, jnp.asarray(x))) for x in batches]
    result = {}
    for k in block_indices:
        stage = space.blocks[k].teacher_stage
        inputs = batches if k == 0 else np.stack([f[f"stage{stage - 1}"] for f in features])
        targets = np.stack([f[f"stage{stage}"] for f in features]).astype(np.float32)
        result[k] = (inputs[0], targets[0]) if single else (inputs, targets)
    return result


def rate_blocks(space: SearchSpace, blocks: Sequence[SupernetBlock],
                variables: Mapping[str, PyTree], teacher: EfficientNet,
                teacher_variables: PyTree, rating_images: Any, recal_images: Any,
                config: Any, out_dir: str, block_indices: Sequence[int] | None = None,
                mesh: Mesh | None = None) -> list[tuple[str, str]]:
    """Rates the candidates of every block (or `block_indices`) and writes their files.

    Args:
      space: the search space.
      blocks: the supernet blocks (`build_supernet_blocks`).
      variables: supernet variables {'block<k>': {'params', 'batch_stats'}}.
      teacher, teacher_variables: the frozen teacher (block inputs and targets).
      rating_images: [R, B, H, W, C] the rating batches (the original: validation batches).
      recal_images: [B_r, H, W, C] the recalibration batch (the original: the first training
        batch); unused in 'batch' mode.
      config: a `rate` config.
      out_dir: where `<block name>.npz` / `.json` go.
      block_indices: blocks to rate (default: all).
      mesh: devices to shard the prefixes over (default: all).

    Returns:
      [(npz path, json path)] per rated block, in order. Blocks whose files already hold a
      rating with the same fingerprint are skipped.
    """
    check_config(config)
    rating_images = as_batches(rating_images, "rating_images")
    recal_images = np.asarray(recal_images) if config.bn_mode == "recalibrate" else None
    data_digest = rating_table.tree_digest({"rate": rating_images, "recal": recal_images})
    block_indices = list(range(len(space.blocks))) if block_indices is None else block_indices
    paths, io = [], None
    for position, k in enumerate(block_indices):
        name = space.blocks[k].name
        prefix = os.path.join(out_dir, name)
        encodings = select_candidates(space, k, config.num_candidates, config.seed)
        fingerprint = rating_table.rating_fingerprint(
            config, space, k, encodings, rating_table.tree_digest(variables[name]), data_digest)
        paths.append((f"{prefix}.npz", f"{prefix}.json"))
        if rating_table.rating_complete(prefix, fingerprint):
            logging.info("%s: rating exists with the same fingerprint, skipped", name)
            continue
        if io is None:  # the teacher runs once, for every block still to rate
            todo = list(block_indices[position:])
            io = teacher_block_io(teacher, teacher_variables, space, rating_images, todo)
            recal_io = (teacher_block_io(teacher, teacher_variables, space, recal_images, todo)
                        if recal_images is not None else None)
        inputs, targets = io[k]
        rater = BlockRater(blocks[k], variables[name], config, mesh)
        rating = rater.rate(inputs, targets, recal_io[k][0] if recal_io else None, encodings)
        rating_table.save_rating(prefix, rating, space, k, fingerprint, config.top_k,
                                 config.cost_resolution)
        warn_if_unfit(name, rating.info["fit_mse_var"])
        best = int(np.argmin(rating.score))
        logging.info("%s: %d candidates in %.1f s (%.1f/s); best %s %s = %.4f", name,
                     len(rating), rating.info["seconds"], rating.info["candidates_per_second"],
                     rating.encodings[best].tolist(), rating.rank_metric, rating.score[best])
    return paths
