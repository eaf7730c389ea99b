"""Reference searches (brute force, the original DNA's nested loops) and synthetic tables,
for tests and benchmarks of the exact search."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from dna_jax.rating_table import BlockTable
from dna_jax.search.problem import (BudgetSpec, CostFn, SearchResult, block_objectives,
                                    make_problem, make_result, parse_budgets, raise_unmet)


# ---- brute force (reference for small tables) --------------------------------------------------

def enumerate_compositions(tables: Sequence[BlockTable], cost_names: Sequence[str] = (), *,
                           combine: str = "sum", standardize: bool = False,
                           max_compositions: int = 4_000_000):
    """Every composition: (indices int [T, B], objective [T], costs [T, m] net of fixed parts).

    Sums run block by block in network order, as the searches sum, so values compare exactly.
    """
    sizes = [len(t) for t in tables]
    total = math.prod(sizes)
    if total > max_compositions:
        raise ValueError(f"{total:,} compositions exceed max_compositions={max_compositions:,}")
    indices = np.stack(np.unravel_index(np.arange(total), sizes), axis=1)
    objs = block_objectives(tables, combine, standardize)
    objective = np.zeros(total)
    costs = np.zeros((total, len(cost_names)))
    for b, t in enumerate(tables):
        objective += objs[b][indices[:, b]]
        for j, name in enumerate(cost_names):
            costs[:, j] += t.cost(name).astype(np.float64)[indices[:, b]]
    return indices, objective, costs


def brute_force_search(tables: Sequence[BlockTable], budgets: Mapping[str, BudgetSpec], *,
                       k: int = 1, fixed_cost: float | Mapping[str, float] = 0.0,
                       combine: str = "sum", standardize: bool = False,
                       cost_fns: Mapping[str, CostFn] | None = None,
                       max_compositions: int = 4_000_000) -> list[SearchResult]:
    """Top-k by trying every composition; for tests and small tables only."""
    cost_fns = dict(cost_fns or {})
    parsed = parse_budgets(budgets)
    table_budgets = {n: v for n, v in parsed.items() if n not in cost_fns}
    problem = make_problem(tables, table_budgets, fixed_cost, combine, standardize)
    indices, objective, costs = enumerate_compositions(
        tables, problem.names, combine=combine, standardize=standardize,
        max_compositions=max_compositions)
    ok = ((costs <= problem.high) & (costs >= problem.low)).all(axis=1)
    extra = {}
    for name, fn in cost_fns.items():
        values = np.asarray(fn(indices), np.float64).reshape(-1)
        low, high = parsed.get(name, (-np.inf, np.inf))
        ok &= (values >= low) & (values <= high)
        extra[name] = values
    rows = np.nonzero(ok)[0]
    if not rows.size:
        raise_unmet(problem, " (brute force)")
    order = rows[np.lexsort(tuple(indices[rows].T[::-1]) + (objective[rows],))][:k]
    return [make_result(problem, indices[r], "brute_force", {n: v[r] for n, v in extra.items()})
            for r in order]


# ---- the original DNA search -------------------------------------------------------------------

def original_dna_search(tables: Sequence[BlockTable], cost: str, budget: float, *,
                        fixed_cost: float = 0.0, combine: str = "sum", standardize: bool = False,
                        max_visits: int = 20_000_000) -> SearchResult | None:
    """The original code's constrained search, with its pruning heuristic, for comparison.

    Each block's candidates are sorted by score. Nested loops run over blocks in network
    order; a prefix is skipped when its cost leaves less than the cheapest completion. In the
    innermost block the first feasible candidate (the best-scored one) is taken, and from then
    on later prefixes only try candidates ranked strictly better there. When that bound
    reaches rank 0 it resets and the block above gets the same treatment (the bound becomes
    its current rank), and so on up; the outermost block always runs all candidates. Among
    siblings this is exact, across prefixes it is a heuristic: a later prefix with a better
    score but less budget left may need a worse-ranked innermost candidate it may no longer
    try. It can take exponential time, so only run it on small tables; `max_visits` bounds it.

    Differences from the original code: budgets are `cost <= budget` at every level (the
    original's innermost test was strict), and a bound reaching rank 0 cascades upwards at
    once (the original deferred it to the parent's next iteration and skipped it when the
    parent was at its last candidate).

    Returns:
      The network found, or None where the original printed "No suitable model".

    Raises:
      RuntimeError: past `max_visits` candidate visits.
    """
    problem = make_problem(tables, {cost: budget}, fixed_cost, combine, standardize)
    nb = problem.num_blocks
    orders = [np.argsort(o, kind="stable") for o in problem.objs]
    objs = [problem.objs[b][orders[b]].tolist() for b in range(nb)]
    costs = [problem.costs[b][orders[b], 0].tolist() for b in range(nb)]
    sizes = [len(c) for c in costs]
    mins = [min(c) for c in costs]
    stage_max = [problem.high[0] - sum(mins[b + 1:]) for b in range(nb)]
    limits = list(sizes)
    current = [0] * nb
    best: list = [np.inf, None]
    visits = 0

    def visit(d: int, prefix_cost: float, prefix_obj: float) -> None:
        nonlocal visits
        for r in range(sizes[d] if d == 0 else limits[d]):
            if d > 0 and r >= limits[d]:
                break  # a deeper level shrank this level's bound
            visits += 1
            if visits > max_visits:
                raise RuntimeError(f"original_dna_search passed max_visits={max_visits:,}; "
                                   f"it is exponential, use search() on tables this large")
            c = prefix_cost + costs[d][r]
            if c > stage_max[d]:
                continue
            o = prefix_obj + objs[d][r]
            current[d] = r
            if d < nb - 1:
                visit(d + 1, c, o)
                continue
            if o < best[0]:
                best[0], best[1] = o, list(current)
            limits[d] = r
            level = d
            while level > 0 and limits[level] == 0:
                limits[level] = sizes[level]
                limits[level - 1] = current[level - 1]
                level -= 1
            break

    visit(0, 0.0, 0.0)
    if best[1] is None:
        return None
    rows = [int(orders[b][r]) for b, r in enumerate(best[1])]
    return make_result(problem, rows, "original_dna")


# ---- synthetic tables (tests, benchmarks) ------------------------------------------------------

def synthetic_block_tables(seed: int, num_blocks: int, num_layers: int, num_ops: int = 6, *,
                           noise: float = 0.05, integer_scores: bool = False,
                           cost_levels: int | None = None) -> list[BlockTable]:
    """Random tables shaped like real ones, for tests and benchmarks.

    A candidate's costs are sums of per-layer per-op costs (so many candidates share costs);
    'params' is random per op for the first layer and per op for the later layers (which share
    costs, as hidden -> hidden layers do in real spaces), 'macs' is params times a per-block resolution factor
    with a little noise (so the two costs are correlated but not proportional), and 'latency'
    is macs-like with its own noise. Scores fall loosely with cost, plus noise.

    Args:
      integer_scores: scores on a grid of 1/8 (many ties; sums are exact in floating point).
      cost_levels: if set, per-layer op costs are small integers below this (many cost ties).
    """
    rng = np.random.default_rng(seed)
    tables = []
    grids = np.meshgrid(*[np.arange(num_ops)] * num_layers, indexing="ij")
    encodings = np.stack([g.ravel() for g in grids], axis=1).astype(np.int32)
    # Layer 0 (stride, input width) has its own op costs; later layers share theirs, as in
    # real spaces where every layer after the first maps hidden -> hidden width.
    shared = np.r_[0, np.ones(num_layers - 1, np.int64)]
    for b in range(num_blocks):
        if cost_levels:
            params = rng.integers(0, cost_levels, (2, num_ops)).astype(np.int64)
            macs = params * (b % 3 + 1) + rng.integers(0, 2, (2, num_ops))
            latency = rng.integers(0, cost_levels, (2, num_ops)).astype(np.float64)
        else:
            base = rng.uniform(1.0, 4.0, num_ops) * 1000 * (b + 1)
            params = np.round(base[None, :] * rng.uniform(0.8, 1.2, (2, num_ops)))
            params = params.astype(np.int64)
            resolution = 56 // (2 ** (b // 2))
            macs = np.round(params * resolution ** 2 * rng.uniform(0.9, 1.1, params.shape))
            macs = macs.astype(np.int64)
            latency = np.round(macs * rng.uniform(0.7, 1.3, params.shape) / 1e5, 3)
        params, macs, latency = params[shared], macs[shared], latency[shared]
        layer_index = np.arange(num_layers)[None, :]
        costs = {"params": params[layer_index, encodings].sum(1),
                 "macs": macs[layer_index, encodings].sum(1),
                 "latency": latency[layer_index, encodings].sum(1)}
        size = costs["macs"].astype(np.float64)
        spread = size.max() - size.min()
        relative = (size - size.min()) / (spread if spread > 0 else 1.0)
        score = 1.0 + 0.5 * (1.0 - relative) + rng.normal(0.0, noise, size.shape) \
            + rng.normal(0.0, noise, (num_layers, num_ops))[layer_index, encodings].sum(1)
        score = np.maximum(score, 0.05)
        if integer_scores:
            score = np.round(score * 8) / 8
        tables.append(BlockTable(encodings, score, costs, source=f"<synthetic block {b}>"))
    return tables
