"""Deployable files of a Flax network: TFLite (through jax2tf) and serialized StableHLO.

The searched networks are MBConv nets meant for phones and edge devices, where they ship as
TFLite; StableHLO (`jax.export`) is the portable form for XLA runtimes. Both are built from a
pure inference function `fn(images) -> outputs` with the variables closed over (so they are
constants of the file), for a fixed input shape (NHWC, float32):

  tflite_bytes(fn, shape)              float32 TFLite flatbuffer
  tflite_bytes(fn, shape, "dynamic")   dynamic-range int8 (weights int8, activations float)
  stablehlo_bytes(fn, shape)           `jax.export` serialization; `load_stablehlo` reads it

`TfliteRunner` runs a flatbuffer on the TFLite interpreter that ships with TensorFlow (XNNPACK
delegate on CPU) with a recorded thread count; it is what parity tests and latency tables use.

TensorFlow is imported lazily: importing this module does not pull it in, so accelerator
images without TensorFlow can still use the StableHLO path.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

QUANTIZATIONS = (None, "dynamic")
# How `TfliteRunner.time_ms` summarises its invokes: the median (the usual figure on a quiet
# device) or the minimum (robust to other processes preempting long invokes on a shared CPU).
TIME_STATISTICS = {"median": np.median, "min": np.min}


def inference_fn(module, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """`images -> logits` of an `EfficientNet`-like module in eval mode (BN running stats).

    The module's convolutions are plain `lax.conv_general_dilated` (what TFLite's converter
    legalises); `variables` ({'params', 'batch_stats'}) become constants of the exported file.
    """
    def fn(images):
        out = module.apply(variables, images, train=False)
        return out[0] if isinstance(out, tuple) else out
    return fn


def _tf():
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError as error:  # pragma: no cover - TF is a dependency of the CPU install
        raise ImportError("TFLite export needs TensorFlow (`pip install tensorflow-cpu`); "
                          "StableHLO export (`stablehlo_bytes`) does not.") from error
    return tf


def tflite_bytes(fn: Callable, shape: Sequence[int], quantize: str | None = None) -> bytes:
    """A TFLite flatbuffer of `fn` for one float32 input of `shape`.

    Args:
      fn: a pure JAX function of one array (variables closed over).
      shape: the input shape, e.g. (1, 28, 28, 3); fixed in the file.
      quantize: None (float32) or 'dynamic' (dynamic-range: int8 weights, float activations).
    """
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    tf = _tf()
    from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

    converted = tf.function(jax2tf.convert(fn, with_gradient=False, enable_xla=True),
                            input_signature=[tf.TensorSpec(tuple(shape), tf.float32)],
                            autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [converted.get_concrete_function()], converted)
    # jax2tf emits XlaCallModule (StableHLO); the converter legalises it to TFLite builtins.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    with _quiet():
        return bytes(converter.convert())


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class TfliteRunner:
    """One TFLite model on the interpreter: `runner(images) -> outputs`, `runner.time_ms()`.

    Args:
      model: the flatbuffer bytes (or a path to a .tflite file).
      threads: interpreter threads (recorded by latency tables; 1 is the phone-like default).
    """

    def __init__(self, model: bytes | str | os.PathLike, threads: int = 1):
        tf = _tf()
        if not isinstance(model, (bytes, bytearray)):
            with open(model, "rb") as f:
                model = f.read()
        self.threads = int(threads)
        with _quiet():
            self.interpreter = tf.lite.Interpreter(model_content=bytes(model),
                                                   num_threads=self.threads)
        self.interpreter.allocate_tensors()
        (self._input,) = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()
        self.input_shape = tuple(int(d) for d in self._input["shape"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """The first output for a batch of exactly the file's input shape."""
        images = np.asarray(images, np.float32)
        if images.shape != self.input_shape:
            raise ValueError(f"this TFLite model takes input shape {self.input_shape}, got "
                             f"{images.shape}")
        self.interpreter.set_tensor(self._input["index"], images)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self._outputs[0]["index"]))

    def time_ms(self, repeats: int = 20, warmup: int = 3, statistic: str = "median") -> float:
        """Median (or `statistic`, see `TIME_STATISTICS`) wall time of one `invoke` in
        milliseconds (random input, fixed seed)."""
        if statistic not in TIME_STATISTICS:
            raise ValueError(f"statistic must be one of {sorted(TIME_STATISTICS)}, got "
                             f"{statistic!r}")
        return float(TIME_STATISTICS[statistic](self.times_ms(repeats, warmup)))

    def times_ms(self, repeats: int = 20, warmup: int = 3) -> np.ndarray:
        """The wall time of each of `repeats` invokes after `warmup` (ms, float64 [repeats])."""
        images = np.random.default_rng(0).standard_normal(self.input_shape).astype(np.float32)
        self.interpreter.set_tensor(self._input["index"], images)
        for _ in range(warmup):
            self.interpreter.invoke()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.interpreter.invoke()
            times.append(time.perf_counter() - start)
        return 1e3 * np.asarray(times, np.float64)


def stablehlo_bytes(fn: Callable, shape: Sequence[int]) -> bytes:
    """`jax.export` serialization of `fn` for one float32 input of `shape` (CPU and CUDA).

    Calling convention: one positional argument, a float32 array of exactly `shape` (NHWC);
    one result, the function's output (logits); no keyword arguments, no effects. Read it
    with `load_stablehlo(data).call(images)` (any JAX >= the writer's serialization version).
    """
    from jax import export as jax_export  # pylint: disable=import-outside-toplevel

    exported = jax_export.export(jax.jit(fn), platforms=("cpu", "cuda"))(
        jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
    return bytes(exported.serialize())


def load_stablehlo(data: bytes):
    """The `jax.export.Exported` of `stablehlo_bytes`' output; call it with `.call(images)`."""
    from jax import export as jax_export  # pylint: disable=import-outside-toplevel

    return jax_export.deserialize(bytearray(data))
