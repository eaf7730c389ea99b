"""Latency tables measured on the TFLite runtime, and whole networks timed the same way.

A table entry is one searchable layer of the CHILD network (the space's widths and stride,
that layer's input resolution), converted alone to a float32 TFLite flatbuffer
(`dna_jax.deploy.tflite_bytes`, random weights: latency does not depend on their values) and
timed on the interpreter (`TfliteRunner.times_ms`: `repeats` invokes after `warmup`) at a
recorded interpreter thread count and batch; the entry is their median or their minimum
(`statistic`; the minimum resists other processes preempting long invokes on a shared CPU,
see the README's validation). The fixed parts (stem + first layer; head + pooling +
classifier) are timed the same way and stored as `fixed_ms`, so a network's table latency is
`fixed_ms` + the sum of its layers' entries, what `search.cost='tflite_ms'` adds up
(`dna_jax.latency`). Skip ops cost 0.

Each distinct piece (same layer spec, input channels and resolution) is converted and timed
once per run; with `cache_dir` the flatbuffers are kept on disk, keyed by the piece, batch,
quantization and the TensorFlow / JAX versions, so a re-measurement only times.

  timer = TfliteTimer(threads=1, batch=1)
  table = measure_space_table(space, timer, num_classes=10)       # a LatencyTable
  ms = timer.network_ms(space, arch, resolution, num_classes=10)  # a whole child network

`benchmarks/measure_latency.py --runtime tflite` writes such a table; the validation against
whole networks is `benchmarks/tflite_latency_validation.py`.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dna_jax import deploy
from dna_jax import files
from dna_jax import latency as lat
from dna_jax import machine_info
from dna_jax.models.childnet import build_childnet
from dna_jax.models.layers import ConvBN, LayerConfig, make_layer
from dna_jax.netspec import conv_output_size

RUNTIME = "tflite"


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


class Stem(nn.Module):
    """The fixed stem and first layer of a space."""

    space: Any
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


def head_input_size(space, resolution: int) -> int:
    """Side length of the last block's output (the head's input)."""
    last = len(space.blocks) - 1
    size = lat.layer_input_resolutions(space, last, resolution)[-1]
    return conv_output_size(size, space.layer_io(last, space.blocks[last].num_layers - 1)[2])


class TfliteTimer:
    """Converts pieces of networks to TFLite and times them; each distinct piece once.

    Args:
      threads: interpreter threads (1: the phone-like default).
      batch: the batch of every timed input.
      repeats, warmup: `TfliteRunner.times_ms`'s.
      statistic: 'min' (default) or 'median' of the `repeats` invokes
        (`deploy.TIME_STATISTICS`); the samples are kept (`samples`), so changing it
        re-summarises without timing again.
      quantize: None (float32) or 'dynamic' (`deploy.tflite_bytes`).
      cache_dir: keep the flatbuffers there (by piece and versions); '' = in memory only.
      seed: of the random weights.
    """

    def __init__(self, threads: int = 1, batch: int = 1, repeats: int = 20, warmup: int = 3,
                 statistic: str = "min", quantize: str | None = None, cache_dir: str = "",
                 seed: int = 0):
        if threads < 1 or batch < 1 or repeats < 1 or warmup < 0:
            raise ValueError(f"need threads, batch, repeats >= 1 and warmup >= 0, got "
                             f"{threads}, {batch}, {repeats}, {warmup}")
        if statistic not in deploy.TIME_STATISTICS:
            raise ValueError(f"statistic must be one of {sorted(deploy.TIME_STATISTICS)}, got "
                             f"{statistic!r}")
        self.threads, self.batch, self.repeats, self.warmup = threads, batch, repeats, warmup
        self.statistic, self.quantize, self.cache_dir, self.seed = (statistic, quantize,
                                                                    cache_dir, seed)
        self.config = LayerConfig()
        self.samples: dict[str, np.ndarray] = {}  # piece -> invoke times (ms)
        self.conversions = 0  # flatbuffers converted (not read from the cache)

    def meta(self) -> dict[str, str]:
        """What a table records about how it was timed."""
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        return {"runtime": RUNTIME, "tensorflow": tf.__version__, "jax": jax.__version__,
                "threads": str(self.threads), "batch": str(self.batch),
                "repeats": str(self.repeats), "warmup": str(self.warmup),
                "statistic": self.statistic, "quantize": self.quantize or "none",
                "dtype": "float32", "machine": machine_info.cpu_summary(), "cpus": str(os.cpu_count()),
                "platform": platform.platform(),
                "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}

    def flatbuffer(self, key: str, module: nn.Module, size: int, channels: int) -> bytes:
        """The TFLite file of `module` on a (batch, size, size, channels) input."""
        shape = (self.batch, size, size, channels)

        def function():
            variables = random_variables(module, jnp.zeros(shape, jnp.float32), self.seed,
                                         train=False)
            return deploy.inference_fn(module, variables)
        return self._converted(key, shape, function)

    def _converted(self, key: str, shape, function: Callable[[], Callable]) -> bytes:
        """The TFLite file of `function()` on `shape`, from the cache if it is there."""
        path = self._cache_path(key, shape)
        if path and files.exists(path):
            return files.read_bytes(path)
        data = deploy.tflite_bytes(function(), shape, self.quantize)
        self.conversions += 1
        if path:
            files.write_bytes(path, data)
        return data

    def _cache_path(self, key: str, shape) -> str:
        if not self.cache_dir:
            return ""
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        text = "|".join(map(str, (key, shape, self.quantize, self.seed, tf.__version__,
                                  jax.__version__)))
        return os.path.join(self.cache_dir, hashlib.sha256(text.encode()).hexdigest()[:24]
                            + ".tflite")

    def time_piece(self, key: str, module: nn.Module, size: int, channels: int) -> float:
        """ms of one invoke of `module` on the runtime, the `statistic` of `repeats` (timed
        once per piece: memoised by `key`)."""
        full_key = f"{key}|{size}|{channels}"
        if full_key not in self.samples:
            runner = deploy.TfliteRunner(self.flatbuffer(full_key, module, size, channels),
                                         self.threads)
            self.samples[full_key] = runner.times_ms(self.repeats, self.warmup)
        return float(deploy.TIME_STATISTICS[self.statistic](self.samples[full_key]))

    def invoke_overhead_ms(self) -> float:
        """One invoke of a one-op file (8 numbers doubled): what every timed piece pays once
        whatever it computes (a table entry per layer pays it, a whole network once)."""
        key = "overhead|mul8"
        if key not in self.samples:
            data = self._converted(key, (self.batch, 1, 1, 8), lambda: lambda x: x * 2.0)
            self.samples[key] = deploy.TfliteRunner(data, self.threads).times_ms(
                self.repeats, self.warmup)
        return float(deploy.TIME_STATISTICS[self.statistic](self.samples[key]))

    def layer_ms(self, spec, in_channels: int, size: int) -> float:
        """One MBConv / DS layer on a (batch, size, size, in_channels) input."""
        return self.time_piece(f"layer|{spec.to_string()}", make_layer(spec, in_channels,
                                                                        self.config),
                               size, in_channels)

    def fixed_ms(self, space, resolution: int, num_classes: int) -> dict[str, float]:
        """{'stem_ms', 'head_ms', 'fixed_ms'}: stem + first layer, head + pool + classifier."""
        stem = self.time_piece(f"stem|{space.stem_channels}|{space.stem_stride}|"
                               f"{space.first_layer.to_string()}", Stem(space, self.config),
                               resolution, 3)
        channels = space.blocks[-1].hidden_channels
        head = self.time_piece(f"head|{space.head_channels}|{num_classes}",
                               Head(space.head_channels, num_classes, self.config),
                               head_input_size(space, resolution), channels)
        return {"stem_ms": stem, "head_ms": head, "fixed_ms": stem + head}

    def network_ms(self, space, arch, resolution: int, num_classes: int) -> float:
        """The whole child network of `arch`, converted as one file and timed."""
        module = build_childnet(space, arch, num_classes, self.config)
        return self.time_piece(_network_key(space, arch, num_classes), module, resolution, 3)

    def time_networks(self, space, archs, resolution: int, num_classes: int,
                      rounds: int = 1) -> list[float]:
        """`network_ms` of each of `archs`, their invokes spread over `rounds` interleaved
        rounds (each round times every network `repeats / rounds` times, after one warm-up
        invoke), so that a slow spell of a shared machine hits every network alike."""
        runners = {}
        for arch in archs:
            key = _network_key(space, arch, num_classes)
            full_key = f"{key}|{resolution}|3"
            if full_key not in self.samples and full_key not in runners:
                module = build_childnet(space, arch, num_classes, self.config)
                runners[full_key] = deploy.TfliteRunner(
                    self.flatbuffer(full_key, module, resolution, 3), self.threads)
                runners[full_key].times_ms(1, self.warmup)
        per_round = [len(chunk) for chunk in np.array_split(np.arange(self.repeats), rounds)]
        samples = {key: [] for key in runners}
        for count in per_round:
            for key, runner in runners.items():
                samples[key].append(runner.times_ms(count, 1))
        self.samples.update({key: np.concatenate(parts) for key, parts in samples.items()})
        return [self.network_ms(space, arch, resolution, num_classes) for arch in archs]


def _network_key(space, arch, num_classes: int) -> str:
    return f"network|{space.name}|{space.to_network_spec(arch).to_strings()}|{num_classes}"


def measure_space_table(space, timer: TfliteTimer, resolution: int | None = None,
                        num_classes: int = 10,
                        log: Callable[[str], None] = lambda _: None) -> lat.LatencyTable:
    """The TFLite latency of every (block, layer, op, resolution) of `space` and its fixed
    parts, with the metadata `dna_jax.latency.load_space_latency` checks."""
    resolution = int(resolution or space.resolution)
    entries = {}
    for b, l, op, size in lat.space_keys(space, resolution):
        in_channels, out_channels, stride = space.layer_io(b, l)
        if op == space.skip_index:
            entries[(b, l, op, size)] = 0.0
            continue
        entries[(b, l, op, size)] = ms = timer.layer_ms(
            space.ops[op].layer(stride, out_channels), in_channels, size)
        log(f"  block {b} layer {l} {space.op_name(op):<7} {size:>4} px {in_channels:>4} -> "
            f"{out_channels:<4} {ms:9.4f} ms")
    fixed = timer.fixed_ms(space, resolution, num_classes)
    log(f"  stem + first layer {fixed['stem_ms']:.4f} ms, head {fixed['head_ms']:.4f} ms")
    meta = {**timer.meta(), "space": space.name, "space_digest": lat.space_digest(space),
            "resolution": str(resolution), "num_classes": str(num_classes),
            "invoke_ms": repr(timer.invoke_overhead_ms()),
            **{name: repr(value) for name, value in fixed.items()}}
    return lat.LatencyTable(entries, meta)
