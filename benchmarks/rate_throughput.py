r"""Rating throughput: the prefix-shared evaluator against the naive per-candidate loop.

    .venv/bin/python benchmarks/rate_throughput.py [--batch 32] [--naive_sample 6]

The paper's block 1 (`dna_released` space: input 48 x 56 x 56 from the B7 teacher's stage of
width 48, output 80 x 28 x 28, 4 layers x 6 ops = 1,296 candidates), random weights and data,
batch 32, one rating batch, training-mode BN (`bn_mode='batch'`). The prefix-shared time is
one cold `BlockRater.rate` (compilation included; the compile-free time of a second call is
printed with `--warm`). The naive loop (one jitted whole-path forward per candidate, as the
original) is timed on `--naive_sample` candidates and extrapolated to all of them; its one
compilation is timed apart and added once. Both use the same convolution implementation
(`--conv_impl`, 'auto' = shifted slices and matmuls on CPU). The last output line is one JSON
object with the figures.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from dna_jax import rate  # noqa: E402
from dna_jax.costs import block_input_size  # noqa: E402
from dna_jax.models.initialize import init_variables  # noqa: E402
from dna_jax.models.supernet import SupernetBlock  # noqa: E402
from dna_jax.space import get_space  # noqa: E402

_BATCH = flags.DEFINE_integer("batch", 32, "Examples per rating batch.")
_BATCHES = flags.DEFINE_integer("rating_batches", 1, "Rating batches.")
_SAMPLE = flags.DEFINE_integer("naive_sample", 6, "Candidates timed in the naive loop.")
_BN = flags.DEFINE_enum("bn_mode", "batch", rate.BN_MODES, "BatchNorm mode of the rating.")
_BUDGET = flags.DEFINE_integer("memory_budget_mib", 2048, "Evaluator memory budget (MiB).")
_CONV = flags.DEFINE_string("conv_impl", "auto", "Convolutions: auto, taps or xla.")
_WARM = flags.DEFINE_bool("warm", False, "Also time a second (compiled) evaluator call.")
_BLOCK = flags.DEFINE_integer("block", 1, "Block (>= 1) of the dna_released space.")


def _setup():
    """The block, its random variables, inputs [R, B, 56, 56, 48] and targets."""
    space = get_space("dna_released")
    k = _BLOCK.value
    spec = space.blocks[k]
    in_channels = space.blocks[k - 1].out_channels  # the teacher's previous stage width
    size = block_input_size(space, k, space.resolution)  # 56 for block 1 at 224 px
    block = SupernetBlock(space, k, in_channels)
    variables = init_variables(block, jax.random.key(0), jnp.zeros((1, size, size, in_channels)),
                               jnp.zeros(spec.num_layers, jnp.int32), train=False)
    rng = np.random.default_rng(0)
    shape = (_BATCHES.value, _BATCH.value)
    inputs = rng.normal(size=(*shape, size, size, in_channels)).astype(np.float32)
    out = -(-size // spec.stride)
    targets = rng.normal(size=(*shape, out, out, spec.out_channels)).astype(np.float32)
    return space, block, variables, inputs, targets


def _time_naive(block, variables, inputs, targets, encodings):
    """(compile seconds, seconds per candidate, errors) of the naive loop on `encodings`."""
    errors = rate.naive_errors_function(block, _BN.value, _CONV.value)
    x, t = jnp.asarray(inputs), jnp.asarray(targets)
    recal = x[0]
    start = time.perf_counter()
    errors(variables, jnp.asarray(encodings[0], jnp.int32), x, t, recal).block_until_ready()
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = [np.asarray(errors(variables, jnp.asarray(row, jnp.int32), x, t, recal))
           for row in encodings]  # np.asarray: a host sync per candidate, as the original
    per_candidate = (time.perf_counter() - start) / len(encodings)
    return max(first - per_candidate, 0.0), per_candidate, np.stack(out)


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    space, block, variables, inputs, targets = _setup()
    encodings = space.block_candidates(_BLOCK.value)
    n = len(encodings)
    print(f"block {_BLOCK.value}: {n} candidates, inputs {inputs.shape}, targets "
          f"{targets.shape}, bn_mode {_BN.value}, conv_impl {_CONV.value}, "
          f"{jax.device_count()} device(s), {os.cpu_count()} CPU cores", flush=True)

    config = rate.get_default_config()
    config.update(bn_mode=_BN.value, conv_impl=_CONV.value,
                  memory_budget_bytes=_BUDGET.value * 2 ** 20, log_every_seconds=10.0)
    rater = rate.BlockRater(block, variables, config)
    recal = inputs[0] if _BN.value == "recalibrate" else None
    start = time.perf_counter()
    shared = rater.rate(inputs, targets, recal)
    seconds = time.perf_counter() - start
    info = shared.info
    warm = None
    if _WARM.value:
        start = time.perf_counter()
        rater.rate(inputs, targets, recal)
        warm = time.perf_counter() - start
    print(f"prefix-shared: {seconds:.1f} s including compilation ({n / seconds:.1f} "
          f"candidates/s), {len(rater.trace_counts)} jitted functions, "
          f"{info['jitted_calls']} calls, stacks {info['stack_rows']}, applications "
          f"{info['app_rows']}" + (f"; {warm:.1f} s compiled" if warm else ""), flush=True)

    sample = encodings[np.sort(np.random.default_rng(1).choice(n, _SAMPLE.value, False))]
    compile_s, per_candidate, naive_errors = _time_naive(block, variables, inputs, targets,
                                                         sample)
    naive_seconds = compile_s + per_candidate * n
    rows = [int(np.nonzero((shared.encodings == e).all(1))[0][0]) for e in sample]
    max_diff = float(np.abs(naive_errors[..., 0] - shared.batch_mse[rows]).max())
    print(f"naive loop: compile {compile_s:.1f} s + {per_candidate:.2f} s per candidate, "
          f"timed on {len(sample)} sampled candidates and EXTRAPOLATED to {n}: "
          f"{naive_seconds:.1f} s ({n / naive_seconds:.2f} candidates/s); max |mse "
          f"difference| on the sample {max_diff:.2e}", flush=True)

    macs, naive_macs = info["macs_executed"], info["naive_macs"]
    figures = {
        "candidates": n, "seconds": round(seconds, 2), "seconds_include_compile": True,
        "warm_seconds": None if warm is None else round(warm, 2),
        "candidates_per_second": round(n / seconds, 2),
        "naive_seconds": round(naive_seconds, 2), "naive_extrapolated_from": len(sample),
        "naive_compile_seconds": round(compile_s, 2),
        "naive_candidates_per_second": round(n / naive_seconds, 3),
        "speedup": round(naive_seconds / seconds, 2),
        "macs_executed": macs, "naive_macs": naive_macs,
        "mac_ratio": round(naive_macs / macs, 2),
        "gflops": round(2 * macs / seconds / 1e9, 2),
        "gflops_warm": None if warm is None else round(2 * macs / warm / 1e9, 2),
        "naive_gflops": round(2 * naive_macs / naive_seconds / 1e9, 2),
        "max_abs_mse_difference": max_diff,
        "batch": _BATCH.value, "rating_batches": _BATCHES.value, "bn_mode": _BN.value,
        "conv_impl": _CONV.value, "jitted_functions": len(rater.trace_counts),
        "cpu_cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(f"multiply-adds: prefix-shared {macs / 1e9:.0f} G, naive {naive_macs / 1e9:.0f} G "
          f"({figures['mac_ratio']}x); achieved {figures['gflops']} GFLOP/s (naive "
          f"{figures['naive_gflops']}); speedup {figures['speedup']}x; load average "
          f"{figures['load_average_1min']} (CPU shared with other jobs)")
    print(json.dumps(figures))


if __name__ == "__main__":
    app.run(main)
