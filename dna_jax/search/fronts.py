"""Exact Pareto fronts of (total objective, total cost) and the dominance filters under them.

A block is pruned to its Pareto set and block fronts are merged with min-plus sums (all
pairwise sums, sort by cost, keep the running-minimum objectives), `MAX_PAIRS` at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from dna_jax.rating_table import BlockTable, format_cost
from dna_jax.search.problem import (MAX_PAIRS, REL_TOL, Problem, SearchResult, make_problem,
                                    make_result)


# ---- dominance ---------------------------------------------------------------------------------

def front_indices(cost: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Indices of the 2-D Pareto set (min cost, min obj), sorted by increasing cost.

    Of equal points the first is kept; the rest count as dominated.
    """
    order = np.argsort(cost)  # introsort: ~10x faster than lexsort; ties are fixed below
    kept = np.nonzero(_first_layer_min(obj[order]))[0]
    # Within a run of equal costs the kept objectives decrease, so the last one is the best.
    sorted_cost = cost[order[kept]]
    last_of_run = np.r_[sorted_cost[1:] != sorted_cost[:-1], True]
    return order[kept[last_of_run]]


def _first_layer_2d(ranks: np.ndarray) -> np.ndarray:
    """Keep-mask of a pre-sorted 2-D sequence: kept iff its value beats every earlier one.

    `ranks` are int64 codes where larger is better and earlier groups always code lower.
    """
    best_before = np.empty_like(ranks)
    best_before[0] = np.iinfo(np.int64).min
    np.maximum.accumulate(ranks[:-1], out=best_before[1:])
    return ranks > best_before


def _first_layer_3d(second: np.ndarray, obj: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Keep-mask of the 3-D Pareto set of a sequence sorted by its first cost.

    A point is dropped iff an earlier point has second' <= second and obj' <= obj (of points
    equal in the first cost a dominated one may survive when it comes first). Chunks
    are tested against the 2-D staircase (second, obj) of all kept points so far, then the
    survivors of a chunk against each other.
    """
    n = second.shape[0]
    keep = np.zeros(n, bool)
    stair_second = np.empty(0)
    stair_obj = np.empty(0)
    for start in range(0, n, chunk):
        sec, ob = second[start:start + chunk], obj[start:start + chunk]
        if stair_second.size:
            pos = np.searchsorted(stair_second, sec, side="right") - 1
            best = np.where(pos >= 0, stair_obj[np.maximum(pos, 0)], np.inf)
            cand = np.nonzero(ob < best)[0]
        else:
            cand = np.arange(sec.shape[0])
        if not cand.size:
            continue
        cs, co = sec[cand], ob[cand]
        if cand.size <= 2048:
            earlier = np.tri(cand.size, k=-1, dtype=bool)
            dominated = (earlier & (cs[None, :] <= cs[:, None]) & (co[None, :] <= co[:, None]))
            ok = ~dominated.any(axis=1)
        else:
            ok = _first_layer_3d(cs, co, chunk=1024)
        kept = cand[ok]
        keep[start + kept] = True
        merged_second = np.concatenate([stair_second, sec[kept]])
        merged_obj = np.concatenate([stair_obj, ob[kept]])
        front = front_indices(merged_second, merged_obj)
        stair_second, stair_obj = merged_second[front], merged_obj[front]
    return keep


def dominance_keep(obj: np.ndarray, cost: np.ndarray, low: np.ndarray, high: np.ndarray,
                    k: int) -> np.ndarray | None:
    """Indices of the points in the first `k` non-dominated layers, or None if unsupported.

    Dominance respects the budgets' shape: for a cost with only an upper bound less is
    better, with only a lower bound more is better, with both only equal costs compare
    (anything else could push a completion out of the interval). A point in layer > k is
    weakly dominated by k distinct points, so dropping it never changes the top-k of any
    completion; that is what makes the pruning exact.
    """
    n = obj.shape[0]
    if n <= k:
        return np.arange(n)
    one_sided, two_sided = [], []
    for j in range(cost.shape[1]):
        lo_open, hi_open = not np.isfinite(low[j]), not np.isfinite(high[j])
        if lo_open and hi_open:
            continue
        if lo_open:
            one_sided.append(cost[:, j])
        elif hi_open:
            one_sided.append(-cost[:, j])
        else:
            two_sided.append(cost[:, j])
    if len(one_sided) > 2 or (len(one_sided) == 2 and two_sided):
        return None
    # Sorting by the first cost alone (ties in any order) can only keep a few extra points:
    # a dropped point always has an earlier point that weakly dominates it.
    if len(one_sided) == 2:
        order = np.argsort(one_sided[0])
        second, sorted_obj = one_sided[1][order], obj[order]
        return order[_peel(n, k, lambda idx: _first_layer_3d(second[idx], sorted_obj[idx]))]
    if not two_sided:  # plain 2-D: running minimum of the objective along increasing cost
        order = np.argsort(one_sided[0])
        sorted_obj = obj[order]
        return order[_peel(n, k, lambda idx: _first_layer_min(sorted_obj[idx]))]
    group = _group_ids(two_sided)
    order = np.lexsort((obj,) + tuple(one_sided) + (group,))
    group = group[order]
    if not one_sided:  # only equal costs compare: the k best of each group
        starts = np.r_[True, group[1:] != group[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        return order[(np.arange(n) - first) < k]
    _, obj_rank = np.unique(obj[order], return_inverse=True)
    levels = int(obj_rank.max()) + 1
    # Larger code = better; a later group always codes higher than any earlier group, so one
    # running maximum over the whole sequence acts as a running maximum within each group.
    codes = group * levels + (levels - 1 - obj_rank.ravel().astype(np.int64))
    return order[_peel(n, k, lambda idx: _first_layer_2d(codes[idx]))]


def _group_ids(columns: Sequence[np.ndarray]) -> np.ndarray:
    """int64 ids, equal exactly where every column is equal."""
    group = np.zeros(columns[0].shape[0], np.int64)
    for column in columns:
        _, inverse = np.unique(column, return_inverse=True)
        group = group * (int(inverse.max()) + 1) + inverse.ravel()
    if len(columns) > 1:
        _, group = np.unique(group, return_inverse=True)
    return group.ravel().astype(np.int64)


def _first_layer_min(sorted_obj: np.ndarray) -> np.ndarray:
    """Keep-mask of a sequence sorted by (cost, obj): kept iff it beats every earlier obj."""
    best_before = np.empty_like(sorted_obj)
    best_before[0] = np.inf
    np.minimum.accumulate(sorted_obj[:-1], out=best_before[1:])
    return sorted_obj < best_before


def _peel(n: int, k: int, first_layer: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Mask of the first k non-dominated layers; `first_layer(idx)` masks one layer of idx."""
    keep = np.zeros(n, bool)
    remaining = np.arange(n)
    for _ in range(k):
        if not remaining.size:
            break
        layer = first_layer(remaining)
        keep[remaining[layer]] = True
        remaining = remaining[~layer]
    return keep


# ---- exact Pareto front ------------------------------------------------------------------------

def merge_fronts(cost_a: np.ndarray, obj_a: np.ndarray, cost_b: np.ndarray, obj_b: np.ndarray,
                  cap: float = np.inf):
    """Front of the min-plus sum of two fronts (all pairwise sums, then Pareto pruning).

    Returns (cost, obj, index into a, index into b); pairs above `cap` are dropped. Pairs are
    materialised in chunks of rows of `a` to bound memory; each chunk is pruned on its own,
    and the union of chunk fronts pruned again (the front of a union is the front of the
    union of fronts).
    """
    nb = cost_b.shape[0]
    rows = max(1, MAX_PAIRS // nb)
    parts = []
    for start in range(0, cost_a.shape[0], rows):
        cost = (cost_a[start:start + rows, None] + cost_b[None, :]).ravel()
        obj = (obj_a[start:start + rows, None] + obj_b[None, :]).ravel()
        flat = np.arange(cost.shape[0]) if np.isinf(cap) else np.nonzero(cost <= cap)[0]
        keep = flat[front_indices(cost[flat], obj[flat])] if flat.size else flat
        parts.append((cost[keep], obj[keep], start + keep // nb, keep % nb))
    cost, obj, ia, ib = (np.concatenate(p) for p in zip(*parts))
    if len(parts) > 1 and cost.size:
        keep = front_indices(cost, obj)
        cost, obj, ia, ib = cost[keep], obj[keep], ia[keep], ib[keep]
    return cost, obj, ia, ib


@dataclasses.dataclass(frozen=True, eq=False)
class ParetoFront:
    """The exact front of (objective, cost) over every composition of the blocks.

    Attributes:
      cost_name: the cost on the front's axis.
      cost: [M] whole-network cost (fixed part included), strictly increasing.
      objective: [M] best objective at that cost, strictly decreasing.
      indices: [M, B] the per-block candidate rows of each front point.
    """

    cost_name: str
    cost: np.ndarray
    objective: np.ndarray
    indices: np.ndarray
    problem: Problem = dataclasses.field(repr=False)

    def __len__(self) -> int:
        return int(self.cost.shape[0])

    @property
    def score(self) -> np.ndarray:
        """The combined score of each point: the objective, or exp(objective) for product."""
        if self.problem.combine == "product":
            return np.exp(self.objective)
        return self.objective

    @property
    def score_label(self) -> str:
        if self.problem.standardize:
            return "sum of standardised block scores"
        return "product of block scores" if self.problem.combine == "product" else \
            "sum of block scores"

    def result(self, i: int) -> SearchResult:
        return make_result(self.problem, self.indices[i], "pareto_front")

    def best_index(self, budget: float) -> int:
        """Index of the best point with cost <= budget (exact for an upper budget)."""
        i = int(np.searchsorted(self.cost, budget, side="right")) - 1
        if i < 0:
            raise ValueError(f"no architecture meets {self.cost_name} <= "
                             f"{format_cost(budget)}: the cheapest possible {self.cost_name} is "
                             f"{format_cost(self.cost[0])}")
        return i

    def best_under(self, budget: float) -> SearchResult:
        """The best network with cost <= budget."""
        return self.result(self.best_index(budget))


def pareto_front(tables: Sequence[BlockTable], cost: str = "macs", *,
                 fixed_cost: float | Mapping[str, float] = 0.0, combine: str = "sum",
                 standardize: bool = False, max_cost: float | None = None) -> ParetoFront:
    """The exact Pareto front of (objective, whole-network cost) over all compositions.

    Args:
      tables: one table per searched block, in network order.
      cost: the cost name on the front's axis.
      fixed_cost: cost of the fixed parts (a number, or a dict per cost name).
      combine, standardize: see `block_objectives`.
      max_cost: drop points above this whole-network cost (faster when only budgets below
        it matter).

    Returns:
      The front, sorted by increasing cost and strictly decreasing objective.
    """
    budgets = {cost: np.inf if max_cost is None else max_cost}
    problem = make_problem(tables, budgets, fixed_cost, combine, standardize)
    front_cost, front_obj, indices = additive_front(problem, 0, problem.high[0])
    fixed = problem.fixed.get(cost, 0.0)
    return ParetoFront(cost, front_cost + fixed, front_obj, indices, problem)


def additive_front(problem: Problem, column: int, cap: float):
    """Front over all blocks of one cost column, merged in block order, up to `cap`.

    Intermediate fronts are capped at `cap` minus the cheapest rest (with rounding slack);
    the last merge uses `cap` exactly, on the same left-to-right sums as brute force.
    """
    costs = [c[:, column] for c in problem.costs]
    mins = [float(c.min()) for c in costs]
    nb = problem.num_blocks
    cost, obj, idx = np.zeros(1), np.zeros(1), np.zeros((1, 0), np.int64)
    for b in range(nb):
        rows = front_indices(costs[b], problem.objs[b])
        level_cap = cap
        if b < nb - 1 and np.isfinite(cap):
            level_cap = cap - sum(mins[b + 1:])
            level_cap += REL_TOL * max(1.0, abs(cap))
        cost, obj, ia, ib = merge_fronts(cost, obj, costs[b][rows], problem.objs[b][rows],
                                          level_cap)
        idx = np.concatenate([idx[ia], rows[ib][:, None]], axis=1)
    return cost, obj, idx

