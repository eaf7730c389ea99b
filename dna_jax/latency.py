"""Latency lookup tables: measured time per (block, layer, op, resolution), as CSV or JSON.

A network's table latency is the sum over its layers of the measured latency of each layer's
op at that layer's input resolution, plus the fixed parts (stem, head), so it adds up like
params and multiply-adds and the exact search applies (add it to the block tables with
`add_latency_cost`). Real latency does not add up exactly (fusion, launch overheads); measure
whole networks and give `beam_search` a callable when that matters.

Keys:
  block: index of the searched block (the order of the block tables).
  layer: index of the searchable layer inside the block.
  op: the op index used in encodings (e.g. 0..5 for the DNA ops, 6 for skip).
  resolution: side length of the layer's INPUT feature map (a stride-2 layer halves it).
Values: latency in milliseconds (`latency_ms`), >= 0.

CSV format (`.csv`): optional metadata lines `# key: value` first, then the header
`block,layer,op,resolution,latency_ms`, then one row per entry:

    # format: dna_jax.latency/1
    # device: cpu
    block,layer,op,resolution,latency_ms
    0,0,0,112,0.8125

JSON format (`.json`): `{"format": "dna_jax.latency/1", "meta": {...}, "entries":
[{"block": 0, "layer": 0, "op": 0, "resolution": 112, "latency_ms": 0.8125}, ...]}`.
Metadata values are strings (device, batch size, dtype, op names, `fixed_ms` ...).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
from typing import Mapping, Sequence

import numpy as np

from dna_jax import artifacts
from dna_jax import costs as analytic
from dna_jax import files
from dna_jax.rating_table import BlockTable

LATENCY_FORMAT = "dna_jax.latency/1"
COLUMNS = ("block", "layer", "op", "resolution", "latency_ms")
Key = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Measured latency (ms) per (block, layer, op, resolution) and free-form metadata."""

    entries: Mapping[Key, float]
    meta: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self):
        checked = {}
        for key, value in self.entries.items():
            if len(key) != 4 or not all(isinstance(k, (int, np.integer)) for k in key):
                raise ValueError(f"{self.source}: latency key {key!r} must be 4 integers "
                                 f"(block, layer, op, resolution)")
            value = float(value)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.source}: latency of {key} must be finite and >= 0, "
                                 f"got {value}")
            checked[tuple(int(k) for k in key)] = value
        object.__setattr__(self, "entries", checked)
        object.__setattr__(self, "meta", {str(k): str(v) for k, v in self.meta.items()})

    def lookup(self, block: int, layer: int, op: int, resolution: int) -> float:
        key = (int(block), int(layer), int(op), int(resolution))
        if key not in self.entries:
            raise ValueError(f"{self.source}: no latency for block {key[0]}, layer {key[1]}, "
                             f"op {key[2]}, resolution {key[3]}")
        return self.entries[key]

    def candidate_latency(self, block: int, encodings: np.ndarray,
                          resolutions: Sequence[int]) -> np.ndarray:
        """Latency [N] of block candidates `encodings` int [N, L] (sum over layers).

        Args:
          resolutions: the input side length of each of the L layers.
        """
        encodings = np.asarray(encodings)
        if encodings.ndim != 2 or encodings.shape[1] != len(resolutions):
            raise ValueError(f"encodings of shape {encodings.shape} need one resolution per "
                             f"layer, got {len(resolutions)}")
        total = np.zeros(encodings.shape[0])
        for layer, resolution in enumerate(resolutions):
            ops = np.unique(encodings[:, layer])
            lut = np.zeros(int(ops.max()) + 1)
            for op in ops:
                lut[op] = self.lookup(block, layer, int(op), resolution)
            total += lut[encodings[:, layer]]
        return total


def add_latency_cost(table: BlockTable, latency: LatencyTable, block: int,
                     resolutions: Sequence[int], name: str = "latency") -> BlockTable:
    """The block table with a `name` cost column of table latency (ms)."""
    return table.with_cost(name, latency.candidate_latency(block, table.encodings, resolutions))


def save_latency_table(path: str | os.PathLike, table: LatencyTable) -> None:
    """Writes `.csv` or `.json` (by suffix) atomically; floats round-trip exactly."""
    path = os.fspath(path)
    meta = {"format": LATENCY_FORMAT, **{k: v for k, v in table.meta.items() if k != "format"}}
    rows = sorted(table.entries.items())
    if path.endswith(".json"):
        data = {"format": LATENCY_FORMAT, "meta": {k: v for k, v in meta.items()
                                                   if k != "format"},
                "entries": [dict(zip(COLUMNS, (*key, value))) for key, value in rows]}
        text = json.dumps(data, indent=1)
    elif path.endswith(".csv"):
        out = io.StringIO()
        for key, value in meta.items():
            if "\n" in key + value or ":" in key:
                raise ValueError(f"metadata {key!r}: keys cannot hold ':' or newlines, values "
                                 f"cannot hold newlines")
            out.write(f"# {key}: {value}\n")
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for key, value in rows:
            writer.writerow([*key, repr(value)])
        text = out.getvalue()
    else:
        raise ValueError(f"{path}: latency tables are .csv or .json")
    artifacts.write_text(path, text)


def load_latency_table(path: str | os.PathLike) -> LatencyTable:
    """Reads a table written by `save_latency_table` (or by hand in the same format).

    Raises:
      ValueError: naming the file (and line) for a missing file, unknown suffix, bad header,
        unparsable or negative values, or a duplicate key.
    """
    path = os.fspath(path)
    if not files.exists(path):
        raise ValueError(f"{path}: latency table file does not exist")
    text = files.read_text(path)
    if path.endswith(".json"):
        return _from_json(path, text)
    if path.endswith(".csv"):
        return _from_csv(path, text)
    raise ValueError(f"{path}: latency tables are .csv or .json")


def _from_json(path: str, text: str) -> LatencyTable:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict) or data.get("format") != LATENCY_FORMAT:
        raise ValueError(f"{path}: expected an object with format {LATENCY_FORMAT!r}")
    entries: dict[Key, float] = {}
    for i, item in enumerate(data.get("entries", [])):
        try:
            key = tuple(_as_int(item[c]) for c in COLUMNS[:4])
            value = float(item["latency_ms"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: entry {i} is malformed ({error!r}); it needs "
                             f"{', '.join(COLUMNS)}") from error
        _add_entry(entries, key, value, path, f"entry {i}")
    return LatencyTable(entries, data.get("meta", {}), source=path)


def _from_csv(path: str, text: str) -> LatencyTable:
    meta: dict[str, str] = {}
    lines = text.splitlines()
    body_start = 0
    for body_start, line in enumerate(lines):
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if not sep:
            raise ValueError(f"{path}: line {body_start + 1}: metadata lines are '# key: value'")
        meta[key.strip()] = value.strip()
    if meta.get("format", LATENCY_FORMAT) != LATENCY_FORMAT:
        raise ValueError(f"{path}: unknown format {meta['format']!r}")
    meta.pop("format", None)
    reader = csv.reader(lines[body_start:])
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != COLUMNS:
        raise ValueError(f"{path}: line {body_start + 1}: header must be {','.join(COLUMNS)}, "
                         f"got {header!r}")
    entries: dict[Key, float] = {}
    for number, row in enumerate(reader, start=body_start + 2):
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise ValueError(f"{path}: line {number}: expected {len(COLUMNS)} fields, got "
                             f"{len(row)}")
        try:
            key = tuple(_as_int(v) for v in row[:4])
            value = float(row[4])
        except ValueError as error:
            raise ValueError(f"{path}: line {number}: {error}") from error
        _add_entry(entries, key, value, path, f"line {number}")
    return LatencyTable(entries, meta, source=path)


def _as_int(value) -> int:
    """An integer from a JSON number or CSV text; floats, bools and '1.5' are errors."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    text = str(value).strip() if isinstance(value, str) else ""
    if not text.lstrip("-").isdigit():
        raise ValueError(f"{value!r} is not an integer")
    return int(text)


def _add_entry(entries: dict, key, value: float, path: str, where: str) -> None:
    if key in entries:
        raise ValueError(f"{path}: {where}: duplicate entry for (block, layer, op, resolution) "
                         f"= {key}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{path}: {where}: latency must be finite and >= 0, got {value}")
    entries[key] = value


# ---- search spaces -----------------------------------------------------------------------------

def layer_input_resolutions(space, block_index: int, resolution: int | None = None
                            ) -> tuple[int, ...]:
    """Input side length of every searchable layer of a block in the child network."""
    from dna_jax.costs import block_input_size
    from dna_jax.netspec import conv_output_size

    size = block_input_size(space, block_index, resolution or space.resolution)
    out = []
    for layer in range(space.blocks[block_index].num_layers):
        out.append(size)
        size = conv_output_size(size, space.layer_io(block_index, layer)[2])
    return tuple(out)


def add_space_latency(tables: Sequence[BlockTable], latency: LatencyTable, space,
                      resolution: int | None = None, name: str = "latency"
                      ) -> list[BlockTable]:
    """Every block table of `space` with a table-latency cost column (ms).

    Use `fixed_latency_ms(latency)` as the fixed part of that cost in the search.
    """
    if len(tables) != len(space.blocks):
        raise ValueError(f"{len(tables)} tables for the {len(space.blocks)} blocks of space "
                         f"{space.name!r}")
    return [add_latency_cost(t, latency, b, layer_input_resolutions(space, b, resolution), name)
            for b, t in enumerate(tables)]


def fixed_latency_ms(latency: LatencyTable) -> float:
    """The measured latency of the fixed parts (stem, first layer, head): meta 'fixed_ms'."""
    try:
        return float(latency.meta.get("fixed_ms", 0.0))
    except ValueError as error:
        raise ValueError(f"{latency.source}: meta fixed_ms is not a number "
                         f"({latency.meta['fixed_ms']!r})") from error


# ---- a table as a search cost: does it fit the space? ------------------------------------------

TFLITE_COST = "tflite_ms"  # search.cost of a table measured on the TFLite runtime
SEARCH_COSTS = (*analytic.COST_NAMES, TFLITE_COST)  # what search.cost accepts
MAX_NAMED_MISSING = 8  # missing entries an error lists by name


def space_digest(space) -> str:
    """A short hash of every shape a latency table of `space` depends on: the stem, the first
    layer, each searchable layer's (in, out, stride, ops) and the head; not the space's name."""
    blocks = [[(*space.layer_io(b, l), [space.ops[op].layer(1, 1).to_string()
                                        if op != space.skip_index else "skip"
                                        for op in space.layer_choices(b, l)])
               for l in range(block.num_layers)] for b, block in enumerate(space.blocks)]
    text = json.dumps([space.stem_channels, space.stem_stride, space.first_layer.to_string(),
                       blocks, space.head_channels])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def space_keys(space, resolution: int | None = None) -> list[Key]:
    """Every (block, layer, op, resolution) key a network of `space` can use."""
    return [(b, l, op, size) for b in range(len(space.blocks))
            for l, size in enumerate(layer_input_resolutions(space, b, resolution))
            for op in space.layer_choices(b, l)]


def space_table_problems(table: LatencyTable, space, resolution: int | None = None,
                         num_classes: int | None = None, runtime: str | None = None
                         ) -> list[str]:
    """What makes `table` unusable as the latency of `space`'s networks (empty: usable).

    Checks the metadata the measuring tool records (runtime, space digest, resolution, number
    of classes, fixed_ms) where the table has it, then that every key of the space has an
    entry (the missing ones are named, op names included).
    """
    resolution = int(resolution or space.resolution)
    meta, problems = table.meta, []
    if runtime is not None and meta.get("runtime") != runtime:
        problems.append(f"it was measured on runtime {meta.get('runtime', '(unrecorded)')!r}, "
                        f"not {runtime!r}")
    if "space_digest" in meta and meta["space_digest"] != space_digest(space):
        problems.append(f"it was measured for space {meta.get('space', '?')!r} (digest "
                        f"{meta['space_digest']}), not for these layers of space "
                        f"{space.name!r} (digest {space_digest(space)})")
    elif meta.get("space", space.name) != space.name:
        problems.append(f"it was measured for space {meta['space']!r}, not {space.name!r}")
    if meta.get("resolution", str(resolution)) != str(resolution):
        problems.append(f"it was measured at {meta['resolution']} px, the search counts costs "
                        f"at {resolution} px")
    if num_classes is not None and meta.get("num_classes", str(num_classes)) != str(num_classes):
        problems.append(f"its fixed part has a {meta['num_classes']}-class classifier, the "
                        f"network has {num_classes} classes")
    try:
        fixed_latency_ms(table)
    except ValueError as error:
        problems.append(str(error))
    missing = [key for key in space_keys(space, resolution) if key not in table.entries]
    if missing:
        named = ", ".join(f"(block {b}, layer {l}, {space.op_name(op)} = op {op}, {r} px)"
                          for b, l, op, r in missing[:MAX_NAMED_MISSING])
        more = (f" and {len(missing) - MAX_NAMED_MISSING} more"
                if len(missing) > MAX_NAMED_MISSING else "")
        problems.append(f"{len(missing)} of the space's {len(space_keys(space, resolution))} "
                        f"entries are missing: {named}{more}")
    return problems


def load_space_latency(path: str | os.PathLike, space, resolution: int | None = None,
                       num_classes: int | None = None, runtime: str | None = None
                       ) -> LatencyTable:
    """A latency table checked against the space it will cost (`space_table_problems`).

    Raises:
      ValueError: naming the file, every problem and the command that measures a fitting table.
    """
    table = load_latency_table(path)
    problems = space_table_problems(table, space, resolution, num_classes, runtime)
    if problems:
        raise ValueError(f"{os.fspath(path)} cannot cost space {space.name!r}: "
                         + "; ".join(problems) + ". " + measure_command(
                             space, resolution, num_classes, runtime, path))
    return table


def measure_command(space, resolution: int | None, num_classes: int | None,
                    runtime: str | None, out) -> str:
    """The command that measures a table for this space (what an error suggests)."""
    return (f"Measure one with: python benchmarks/measure_latency.py --runtime "
            f"{runtime or 'tflite'} --space {space.name} --resolution "
            f"{int(resolution or space.resolution)}"
            + (f" --num-classes {num_classes}" if num_classes is not None else "")
            + f" --out {os.fspath(out)}")


def space_latency_range(table: LatencyTable, space, resolution: int | None = None
                        ) -> tuple[float, float]:
    """(cheapest, dearest) whole-network table latency of `space` (fixed part included):
    layers cost independently, so the extremes are per layer."""
    low = high = fixed_latency_ms(table)
    for b in range(len(space.blocks)):
        for l, size in enumerate(layer_input_resolutions(space, b, resolution)):
            values = [table.lookup(b, l, op, size) for op in space.layer_choices(b, l)]
            low, high = low + min(values), high + max(values)
    return low, high
