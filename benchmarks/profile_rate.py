r"""Where the time of rating a block goes, by XLA op kind (a `jax.profiler` trace).

    .venv/bin/python benchmarks/profile_rate.py [--bn_mode recalibrate] [--trace_dir DIR]

Rates block 1 of the released space (the job of `rate_throughput.py`) once cold (compiling
every function), then traces a second, compiled call with `jax.profiler.trace` (a Perfetto
trace is written beside the XPlane one) and sums the durations of the executed XLA ops
(XLA:CPU thunks, on all threads) by kind, from their names: 'dot/conv' (matmuls, YNNPACK/oneDNN
fusions and convolutions: the tap convolutions' work), 'reduce' (reductions: BN statistics,
SE pooling, the error sums), 'gather/slice' (stack gathers, tap slices, dynamic slices),
'copy/transpose/concat' (layout and data movement), 'elementwise fusion' (the other fusions:
BN apply, swish, sigmoid, adds) and 'other'. Thunk time is CPU time summed over threads, so
the shares, not the totals, are what to compare with the wall time. The last output line is
one JSON object: the shares, the top op names and the wall times.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rate_throughput  # noqa: E402  (benchmarks/; first: it sets the host allocator up)
import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from dna_jax import rate  # noqa: E402

_MODE = flags.DEFINE_enum("profile_bn_mode", "recalibrate", rate.BN_MODES, "BatchNorm mode.")
_DIR = flags.DEFINE_string("trace_dir", "", "Where the trace goes (default: a temp folder).")
_PROFILE_SPACE = flags.DEFINE_string("profile_space", "dna_released", "Search space.")
_PROFILE_BATCH = flags.DEFINE_integer("profile_batch", 32, "Examples per rating batch.")

KINDS = (
    ("dot/conv", re.compile(r"dot|conv|ynn|onednn|xnn|gemm|matmul|custom-call|custom_call")),
    ("reduce", re.compile(r"reduce")),
    ("gather/slice", re.compile(r"gather|slice|scatter|dynamic")),
    ("copy/transpose/concat", re.compile(r"copy|transpose|concat|pad|bitcast|broadcast\b")),
    ("elementwise fusion", re.compile(r"fusion|add|multiply|exp|logistic|select|divide|"
                                      r"subtract|maximum|rsqrt|negate|convert|compare")),
)
# Runtime and Python events, not XLA ops.
_NOT_OPS = re.compile(r"^\$|Await|Execute|PjRt|Pjrt|Thunk|Threadpool|Buffer|Handle |Parse|"
                      r"Allocate|Wait |GarbageCollect|CollectGarbage|^end: |Function\(|"
                      r"Transfer|Copy.*Host|Record|Region|Compile|compile|lower|trace")


def op_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name.lower()):
            return kind
    return "other"


def summarise(trace_path: str, top: int = 25) -> dict:
    """Durations of the XLA op events of a Perfetto trace, by kind and by name (seconds)."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    by_name: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not _NOT_OPS.search(event.get("name", "")):
            by_name[event["name"]] += event.get("dur", 0.0) * 1e-6
    base = collections.Counter()
    for name, seconds in by_name.items():
        base[re.sub(r"\.\d+$", "", name)] += seconds  # fusion.12 -> fusion
    by_kind: collections.Counter = collections.Counter()
    for name, seconds in base.items():
        by_kind[op_kind(name)] += seconds
    total = sum(by_kind.values()) or 1.0
    return {
        "op_seconds": round(total, 3),
        "share_by_kind": {k: round(v / total, 4) for k, v in by_kind.most_common()},
        "seconds_by_kind": {k: round(v, 3) for k, v in by_kind.most_common()},
        "top_ops": [(name, round(seconds, 3), op_kind(name))
                    for name, seconds in base.most_common(top)],
    }


def main(argv):
    del argv
    mode = _MODE.value
    job = rate_throughput.setup(_PROFILE_SPACE.value, 1, _PROFILE_BATCH.value, 1)
    space, block, variables, inputs, targets = job
    config = rate.get_default_config()
    config.update(bn_mode=mode, log_every_seconds=60.0)
    rater = rate.BlockRater(block, variables, config)
    recal = inputs[0] if mode == "recalibrate" else None
    start = time.perf_counter()
    rater.rate(inputs, targets, recal)
    cold = time.perf_counter() - start
    trace_dir = _DIR.value or tempfile.mkdtemp(prefix="dna_jax_profile_")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        rater.rate(inputs, targets, recal)
    traced = time.perf_counter() - start
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    figures = summarise(path)
    figures.update({"bn_mode": mode, "space": space.name, "block": 1,
                    "batch": _PROFILE_BATCH.value, "cold_seconds": round(cold, 2),
                    "traced_warm_seconds": round(traced, 2), "trace": path,
                    "load_average_1min": round(os.getloadavg()[0], 2),
                    "keep_freed_memory": rate_throughput.KEEP_FREED_MEMORY})
    print(f"bn_mode {mode}: cold {cold:.1f} s, traced warm call {traced:.1f} s (load average "
          f"{figures['load_average_1min']}, CPU shared); XLA op time by kind:")
    for kind, share in figures["share_by_kind"].items():
        print(f"  {kind:>22}: {share:6.1%}  ({figures['seconds_by_kind'][kind]:.1f} s)")
    print("top ops:", figures["top_ops"][:12])
    print(json.dumps(figures))


if __name__ == "__main__":
    app.run(main)
