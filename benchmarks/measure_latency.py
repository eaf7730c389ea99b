"""Measure a latency lookup table (block, layer, op, resolution) on the current device.

Each searchable layer of each block is built as it appears in the CHILD network (the space's
hidden widths, the layer's input resolution), jitted, warmed up, and timed: the entry is the
median of `--runs` calls (each until the result is ready). Layers with identical shapes (a
block's hidden -> hidden layers) are measured once and the figure reused, unless
`--no-share`. Skip ops cost 0. The fixed parts (stem + first layer, head + pooling +
classifier) are measured the same way and stored as metadata `fixed_ms`, so a network's table
latency is `fixed_ms` + the sum of its layers' entries (`dna_jax.latency.add_space_latency`,
`fixed_latency_ms`). `--check-networks N` also times N random whole child networks and
prints how far the table's sum is from the measurement (fusion and launch overheads make
real latency not quite additive).

  .venv/bin/python benchmarks/measure_latency.py --space small --out /tmp/latency_small.csv

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
from dna_jax import space as space_lib  # noqa: E402
from dna_jax.models.childnet import build_childnet  # noqa: E402
from dna_jax.models.layers import ConvBN, LayerConfig, make_layer  # noqa: E402
from dna_jax.netspec import conv_output_size  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def random_variables(module: nn.Module, x: jax.Array, seed: int, **kwargs) -> dict:
    """Variables of the right shapes without compiling an initialiser (values do not change
    the latency; BatchNorm variances are 1 so activations stay finite)."""
    shapes = jax.eval_shape(lambda y: module.init(jax.random.key(0), y, **kwargs), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, 0.05, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


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


class Stem(nn.Module):
    """The fixed stem and first layer of a space."""

    space: space_lib.SearchSpace
    config: LayerConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(self.space.stem_channels, 3, self.space.stem_stride, config=self.config)(
            x, train)
        return make_layer(self.space.first_layer, self.space.stem_channels, self.config)(x, train)


class Head(nn.Module):
    """The fixed head: 1x1 conv + BN, global pooling, classifier."""

    channels: int
    num_classes: int
    config: LayerConfig

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ConvBN(self.channels, 1, config=self.config)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.config.dtype)(x) if self.num_classes else x


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
    size = lat.layer_input_resolutions(space, len(space.blocks) - 1, resolution)[-1]
    size = conv_output_size(size, space.layer_io(len(space.blocks) - 1,
                                                  space.blocks[-1].num_layers - 1)[2])
    h = jnp.ones((batch, size, size, space.blocks[-1].hidden_channels), config.dtype)
    head_ms = time_apply(Head(space.head_channels, num_classes, config), h, runs, warmup)
    return {"stem_ms": stem_ms, "head_ms": head_ms, "fixed_ms": stem_ms + head_ms}


def check_networks(space, table: lat.LatencyTable, resolution: int, batch: int,
                   num_classes: int, count: int, runs: int, warmup: int, config, seed: int,
                   log) -> list[dict]:
    """Table latency against measured latency of `count` random whole child networks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        arch = space.sample(rng)
        predicted = lat.fixed_latency_ms(table) + sum(
            table.candidate_latency(b, np.asarray([ops]),
                                    lat.layer_input_resolutions(space, b, resolution))[0]
            for b, ops in enumerate(arch.blocks))
        x = jnp.ones((batch, resolution, resolution, 3), config.dtype)
        measured = time_apply(build_childnet(space, arch, num_classes, config), x, runs,
                              warmup)
        out.append({"arch": [list(b) for b in arch.blocks], "table_ms": predicted,
                    "measured_ms": measured, "ratio": measured / predicted})
        log(f"  network {[list(b) for b in arch.blocks]}: table {predicted:.3f} ms, "
            f"measured {measured:.3f} ms (ratio {measured / predicted:.3f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="small")
    parser.add_argument("--resolution", type=int, default=0, help="default: the space's")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10, help="timed runs per entry (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--no-share", action="store_true",
                        help="measure every layer, even where shapes repeat")
    parser.add_argument("--check-networks", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help=".csv or .json (default: "
                        "latency_<space>_<device>.csv in the current folder)")
    args = parser.parse_args()
    space = space_lib.get_space(args.space)
    resolution = args.resolution or space.resolution
    config = LayerConfig(dtype=DTYPES[args.dtype])
    device = jax.devices()[0]
    out = args.out or f"latency_{space.name}_{device.platform}.csv"
    start = time.perf_counter()
    print(f"Measuring {space.name} at {resolution} px, batch {args.batch}, on "
          f"{device.device_kind} ({device.platform}); median of {args.runs} runs")
    entries, distinct = measure_layers(space, resolution, args.batch, args.runs, args.warmup,
                                       config, not args.no_share, print)
    fixed = measure_fixed(space, resolution, args.batch, args.num_classes, args.runs,
                          args.warmup, config)
    meta = {"device": device.device_kind, "platform": device.platform, "space": space.name,
            "resolution": resolution, "batch": args.batch, "dtype": args.dtype,
            "runs": args.runs, "warmup": args.warmup, "num_classes": args.num_classes,
            "jax": jax.__version__, **{k: repr(v) for k, v in fixed.items()}}
    table = lat.LatencyTable(entries, meta)
    lat.save_latency_table(out, table)
    loaded = lat.load_latency_table(out)
    assert loaded.entries == table.entries  # what the search will read
    print(f"stem + first layer {fixed['stem_ms']:.4f} ms, head {fixed['head_ms']:.4f} ms")
    checks = check_networks(space, loaded, resolution, args.batch, args.num_classes,
                            args.check_networks, args.runs, args.warmup, config, args.seed,
                            print)
    seconds = time.perf_counter() - start
    print(f"{len(entries)} entries ({distinct} distinct layers measured) -> {out} in "
          f"{seconds:.1f} s")
    print(json.dumps({"out": out, "entries": len(entries), "distinct_layers": distinct,
                      "device": device.device_kind, "platform": device.platform,
                      "fixed_ms": fixed["fixed_ms"], "stem_ms": fixed["stem_ms"],
                      "head_ms": fixed["head_ms"],
                      "min_ms": min(v for v in entries.values() if v > 0),
                      "max_ms": max(entries.values()), "networks": checks,
                      "seconds": seconds}))


if __name__ == "__main__":
    main()
