"""The rating table: the one file format between rating and everything that reads ratings.

`dna_jax.rate` (and DNA++'s `dna_jax.ssl`) write it; the search, ranking, latency, export and
fidelity read it, all through this module. A block's table is two files side by side in the
rating folder, each written atomically (temporary file, rename), the `.npz` first:

`<block name>.npz`, `format_version` 1:
  encodings       int [N, L]    one op index per searchable layer, one row per candidate
  score           float [N]     the rank metric: a loss, lower is better
  format_version  int scalar    `TABLE_FORMAT_VERSION`; absent in hand-made tables
  cost_<name>     [N]           a candidate's own costs ('params', 'macs', 'dna_flops', ...)
  score_metric    str scalar    which metric `score` is                 } written by a
  batch_mse, batch_mae  [N, R]  per-rating-batch errors                 } rating only, not
  metric_<name>   float [N]     every metric the rating computed        } by `save_block_table`

`<block name>.json`, the summary (`rating_summary`): block, name, space, candidates,
rank_metric, `fingerprint` (what the rating depends on: a block whose summary holds the run's
fingerprint is not rated again, `rating_complete`), `rating` (how it was computed, with
`fit_mse_var`: the fit summary `block_fit` reads back), per-metric statistics,
spearman_with_score and the top-k candidates.

Validation on reading: a `format_version` other than this module's is refused; encodings are
integers, with one score and one value per cost per row, all finite (`BlockTable`); against a
search space (`load_space_tables`): the number of layers, ops legal in each layer, no repeated
candidate, analytic costs equal to `dna_jax.costs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np

from dna_jax import artifacts
from dna_jax import files
from dna_jax import integrity
from dna_jax import costs as analytic

TABLE_FORMAT_VERSION = 1
COST_PREFIX = "cost_"
METRIC_PREFIX = "metric_"
PyTree = Any


# ---- what the search composes ------------------------------------------------------------------

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


def table_arrays(encodings: np.ndarray, score: np.ndarray, costs: Mapping[str, np.ndarray],
                 **rating: np.ndarray) -> dict[str, np.ndarray]:
    """The `.npz` arrays of a table, keys in file order; `rating` holds `score_metric`,
    `batch_mse`, `batch_mae` and `metrics` (name -> [N]) for a rating's table."""
    metrics = rating.pop("metrics", {})
    arrays = {"encodings": encodings, "score": score,
              "format_version": np.asarray(TABLE_FORMAT_VERSION), **rating}
    arrays.update({COST_PREFIX + name: values for name, values in costs.items()})
    arrays.update({METRIC_PREFIX + name: values for name, values in metrics.items()})
    return arrays


def save_block_table(path: str | os.PathLike, table: BlockTable) -> None:
    """Writes a table's `.npz` (encodings, score, costs, format_version) atomically."""
    artifacts.write_npz(os.fspath(path), **table_arrays(table.encodings, table.score,
                                                        table.costs))


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of a table's `.npz`, checked for existence, readability and version.

    Raises:
      ValueError: naming the file and the problem.
    """
    path = os.fspath(path)
    if not files.exists(path):
        raise ValueError(f"{path}: block table file does not exist")
    try:
        with files.open_file(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as error:  # zipfile / format errors have many types
        raise ValueError(f"{path}: not a readable .npz block table ({error})") from error
    version = arrays.get("format_version")
    if version is not None and int(version) != TABLE_FORMAT_VERSION:
        raise ValueError(f"{path}: block table format_version {int(version)}, this version of "
                         f"dna_jax reads {TABLE_FORMAT_VERSION}")
    return arrays


def load_block_table(path: str | os.PathLike, required_costs: Sequence[str] = ()) -> BlockTable:
    """Reads the encodings, score and costs of a table (`save_block_table`, `save_rating`).

    Raises:
      ValueError: naming the file and the problem, if it is missing, unreadable, empty,
        inconsistent (mismatched lengths, NaN scores) or lacks one of `required_costs`.
    """
    path = os.fspath(path)
    verify_table(path)
    arrays = read_arrays(path)
    for key in ("encodings", "score"):
        if key not in arrays:
            raise ValueError(f"{path}: missing array {key!r} (has: {', '.join(arrays) or 'none'})")
    costs = {k[len(COST_PREFIX):]: v for k, v in arrays.items() if k.startswith(COST_PREFIX)}
    for name in required_costs:
        if name not in costs:
            raise ValueError(f"{path}: missing cost {name!r} (has: {', '.join(costs) or 'none'})")
    return BlockTable(arrays["encodings"], arrays["score"], costs, source=path)


def load_metrics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A rating table's `metric_<name>` columns as {name: float64 [N]} (empty for a table
    written by `save_block_table`)."""
    return {k[len(METRIC_PREFIX):]: np.asarray(v, np.float64)
            for k, v in read_arrays(path).items() if k.startswith(METRIC_PREFIX)}


# ---- the tables of a search space ------------------------------------------------------------

def table_path(table_dir: str | os.PathLike, space, block_index: int) -> str:
    """Where `dna_jax.rate.rate_blocks` writes a block's table: `<dir>/<block name>.npz`."""
    return os.path.join(os.fspath(table_dir), f"{space.blocks[block_index].name}.npz")


def load_space_tables(table_dir: str | os.PathLike, space, *, resolution: int | None = None,
                      check_costs: bool = True) -> list[BlockTable]:
    """One table per block of `space`, read from `table_dir` and checked against the space.

    Every block gets a table, fixed blocks included (a missing fixed block's table is its one
    candidate with score 0), so results encode whole architectures and the fixed part of a
    network is only the stem, the first layer and the head (`dna_jax.search.space_fixed_costs`).
    Missing analytic cost columns (`params`, `macs`, `dna_flops`) are added from
    `dna_jax.costs`.

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
    table_dir = os.fspath(table_dir)
    if not files.isdir(table_dir):
        raise ValueError(f"{table_dir}: rating table folder does not exist")
    tables = []
    for b, block in enumerate(space.blocks):
        path = table_path(table_dir, space, b)
        if not files.exists(path) and block.fixed_ops is not None:
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
                         f"is {format_cost(stored[row])}, but space {space.name!r} at "
                         f"resolution {resolution} gives {format_cost(expected[row])} "
                         f"({int(bad.sum())} rows differ; was the table rated at another "
                         f"resolution or in another space?)")


def format_cost(value: float) -> str:
    """A cost for messages: integers exactly (costs are often counts), else 6 digits."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else f"{value:.6g}"


# ---- a rating: the table with everything the rater measured --------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BlockRating:
    """Ratings of a set of candidates of one block (rows follow `encodings`).

    Attributes:
      encodings: int32 [N, L].
      batch_mse, batch_mae: [N, R] per-rating-batch errors.
      metrics: metric name -> [N] (see `dna_jax.rate.METRICS`).
      rank_metric: the metric used as the score.
      info: how it was computed (mode, plan, applications, wall time, `fit_mse_var`).
    """

    encodings: np.ndarray
    batch_mse: np.ndarray
    batch_mae: np.ndarray
    metrics: Mapping[str, np.ndarray]
    rank_metric: str
    info: Mapping[str, Any]

    @property
    def score(self) -> np.ndarray:
        return self.metrics[self.rank_metric]

    def __len__(self) -> int:
        return len(self.encodings)


def save_rating(path_prefix: str, rating: BlockRating, space, block_index: int,
                fingerprint: str = "", top_k: int = 10, cost_resolution: int = 0
                ) -> tuple[str, str]:
    """Writes `<prefix>.npz` (the table) then `<prefix>.json` (the summary), atomically.

    Returns:
      (npz path, json path).
    """
    costs = analytic.candidate_costs(space, block_index, rating.encodings,
                                     cost_resolution or None)
    npz, summary = f"{path_prefix}.npz", f"{path_prefix}.json"
    artifacts.write_npz(npz, **table_arrays(
        rating.encodings, rating.score, costs, score_metric=np.asarray(rating.rank_metric),
        batch_mse=rating.batch_mse, batch_mae=rating.batch_mae, metrics=rating.metrics))
    content = rating_summary(rating, space, block_index, costs, fingerprint, top_k)
    content["npz_sha256"] = integrity.file_digest(npz)  # what readers verify (verify_table)
    artifacts.write_json(summary, content)
    return npz, summary


def verify_table(path: str | os.PathLike) -> None:
    """Checks a rating's `.npz` against the SHA-256 its `.json` summary recorded (tables
    without one, e.g. hand-made or older, pass unverified).

    Raises:
      ValueError: the table's bytes changed since it was written, naming both files and how
        to rate the block again.
    """
    path = os.fspath(path)
    summary_path = os.path.splitext(path)[0] + ".json"
    if not files.exists(summary_path) or not files.exists(path):
        return
    try:
        recorded = artifacts.read_json(summary_path).get("npz_sha256")
    except ValueError:
        return  # an unreadable summary is reported by whoever needs it
    if recorded and integrity.file_digest(path) != recorded:
        manifest = os.path.join(os.path.dirname(files.absolute(path)), artifacts.MANIFEST)
        raise ValueError(f"{path} is corrupt: its SHA-256 differs from the one {summary_path} "
                         f"recorded when it was written. Rate the block again: remove "
                         f"{manifest} (if present) and {path}, and rerun the rate stage (the "
                         "other blocks are reused)")


def rating_summary(rating: BlockRating, space, block_index: int,
                   costs: Mapping[str, np.ndarray], fingerprint: str = "",
                   top_k: int = 10) -> dict:
    """Top-k candidates, per-metric statistics and rank correlations with the score."""
    order = np.argsort(rating.score, kind="stable")
    top = [{"rank": r + 1, "encoding": rating.encodings[i].tolist(),
            "ops": [space.op_name(int(o)) for o in rating.encodings[i]],
            "score": float(rating.score[i]),
            "metrics": {n: float(v[i]) for n, v in rating.metrics.items()},
            "costs": {n: int(v[i]) for n, v in costs.items()}}
           for r, i in enumerate(order[:top_k])]
    return {
        "block": block_index, "name": space.blocks[block_index].name, "space": space.name,
        "candidates": len(rating), "rank_metric": rating.rank_metric,
        "fingerprint": fingerprint, "rating": dict(rating.info),
        "metrics": {name: {"min": float(v.min()), "max": float(v.max()),
                           "mean": float(v.mean()), "std": float(v.std()),
                           "median": float(np.median(v))}
                    for name, v in rating.metrics.items()},
        "spearman_with_score": {name: _spearman(values, rating.score)
                                for name, values in rating.metrics.items()},
        "top_k": top,
    }


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (ties averaged); NaN where undefined: a constant or non-finite column."""
    from dna_jax import ranking_stats  # pylint: disable=import-outside-toplevel  (scipy)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("nan")
    return ranking_stats.spearman_rho(a, b)


def load_rating(path_prefix: str) -> BlockRating:
    """Reads a rating written by `save_rating`."""
    summary = artifacts.read_json(f"{path_prefix}.json")
    verify_table(f"{path_prefix}.npz")
    arrays = read_arrays(f"{path_prefix}.npz")
    metrics = {k[len(METRIC_PREFIX):]: v for k, v in arrays.items()
               if k.startswith(METRIC_PREFIX)}
    return BlockRating(arrays["encodings"], arrays["batch_mse"], arrays["batch_mae"], metrics,
                       str(arrays["score_metric"]), summary.get("rating", {}))


def block_fit(out_dir: str, block_name: str) -> dict | None:
    """A rated block's fit summary (`dna_jax.rate.fit_summary`) from its JSON summary (None
    if absent: e.g. a table written by an older version)."""
    path = os.path.join(out_dir, f"{block_name}.json")
    if not files.exists(path):
        return None
    return artifacts.read_json(path).get("rating", {}).get("fit_mse_var")


# ---- resume: the fingerprint -------------------------------------------------------------------


def tree_digest(tree: PyTree) -> str:
    """A short hash of the values of a pytree of arrays."""
    import jax  # pylint: disable=import-outside-toplevel  (the readers need no jax)
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        value = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(str(value.dtype).encode() + str(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def rating_fingerprint(config: Any, space, block_index: int,
                       encodings: np.ndarray, variables_digest: str, data_digest: str) -> str:
    """What a block's rating depends on; a saved rating with the same one is reused."""
    fields = {k: config[k] for k in ("bn_mode", "rank_metric", "num_candidates", "seed",
                                     "cost_resolution")}
    return artifacts.config_hash(fields, space.name, block_index, tree_digest(encodings),
                                 variables_digest, data_digest)


def rating_complete(path_prefix: str, fingerprint: str) -> bool:
    """Both files exist, the table is readable and unchanged (its recorded SHA-256), and the
    summary has this fingerprint: else the block is rated again."""
    try:
        summary = artifacts.read_json(f"{path_prefix}.json")
        verify_table(f"{path_prefix}.npz")
        readable = {"encodings", "score", "batch_mse"} <= set(read_arrays(f"{path_prefix}.npz"))
    except (OSError, ValueError):
        return False
    return readable and summary.get("fingerprint") == fingerprint
