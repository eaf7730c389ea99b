r"""One command that measures dna_jax on an accelerator, and the original on the same device.

    python benchmarks/accelerator_suite.py [--dna-repo /path/to/DNA]     # GPU / TPU, < 8 min
    python benchmarks/accelerator_suite.py --tiny [--dna-repo ...]       # CPU smoke run

Sections, in this order (each one is skipped, with the reason in the JSON, once the time left
of `--budget-s` would not cover it):
  1. rating: block 1 of the paper's released space (1,296 candidates, batch 32, input
     48 x 56 x 56), both BN modes ('recalibrate' = like for like with the original), cold
     (compilation included) and warm, candidates/s (`rate_throughput.measure`);
  2. original: the same rating by the original PyTorch loop (changlin31/DNA `_potential`,
     `reset_bn_eval=True`) on the same device, in a subprocess (`original_dna_rate.py`); only
     with `--dna-repo` (a checkout you fetched), else skipped with the reason;
  3. distillation: the all-blocks step and the original's sequential schedule, EfficientNet-B7
     teacher, released space, 224 px, batch 64 (`distill_throughput.main`), per dtype
     (bfloat16 first, then float32), images/s and MFU = analytic model FLOP/s over the device's
     peak (`PEAK_TFLOPS`; an unknown device gets a null MFU). If float32's sequential schedule
     would not fit the time left, its all-blocks step is measured alone.

It imports no TensorFlow, tfds or clu (tests/test_accelerator_suite.py runs `--tiny` with
them blocked): an image with jax, flax, optax, orbax-checkpoint, chex, numpy, ml-collections,
absl-py (and torch for section 2) is enough. `--tiny` swaps in the tiny space and teacher,
32 px, few candidates of the original, for a CPU run. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# Before JAX starts: let the PyTorch subprocess have GPU memory too (JAX would take 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import jax  # noqa: E402

import distill_throughput  # noqa: E402  (benchmarks/)
import rate_throughput  # noqa: E402  (benchmarks/)

# Dense peak TFLOP/s by device kind (vendor data sheets): bfloat16 tensor cores, float32
# without tensor cores, and TF32 tensor cores (XLA may run float32 convolutions and matmuls
# in TF32 at JAX's default precision, so float32 MFU is given against both). First match of a
# substring of `jax.devices()[0].device_kind` wins.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 51.0, "tf32": 378.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float32": 60.0, "tf32": 418.0}),
    ("H100", {"bfloat16": 989.0, "float32": 67.0, "tf32": 494.5}),  # SXM ("H100 80GB HBM3")
    ("H200", {"bfloat16": 989.0, "float32": 67.0, "tf32": 494.5}),  # and GH200
    ("H800", {"bfloat16": 989.0, "float32": 67.0, "tf32": 494.5}),
    ("A100", {"bfloat16": 312.0, "float32": 19.5, "tf32": 156.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": None, "tf32": None}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": None, "tf32": None}),
    ("TPU v4", {"bfloat16": 275.0, "float32": None, "tf32": None}),
)


def peak_tflops(device_kind: str) -> dict | None:
    """{dtype: dense peak TFLOP/s or None} of a device kind, or None if it is not listed."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return dict(peaks)
    return None


def mfu(flop_per_s: float, peak: float | None) -> float | None:
    return None if not peak else round(flop_per_s / (peak * 1e12), 4)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dna-repo", default="",
                        help="checkout of github.com/changlin31/DNA (section 2; else skipped)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget; sections that would overrun it are skipped")
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="distillation compute dtypes, in order")
    parser.add_argument("--distill-batch", type=int, default=0, help="0: 64 (tiny: 2)")
    parser.add_argument("--distill-steps", type=int, default=0, help="0: 5 (tiny: 1)")
    parser.add_argument("--rate-memory-budget-mib", type=int, default=0,
                        help="evaluator memory budget; 0: 16384 on an accelerator, else 2048")
    parser.add_argument("--naive-sample", type=int, default=-1,
                        help="naive-loop candidates timed (-1: 6, tiny 2; 0 skips)")
    parser.add_argument("--original-candidates", type=int, default=-1,
                        help="candidates of the original loop (-1: all, tiny 3; extrapolated)")
    parser.add_argument("--skip", default="", help="comma list of rate,original,distill")
    args = parser.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    for dtype in args.dtypes:
        if dtype not in ("bfloat16", "float32"):
            parser.error(f"--dtypes: unknown dtype {dtype!r}")
    args.skip = {s for s in args.skip.split(",") if s}
    if args.skip - {"rate", "original", "distill"}:
        parser.error(f"--skip: unknown sections {sorted(args.skip)}")
    tiny = args.tiny
    args.distill_batch = args.distill_batch or (2 if tiny else 64)
    args.distill_steps = args.distill_steps or (1 if tiny else 5)
    if args.naive_sample < 0:
        args.naive_sample = 2 if tiny else 6
    if args.original_candidates < 0:
        args.original_candidates = 3 if tiny else 0
    args.space, args.teacher, args.resolution = (
        ("tiny", "tiny_teacher", 32) if tiny else ("dna_released", "efficientnet_b7", 224))
    return args


class Clock:
    """Time left of the suite's budget, and a record of the sections skipped for it."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def run_rating(args, backend: str) -> dict:
    """Section 1: both BN modes of block 1, cold and warm."""
    budget = args.rate_memory_budget_mib or (2048 if backend == "cpu" else 16384)
    job = rate_throughput.setup(args.space, 1, 32 if not args.tiny else 8, 1)
    out = {}
    for mode in ("recalibrate", "batch"):
        figures = rate_throughput.measure(
            mode, space_name=args.space, block_index=1, conv_impl="auto",
            memory_budget_mib=budget, warm=True, naive_sample=args.naive_sample, job=job)
        out[mode] = figures
    return out


def run_original(args, timeout_s: float) -> dict:
    """Section 2: `original_dna_rate.py` in a subprocess (its own torch, patches, sys.path)."""
    if not args.dna_repo:
        return {"skipped": "no --dna-repo given (a checkout of github.com/changlin31/DNA)"}
    command = [sys.executable, os.path.join(_HERE, "original_dna_rate.py"), "--dna-repo",
               args.dna_repo, "--num-candidates", str(args.original_candidates)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                             check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"the original loop did not finish in the {timeout_s:.0f} s left"}
    lines = run.stdout.strip().splitlines()
    if run.returncode != 0 or not lines:
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        return {"skipped": f"original_dna_rate.py failed (exit {run.returncode}): "
                           + " | ".join(tail)}
    return json.loads(lines[-1])


def run_distillation(args, dtype: str, peaks: dict | None, sequential: bool) -> dict:
    """Section 3 for one dtype: distill_throughput's figures plus MFU."""
    argv = ["--space", args.space, "--teacher", args.teacher, "--resolution",
            str(args.resolution), "--batch-size", str(args.distill_batch), "--steps",
            str(args.distill_steps), "--dtype", dtype]
    if not sequential:
        argv.append("--all-blocks-only")
    figures = distill_throughput.main(argv)
    peak = (peaks or {}).get(dtype)
    figures["peak_tflops"] = peak
    figures["all_blocks_mfu"] = mfu(figures["all_blocks_model_flop_per_s"], peak)
    figures["sequential_mfu"] = (mfu(figures["sequential_model_flop_per_s"], peak)
                                 if sequential else None)
    if dtype == "float32" and peaks:
        figures["all_blocks_mfu_vs_tf32_peak"] = mfu(figures["all_blocks_model_flop_per_s"],
                                                      peaks.get("tf32"))
    return figures


def _rate_summary(rating: dict, original: dict, tiny: bool) -> dict:
    """Candidates/s per mode and the speed-ups over the original (recalibrate only; none in
    tiny mode, where ours rates the tiny space and the original its real block 1)."""
    out = {}
    for mode, figures in rating.items():
        out[mode] = {k: figures.get(k) for k in (
            "label", "seconds", "warm_seconds", "candidates_per_second",
            "warm_candidates_per_second", "naive_seconds", "speedup", "max_abs_mse_difference")}
    base = original.get("seconds_all_candidates")
    ours = rating.get("recalibrate", {})
    if base and ours and tiny:
        out["recalibrate"]["speedup_vs_original"] = (
            "not computed: --tiny rates the tiny space, the original its real block 1")
    elif base and ours:
        out["recalibrate"]["speedup_vs_original_cold"] = round(base / ours["seconds"], 2)
        if ours.get("warm_seconds"):
            out["recalibrate"]["speedup_vs_original_warm"] = round(base / ours["warm_seconds"], 2)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    device = jax.devices()[0]
    backend = jax.default_backend()
    peaks = peak_tflops(device.device_kind)
    result = {
        "suite": "dna_jax accelerator suite", "tiny": args.tiny, "backend": backend,
        "device_kind": device.device_kind, "device_count": jax.device_count(),
        "peak_tflops": peaks, "jax": jax.__version__, "budget_s": args.budget_s,
        "space": args.space, "teacher": args.teacher, "resolution": args.resolution,
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    print(f"device: {device.device_kind} x {jax.device_count()} ({backend}); peaks {peaks}",
          flush=True)

    # 1. Rating of block 1 (both BN modes).
    rating: dict = {}
    if "rate" in args.skip:
        result["rate"] = {"skipped": "--skip rate"}
    else:
        rating = run_rating(args, backend)
        result["rate"] = rating
    print(f"[{clock.elapsed():.0f} s] rating done", flush=True)

    # 2. The original PyTorch loop on the same device.
    if "original" in args.skip:
        original = {"skipped": "--skip original"}
    elif clock.left() < 30:
        original = {"skipped": f"budget: {clock.left():.0f} s left"}
    else:
        original = run_original(args, max(clock.left() - 20, 10))
    result["original"] = original
    result["rate_summary"] = _rate_summary(rating, original, args.tiny)
    print(f"[{clock.elapsed():.0f} s] original: "
          f"{original.get('skipped') or original.get('seconds_all_candidates')}", flush=True)

    # 3. Distillation per dtype; a dtype's cost estimated from the previous one.
    result["distill"] = {}
    last_cost = None
    for dtype in args.dtypes:
        if "distill" in args.skip:
            result["distill"][dtype] = {"skipped": "--skip distill"}
            continue
        left = clock.left()
        if last_cost is not None and last_cost[1] > left:
            if last_cost[0] > left:
                result["distill"][dtype] = {"skipped": f"budget: {left:.0f} s left, the "
                                            f"previous dtype took {last_cost[1]:.0f} s"}
                continue
            sequential = False
        else:
            sequential = True
        start = clock.elapsed()
        figures = run_distillation(args, dtype, peaks, sequential)
        if not sequential:
            figures["sequential_skipped"] = f"budget: {left:.0f} s left"
        spent = clock.elapsed() - start
        share = sum(figures["compile_s"].get(k, 0.0) for k in figures["compile_s"]
                    if k == "all_blocks") / max(sum(figures["compile_s"].values()), 1e-9)
        last_cost = (spent * share, spent)  # (all-blocks part, everything)
        result["distill"][dtype] = figures
        print(f"[{clock.elapsed():.0f} s] distillation {dtype}: all-blocks "
              f"{figures['all_blocks_images_per_s']:.1f} images/s (MFU "
              f"{figures['all_blocks_mfu']}), sequential "
              f"{figures.get('sequential_images_per_s')}", flush=True)

    result["seconds"] = round(clock.elapsed(), 1)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, sort_keys=True, default=str))
    return result


if __name__ == "__main__":
    main()
