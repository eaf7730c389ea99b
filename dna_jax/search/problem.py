"""A search problem: budgets, the objective a search minimises, and the networks it returns.

Budgets are read here (`parse_budget_strings` for the command line, `parse_budgets` for
mappings), net of the fixed parts of the network (`space_fixed_costs`), and checked for
reachability before any search runs, so an impossible budget names the cheapest network.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from dna_jax import costs as analytic
from dna_jax.rating_table import BlockTable, format_cost

BudgetSpec = float | tuple[float | None, float | None]
CostFn = Callable[[np.ndarray], np.ndarray]
COMBINES = ("sum", "product")
REL_TOL = 1e-12
MAX_PAIRS = 1 << 21  # pairwise sums materialised at once (memory bound of every merge)


# ---- fixed costs, budgets from text -----------------------------------------------------------

def space_fixed_costs(space, resolution: int | None = None,
                      num_classes: int = 1000) -> dict[str, int]:
    """Whole-network costs outside every block table: stem, first layer and head.

    `dna_jax.costs.fixed_costs` also counts fixed blocks; `load_space_tables` gives those a
    table, so they are subtracted here (counting them twice would shift every budget).
    """
    total = analytic.fixed_costs(space, resolution, num_classes).as_dict()
    for b, block in enumerate(space.blocks):
        if block.fixed_ops is not None:
            own = analytic.candidate_costs(space, b, np.asarray([block.fixed_ops]), resolution)
            for name in total:
                total[name] -= int(own[name][0])
    return total


_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}


def parse_budget_strings(texts: Sequence[str]) -> dict[str, BudgetSpec]:
    """Budgets from text: `macs=460e6`, `params=5.5M`, `macs=400M:460M`, `params=:6M`.

    A single number is an upper bound; `low:high` an interval with either side left open.
    Suffixes k, M, G multiply by 1e3, 1e6, 1e9.

    Raises:
      ValueError: naming the malformed entry.
    """
    budgets: dict[str, BudgetSpec] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not value.strip():
            raise ValueError(f"budget {text!r} must look like NAME=HIGH or NAME=LOW:HIGH "
                             f"(e.g. macs=460M, params=:5.5M)")
        if name in budgets:
            raise ValueError(f"budget {name!r} is given twice")
        try:
            if ":" in value:
                low, high = value.split(":", 1)
                budgets[name] = (_parse_amount(low), _parse_amount(high))
            else:
                budgets[name] = _parse_amount(value)
        except ValueError as error:
            raise ValueError(f"budget {text!r}: {error}") from error
        if budgets[name] is None or budgets[name] == (None, None):
            raise ValueError(f"budget {text!r} bounds nothing")
    return budgets


def _parse_amount(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    scale = _SUFFIXES.get(text[-1].lower(), 1.0)
    number = text[:-1] if text[-1].lower() in _SUFFIXES else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a number (suffixes k, M, G allowed)") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not finite")
    return value


# ---- objectives, budgets, fixed costs ---------------------------------------------------------

UNFIT_BLOCKS = ("keep", "exclude")


def prepare_tables(tables: Sequence[BlockTable], fits: Sequence[Mapping | None] = (),
                   unfit_blocks: str = "keep", rank_normalize: bool = False
                   ) -> list[BlockTable]:
    """The tables the search composes, after two choices about how block scores add up.

    Args:
      tables: one per block.
      fits: per block, the rating's `fit_mse_var` summary (`beats_constant`), or None.
      unfit_blocks: 'keep' sums every block's scores; 'exclude' gives a block whose best
        candidate does not beat the constant predictor a score of 0 for every candidate (its
        scores measure noise), so only cost decides it.
      rank_normalize: replace each block's scores by their rank among its candidates
        divided by N (0..1], ties averaged), so every block weighs the same in the sum
        whatever the scale of its losses.
    """
    if unfit_blocks not in UNFIT_BLOCKS:
        raise ValueError(f"unfit_blocks must be one of {UNFIT_BLOCKS}, got {unfit_blocks!r}")
    from scipy import stats  # pylint: disable=import-outside-toplevel
    out = []
    for b, table in enumerate(tables):
        fit = fits[b] if b < len(fits) else None
        score = table.score
        if unfit_blocks == "exclude" and fit is not None and not fit["beats_constant"]:
            score = np.zeros_like(score)
        elif rank_normalize:
            score = stats.rankdata(score) / len(score)
        out.append(dataclasses.replace(table, score=score))
    return out


def block_objectives(tables: Sequence[BlockTable], combine: str = "sum",
                     standardize: bool = False) -> list[np.ndarray]:
    """Per-block terms whose sum the search minimises.

    'sum' uses the scores; 'product' uses log-scores (the product of positive scores is
    minimised exactly where the sum of their logs is). `standardize` z-scores each block.

    Raises:
      ValueError: for an unknown combine, product with non-positive scores, or product with
        standardisation (z-scores are signed, so a product of them means nothing; the original
        code warned against it too).
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if combine == "product" and standardize:
        raise ValueError("combine='product' cannot be used with standardize=True: standardised "
                         "scores can be negative; standardise with combine='sum'")
    out = []
    for b, table in enumerate(tables):
        terms = table.score.astype(np.float64)
        if combine == "product":
            if np.any(terms <= 0):
                raise ValueError(f"{table.source}: combine='product' needs positive scores; "
                                 f"block {b} has minimum {terms.min():g}")
            terms = np.log(terms)
        if standardize:
            std = terms.std()
            terms = (terms - terms.mean()) / (std if std > 0 else 1.0)
        out.append(terms)
    return out


def parse_budgets(budgets: Mapping[str, BudgetSpec]) -> dict[str, tuple[float, float]]:
    """Normalises budgets to {name: (low, high)} with infinities for open sides."""
    parsed = {}
    for name, spec in budgets.items():
        if isinstance(spec, (tuple, list)):
            if len(spec) != 2:
                raise ValueError(f"budget {name!r}: an interval is (low, high), got {spec!r}")
            low = -np.inf if spec[0] is None else float(spec[0])
            high = np.inf if spec[1] is None else float(spec[1])
        else:
            low, high = -np.inf, float(spec)
        if math.isnan(low) or math.isnan(high):
            raise ValueError(f"budget {name!r} is NaN")
        if low > high:
            raise ValueError(f"budget {name!r}: low {format_cost(low)} > high {format_cost(high)}")
        parsed[name] = (low, high)
    return parsed


def _fixed_map(fixed_cost: float | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """A plain number applies to the one constrained cost; a mapping gives each cost its own."""
    if isinstance(fixed_cost, Mapping):
        return {str(k): float(v) for k, v in fixed_cost.items()}
    value = float(fixed_cost)
    if value and len(names) != 1:
        raise ValueError(f"fixed_cost is a plain number ({format_cost(value)}) but {len(names)} "
                         f"costs are involved ({', '.join(names) or 'none'}); give a dict per cost")
    return {name: value for name in names}



def _describe_budget(name: str, low: float, high: float) -> str:
    if np.isfinite(low) and np.isfinite(high):
        return f"{format_cost(low)} <= {name} <= {format_cost(high)}"
    return f"{name} >= {format_cost(low)}" if np.isfinite(low) else f"{name} <= {format_cost(high)}"


@dataclasses.dataclass
class Problem:
    """A search problem in objective space; budgets already net of the fixed parts."""

    tables: tuple[BlockTable, ...]
    objs: list[np.ndarray]          # per block: objective terms [N_b]
    costs: list[np.ndarray]         # per block: constrained costs [N_b, m] (float64)
    names: tuple[str, ...]
    low: np.ndarray                 # [m], net of fixed
    high: np.ndarray                # [m], net of fixed
    fixed: dict[str, float]
    combine: str
    standardize: bool

    @property
    def num_blocks(self) -> int:
        return len(self.objs)

    @property
    def tolerance(self) -> np.ndarray:
        """Per-budget slack for pruning partial sums: rounding must never cut an optimum.

        Partial checks add costs in another order than the final left-to-right sum; the final
        check (`_level_search`) is exact.
        """
        scale = np.maximum(1.0, np.maximum(np.abs(np.where(np.isfinite(self.low), self.low, 0)),
                                           np.abs(np.where(np.isfinite(self.high), self.high,
                                                           0))))
        return REL_TOL * scale * max(1, self.num_blocks)


def make_problem(tables: Sequence[BlockTable], budgets: Mapping[str, BudgetSpec],
                  fixed_cost, combine: str, standardize: bool,
                  table_costs: Sequence[str] | None = None) -> Problem:
    tables = tuple(tables)
    if not tables:
        raise ValueError("no block tables given")
    for t in tables:
        if not isinstance(t, BlockTable):
            raise ValueError(f"expected BlockTable, got {type(t).__name__}")
    parsed = parse_budgets(budgets)
    names = tuple(parsed) if table_costs is None else tuple(table_costs)
    fixed = _fixed_map(fixed_cost, names)
    objs = block_objectives(tables, combine, standardize)
    costs = [np.stack([t.cost(n).astype(np.float64) for n in names], axis=1)
             if names else np.zeros((len(t), 0)) for t in tables]
    low = np.array([parsed[n][0] - fixed.get(n, 0.0) for n in names], np.float64)
    high = np.array([parsed[n][1] - fixed.get(n, 0.0) for n in names], np.float64)
    problem = Problem(tables, objs, costs, names, low, high, fixed, combine, standardize)
    _check_reachable(problem)
    return problem


def _check_reachable(problem: Problem) -> None:
    """Each budget alone must be reachable; else name the cheapest (or dearest) network."""
    for j, name in enumerate(problem.names):
        fixed = problem.fixed.get(name, 0.0)
        cheapest = sum(float(c[:, j].min()) for c in problem.costs)
        dearest = sum(float(c[:, j].max()) for c in problem.costs)
        if cheapest > problem.high[j]:
            raise ValueError(
                f"no architecture meets {name} <= {format_cost(problem.high[j] + fixed)}: the "
                f"cheapest possible {name} is {format_cost(cheapest + fixed)} (blocks "
                f"{format_cost(cheapest)} + fixed {format_cost(fixed)})")
        if dearest < problem.low[j]:
            raise ValueError(
                f"no architecture meets {name} >= {format_cost(problem.low[j] + fixed)}: the "
                f"largest possible {name} is {format_cost(dearest + fixed)} (blocks "
                f"{format_cost(dearest)} + fixed {format_cost(fixed)})")


# ---- results -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SearchResult:
    """One chosen network, enough for an exporter to build it.

    Attributes:
      indices: row of the chosen candidate in each block's table.
      encodings: op indices per layer, per block (what `dna_jax.space.Arch.of` takes).
      objective: the minimised sum of block terms (see `block_objectives`).
      score: the block scores combined: their sum, or their product for combine='product'.
      block_scores: the chosen candidates' raw scores.
      costs: whole-network costs (blocks + fixed parts) for every cost all tables have, plus
        the values of any cost callables the search was given.
      method: which search produced it.
    """

    indices: tuple[int, ...]
    encodings: tuple[tuple[int, ...], ...]
    objective: float
    score: float
    block_scores: tuple[float, ...]
    costs: Mapping[str, float]
    method: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"indices": list(self.indices), "encodings": [list(e) for e in self.encodings],
                "objective": self.objective, "score": self.score,
                "block_scores": list(self.block_scores), "costs": dict(self.costs),
                "method": self.method}


def make_result(problem: Problem, indices: Sequence[int], method: str,
                 extra_costs: Mapping[str, float] | None = None) -> SearchResult:
    tables, objs = problem.tables, problem.objs
    indices = tuple(int(i) for i in indices)
    objective = 0.0
    for b, i in enumerate(indices):  # block order, as every search sums
        objective += float(objs[b][i])
    block_scores = tuple(float(t.score[i]) for t, i in zip(tables, indices))
    score = math.prod(block_scores) if problem.combine == "product" else math.fsum(block_scores)
    common = [n for n in tables[0].costs if all(n in t.costs for t in tables)]
    costs: dict[str, float] = {}
    for name in common:
        total = sum(t.costs[name][i].item() for t, i in zip(tables, indices))
        total = total + problem.fixed.get(name, 0.0)
        costs[name] = int(total) if float(total).is_integer() else float(total)
    costs.update({k: float(v) for k, v in (extra_costs or {}).items()})
    encodings = tuple(tuple(int(o) for o in t.encodings[i]) for t, i in zip(tables, indices))
    return SearchResult(indices, encodings, objective, score, block_scores, costs, method)


def raise_unmet(problem: Problem, detail: str = "") -> None:
    """ValueError naming the budgets and the cheapest possible value of each cost."""
    what, cheapest = [], []
    for j, name in enumerate(problem.names):
        fixed = problem.fixed.get(name, 0.0)
        what.append(_describe_budget(name, problem.low[j] + fixed, problem.high[j] + fixed))
        least = sum(float(c[:, j].min()) for c in problem.costs) + fixed
        cheapest.append(f"{name} {format_cost(least)}")
    raise ValueError(f"no architecture meets {' and '.join(what) or 'the budgets'}{detail}; "
                     f"cheapest possible: {', '.join(cheapest) or 'n/a'}")


