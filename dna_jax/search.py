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
* `load_space_tables` / `space_fixed_costs`: the rating stage's tables of a search space,
  checked against it, and the fixed parts, so results carry whole-network costs that equal
  `dna_jax.costs.network_costs` of the exported child network.

Scores are losses (lower is better). The search minimises an *objective*: the sum of per-block
terms. `combine='sum'` uses the block scores themselves; `combine='product'` minimises the
product of (positive) block scores, which is the same as minimising the sum of their logs, so
the terms are log-scores. `standardize=True` z-scores each block's terms first, so blocks whose
scores have different spreads weigh the same (the original's `norm_mse`; its extra affine map
(z + 2) / 4 does not change the ranking of sums, so it is left out).

Budgets are a mapping from cost name to an upper bound (a number) or an interval
`(low, high)` with `None` for an open side, e.g. `{'macs': 460e6, 'params': (None, 5.5e6)}`.
They are on whole-network costs: the fixed parts, given as `fixed_cost`, are subtracted first.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import tempfile
from typing import Callable, Mapping, Sequence

import numpy as np

from dna_jax import artifacts

BudgetSpec = float | tuple[float | None, float | None]
CostFn = Callable[[np.ndarray], np.ndarray]
COMBINES = ("sum", "product")
TABLE_FORMAT_VERSION = 1
_COST_PREFIX = "cost_"
_REL_TOL = 1e-12
_MAX_PAIRS = 1 << 21  # pairwise sums materialised at once (memory bound of every merge)


# ---- per-block tables --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class BlockTable:
    """Every rated candidate of one block: what the search composes.

    Attributes:
      encodings: int [N, L], the op index of each searchable layer of each candidate.
      score: float [N], the candidate's rating (a loss: lower is better).
      costs: cost name -> [N] (e.g. 'params', 'macs', 'dna_flops', 'latency'), costs of the
        candidate alone; a network's cost is the sum over blocks plus the fixed parts.
      source: where the table came from (a file path), used in error messages.
    """

    encodings: np.ndarray
    score: np.ndarray
    costs: Mapping[str, np.ndarray]
    source: str = "<memory>"

    def __post_init__(self):
        encodings, score, costs = _validated_arrays(self.encodings, self.score, self.costs,
                                                    self.source)
        object.__setattr__(self, "encodings", encodings)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "costs", costs)

    def __len__(self) -> int:
        return int(self.score.shape[0])

    @property
    def cost_names(self) -> tuple[str, ...]:
        return tuple(self.costs)

    def cost(self, name: str) -> np.ndarray:
        """One cost column; a missing name is a ValueError naming the table and what it has."""
        if name not in self.costs:
            raise ValueError(f"{self.source}: block table has no cost {name!r} "
                             f"(it has: {', '.join(self.costs) or 'none'})")
        return self.costs[name]

    def with_cost(self, name: str, values: np.ndarray) -> "BlockTable":
        """A copy with one cost column added or replaced (e.g. table latency)."""
        return dataclasses.replace(self, costs={**self.costs, name: np.asarray(values)})


def _validated_arrays(encodings, score, costs, source: str):
    """Checks shapes, dtypes and finiteness; returns normalised arrays or raises ValueError."""
    encodings = np.asarray(encodings)
    score = np.asarray(score)
    if encodings.ndim != 2:
        raise ValueError(f"{source}: encodings must be 2-D [candidates, layers], "
                         f"got shape {encodings.shape}")
    if encodings.shape[0] == 0:
        raise ValueError(f"{source}: the block table is empty (no candidates)")
    if encodings.dtype.kind not in "iu":
        raise ValueError(f"{source}: encodings must be integers, got dtype {encodings.dtype}")
    n = encodings.shape[0]
    if score.ndim != 1 or score.shape[0] != n:
        raise ValueError(f"{source}: score has shape {score.shape}, expected ({n},) to match "
                         f"{n} encodings")
    if score.dtype.kind not in "fiu":
        raise ValueError(f"{source}: score must be numeric, got dtype {score.dtype}")
    score = score.astype(np.float64)
    _check_finite(score, "score", source)
    if not isinstance(costs, Mapping):
        raise ValueError(f"{source}: costs must be a mapping from cost name to [N] array")
    checked = {}
    for name, values in costs.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{source}: cost name {name!r} must be an identifier")
        values = np.asarray(values)
        if values.ndim != 1 or values.shape[0] != n:
            raise ValueError(f"{source}: cost {name!r} has shape {values.shape}, expected ({n},) "
                             f"to match {n} encodings")
        if values.dtype.kind not in "fiu":
            raise ValueError(f"{source}: cost {name!r} must be numeric, got {values.dtype}")
        _check_finite(values, f"cost {name!r}", source)
        checked[name] = values
    return encodings, score, checked


def _check_finite(values: np.ndarray, what: str, source: str) -> None:
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            first = int(np.argmax(bad))
            kind = "NaN" if np.isnan(values[first]) else "infinite"
            raise ValueError(f"{source}: {what} has {int(bad.sum())} non-finite values "
                             f"(row {first} is {kind})")


def save_block_table(path: str | os.PathLike, table: BlockTable) -> None:
    """Writes a table as `.npz` atomically (`artifacts.write_npz`: temporary file, rename).

    Keys: `encodings`, `score`, `cost_<name>` per cost, `format_version`.
    """
    path = os.fspath(path)
    arrays = {"encodings": table.encodings, "score": table.score,
              "format_version": np.asarray(TABLE_FORMAT_VERSION)}
    for name, values in table.costs.items():
        arrays[_COST_PREFIX + name] = values
    artifacts.write_npz(path, **arrays)


def load_block_table(path: str | os.PathLike, required_costs: Sequence[str] = ()) -> BlockTable:
    """Reads a table written by `save_block_table`.

    Raises:
      ValueError: naming the file and the problem, if it is missing, unreadable, empty,
        inconsistent (mismatched lengths, NaN scores) or lacks one of `required_costs`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: block table file does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # zipfile / format errors have many types
        raise ValueError(f"{path}: not a readable .npz block table ({error})") from error
    for key in ("encodings", "score"):
        if key not in arrays:
            raise ValueError(f"{path}: missing array {key!r} (has: {', '.join(arrays) or 'none'})")
    costs = {k[len(_COST_PREFIX):]: v for k, v in arrays.items() if k.startswith(_COST_PREFIX)}
    for name in required_costs:
        if name not in costs:
            raise ValueError(f"{path}: missing cost {name!r} (has: {', '.join(costs) or 'none'})")
    return BlockTable(arrays["encodings"], arrays["score"], costs, source=path)


def _save_figure(fig, path: str | os.PathLike, dpi: int) -> None:
    """Renders a matplotlib figure to PNG in memory, then writes it atomically."""
    path = os.fspath(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---- tables of a search space: files, consistency, fixed parts -------------------------------

def table_path(table_dir: str | os.PathLike, space, block_index: int) -> str:
    """Where `dna_jax.rate.rate_blocks` writes a block's table: `<dir>/<block name>.npz`."""
    return os.path.join(os.fspath(table_dir), f"{space.blocks[block_index].name}.npz")


def load_space_tables(table_dir: str | os.PathLike, space, *, resolution: int | None = None,
                      check_costs: bool = True) -> list[BlockTable]:
    """One table per block of `space`, read from `table_dir` and checked against the space.

    Every block gets a table, fixed blocks included (a missing fixed block's table is its one
    candidate with score 0), so results encode whole architectures and the fixed part of a
    network is only the stem, the first layer and the head (`space_fixed_costs`). Missing
    analytic cost columns (`params`, `macs`, `dna_flops`) are added from `dna_jax.costs`.

    Args:
      table_dir: the rating stage's output folder.
      space: the search space the tables were rated in.
      resolution: input side length the costs refer to (default: the space's).
      check_costs: the stored analytic costs must equal `dna_jax.costs.candidate_costs` at
        `resolution` (they differ when a table was rated at another resolution or space).

    Raises:
      ValueError: naming the file and the problem: missing folder or file, unreadable or
        empty table, wrong number of layers, illegal op indices, repeated candidates, costs
        that do not match the space.
    """
    from dna_jax import costs as analytic  # costs.py is jax-free; imported here to stay light

    table_dir = os.fspath(table_dir)
    if not os.path.isdir(table_dir):
        raise ValueError(f"{table_dir}: rating table folder does not exist")
    tables = []
    for b, block in enumerate(space.blocks):
        path = table_path(table_dir, space, b)
        if not os.path.exists(path) and block.fixed_ops is not None:
            encodings = np.asarray([block.fixed_ops], np.int32)
            table = BlockTable(encodings, np.zeros(1), {}, source=f"<fixed {block.name}>")
        else:
            table = load_block_table(path)
        _check_space_encodings(table, space, b)
        expected = analytic.candidate_costs(space, b, table.encodings, resolution)
        for name, values in expected.items():
            if name not in table.costs:
                table = table.with_cost(name, values)
            elif check_costs:
                _check_cost_column(table, name, values, space, resolution or space.resolution)
        tables.append(table)
    return tables


def _check_space_encodings(table: BlockTable, space, b: int) -> None:
    block = space.blocks[b]
    enc = table.encodings
    if enc.shape[1] != block.num_layers:
        raise ValueError(f"{table.source}: encodings have {enc.shape[1]} layers, but block {b} "
                         f"({block.name}) of space {space.name!r} has {block.num_layers}")
    for l in range(block.num_layers):
        legal = np.asarray(space.layer_choices(b, l))
        bad = ~np.isin(enc[:, l], legal)
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"{table.source}: row {row} uses op {int(enc[row, l])} in layer {l}, "
                             f"which block {b} ({block.name}) of space {space.name!r} does not "
                             f"allow (legal: {', '.join(map(str, legal))})")
    unique, counts = np.unique(enc, axis=0, return_counts=True)
    if unique.shape[0] != enc.shape[0]:
        repeated = unique[int(np.argmax(counts > 1))]
        raise ValueError(f"{table.source}: candidate {repeated.tolist()} appears "
                         f"{int(counts.max())} times; each candidate must appear once")


def _check_cost_column(table: BlockTable, name: str, expected: np.ndarray, space,
                       resolution: int) -> None:
    stored = table.costs[name]
    bad = stored != expected
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"{table.source}: {name} of candidate {table.encodings[row].tolist()} "
                         f"is {_num(stored[row])}, but space {space.name!r} at resolution "
                         f"{resolution} gives {_num(expected[row])} ({int(bad.sum())} rows differ;"
                         f" was the table rated at another resolution or in another space?)")


def space_fixed_costs(space, resolution: int | None = None,
                      num_classes: int = 1000) -> dict[str, int]:
    """Whole-network costs outside every block table: stem, first layer and head.

    `dna_jax.costs.fixed_costs` also counts fixed blocks; `load_space_tables` gives those a
    table, so they are subtracted here (counting them twice would shift every budget).
    """
    from dna_jax import costs as analytic

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


def _parse_budgets(budgets: Mapping[str, BudgetSpec]) -> dict[str, tuple[float, float]]:
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
            raise ValueError(f"budget {name!r}: low {_num(low)} > high {_num(high)}")
        parsed[name] = (low, high)
    return parsed


def _fixed_map(fixed_cost: float | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """A plain number applies to the one constrained cost; a mapping gives each cost its own."""
    if isinstance(fixed_cost, Mapping):
        return {str(k): float(v) for k, v in fixed_cost.items()}
    value = float(fixed_cost)
    if value and len(names) != 1:
        raise ValueError(f"fixed_cost is a plain number ({_num(value)}) but {len(names)} costs are "
                         f"involved ({', '.join(names) or 'none'}); give a dict per cost")
    return {name: value for name in names}


def _num(value: float) -> str:
    """A cost for messages: integers exactly (costs are often counts), else 6 digits."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else f"{value:.6g}"


def _describe_budget(name: str, low: float, high: float) -> str:
    if np.isfinite(low) and np.isfinite(high):
        return f"{_num(low)} <= {name} <= {_num(high)}"
    return f"{name} >= {_num(low)}" if np.isfinite(low) else f"{name} <= {_num(high)}"


@dataclasses.dataclass
class _Problem:
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
        return _REL_TOL * scale * max(1, self.num_blocks)


def _make_problem(tables: Sequence[BlockTable], budgets: Mapping[str, BudgetSpec],
                  fixed_cost, combine: str, standardize: bool,
                  table_costs: Sequence[str] | None = None) -> _Problem:
    tables = tuple(tables)
    if not tables:
        raise ValueError("no block tables given")
    for t in tables:
        if not isinstance(t, BlockTable):
            raise ValueError(f"expected BlockTable, got {type(t).__name__}")
    parsed = _parse_budgets(budgets)
    names = tuple(parsed) if table_costs is None else tuple(table_costs)
    fixed = _fixed_map(fixed_cost, names)
    objs = block_objectives(tables, combine, standardize)
    costs = [np.stack([t.cost(n).astype(np.float64) for n in names], axis=1)
             if names else np.zeros((len(t), 0)) for t in tables]
    low = np.array([parsed[n][0] - fixed.get(n, 0.0) for n in names], np.float64)
    high = np.array([parsed[n][1] - fixed.get(n, 0.0) for n in names], np.float64)
    problem = _Problem(tables, objs, costs, names, low, high, fixed, combine, standardize)
    _check_reachable(problem)
    return problem


def _check_reachable(problem: _Problem) -> None:
    """Each budget alone must be reachable; else name the cheapest (or dearest) network."""
    for j, name in enumerate(problem.names):
        fixed = problem.fixed.get(name, 0.0)
        cheapest = sum(float(c[:, j].min()) for c in problem.costs)
        dearest = sum(float(c[:, j].max()) for c in problem.costs)
        if cheapest > problem.high[j]:
            raise ValueError(
                f"no architecture meets {name} <= {_num(problem.high[j] + fixed)}: the cheapest "
                f"possible {name} is {_num(cheapest + fixed)} (blocks {_num(cheapest)} + fixed "
                f"{_num(fixed)})")
        if dearest < problem.low[j]:
            raise ValueError(
                f"no architecture meets {name} >= {_num(problem.low[j] + fixed)}: the largest "
                f"possible {name} is {_num(dearest + fixed)} (blocks {_num(dearest)} + fixed "
                f"{_num(fixed)})")


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


def _make_result(problem: _Problem, indices: Sequence[int], method: str,
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


# ---- dominance ---------------------------------------------------------------------------------

def _front_indices(cost: np.ndarray, obj: np.ndarray) -> np.ndarray:
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
        front = _front_indices(merged_second, merged_obj)
        stair_second, stair_obj = merged_second[front], merged_obj[front]
    return keep


def _dominance_keep(obj: np.ndarray, cost: np.ndarray, low: np.ndarray, high: np.ndarray,
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

def _merge_fronts(cost_a: np.ndarray, obj_a: np.ndarray, cost_b: np.ndarray, obj_b: np.ndarray,
                  cap: float = np.inf):
    """Front of the min-plus sum of two fronts (all pairwise sums, then Pareto pruning).

    Returns (cost, obj, index into a, index into b); pairs above `cap` are dropped. Pairs are
    materialised in chunks of rows of `a` to bound memory; each chunk is pruned on its own,
    and the union of chunk fronts pruned again (the front of a union is the front of the
    union of fronts).
    """
    nb = cost_b.shape[0]
    rows = max(1, _MAX_PAIRS // nb)
    parts = []
    for start in range(0, cost_a.shape[0], rows):
        cost = (cost_a[start:start + rows, None] + cost_b[None, :]).ravel()
        obj = (obj_a[start:start + rows, None] + obj_b[None, :]).ravel()
        flat = np.arange(cost.shape[0]) if np.isinf(cap) else np.nonzero(cost <= cap)[0]
        keep = flat[_front_indices(cost[flat], obj[flat])] if flat.size else flat
        parts.append((cost[keep], obj[keep], start + keep // nb, keep % nb))
    cost, obj, ia, ib = (np.concatenate(p) for p in zip(*parts))
    if len(parts) > 1 and cost.size:
        keep = _front_indices(cost, obj)
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
    problem: _Problem = dataclasses.field(repr=False)

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
        return _make_result(self.problem, self.indices[i], "pareto_front")

    def best_index(self, budget: float) -> int:
        """Index of the best point with cost <= budget (exact for an upper budget)."""
        i = int(np.searchsorted(self.cost, budget, side="right")) - 1
        if i < 0:
            raise ValueError(f"no architecture meets {self.cost_name} <= {_num(budget)}: the "
                             f"cheapest possible {self.cost_name} is {_num(self.cost[0])}")
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
    problem = _make_problem(tables, budgets, fixed_cost, combine, standardize)
    front_cost, front_obj, indices = _additive_front(problem, 0, problem.high[0])
    fixed = problem.fixed.get(cost, 0.0)
    return ParetoFront(cost, front_cost + fixed, front_obj, indices, problem)


def _additive_front(problem: _Problem, column: int, cap: float):
    """Front over all blocks of one cost column, merged in block order, up to `cap`.

    Intermediate fronts are capped at `cap` minus the cheapest rest (with rounding slack);
    the last merge uses `cap` exactly, on the same left-to-right sums as brute force.
    """
    costs = [c[:, column] for c in problem.costs]
    mins = [float(c.min()) for c in costs]
    nb = problem.num_blocks
    cost, obj, idx = np.zeros(1), np.zeros(1), np.zeros((1, 0), np.int64)
    for b in range(nb):
        rows = _front_indices(costs[b], problem.objs[b])
        level_cap = cap
        if b < nb - 1 and np.isfinite(cap):
            level_cap = cap - sum(mins[b + 1:])
            level_cap += _REL_TOL * max(1.0, abs(cap))
        cost, obj, ia, ib = _merge_fronts(cost, obj, costs[b][rows], problem.objs[b][rows],
                                          level_cap)
        idx = np.concatenate([idx[ia], rows[ib][:, None]], axis=1)
    return cost, obj, idx


# ---- bounds from suffix fronts -----------------------------------------------------------------

@dataclasses.dataclass
class _Bounds:
    """For each level d (blocks < d chosen): what the remaining blocks can still reach."""

    min_cost: np.ndarray        # [B+1, m] cheapest suffix
    max_cost: np.ndarray        # [B+1, m] dearest suffix
    min_obj: np.ndarray         # [B+1] best suffix objective, ignoring budgets
    fronts: list[list[tuple[int, float, np.ndarray, np.ndarray]]]  # per level: (j, sign, c, o)

    def lower_bound(self, level: int, partial_obj: np.ndarray, partial_cost: np.ndarray,
                    problem: _Problem, limit: float = np.inf,
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

    def feasible(self, level: int, partial_cost: np.ndarray, problem: _Problem) -> np.ndarray:
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


def _suffix_bounds(problem: _Problem) -> _Bounds:
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
                rows = _front_indices(block_cost, problem.objs[d])
                cap = limit - prefix_min[d]
                cap += _REL_TOL * max(1.0, abs(cap))
                cost, obj, _, _ = _merge_fronts(block_cost[rows], problem.objs[d][rows],
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


def _block_candidates(problem: _Problem, bounds: _Bounds, b: int, k: int,
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
        keep = _dominance_keep(problem.objs[b][rows], cost[rows], problem.low, problem.high, k)
        if keep is not None:
            rows = rows[np.sort(keep)]
    return rows


def _level_search(problem: _Problem, bounds: _Bounds, k: int, *, width: int | None,
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
    slack = _REL_TOL * max(1.0, abs(upper_bound)) * nb if np.isfinite(upper_bound) else 0.0
    for d in range(nb):
        rows = _block_candidates(problem, bounds, d, k, dominance)
        if not rows.size or not states.obj.size:
            return _States(np.zeros(0), np.zeros((0, m)), np.zeros((0, nb), np.int64))
        rows, first, counts = _candidate_windows(problem, bounds, states, rows, d,
                                                 upper_bound + slack)
        block_obj, block_cost = problem.objs[d][rows], problem.costs[d][rows]
        parts = []
        for lo, hi in _chunks(counts, _MAX_PAIRS):
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


def _candidate_windows(problem: _Problem, bounds: _Bounds, states: _States, rows: np.ndarray,
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


def _reduce(obj, cost, key, parent, cand, problem: _Problem, k: int, width: int | None,
            dominance: bool):
    """Dominance pruning (k layers), then the beam cut to the `width` best by lower bound.

    A beam first keeps its 4 x width best by key so dominance never sorts millions of pairs.
    """
    if width is not None and obj.shape[0] > 4 * width:
        keep = np.sort(np.argpartition(key, 4 * width)[:4 * width])
        obj, cost, key, parent, cand = obj[keep], cost[keep], key[keep], parent[keep], cand[keep]
    if dominance and obj.size:
        keep = _dominance_keep(obj, cost, problem.low, problem.high, k)
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


def _raise_unmet(problem: _Problem, detail: str = "") -> None:
    """ValueError naming the budgets and the cheapest possible value of each cost."""
    what, cheapest = [], []
    for j, name in enumerate(problem.names):
        fixed = problem.fixed.get(name, 0.0)
        what.append(_describe_budget(name, problem.low[j] + fixed, problem.high[j] + fixed))
        least = sum(float(c[:, j].min()) for c in problem.costs) + fixed
        cheapest.append(f"{name} {_num(least)}")
    raise ValueError(f"no architecture meets {' and '.join(what) or 'the budgets'}{detail}; "
                     f"cheapest possible: {', '.join(cheapest) or 'n/a'}")


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
    parsed = _parse_budgets(budgets)
    table_budgets = {n: v for n, v in parsed.items() if n not in cost_fns}
    problem = _make_problem(tables, table_budgets, fixed_cost, combine, standardize)
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
        _raise_unmet(problem, f" (beam search, width {width}, found none; try a wider beam "
                              f"or search())" if fns is None else
                     f" and the cost callables' budgets (beam search, width {width}, found none)")
    results = []
    for choice in states.choice[:k]:
        extra = {}
        if fns is not None:
            extra = dict(zip(fns.names, fns.values(choice[None, :])[0]))
        results.append(_make_result(problem, choice, "beam", extra))
    return results


def _cheapest_rows(problem: _Problem, cost_fns: Mapping[str, CostFn], names: Sequence[str],
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
    problem = _make_problem(tables, budgets, fixed_cost, combine, standardize)
    if len(problem.names) > 2:
        raise ValueError(f"exact search handles at most two constrained costs, got "
                         f"{len(problem.names)} ({', '.join(problem.names)}); use beam_search")
    if k == 1 and len(problem.names) == 1 and not np.isfinite(problem.low[0]):
        cost, obj, idx = _additive_front(problem, 0, problem.high[0])
        return [_make_result(problem, idx[-1], "exact")]
    return _exact(problem, k, max_states)


def _exact(problem: _Problem, k: int, max_states: int | None) -> list[SearchResult]:
    bounds = _suffix_bounds(problem)
    incumbent = _level_search(problem, bounds, k, width=max(64, 8 * k))
    upper = float(incumbent.obj[k - 1]) if incumbent.obj.size >= k else np.inf
    states = _level_search(problem, bounds, k, width=None, upper_bound=upper,
                           max_states=max_states)
    if not states.obj.size:
        _raise_unmet(problem, _joint_detail(problem))
    return [_make_result(problem, choice, "exact") for choice in states.choice[:k]]


def _joint_detail(problem: _Problem) -> str:
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
    return f" (the least {b} of any network meeting the {a} budget is {_num(least)})"


def best_under_budget(tables: Sequence[BlockTable], budgets: Mapping[str, BudgetSpec],
                      **kwargs) -> SearchResult:
    """The exact best network under budgets (`search` with k=1)."""
    return search(tables, budgets, k=1, **kwargs)[0]


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
    parsed = _parse_budgets(budgets)
    table_budgets = {n: v for n, v in parsed.items() if n not in cost_fns}
    problem = _make_problem(tables, table_budgets, fixed_cost, combine, standardize)
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
        _raise_unmet(problem, " (brute force)")
    order = rows[np.lexsort(tuple(indices[rows].T[::-1]) + (objective[rows],))][:k]
    return [_make_result(problem, indices[r], "brute_force", {n: v[r] for n, v in extra.items()})
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
    problem = _make_problem(tables, {cost: budget}, fixed_cost, combine, standardize)
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
    return _make_result(problem, rows, "original_dna")


# ---- plots -------------------------------------------------------------------------------------

def plot_pareto_front(front: ParetoFront, path: str | os.PathLike, *,
                      chosen: Sequence[SearchResult] = (), title: str | None = None) -> None:
    """Saves a PNG of the front (score against cost) with the chosen networks marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(front.cost, front.score, where="post", color="tab:blue", lw=1, alpha=0.6)
    ax.plot(front.cost, front.score, ".", color="tab:blue", ms=3,
            label=f"Pareto front ({len(front)} points)")
    for i, result in enumerate(chosen):
        value = math.exp(result.objective) if front.problem.combine == "product" \
            else result.objective
        ax.plot(result.costs[front.cost_name], value, "*", ms=12, color=f"C{(i + 1) % 10}",
                label=f"{result.method}: {front.cost_name}={result.costs[front.cost_name]:.4g}")
    ax.set_xlabel(front.cost_name)
    ax.set_ylabel(front.score_label)
    ax.set_title(title or f"Pareto front over {front.indices.shape[1]} blocks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=120)


def plot_score_histograms(tables: Sequence[BlockTable], path: str | os.PathLike, *,
                          bins: int = 40, names: Sequence[str] | None = None) -> None:
    """Saves a PNG with one histogram of candidate scores per block."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(tables)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    FigureCanvasAgg(fig)
    for b, table in enumerate(tables):
        ax = fig.add_subplot(rows, cols, b + 1)
        ax.hist(table.score, bins=bins, color="tab:blue", alpha=0.8)
        ax.set_title(names[b] if names else f"block {b} ({len(table)} candidates)", fontsize=9)
        ax.set_xlabel("score (lower is better)", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)


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
