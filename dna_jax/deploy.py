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

`write_deploy_files` writes a folder's deploy files (`FILES`: model.tflite, model_int8.tflite,
model.stablehlo), checks each against the Flax model on a few inputs and times the TFLite
ones; the description it returns (SHA-256, size and input shape of every file, parity,
latency) is what `dna-jax export --format` seals into export.json and the pipeline's deploy
stage into deploy.json; `verify_deploy_files` checks the files against it.

Calling convention of every file (`CALLING_CONVENTION`): one input, float32 images NHWC of
exactly the recorded `input_shape` (the batch is fixed), normalised as in training ((pixel -
mean) / std per channel on the 0..255 scale; Fashion-MNIST: 72.94 / 90.02, grayscale tiled
to 3 channels); one output, float32 logits [batch, classes] (no softmax). A TFLite file has
exactly one input and one output tensor. A StableHLO file is read with
`jax.export.deserialize(bytearray(data))` and called as `.call(images)`: one positional
argument, one result, no keyword arguments, no effects, lowered for cpu, cuda and tpu (the
platform is picked at call time), serialization version of the writer's JAX.

TensorFlow is imported lazily: importing this module does not pull it in, so accelerator
images without TensorFlow can still use the StableHLO path; asking for TFLite there is one
error saying so (`tensorflow_problem`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dna_jax import files

QUANTIZATIONS = (None, "dynamic")
# How `TfliteRunner.time_ms` summarises its invokes: the median (the usual figure on a quiet
# device) or the minimum (robust to other processes preempting long invokes on a shared CPU).
TIME_STATISTICS = {"median": np.median, "min": np.min}
# What a serialized StableHLO file is lowered for: one file runs on any of them (jax.export's
# multi-platform lowering; the platform is picked when it is called).
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")


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

    # Lowered for the CPU whatever the backend here: TFLite runs it on phones' CPUs.
    converted = tf.function(jax2tf.convert(fn, with_gradient=False,
                                           native_serialization_platforms=("cpu",)),
                            input_signature=[tf.TensorSpec(tuple(shape), tf.float32)],
                            autograph=False)
    with _quiet(), _without_locations():  # the same bytes from any caller
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [converted.get_concrete_function()], converted)
        # jax2tf emits XlaCallModule (StableHLO); the converter legalises it to TFLite builtins.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return bytes(converter.convert())


@contextlib.contextmanager
def _without_locations():
    """No Python source locations in the lowered module: they name the caller's frames, so
    the same network would give other bytes from another call site (a rerun, a test)."""
    before = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        yield
    finally:
        jax.config.update("jax_traceback_in_locations_limit", before)


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
    """`jax.export` serialization of `fn` for one float32 input of `shape` (CPU, CUDA, TPU),
    without source locations: the same network gives the same bytes from any caller.

    Calling convention: one positional argument, a float32 array of exactly `shape` (NHWC);
    one result, the function's output (logits); no keyword arguments, no effects. Read it
    with `load_stablehlo(data).call(images)` (any JAX >= the writer's serialization version).
    """
    from jax import export as jax_export  # pylint: disable=import-outside-toplevel

    with _without_locations():
        exported = jax_export.export(jax.jit(fn), platforms=STABLEHLO_PLATFORMS)(
            jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
    return bytes(exported.serialize())


def load_stablehlo(data: bytes):
    """The `jax.export.Exported` of `stablehlo_bytes`' output; call it with `.call(images)`."""
    from jax import export as jax_export  # pylint: disable=import-outside-toplevel

    return jax_export.deserialize(bytearray(data))


# ---- deploy files: written, verified, timed -------------------------------------------------

DEPLOY_FORMAT = "dna_jax.deploy/1"  # the description's `format` field
FORMATS = ("tflite", "stablehlo")
# (format, file name, quantization): what each requested format writes.
FILES = (("tflite", "model.tflite", "float32"),
         ("tflite", "model_int8.tflite", "dynamic_int8"),
         ("stablehlo", "model.stablehlo", "float32"))
_QUANTIZE = {"float32": None, "dynamic_int8": "dynamic"}
CALLING_CONVENTION = (
    "one input: float32 images, NHWC, of exactly `input_shape` (batch fixed), normalised as "
    "in training ((pixel - mean) / std per channel, pixels on the 0..255 scale); one output: "
    "float32 logits [batch, num_classes], no softmax. TFLite: the interpreter's only input "
    "and output tensors. StableHLO: jax.export.deserialize(bytes).call(images), lowered for "
    "cpu, cuda and tpu, no keyword arguments, no effects, no state")


class DeployError(ValueError):
    """Deploy files cannot be made or do not verify; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class DeployOptions:
    """What to write and how to check it.

    Fields:
      formats: a subset of FORMATS (`parse_formats`): 'tflite' writes model.tflite (float32)
        and model_int8.tflite (dynamic-range int8: int8 weights, float activations),
        'stablehlo' model.stablehlo.
      batch_size: the batch fixed in the files.
      threads: TFLite interpreter threads for the latency measurement.
      timing_repeats: timed `invoke`s per TFLite file (the median is reported; 0 = no timing).
      parity_images: standard-normal images the files are compared with the Flax model on
        when written (0 = no check); real-image parity is in tests/test_deploy.py.
    """

    formats: tuple[str, ...] = FORMATS
    batch_size: int = 1
    threads: int = 1
    timing_repeats: int = 100
    parity_images: int = 16


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """'all' -> every format; 'none' or '' -> (); 'tflite,stablehlo' -> in FORMATS order.

    Raises:
      DeployError: an unknown name (the message lists the choices).
    """
    names = [s.strip() for s in (value.split(",") if isinstance(value, str) else value)]
    names = [s for s in names if s and s != "none"]
    if "all" in names:
        return FORMATS
    unknown = [s for s in names if s not in FORMATS]
    if unknown:
        raise DeployError(f"unknown deploy format(s) {unknown}: choose from "
                          f"{', '.join(FORMATS)}, 'all' or 'none' (comma-separated)")
    return tuple(f for f in FORMATS if f in names)


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (without importing it)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    return importlib.util.find_spec("tensorflow") is not None


def tensorflow_problem(formats: Sequence[str], instead: str) -> str | None:
    """Why `formats` cannot be written here (TFLite asked for, TensorFlow missing), or None.
    `instead` says how to ask for StableHLO only (a flag, a config field)."""
    if "tflite" not in formats or tensorflow_available():
        return None
    return ("TFLite export needs TensorFlow, which is not installed here (`pip install "
            f"tensorflow-cpu`); or ask for StableHLO only ({instead}), which does not")


def file_records(out_dir: str, formats: Sequence[str]) -> list[tuple[str, str, str]]:
    """(format, path, quantization) of the files `formats` write into `out_dir`."""
    return [(fmt, os.path.join(out_dir, name), quantization)
            for fmt, name, quantization in FILES if fmt in formats]


def write_deploy_files(fn: Callable, input_shape: Sequence[int], out_dir: str,
                       options: DeployOptions, instead: str = "--format stablehlo") -> dict:
    """Writes the deploy files of `fn` into `out_dir`, checks them, times the TFLite ones.

    Each file is written atomically; the caller records the returned description (in a sealed
    JSON file: export.json, deploy.json) after this returns, so a recorded file is complete.

    Args:
      fn: `inference_fn(module, variables)` (host variables: numpy).
      input_shape: (batch, height, width, channels).
      out_dir: the folder (created).
      options: formats, timing and parity settings.
      instead: how the caller asks for StableHLO only (named by the TensorFlow error).

    Returns:
      {'format', 'calling_convention', 'input': {shape, dtype, layout}, 'output': {shape,
      dtype}, 'files': [{file, format, quantization, sha256, bytes, input_shape}],
      'parity': {file: {...}}, 'latency': {file: {median_ms, threads, batch, repeats}},
      'machine': {...}}.

    Raises:
      DeployError: TFLite asked for without TensorFlow.
    """
    problem = tensorflow_problem(options.formats, instead)
    if problem:
        raise DeployError(problem)
    input_shape = tuple(int(d) for d in input_shape)
    output = jax.eval_shape(fn, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    files.makedirs(out_dir)
    records, data = [], {}
    for fmt, path, quantization in file_records(out_dir, options.formats):
        if fmt == "tflite":
            data[path] = tflite_bytes(fn, input_shape, _QUANTIZE[quantization])
        else:
            data[path] = stablehlo_bytes(fn, input_shape)
        files.write_bytes(path, data[path])
        records.append({"file": os.path.basename(path), "format": fmt,
                        "quantization": quantization,
                        "sha256": hashlib.sha256(data[path]).hexdigest(),
                        "bytes": len(data[path]), "input_shape": list(input_shape)})
    description = {
        "format": DEPLOY_FORMAT, "calling_convention": CALLING_CONVENTION,
        "input": {"shape": list(input_shape), "dtype": "float32", "layout": "NHWC"},
        "output": {"shape": list(output.shape), "dtype": str(output.dtype)},
        "files": records, "stablehlo_platforms": list(STABLEHLO_PLATFORMS),
        "parity": {}, "latency": {}, "machine": machine(),
    }
    if options.parity_images and records:
        images = np.random.default_rng(0).standard_normal(
            (_round_up(options.parity_images, input_shape[0]), *input_shape[1:]))
        description["parity"] = {
            r["file"]: parity(fn, data[os.path.join(out_dir, r["file"])], r["format"],
                              images.astype(np.float32), input_shape[0])
            for r in records}
        description["parity_inputs"] = f"{len(images)} standard-normal images (seed 0)"
    if options.timing_repeats:
        for record in records:
            if record["format"] == "tflite":
                runner = TfliteRunner(data[os.path.join(out_dir, record["file"])],
                                      options.threads)
                description["latency"][record["file"]] = {
                    "median_ms": runner.time_ms(repeats=options.timing_repeats),
                    "threads": options.threads, "batch": input_shape[0],
                    "repeats": options.timing_repeats}
    return description



def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def run_file(data: bytes, fmt: str, images: np.ndarray, batch: int,
             threads: int = 1) -> np.ndarray:
    """Outputs of a deploy file for `images` (any count divisible by `batch`), in batches of
    the file's fixed `batch`."""
    if fmt == "tflite":
        runner = TfliteRunner(data, threads)
        call = runner
    else:
        compiled = jax.jit(load_stablehlo(data).call)  # compiled once, not per call
        call = lambda x: np.asarray(compiled(x))  # noqa: E731
    return np.concatenate([call(images[i:i + batch]) for i in range(0, len(images), batch)])


def parity(fn: Callable, data: bytes, fmt: str, images: np.ndarray, batch: int) -> dict:
    """How a deploy file's outputs compare with `fn`'s on `images`: max_abs_error,
    logit_scale (max |logit| of fn), relative_error (their ratio) and top1_agreement."""
    reference = np.asarray(jax.jit(fn)(images))
    outputs = run_file(data, fmt, images, batch)
    return parity_figures(reference, outputs)


def parity_figures(reference: np.ndarray, outputs: np.ndarray) -> dict:
    """max_abs_error, logit_scale, relative_error, top1_agreement of outputs vs reference."""
    error = float(np.max(np.abs(outputs - reference)))
    scale = float(np.max(np.abs(reference)))
    return {"max_abs_error": error, "logit_scale": scale,
            "relative_error": error / scale if scale else float("inf"),
            "top1_agreement": float(np.mean(outputs.argmax(-1) == reference.argmax(-1))),
            "images": int(len(reference))}


def machine() -> dict:
    """Where latencies were measured: CPU model, logical CPUs, TensorFlow version."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    out = {"cpu": name, "logical_cpus": os.cpu_count()}
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        out["tensorflow"] = tf.__version__
    except ImportError:
        pass
    return out


def verify_deploy_files(out_dir: str, description: Mapping[str, Any] | None) -> list[str]:
    """What is wrong with the deploy files a sealed description records (each problem names
    the file): missing, or bytes whose SHA-256 is not the recorded one."""
    problems = []
    for record in (description or {}).get("files", []):
        path = os.path.join(out_dir, record["file"])
        if not files.exists(path):
            problems.append(f"{path} is missing")
            continue
        actual = hashlib.sha256(files.read_bytes(path)).hexdigest()
        if actual != record["sha256"]:
            problems.append(f"{path} is corrupt: its SHA-256 {actual[:12]}... differs from the "
                            f"{record['sha256'][:12]}... recorded when it was written")
    return problems
