"""Measure a latency lookup table (block, layer, op, resolution) on this machine.

Two runtimes (`--runtime`):

  jax     each searchable layer of each block, as it appears in the CHILD network (the space's
          hidden widths, the layer's input resolution), jitted, warmed up and timed: the entry
          is the median of `--runs` calls (each until the result is ready).
  tflite  each such layer converted alone to a float32 TFLite file (random weights) and timed
          on the TFLite interpreter with `--threads` threads: the minimum (`--statistic`, or
          the median) of `--runs` invokes (`dna_jax.tflite_latency`). This is the table
          `search.cost='tflite_ms'` reads; `--cache-dir` keeps the converted files, so a
          re-measurement only times.

Layers with identical shapes (a block's hidden -> hidden layers) are measured once and the
figure reused (jax: unless `--no-share`). Skip ops cost 0. The fixed parts (stem + first
layer, head + pooling + classifier) are measured the same way and stored as metadata
`fixed_ms`, so a network's table latency is `fixed_ms` + the sum of its layers' entries
(`dna_jax.latency.add_space_latency`, `fixed_latency_ms`). The metadata also records the
runtime, batch, threads, the machine, the date and the space's digest (what the search checks
a table against). `--check-networks N` also times N random whole child networks on the same
runtime and prints how far the table's sum is from the measurement
(`benchmarks/tflite_latency_validation.py` does that properly).

  .venv/bin/python benchmarks/measure_latency.py --space small --out /tmp/latency_small.csv
  .venv/bin/python benchmarks/measure_latency.py --runtime tflite --space small \
      --out tables/tflite_small.csv

The output is CSV or JSON by suffix, in the format `dna_jax.latency.load_latency_table`
reads. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402  (after the path insert)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dna_jax import latency as lat  # noqa: E402
from dna_jax import machine_info  # noqa: E402
from dna_jax import space as space_lib  # noqa: E402
from dna_jax import tflite_latency  # noqa: E402
from dna_jax.models.childnet import build_childnet  # noqa: E402
from dna_jax.models.layers import LayerConfig, make_layer  # noqa: E402
from dna_jax.tflite_latency import Head, Stem, random_variables  # noqa: E402,F401

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def time_apply(module: nn.Module, x: jax.Array, runs: int, warmup: int, seed: int = 0,
               **kwargs) -> float:
    """Median milliseconds of a jitted `module.apply(variables, x, **kwargs)`."""
    variables = random_variables(module, x, seed, **kwargs)
    fn = jax.jit(lambda v, y: module.apply(v, y, **kwargs))
    for _ in range(max(1, warmup)):
        jax.block_until_ready(fn(variables, x))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def measure_layers(space, resolution: int, batch: int, runs: int, warmup: int, config,
                   share: bool, log) -> tuple[dict, int]:
    """{(block, layer, op, resolution): ms} and the number of distinct layers measured."""
    entries, cache = {}, {}
    for b in range(len(space.blocks)):
        for l, size in enumerate(lat.layer_input_resolutions(space, b, resolution)):
            in_channels, out_channels, stride = space.layer_io(b, l)
            for op in space.layer_choices(b, l):
                if op == space.skip_index:
                    entries[(b, l, op, size)] = 0.0
                    continue
                spec = space.ops[op].layer(stride, out_channels)
                shape_key = (spec, in_channels, size) if share else (b, l, op)
                if shape_key not in cache:
                    x = jnp.ones((batch, size, size, in_channels), config.dtype)
                    cache[shape_key] = time_apply(make_layer(spec, in_channels, config), x,
                                                  runs, warmup, train=False)
                entries[(b, l, op, size)] = cache[shape_key]
                log(f"  block {b} layer {l} {space.op_name(op):<7} {size:>4} px "
                    f"{in_channels:>4} -> {out_channels:<4} {cache[shape_key]:9.4f} ms")
    return entries, len(cache)


def measure_fixed(space, resolution: int, batch: int, num_classes: int, runs: int,
                  warmup: int, config) -> dict[str, float]:
    x = jnp.ones((batch, resolution, resolution, 3), config.dtype)
    stem_ms = time_apply(Stem(space, config), x, runs, warmup)
    size = tflite_latency.head_input_size(space, resolution)
    h = jnp.ones((batch, size, size, space.blocks[-1].hidden_channels), config.dtype)
    head_ms = time_apply(Head(space.head_channels, num_classes, config), h, runs, warmup)
    return {"stem_ms": stem_ms, "head_ms": head_ms, "fixed_ms": stem_ms + head_ms}


def measure_jax_table(space, resolution: int, batch: int = 1, runs: int = 10, warmup: int = 2,
                      num_classes: int = 10, dtype: str = "float32", share: bool = True,
                      log=lambda _: None) -> tuple[lat.LatencyTable, int]:
    """The JAX-timed table of `space` (and how many distinct layers were measured)."""
    config = LayerConfig(dtype=DTYPES[dtype])
    device = jax.devices()[0]
    entries, distinct = measure_layers(space, resolution, batch, runs, warmup, config, share,
                                       log)
    fixed = measure_fixed(space, resolution, batch, num_classes, runs, warmup, config)
    log(f"  stem + first layer {fixed['stem_ms']:.4f} ms, head {fixed['head_ms']:.4f} ms")
    meta = {"runtime": "jax", "device": device.device_kind, "platform": device.platform,
            "machine": machine_info.cpu_summary(), "space": space.name,
            "space_digest": lat.space_digest(space), "resolution": resolution, "batch": batch,
            "dtype": dtype, "runs": runs, "warmup": warmup, "num_classes": num_classes,
            "jax": jax.__version__, "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **{k: repr(v) for k, v in fixed.items()}}
    return lat.LatencyTable(entries, meta), distinct


def table_network_ms(table: lat.LatencyTable, space, arch, resolution: int) -> float:
    """`fixed_ms` + the table entries of the layers of `arch`."""
    return lat.fixed_latency_ms(table) + sum(
        float(table.candidate_latency(b, np.asarray([ops]),
                                      lat.layer_input_resolutions(space, b, resolution))[0])
        for b, ops in enumerate(arch.blocks))


def check_networks(space, table: lat.LatencyTable, resolution: int, count: int, seed: int,
                   network_ms, log) -> list[dict]:
    """Table latency against `network_ms(arch)`, the measured latency of `count` random whole
    child networks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        arch = space.sample(rng)
        predicted = table_network_ms(table, space, arch, resolution)
        measured = network_ms(arch)
        out.append({"arch": [list(b) for b in arch.blocks], "table_ms": predicted,
                    "measured_ms": measured, "ratio": measured / predicted})
        log(f"  network {[list(b) for b in arch.blocks]}: table {predicted:.3f} ms, "
            f"measured {measured:.3f} ms (ratio {measured / predicted:.3f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", default="jax", choices=("jax", "tflite"),
                        help="jitted JAX layers, or layers converted to TFLite and timed on "
                        "its interpreter (the table search.cost='tflite_ms' reads)")
    parser.add_argument("--space", default="small")
    parser.add_argument("--resolution", type=int, default=0, help="default: the space's")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="tflite: interpreter threads")
    parser.add_argument("--statistic", default="min", choices=("min", "median"),
                        help="tflite: of the --runs invokes (min: robust to other processes "
                        "on a shared CPU; median: the usual figure on a quiet device)")
    parser.add_argument("--runs", type=int, default=0, help="timed runs per entry (median); "
                        "default 10 (jax), 20 (tflite)")
    parser.add_argument("--warmup", type=int, default=-1, help="default 2 (jax), 3 (tflite)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="jax only (TFLite tables are float32)")
    parser.add_argument("--quantize", default="none", choices=("none", "dynamic"),
                        help="tflite: dynamic-range int8 weights")
    parser.add_argument("--cache-dir", default="", help="tflite: keep converted files here")
    parser.add_argument("--no-share", action="store_true",
                        help="jax: measure every layer, even where shapes repeat")
    parser.add_argument("--check-networks", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help=".csv or .json (default: "
                        "latency_<space>_<runtime or device>.csv in the current folder)")
    args = parser.parse_args()
    space = space_lib.get_space(args.space)
    resolution = args.resolution or space.resolution
    tflite = args.runtime == "tflite"
    runs = args.runs or (20 if tflite else 10)
    warmup = args.warmup if args.warmup >= 0 else (3 if tflite else 2)
    device = jax.devices()[0]
    where = (f"TFLite, {args.threads} thread(s), on {machine_info.cpu_summary()}" if tflite
             else f"{device.device_kind} ({device.platform})")
    out = args.out or f"latency_{space.name}_{'tflite' if tflite else device.platform}.csv"
    start = time.perf_counter()
    statistic = args.statistic if tflite else "median"
    print(f"Measuring {space.name} at {resolution} px, batch {args.batch}, with {where}; "
          f"{statistic} of {runs} runs")
    if tflite:
        timer = tflite_latency.TfliteTimer(
            threads=args.threads, batch=args.batch, repeats=runs, warmup=warmup,
            statistic=args.statistic, quantize=None if args.quantize == "none" else args.quantize,
            cache_dir=args.cache_dir, seed=args.seed)
        table = tflite_latency.measure_space_table(space, timer, resolution, args.num_classes,
                                                   print)
        distinct = sum(key.startswith("layer|") for key in timer.samples)
        network_ms = lambda arch: timer.network_ms(space, arch, resolution, args.num_classes)
    else:
        table, distinct = measure_jax_table(space, resolution, args.batch, runs, warmup,
                                            args.num_classes, args.dtype, not args.no_share,
                                            print)
        config = LayerConfig(dtype=DTYPES[args.dtype])
        x = jnp.ones((args.batch, resolution, resolution, 3), config.dtype)
        network_ms = lambda arch: time_apply(build_childnet(space, arch, args.num_classes,
                                                            config), x, runs, warmup)
    lat.save_latency_table(out, table)
    loaded = lat.load_latency_table(out)
    assert loaded.entries == table.entries  # what the search will read
    checks = check_networks(space, loaded, resolution, args.check_networks, args.seed,
                            network_ms, print)
    seconds = time.perf_counter() - start
    entries = table.entries
    print(f"{len(entries)} entries ({distinct} distinct layers measured) -> {out} in "
          f"{seconds:.1f} s")
    fixed = {k: float(table.meta[k]) for k in ("fixed_ms", "stem_ms", "head_ms")}
    print(json.dumps({"out": out, "runtime": args.runtime, "entries": len(entries),
                      "distinct_layers": distinct, "device": device.device_kind,
                      "platform": device.platform, "machine": machine_info.cpu_summary(),
                      "threads": args.threads if tflite else None, "batch": args.batch,
                      **fixed, "min_ms": min(v for v in entries.values() if v > 0),
                      "max_ms": max(entries.values()), "networks": checks,
                      "conversions": timer.conversions if tflite else None,
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
