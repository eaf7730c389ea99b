r"""Rating throughput: the prefix-shared evaluator against the naive per-candidate loop.

    .venv/bin/python benchmarks/rate_throughput.py [--bn_mode recalibrate|batch|both]
        [--batch 32] [--naive_sample 6]

The paper's block 1 (`dna_released` space: input 48 x 56 x 56 from the B7 teacher's stage of
width 48, output 80 x 28 x 28, 4 layers x 6 ops = 1,296 candidates), random weights and data,
batch 32, one rating batch. BatchNorm mode (`--bn_mode`): 'recalibrate' (default) is the
like-for-like mode: the original's default `reset_bn_eval=True` (per candidate, BN statistics
from one training-mode forward over a recalibration batch, then an evaluation forward), the job
`benchmarks/original_dna_rate.py` times on the original PyTorch code; 'batch' normalises the
rating batch by its own statistics (half the forward work: not comparable with the original);
'both' runs the two, one after the other, each labelled.

The prefix-shared time is one cold `BlockRater.rate` (compilation included; the compile-free
time of a second call is printed with `--warm`). The naive loop (one jitted whole-path forward
per candidate, as the original) is timed on `--naive_sample` candidates and extrapolated to all
of them (0 skips it); its one compilation is timed apart and added once. Both use the same
convolution implementation (`--conv_impl`, 'auto' = shifted slices and matmuls on CPU) and
the same host allocator options (`dna_jax.host_memory.keep_freed_memory`, applied at import;
$DNA_JAX_KEEP_FREED_MEMORY=0 turns them off, for comparison). The
last output line is one JSON object: the figures of the mode, or with `--bn_mode both` one
object per mode under `modes`.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dna_jax import host_memory  # noqa: E402

KEEP_FREED_MEMORY = host_memory.keep_freed_memory()  # before JAX starts its CPU threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from dna_jax import rate  # noqa: E402
from dna_jax.costs import block_input_size  # noqa: E402
from dna_jax.models.initialize import init_variables  # noqa: E402
from dna_jax.models.supernet import SupernetBlock  # noqa: E402
from dna_jax.space import get_space  # noqa: E402

LIKE_FOR_LIKE = "recalibrate"  # the original's default reset_bn_eval=True
_BATCH = flags.DEFINE_integer("batch", 32, "Examples per rating batch.")
_BATCHES = flags.DEFINE_integer("rating_batches", 1, "Rating batches.")
_SAMPLE = flags.DEFINE_integer("naive_sample", 6, "Candidates timed in the naive loop.")
_BN = flags.DEFINE_enum("bn_mode", LIKE_FOR_LIKE, (*rate.BN_MODES, "both"),
                        "BatchNorm mode of the rating ('both': each in turn).")
_BUDGET = flags.DEFINE_integer("memory_budget_mib", 2048, "Evaluator memory budget (MiB).")
_CONV = flags.DEFINE_string("conv_impl", "auto", "Convolutions: auto, taps or xla.")
_WARM = flags.DEFINE_bool("warm", False, "Also time a second (compiled) evaluator call.")
_BLOCK = flags.DEFINE_integer("block", 1, "Block (>= 1) of the space.")
_SPACE = flags.DEFINE_string("space", "dna_released", "Search space (tests: 'tiny').")


def setup(space_name: str = "dna_released", block_index: int = 1, batch: int = 32,
          batches: int = 1):
    """(space, block, random variables, inputs [R, B, H, W, C], targets) of a rating job."""
    space = get_space(space_name)
    spec = space.blocks[block_index]
    in_channels = space.blocks[block_index - 1].out_channels  # the teacher's previous stage
    size = block_input_size(space, block_index, space.resolution)  # 56 for block 1 at 224 px
    block = SupernetBlock(space, block_index, in_channels)
    variables = init_variables(block, jax.random.key(0), jnp.zeros((1, size, size, in_channels)),
                               jnp.zeros(spec.num_layers, jnp.int32), train=False)
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(batches, batch, size, size, in_channels)).astype(np.float32)
    out = -(-size // spec.stride)
    targets = rng.normal(size=(batches, batch, out, out, spec.out_channels)).astype(np.float32)
    return space, block, variables, inputs, targets


def time_naive(block, variables, inputs, targets, encodings, bn_mode: str, conv_impl: str):
    """(compile seconds, seconds per candidate, errors) of the naive loop on `encodings`."""
    errors = rate.naive_errors_function(block, bn_mode, conv_impl)
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


def _label(bn_mode: str) -> str:
    if bn_mode == LIKE_FOR_LIKE:
        return "bn_mode recalibrate (like for like with the original's reset_bn_eval=True)"
    return "bn_mode batch (batch statistics: half the original's forward work, not like for like)"


def measure(bn_mode: str, *, space_name: str = "dna_released", block_index: int = 1,
            batch: int = 32, batches: int = 1, conv_impl: str = "auto",
            memory_budget_mib: int = 2048, warm: bool = False, naive_sample: int = 6,
            job=None) -> dict:
    """Times the prefix-shared rating (and a sample of the naive loop) in one BN mode.

    `job`: the `setup(...)` tuple to reuse (else built from the arguments). Returns the figures.
    """
    space, block, variables, inputs, targets = job or setup(space_name, block_index, batch,
                                                            batches)
    encodings = space.block_candidates(block_index)
    n = len(encodings)
    print(f"[{_label(bn_mode)}] block {block_index} of {space.name}: {n} candidates, inputs "
          f"{inputs.shape}, targets {targets.shape}, conv_impl {conv_impl}, "
          f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPU cores",
          flush=True)

    config = rate.get_default_config()
    config.update(bn_mode=bn_mode, conv_impl=conv_impl,
                  memory_budget_bytes=memory_budget_mib * 2 ** 20, log_every_seconds=10.0)
    rater = rate.BlockRater(block, variables, config)
    recal = inputs[0] if bn_mode == "recalibrate" else None
    start = time.perf_counter()
    shared = rater.rate(inputs, targets, recal)
    seconds = time.perf_counter() - start
    info = shared.info
    warm_s = None
    if warm:
        start = time.perf_counter()
        rater.rate(inputs, targets, recal)
        warm_s = time.perf_counter() - start
    print(f"[bn_mode {bn_mode}] prefix-shared: {seconds:.1f} s including compilation "
          f"({n / seconds:.1f} candidates/s), {len(rater.trace_counts)} jitted functions, "
          f"{info['jitted_calls']} calls, stacks {info['stack_rows']}, applications "
          f"{info['app_rows']}" + (f"; {warm_s:.2f} s compiled" if warm_s else ""), flush=True)

    macs, naive_macs = info["macs_executed"], info["naive_macs"]
    figures = {
        "bn_mode": bn_mode, "like_for_like": bn_mode == LIKE_FOR_LIKE, "label": _label(bn_mode),
        "space": space.name, "block": block_index,
        "candidates": n, "seconds": round(seconds, 3), "seconds_include_compile": True,
        "warm_seconds": None if warm_s is None else round(warm_s, 4),
        "candidates_per_second": round(n / seconds, 3),
        "warm_candidates_per_second": None if warm_s is None else round(n / warm_s, 2),
        "macs_executed": macs, "naive_macs": naive_macs,
        "mac_ratio": round(naive_macs / macs, 2),
        "gflops": round(2 * macs / seconds / 1e9, 2),
        "gflops_warm": None if warm_s is None else round(2 * macs / warm_s / 1e9, 2),
        "batch": inputs.shape[1], "rating_batches": inputs.shape[0], "conv_impl": conv_impl,
        "jitted_functions": len(rater.trace_counts), "backend": jax.default_backend(),
        "cpu_cores": os.cpu_count(), "keep_freed_memory": KEEP_FREED_MEMORY,
    }
    if naive_sample:
        sample = encodings[np.sort(np.random.default_rng(1).choice(n, naive_sample, False))]
        compile_s, per_candidate, naive_errors = time_naive(block, variables, inputs, targets,
                                                            sample, bn_mode, conv_impl)
        naive_seconds = compile_s + per_candidate * n
        rows = [int(np.nonzero((shared.encodings == e).all(1))[0][0]) for e in sample]
        max_diff = float(np.abs(naive_errors[..., 0] - shared.batch_mse[rows]).max())
        print(f"[bn_mode {bn_mode}] naive loop: compile {compile_s:.1f} s + {per_candidate:.3f} "
              f"s per candidate, timed on {len(sample)} sampled candidates and EXTRAPOLATED to "
              f"{n}: {naive_seconds:.1f} s ({n / naive_seconds:.2f} candidates/s); max |mse "
              f"difference| on the sample {max_diff:.2e}", flush=True)
        figures.update({
            "naive_seconds": round(naive_seconds, 2), "naive_extrapolated_from": len(sample),
            "naive_compile_seconds": round(compile_s, 2),
            "naive_candidates_per_second": round(n / naive_seconds, 3),
            "speedup": round(naive_seconds / seconds, 2),
            "naive_gflops": round(2 * naive_macs / naive_seconds / 1e9, 2),
            "max_abs_mse_difference": max_diff})
    figures["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(f"[bn_mode {bn_mode}] multiply-adds: prefix-shared {macs / 1e9:.1f} G, naive "
          f"{naive_macs / 1e9:.1f} G ({figures['mac_ratio']}x); achieved {figures['gflops']} "
          f"GFLOP/s; speedup over the naive loop {figures.get('speedup')}x; load average "
          f"{figures['load_average_1min']} (CPU shared with other jobs)", flush=True)
    return figures


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    modes = rate.BN_MODES if _BN.value == "both" else (_BN.value,)
    job = setup(_SPACE.value, _BLOCK.value, _BATCH.value, _BATCHES.value)
    results = {mode: measure(mode, block_index=_BLOCK.value, conv_impl=_CONV.value,
                             memory_budget_mib=_BUDGET.value, warm=_WARM.value,
                             naive_sample=_SAMPLE.value, job=job)
               for mode in modes}
    if len(modes) == 1:
        print(json.dumps(results[modes[0]]))
    else:
        print(json.dumps({"modes": results, "like_for_like_mode": LIKE_FOR_LIKE}))


if __name__ == "__main__":
    app.run(main)
