"""Rate every candidate of a supernet block: prefix-shared, vmapped, chunked and sharded.

A candidate's rating is its distillation error against the teacher's block output, averaged
over R rating batches (REFERENCE.md section 3). Per rating batch r, with s the student block
output and t the teacher's:

  mse      = mean (s - t)^2                (the training loss)
  mse_var  = mse / var(t)
  rmse_var = sqrt(mse) / var(t)
  mae_rel  = mean |s - t| / mean |t|
  cl_loss  = mean |s - t| / std(t)         (a scale-free L1 error)

and each metric is the mean over the R batches. The original ranks candidates by `cl_loss`
(it makes blocks and cells comparable), so that is the default `rank_metric`; any of the five
can be chosen, and all five are saved.

BatchNorm (`bn_mode`):
  * 'recalibrate' (default, what the paper measured): per candidate, BN statistics are the
    batch statistics of one training-mode forward pass over a fixed recalibration batch;
    the rating batches then run in evaluation mode with those statistics. Variances are
    Flax's (biased); PyTorch's running variance is unbiased, a relative difference of
    1 / (elements per channel - 1), negligible at any real batch size.
  * 'batch': each rating batch is normalised by its own statistics (training-mode BN).

Prefix sharing. The candidates form a trie over layers: a node of level l is a distinct prefix
of l + 1 ops. The evaluator walks the trie depth first; at each level it applies each op once
to the stack of the parent activations that take it (`jax.vmap` of `SupernetBlock.apply_op`
with static layer and op), so no prefix is computed twice and no branch that no candidate
takes is computed. Leaves are reduced to their per-batch errors inside the same jitted call.
In 'recalibrate' mode a first walk over the recalibration batch computes every node's BN
statistics once (training mode, momentum 0, so the stored statistics are exactly the batch's);
the rating walk gathers each node's statistics and applies it in evaluation mode, so a node's
statistics are computed once and reused by all its descendants. A walk carries all rating
batches at once when they fit the memory budget, else groups of them (`passes`).

Memory and sharding. Stacks hold S_l prefixes of level l and every op application A_l rows;
`plan_traversal` picks them (deepest and largest terms first) so that the estimated live
activations of a walk stay under `memory_budget_bytes` per device. The prefix axis of every
stack is sharded over the mesh: each device owns whole subtrees below a `split_level` (the
levels above it are small and computed on every device), so every gather is device-local
(`jax.shard_map`) and no activations cross devices. Every jitted function has fixed shapes:
one compilation per (walk kind, level, op), one per stack packing and one for the root.

Outputs (`rate_blocks`): per block `<block>.npz` (encodings, score, costs, every metric,
per-batch errors) and a `<block>.json` summary (top-k, statistics, throughput, fingerprint), in
the format `dna_jax.rating_table` owns. A block whose summary matches the fingerprint of the run
is skipped, so rating resumes block by block.

Where things are: `config`, `plan` (the trie, device ownership, the memory plan), `scores`
(metrics, fit summary, leaf reductions), `evaluator` (`BlockRater`), `naive` (the reference),
`stage` (teacher block inputs and targets, `rate_blocks`).
"""

from __future__ import annotations

from dna_jax.rate.config import BN_MODES, METRICS, check_config, get_default_config
from dna_jax.rate.evaluator import BlockRater
from dna_jax.rate.naive import naive_errors_function, rate_naive
from dna_jax.rate.plan import (CandidateTrie, LevelShape, TraversalPlan, assign_owners,
                               block_shapes, build_trie, plan_traversal, select_candidates,
                               split_level)
from dna_jax.rate.scores import (TEACHER_ERRORS, LeafReduction, combine_metrics, fit_summary,
                                 teacher_batch_stats, warn_if_unfit)
from dna_jax.rate.stage import rate_blocks, teacher_block_io
# The table format lives in dna_jax.rating_table; these names stay here for ssl.py and other
# callers not yet moved to it.
from dna_jax.rating_table import (BlockRating, block_fit, load_rating, rating_complete,
                                  rating_fingerprint, save_rating, tree_digest)

__all__ = [
    "BN_MODES", "BlockRater", "BlockRating", "CandidateTrie", "LeafReduction", "LevelShape",
    "METRICS", "TEACHER_ERRORS", "TraversalPlan", "assign_owners", "block_fit", "block_shapes",
    "build_trie", "check_config", "combine_metrics", "fit_summary", "get_default_config",
    "load_rating", "naive_errors_function", "plan_traversal", "rate_blocks", "rate_naive",
    "rating_complete", "rating_fingerprint", "save_rating", "select_candidates", "split_level",
    "teacher_batch_stats", "teacher_block_io", "tree_digest", "warn_if_unfit",
]
