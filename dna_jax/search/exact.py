"""The level-wise search over blocks: exact branch and bound (`search`) and `beam_search`.

Both keep partial networks level by level; exactness comes from pruning only what cannot be
an optimum: dominance between partial networks, feasibility, and lower bounds on the remaining
objective from exact suffix fronts, against an incumbent from a narrow beam.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from dna_jax.rating_table import BlockTable, format_cost
from dna_jax.search.fronts import additive_front, dominance_keep, front_indices, merge_fronts
from dna_jax.search.problem import (MAX_PAIRS, REL_TOL, BudgetSpec, CostFn, Problem,
                                    SearchResult, make_problem, make_result, parse_budgets,
                                    raise_unmet)


# ---- bounds from suffix fronts -----------------------------------------------------------------

@dataclasses.dataclass
class _Bounds:
    """For each level d (blocks < d chosen): what the remaining blocks can still reach."""

    min_cost: np.ndarray        # [B+1, m] cheapest suffix
    max_cost: np.ndarray        # [B+1, m] dearest suffix
    min_obj: np.ndarray         # [B+1] best suffix objective, ignoring budgets
    fronts: list[list[tuple[int, float, np.ndarray, np.ndarray]]]  # per level: (j, sign, c, o)

    def lower_bound(self, level: int, partial_obj: np.ndarray, partial_cost: np.ndarray,
                    problem: Problem, limit: float = np.inf,
                    cost_for_low: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact lower bounds of the best completions' objectives, for those within `limit`.

        Each budget alone bounds the suffix: the suffix front gives the best suffix objective
        with cost <= what the budget leaves (or >= for a lower bound); the max over budgets
        and the unconstrained best is still a lower bound (inf: no feasible completion).
        Rows are dropped as soon as one bound passes `limit`, so later lookups run on fewer.
        `cost_for_low`, if given, replaces `partial_cost` in the lower-budget lookups.

        Returns:
          (rows kept, their lower bounds).
        """
        rows = np.arange(partial_obj.shape[0])
        key = partial_obj + self.min_obj[level]
        tol = problem.tolerance
        for j, sign, front_cost, front_obj in self.fronts[level]:
            good = key <= limit
            rows, key = rows[good], key[good]
            if sign > 0:
                left = problem.high[j] + tol[j] - partial_cost[rows, j]
            else:
                low_cost = partial_cost if cost_for_low is None else cost_for_low
                left = low_cost[rows, j] - problem.low[j] + tol[j]
            pos = np.searchsorted(front_cost, left, side="right") - 1
            value = np.where(pos >= 0, front_obj[np.maximum(pos, 0)], np.inf)
            key = np.maximum(key, partial_obj[rows] + value)
        good = key <= limit
        return rows[good], key[good]

    def feasible(self, level: int, partial_cost: np.ndarray, problem: Problem) -> np.ndarray:
        """Mask of partial networks some completion of which can meet every budget."""
        ok = np.ones(partial_cost.shape[0], bool)
        for j in range(partial_cost.shape[1]):
            if np.isfinite(problem.high[j]):
                ok &= partial_cost[:, j] <= problem.high[j] + problem.tolerance[j] - \
                    self.min_cost[level, j]
            if np.isfinite(problem.low[j]):
                ok &= partial_cost[:, j] >= problem.low[j] - problem.tolerance[j] - \
                    self.max_cost[level, j]
        return ok


def _suffix_bounds(problem: Problem) -> _Bounds:
    """Suffix sums of cheapest/dearest costs and exact suffix fronts per bounded cost."""
    nb, m = problem.num_blocks, len(problem.names)
    min_cost, max_cost, min_obj = np.zeros((nb + 1, m)), np.zeros((nb + 1, m)), np.zeros(nb + 1)
    for d in range(nb - 1, -1, -1):
        min_cost[d] = min_cost[d + 1] + problem.costs[d].min(axis=0)
        max_cost[d] = max_cost[d + 1] + problem.costs[d].max(axis=0)
        min_obj[d] = min_obj[d + 1] + problem.objs[d].min()
    fronts: list[list] = [[] for _ in range(nb + 1)]
    for j in range(m):
        for sign, limit in ((1.0, problem.high[j]), (-1.0, -problem.low[j])):
            if not np.isfinite(limit):
                continue
            # Suffix d only ever needs costs up to the budget minus the cheapest prefix.
            prefix_min = np.concatenate([[0.0], np.cumsum(
                [(sign * c[:, j]).min() for c in problem.costs])])
            cost, obj = np.zeros(1), np.zeros(1)
            for d in range(nb - 1, -1, -1):
                block_cost = sign * problem.costs[d][:, j]
                rows = front_indices(block_cost, problem.objs[d])
                cap = limit - prefix_min[d]
                cap += REL_TOL * max(1.0, abs(cap))
                cost, obj, _, _ = merge_fronts(block_cost[rows], problem.objs[d][rows],
                                                cost, obj, cap)
                fronts[d].append((j, sign, cost, obj))
    return _Bounds(min_cost, max_cost, min_obj, fronts)


# ---- level-wise search (shared by beam search and exact search) --------------------------------

@dataclasses.dataclass
class _States:
    """Partial networks: blocks < level chosen."""

    obj: np.ndarray      # [n]
    cost: np.ndarray     # [n, m]
    choice: np.ndarray   # [n, level]


@dataclasses.dataclass
class _CostFns:
    """Whole-network cost callables with their bounds (beam search only)."""

    names: tuple[str, ...]
    fns: tuple[CostFn, ...]
    low: np.ndarray
    high: np.ndarray
    filler: np.ndarray           # [B] candidate used to complete partial networks
    prune_partial: bool

    def values(self, choice: np.ndarray) -> np.ndarray:
        out = np.empty((choice.shape[0], len(self.fns)))
        for i, fn in enumerate(self.fns):
            out[:, i] = np.asarray(fn(choice), np.float64).reshape(-1)
        return out


def _block_candidates(problem: Problem, bounds: _Bounds, b: int, k: int,
                      dominance: bool) -> np.ndarray:
    """Rows of block b worth trying: feasible alone, and not dominated k times if allowed."""
    cost = problem.costs[b]
    others_min = bounds.min_cost[0] - cost.min(axis=0)
    others_max = bounds.max_cost[0] - cost.max(axis=0)
    tol = problem.tolerance
    ok = ((cost + others_min <= problem.high + tol) &
          (cost + others_max >= problem.low - tol)).all(axis=1)
    rows = np.nonzero(ok)[0]
    if dominance and rows.size:
        keep = dominance_keep(problem.objs[b][rows], cost[rows], problem.low, problem.high, k)
        if keep is not None:
            rows = rows[np.sort(keep)]
    return rows


def _level_search(problem: Problem, bounds: _Bounds, k: int, *, width: int | None,
                  upper_bound: float = np.inf, cost_fns: _CostFns | None = None,
                  max_states: int | None = None) -> _States:
    """Expands blocks one by one, pruning what cannot be (or, with a width, rank) in the top k.

    Exact when width is None: infeasible partials, partials whose lower bound exceeds
    `upper_bound` (the k-th best known objective) and partials dominated k times are the only
    ones dropped. With a width, only the `width` best by lower bound survive each level.
    Each block's candidates are sorted by objective, so a state only pairs with the prefix of
    candidates that can still beat `upper_bound` (a ragged expansion, never all pairs).
    Returns the complete networks that meet every budget, best first.
    """
    nb = problem.num_blocks
    dominance = cost_fns is None
    m = len(problem.names)
    states = _States(np.zeros(1), np.zeros((1, m)), np.zeros((1, 0), np.int64))
    slack = REL_TOL * max(1.0, abs(upper_bound)) * nb if np.isfinite(upper_bound) else 0.0
    for d in range(nb):
        rows = _block_candidates(problem, bounds, d, k, dominance)
        if not rows.size or not states.obj.size:
            return _States(np.zeros(0), np.zeros((0, m)), np.zeros((0, nb), np.int64))
        rows, first, counts = _candidate_windows(problem, bounds, states, rows, d,
                                                 upper_bound + slack)
        block_obj, block_cost = problem.objs[d][rows], problem.costs[d][rows]
        parts = []
        for lo, hi in _chunks(counts, MAX_PAIRS):
            part_counts = counts[lo:hi]
            parent = lo + np.repeat(np.arange(hi - lo), part_counts)
            if not parent.size:
                continue
            offsets = np.cumsum(part_counts) - part_counts
            cand = np.arange(parent.size) - np.repeat(offsets - first[lo:hi], part_counts)
            obj = states.obj[parent] + block_obj[cand]
            cost = states.cost[parent] + block_cost[cand]
            sel = np.nonzero(bounds.feasible(d + 1, cost, problem))[0]
            kept, key = bounds.lower_bound(d + 1, obj[sel], cost[sel], problem,
                                           upper_bound + slack)
            sel = sel[kept]
            if cost_fns is not None and sel.size:
                good = _cost_fns_ok(cost_fns, states.choice[parent[sel]], rows[cand[sel]], d, nb)
                sel, key = sel[good], key[good]
            parts.append(_reduce(obj[sel], cost[sel], key, parent[sel], cand[sel],
                                 problem, k, width, dominance))
        if not parts:
            return _States(np.zeros(0), np.zeros((0, m)), np.zeros((0, nb), np.int64))
        obj, cost, key, parent, cand = (np.concatenate(p) for p in zip(*parts))
        if len(parts) > 1:
            obj, cost, key, parent, cand = _reduce(obj, cost, key, parent, cand, problem, k,
                                                   width, dominance)
        if max_states is not None and obj.shape[0] > max_states:
            raise RuntimeError(
                f"exact search kept {obj.shape[0]:,} partial networks after block {d} "
                f"(max_states={max_states:,}); raise max_states or use beam_search")
        choice = np.concatenate([states.choice[parent], rows[cand][:, None]], axis=1)
        states = _States(obj, cost, choice)
    # Final check on the exact left-to-right sums (the pruning above allowed rounding slack).
    ok = ((states.cost <= problem.high) & (states.cost >= problem.low)).all(axis=1)
    final = _States(states.obj[ok], states.cost[ok], states.choice[ok])
    order = np.lexsort(tuple(final.choice.T[::-1]) + (final.obj,))
    return _States(final.obj[order], final.cost[order], final.choice[order])


def _candidate_windows(problem: Problem, bounds: _Bounds, states: _States, rows: np.ndarray,
                       d: int, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orders block d's candidates and gives each state the window of them worth pairing.

    Candidates are sorted by the first upper-bounded cost (else by objective). A candidate
    past the state's remaining budget on that cost cannot be feasible (window end); one
    before the first candidate whose running-minimum objective fits under `limit` cannot be
    within the bound (window start). The objective limit per state subtracts a lower bound
    of the rest taken with block d's cheapest cost (its most generous case).

    Returns:
      (ordered rows, window start per state, window length per state).
    """
    objs, costs = problem.objs[d][rows], problem.costs[d][rows]
    n = states.obj.shape[0]
    upper = [j for j in range(len(problem.names)) if np.isfinite(problem.high[j])]
    rest = np.full(n, bounds.min_obj[d + 1])
    if np.isfinite(limit):
        rest = np.maximum(rest, bounds.lower_bound(
            d + 1, np.zeros(n), states.cost + costs.min(axis=0), problem,
            cost_for_low=states.cost + costs.max(axis=0))[1])
    obj_limit = limit - states.obj - rest
    if not upper:
        order = np.argsort(objs, kind="stable")
        count = np.searchsorted(objs[order], obj_limit, side="right")
        return rows[order], np.zeros(n, np.int64), count
    j = upper[0]
    order = np.argsort(costs[:, j], kind="stable")
    sorted_cost = costs[order, j]
    room = problem.high[j] + problem.tolerance[j] - bounds.min_cost[d + 1, j] - states.cost[:, j]
    end = np.searchsorted(sorted_cost, room, side="right")
    running_min = np.minimum.accumulate(objs[order])
    start = np.searchsorted(-running_min, -obj_limit, side="left")
    return rows[order], start, np.maximum(end - start, 0)


def _chunks(counts: np.ndarray, budget: int):
    """(start, stop) ranges of states whose pair counts sum to about `budget` each."""
    total = np.cumsum(counts)
    start = 0
    while start < counts.shape[0]:
        base = total[start - 1] if start else 0
        stop = int(np.searchsorted(total, base + budget, side="right"))
        stop = max(stop, start + 1)
        yield start, stop
        start = stop


def _reduce(obj, cost, key, parent, cand, problem: Problem, k: int, width: int | None,
            dominance: bool):
    """Dominance pruning (k layers), then the beam cut to the `width` best by lower bound.

    A beam first keeps its 4 x width best by key so dominance never sorts millions of pairs.
    """
    if width is not None and obj.shape[0] > 4 * width:
        keep = np.sort(np.argpartition(key, 4 * width)[:4 * width])
        obj, cost, key, parent, cand = obj[keep], cost[keep], key[keep], parent[keep], cand[keep]
    if dominance and obj.size:
        keep = dominance_keep(obj, cost, problem.low, problem.high, k)
        if keep is not None:
            keep = np.sort(keep)
            obj, cost, key, parent, cand = obj[keep], cost[keep], key[keep], parent[keep], \
                cand[keep]
    if width is not None and obj.shape[0] > width:
        keep = np.sort(np.lexsort((obj, key))[:width])
        obj, cost, key, parent, cand = obj[keep], cost[keep], key[keep], parent[keep], cand[keep]
    return obj, cost, key, parent, cand


def _cost_fns_ok(cost_fns: _CostFns, prefix: np.ndarray, new: np.ndarray, d: int,
                 nb: int) -> np.ndarray:
    """Mask of candidates whose whole-network callable costs can still meet the budgets."""
    last = d == nb - 1
    if not last and not cost_fns.prune_partial:
        return np.ones(new.shape[0], bool)
    full = np.tile(cost_fns.filler, (new.shape[0], 1))
    full[:, :d] = prefix
    full[:, d] = new
    ok = np.ones(new.shape[0], bool)
    for start in range(0, full.shape[0], 1 << 18):
        values = cost_fns.values(full[start:start + (1 << 18)])
        good = (values <= cost_fns.high).all(axis=1)
        if last:  # lower bounds only on complete networks: a completion may still add cost
            good &= (values >= cost_fns.low).all(axis=1)
        ok[start:start + (1 << 18)] = good
    return ok


# ---- beam search -------------------------------------------------------------------------------

def beam_search(tables: Sequence[BlockTable], budgets: Mapping[str, BudgetSpec], *,
                width: int = 256, k: int = 1,
                cost_fns: Mapping[str, CostFn] | None = None,
                fixed_cost: float | Mapping[str, float] = 0.0, combine: str = "sum",
                standardize: bool = False, prune_partial: bool = True) -> list[SearchResult]:
    """Beam search over blocks in network order, keeping `width` partial networks per level.

    Partial networks are ranked by their objective plus an exact lower bound on what the
    remaining blocks add under the additive budgets (from suffix fronts), so the beam does
    not spend its width on prefixes that leave no room. With `width` >= the number of partial
    networks at every level nothing is cut and the result is exact.

    Args:
      tables: one table per searched block.
      budgets: bounds on table costs (additive, fixed parts subtracted) and/or on the names
        in `cost_fns`.
      width: partial networks kept per level.
      k: number of results.
      cost_fns: name -> callable mapping choices int [n, B] (candidate rows per block) to the
        whole-network cost [n] (fixed parts included), for costs that do not add up.
      prune_partial: check the callables' upper bounds on partial networks completed with
        each remaining block's cheapest candidate (found by evaluating every candidate of a
        block with the others at row 0). That pruning is exact when a block's cheapest
        candidate is cheapest whatever the other blocks are (additive or lookup-table
        latency); otherwise set it False and only complete networks are checked.

    Returns:
      Up to k results, best first.

    Raises:
      ValueError: for unreachable budgets (naming the cheapest possible cost), or when the
        beam found no network meeting them.
    """
    cost_fns = dict(cost_fns or {})
    parsed = parse_budgets(budgets)
    table_budgets = {n: v for n, v in parsed.items() if n not in cost_fns}
    problem = make_problem(tables, table_budgets, fixed_cost, combine, standardize)
    fns = None
    if cost_fns:
        names = tuple(cost_fns)
        low = np.array([parsed.get(n, (-np.inf, np.inf))[0] for n in names])
        high = np.array([parsed.get(n, (-np.inf, np.inf))[1] for n in names])
        fns = _CostFns(names, tuple(cost_fns[n] for n in names), low, high,
                       _cheapest_rows(problem, cost_fns, names, high), prune_partial)
    bounds = _suffix_bounds(problem)
    states = _level_search(problem, bounds, k, width=max(width, k), cost_fns=fns)
    if not states.obj.size:
        raise_unmet(problem, f" (beam search, width {width}, found none; try a wider beam "
                              f"or search())" if fns is None else
                     f" and the cost callables' budgets (beam search, width {width}, found none)")
    results = []
    for choice in states.choice[:k]:
        extra = {}
        if fns is not None:
            extra = dict(zip(fns.names, fns.values(choice[None, :])[0]))
        results.append(make_result(problem, choice, "beam", extra))
    return results


def _cheapest_rows(problem: Problem, cost_fns: Mapping[str, CostFn], names: Sequence[str],
                   high: np.ndarray) -> np.ndarray:
    """Per block, the row with the smallest callable cost (others at row 0); ties: first."""
    nb = problem.num_blocks
    rows = np.zeros(nb, np.int64)
    for b in range(nb):
        n = len(problem.tables[b])
        choice = np.zeros((n, nb), np.int64)
        choice[:, b] = np.arange(n)
        values = np.stack([np.asarray(cost_fns[name](choice), np.float64).reshape(-1)
                           for name in names], axis=1)
        bounded = np.isfinite(high)
        scale = np.where(bounded, np.abs(high) + 1.0, 1.0)
        rows[b] = int(np.argmin((values / scale).sum(axis=1)))
    return rows


# ---- exact search ------------------------------------------------------------------------------

def search(tables: Sequence[BlockTable], budgets: Mapping[str, BudgetSpec], *, k: int = 1,
           fixed_cost: float | Mapping[str, float] = 0.0, combine: str = "sum",
           standardize: bool = False, max_states: int = 5_000_000) -> list[SearchResult]:
    """The exact best k networks under budgets on one or two additive costs.

    A single upper budget with k=1 is read off the front. Everything else (top-k, lower
    bounds, two costs) runs the level-wise branch and bound of `_level_search` with an
    incumbent from beam search; see the module docstring for why its pruning is exact.

    Args:
      tables: one table per searched block, in network order.
      budgets: e.g. {'macs': 460e6} or {'macs': (400e6, 460e6), 'params': 5.5e6}.
      k: number of results.
      fixed_cost: cost of the fixed parts (a number for one cost, or a dict per cost).
      combine, standardize: see `block_objectives`.
      max_states: RuntimeError if a level keeps more partial networks than this (the exact
        search is exponential in the worst case; in practice pruning keeps it small).

    Returns:
      The k best networks (fewer if fewer exist), best first.

    Raises:
      ValueError: if no network meets the budgets (naming the cheapest possible costs), or
        for more than two constrained costs (use `beam_search`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    problem = make_problem(tables, budgets, fixed_cost, combine, standardize)
    if len(problem.names) > 2:
        raise ValueError(f"exact search handles at most two constrained costs, got "
                         f"{len(problem.names)} ({', '.join(problem.names)}); use beam_search")
    if k == 1 and len(problem.names) == 1 and not np.isfinite(problem.low[0]):
        cost, obj, idx = additive_front(problem, 0, problem.high[0])
        return [make_result(problem, idx[-1], "exact")]
    return branch_and_bound(problem, k, max_states)


def branch_and_bound(problem: Problem, k: int, max_states: int | None) -> list[SearchResult]:
    bounds = _suffix_bounds(problem)
    incumbent = _level_search(problem, bounds, k, width=max(64, 8 * k))
    upper = float(incumbent.obj[k - 1]) if incumbent.obj.size >= k else np.inf
    states = _level_search(problem, bounds, k, width=None, upper_bound=upper,
                           max_states=max_states)
    if not states.obj.size:
        raise_unmet(problem, _joint_detail(problem))
    return [make_result(problem, choice, "exact") for choice in states.choice[:k]]


def _joint_detail(problem: Problem) -> str:
    """For two costs each reachable alone: the least of the second under the first."""
    if len(problem.names) != 2:
        return ""
    a, b = problem.names
    sub = dataclasses.replace(problem, objs=[c[:, 1].copy() for c in problem.costs],
                              costs=[c[:, :1] for c in problem.costs], names=(a,),
                              low=problem.low[:1], high=problem.high[:1])
    bounds = _suffix_bounds(sub)
    states = _level_search(sub, bounds, 1, width=None)
    if not states.obj.size:
        return ""
    least = float(states.obj[0]) + problem.fixed.get(b, 0.0)
    return f" (the least {b} of any network meeting the {a} budget is {format_cost(least)})"


def best_under_budget(tables: Sequence[BlockTable], budgets: Mapping[str, BudgetSpec],
                      **kwargs) -> SearchResult:
    """The exact best network under budgets (`search` with k=1)."""
    return search(tables, budgets, k=1, **kwargs)[0]

