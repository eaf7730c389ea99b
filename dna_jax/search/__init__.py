"""Compose per-block ratings into whole networks under budgets.

DNA rates every candidate of every block separately; a network is one candidate per block.
Its score and its costs (params, multiply-adds, table latency) are sums over blocks plus the
fixed parts (stem, fixed blocks, head), so the best network under a budget is a
multiple-choice knapsack. This module solves it:

* `pareto_front`: the exact front of (total score, total cost) over every composition. Each
  block is pruned to its Pareto set and block fronts are merged with min-plus sums (all pairwise
  sums, sort by cost, keep the running-minimum scores). Every front point carries its
  per-block candidate indices, so one merge answers every budget.
* `search`: the exact best (or top-k) network under budgets on one or two costs, each an upper
  bound, a lower bound or both. It is a level-wise branch and bound over blocks whose pruning
  never loses an optimum: dominance between partial networks, feasibility, and lower bounds on
  the remaining score taken from exact suffix fronts, against an incumbent from beam search.
* `beam_search`: width-W beam over blocks, for costs that do not add up (a callable gives the
  cost of whole compositions, e.g. measured latency) or spaces too large to merge exactly. With
  W at least the number of partial networks it is exhaustive, hence exact.
* `original_dna_search`: the original code's nested loops and pruning, to show where it misses.
* `brute_force_search` / `enumerate_compositions`: the reference for small tables.
* `load_space_tables` (`dna_jax.rating_table`) / `space_fixed_costs`: the rating stage's tables
  of a search space, checked against it, and the fixed parts, so results carry whole-network
  costs that equal `dna_jax.costs.network_costs` of the exported child network.

Scores are losses (lower is better). The search minimises an *objective*: the sum of per-block
terms. `combine='sum'` uses the block scores themselves; `combine='product'` minimises the
product of (positive) block scores, which is the same as minimising the sum of their logs, so
the terms are log-scores. `standardize=True` z-scores each block's terms first, so blocks whose
scores have different spreads weigh the same (the original's `norm_mse`; its extra affine map
(z + 2) / 4 does not change the ranking of sums, so it is left out).

Budgets are a mapping from cost name to an upper bound (a number) or an interval
`(low, high)` with `None` for an open side, e.g. `{'macs': 460e6, 'params': (None, 5.5e6)}`.
They are on whole-network costs: the fixed parts, given as `fixed_cost`, are subtracted first.

Where things are: `problem` (budgets, objectives, results), `fronts` (Pareto fronts,
dominance), `exact` (branch and bound, beam search), `reference` (brute force, the original
search, synthetic tables), `plots`; the table format itself is `dna_jax.rating_table`.
"""

from __future__ import annotations

from dna_jax.rating_table import (BlockTable, load_block_table, load_space_tables,
                                  save_block_table, table_path)
from dna_jax.search.exact import beam_search, best_under_budget, search
from dna_jax.search.fronts import ParetoFront, pareto_front
from dna_jax.search.plots import plot_pareto_front, plot_score_histograms
from dna_jax.search.problem import (COMBINES, UNFIT_BLOCKS, BudgetSpec, CostFn, SearchResult,
                                    block_objectives, parse_budget_strings, parse_budgets,
                                    prepare_tables, space_fixed_costs)
from dna_jax.search.reference import (brute_force_search, enumerate_compositions,
                                      original_dna_search, synthetic_block_tables)

__all__ = [
    "BlockTable", "BudgetSpec", "COMBINES", "CostFn", "ParetoFront", "SearchResult",
    "UNFIT_BLOCKS", "beam_search", "best_under_budget", "block_objectives",
    "brute_force_search", "enumerate_compositions", "load_block_table", "load_space_tables",
    "original_dna_search", "parse_budget_strings", "parse_budgets", "pareto_front",
    "plot_pareto_front", "plot_score_histograms", "prepare_tables", "save_block_table",
    "search", "space_fixed_costs", "synthetic_block_tables", "table_path",
]
