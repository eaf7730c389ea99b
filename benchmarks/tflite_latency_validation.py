"""Does a TFLite latency table predict the latency of whole exported networks? (issue 24)

For each space (default: 60 random networks of `small` at its 32 px, 30 of `dna_released` at
224 px; random weights, 10 classes) this run measures, on this machine and in this process:

  * the TFLite latency table (`dna_jax.tflite_latency`: every layer converted alone and timed
    on the interpreter, `--threads` threads, batch `--batch`, `--repeats` invokes);
  * every network converted whole to TFLite and timed the same way (the truth), its
    invokes spread over `--rounds` interleaved rounds of all the networks;
  * the JAX-timed table of `benchmarks/measure_latency.py` (jitted layers, median of 10 runs).

Each timed file's invokes are summarised two ways, from the same samples: their minimum (the
headline: other processes preempting a long invoke on a shared CPU inflate the median of a
whole network far more than that of a layer) and their median. Predictors of the measured
latency, scored by the mean absolute percentage error (MAPE) and Kendall's tau-b over the
networks, with percentile bootstrap 95% intervals (networks resampled):

  tflite_table                  fixed_ms + the layers' entries (what the search adds up);
                                `mape_scaled`: times one scale fitted leave-one-out
  tflite_table-invoke_overhead  minus (timed files - 1) x the invoke time of a one-op file:
                                a correction from the tables alone (no fit to networks)
  tflite_table+op_offsets       plus one offset (ms) per layer of each op kind and an
                                intercept, least squares on the residuals, predicted
                                leave-one-out (each network by offsets fitted on the others)
  jax_table                     the JAX table's sum: tau; `mape` raw (another runtime: a scale
                                error), `mape_scaled` with one scale fitted leave-one-out
  macs                          multiply-adds: tau, and `mape_scaled` (ms per multiply-add)

The bootstrap resamples the networks with their leave-one-out predictions fixed (it does not
refit). The load average is recorded before and after each phase: on a shared machine run it
at normal priority (not niced). `--quick` runs the `tiny` space (a few networks, few
repeats) to test the script. The last line is one JSON object.

  .venv/bin/python benchmarks/tflite_latency_validation.py --out results/tflite_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(_HERE))

import measure_latency  # noqa: E402  (benchmarks/)

from dna_jax import costs as costs_lib  # noqa: E402
from dna_jax import latency as lat  # noqa: E402
from dna_jax import machine_info  # noqa: E402
from dna_jax import ranking_stats  # noqa: E402
from dna_jax import space as space_lib  # noqa: E402
from dna_jax import tflite_latency  # noqa: E402

DEFAULT_SPACES = "small:60:32,dna_released:30:224"
STATISTICS = ("min", "median")  # of each piece's invokes; the first is the headline
QUICK_SPACES = "tiny:5:16"


# ---- statistics (numpy only) -------------------------------------------------------------------

def mape(measured, predicted) -> float:
    """Mean absolute percentage error (%) of `predicted` against `measured`."""
    measured, predicted = np.asarray(measured, float), np.asarray(predicted, float)
    return float(100.0 * np.mean(np.abs(predicted - measured) / measured))


def loo_offsets(measured, predicted, features) -> np.ndarray:
    """Leave-one-out predictions of `predicted + features @ c + c0`, where (c, c0) is the least
    squares fit of the residuals `measured - predicted` on the other networks (min-norm when
    the columns are collinear, e.g. a fixed number of layers)."""
    measured, predicted = np.asarray(measured, float), np.asarray(predicted, float)
    design = np.column_stack([np.asarray(features, float), np.ones(len(measured))])
    residual = measured - predicted
    out = np.empty(len(measured))
    for i in range(len(measured)):
        keep = np.arange(len(measured)) != i
        coef = np.linalg.lstsq(design[keep], residual[keep], rcond=None)[0]
        out[i] = predicted[i] + design[i] @ coef
    return out


def fit_offsets(measured, predicted, features) -> np.ndarray:
    """The offsets (per feature, then the intercept) fitted on every network."""
    design = np.column_stack([np.asarray(features, float), np.ones(len(measured))])
    return np.linalg.lstsq(design, np.asarray(measured, float) - np.asarray(predicted, float),
                           rcond=None)[0]


def loo_scale(measured, predictor) -> np.ndarray:
    """Leave-one-out predictions of `a * predictor`, `a` the least-squares scale through the
    origin of the relative error (sum(m x) / sum(x x) weighted by 1 / m^2) on the others."""
    m, x = np.asarray(measured, float), np.asarray(predictor, float)
    w = 1.0 / m ** 2
    out = np.empty(len(m))
    for i in range(len(m)):
        keep = np.arange(len(m)) != i
        a = np.sum(w[keep] * m[keep] * x[keep]) / np.sum(w[keep] * x[keep] ** 2)
        out[i] = a * x[i]
    return out


def score(measured, predicted, *, with_mape: bool = True, num_resamples: int = 2000,
          seed: int = 0) -> dict:
    """MAPE (%) and Kendall tau-b with percentile bootstrap 95% intervals over the networks."""
    out = {"tau": ranking_stats.kendall_tau(measured, predicted),
           "tau_ci95": ranking_stats.bootstrap_interval(
               measured, predicted, ranking_stats.kendall_tau, num_resamples=num_resamples,
               seed=seed)}
    if with_mape:
        out["mape"] = mape(measured, predicted)
        out["mape_ci95"] = ranking_stats.bootstrap_interval(
            measured, predicted, mape, num_resamples=num_resamples, seed=seed)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def predictor_scores(rows: Sequence[dict], statistic: str, num_ops: int, invoke_ms: float,
                     num_resamples: int, seed: int) -> tuple[dict, dict]:
    """{predictor: scores} against the networks measured with `statistic`, and the per-op
    offsets (ms) fitted on every network.

    The rows hold `measured_ms[statistic]`, `tflite_table_ms[statistic]`, `jax_table_ms`,
    `macs`, `op_counts` and `pieces` (the timed files the table sum adds: layers, stem, head).
    """
    measured = np.array([r["measured_ms"][statistic] for r in rows])
    table = np.array([r["tflite_table_ms"][statistic] for r in rows])
    jax_table = np.array([r["jax_table_ms"] for r in rows])
    macs = np.array([r["macs"] for r in rows], float)
    counts = np.array([r["op_counts"] for r in rows], float)[:, :num_ops]
    pieces = np.array([r["pieces"] for r in rows], float)
    kw = dict(num_resamples=num_resamples, seed=seed)

    def scaled(name, values):  # rank statistics of the raw predictor, MAPE of the LOO scale
        out = score(measured, values, with_mape=name != "macs", **kw)
        fitted = score(measured, loo_scale(measured, values), **kw)
        out.update(mape_scaled=fitted["mape"], mape_scaled_ci95=fitted["mape_ci95"])
        return out

    scores = {
        "tflite_table": scaled("tflite_table", table),
        "tflite_table-invoke_overhead": score(measured, table - (pieces - 1) * invoke_ms, **kw),
        "tflite_table+op_offsets": score(measured, loo_offsets(measured, table, counts), **kw),
        "jax_table": scaled("jax_table", jax_table),
        "macs": scaled("macs", macs),
    }
    names = [f"op{k}" for k in range(num_ops)] + ["intercept"]
    return scores, dict(zip(names, fit_offsets(measured, table, counts).tolist()))


# ---- measurements ------------------------------------------------------------------------------

def sample_networks(space, count: int, rng: np.random.Generator) -> list:
    """`count` distinct random architectures (fewer if the space is smaller)."""
    seen, out = set(), []
    for _ in range(100 * count):
        if len(out) == min(count, space.size()):
            break
        arch = space.sample(rng)
        if arch.blocks not in seen:
            seen.add(arch.blocks)
            out.append(arch)
    return out


def op_counts(space, arch) -> list[int]:
    """Searched layers per op index (skip last)."""
    counts = [0] * (len(space.ops) + 1)
    for ops in arch.blocks:
        for op in ops:
            counts[op] += 1
    return counts


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def table_pieces(space, arch) -> int:
    """Timed files a table sum adds for `arch`: its non-skip layers, the stem, the head."""
    return 2 + sum(op != space.skip_index for ops in arch.blocks for op in ops)


def measure_space(name: str, count: int, resolution: int, args, log) -> dict:
    """Both tables and `count` whole networks of one space, and the predictors' scores under
    both statistics of the invokes (`min`, `median`): each piece is timed once."""
    space = space_lib.get_space(name)
    timer = tflite_latency.TfliteTimer(threads=args.threads, batch=args.batch,
                                       repeats=args.repeats, warmup=args.warmup,
                                       statistic=STATISTICS[0], cache_dir=args.cache_dir,
                                       seed=args.seed)
    load = {"start": loadavg()}
    start = time.perf_counter()
    log(f"{name} at {resolution} px: TFLite table")
    tables = {STATISTICS[0]: tflite_latency.measure_space_table(space, timer, resolution,
                                                                args.num_classes, log)}
    table_s = time.perf_counter() - start
    load["after_tflite_table"] = loadavg()

    rows, archs = [], sample_networks(space, count, np.random.default_rng(args.seed))
    start = time.perf_counter()
    log(f"{name}: {len(archs)} networks, {args.rounds} interleaved rounds")
    timings = timer.time_networks(space, archs, resolution, args.num_classes, args.rounds)
    for i, (arch, measured) in enumerate(zip(archs, timings)):
        spec = space.to_network_spec(arch)
        rows.append({"arch": [list(b) for b in arch.blocks],
                     "measured_ms": {STATISTICS[0]: measured},
                     "tflite_table_ms": {STATISTICS[0]: measure_latency.table_network_ms(
                         tables[STATISTICS[0]], space, arch, resolution)},
                     "macs": costs_lib.network_costs(spec, resolution,
                                                     args.num_classes).total.macs,
                     "op_counts": op_counts(space, arch), "pieces": table_pieces(space, arch)})
        log(f"  network {i}: measured {measured:.4f} ms, table "
            f"{rows[-1]['tflite_table_ms'][STATISTICS[0]]:.4f} ms ({STATISTICS[0]})")
    networks_s = time.perf_counter() - start
    load["after_networks"] = loadavg()
    invoke_ms = {}
    for statistic in STATISTICS:  # the same invokes summarised the other way: no new timing
        timer.statistic = statistic
        tables[statistic] = tflite_latency.measure_space_table(space, timer, resolution,
                                                               args.num_classes)
        invoke_ms[statistic] = timer.invoke_overhead_ms()
        for row, arch in zip(rows, archs):
            row["measured_ms"][statistic] = timer.network_ms(space, arch, resolution,
                                                             args.num_classes)
            row["tflite_table_ms"][statistic] = measure_latency.table_network_ms(
                tables[statistic], space, arch, resolution)

    log(f"{name}: JAX table")
    start = time.perf_counter()
    jax_table, _ = measure_latency.measure_jax_table(space, resolution, args.batch,
                                                     args.jax_runs, 2, args.num_classes)
    jax_s = time.perf_counter() - start
    load["after_jax_table"] = loadavg()
    for row, arch in zip(rows, archs):
        row["jax_table_ms"] = measure_latency.table_network_ms(jax_table, space, arch,
                                                               resolution)

    predictors, offsets = {}, {}
    for statistic in STATISTICS:
        predictors[statistic], fitted = predictor_scores(
            rows, statistic, len(space.ops), invoke_ms[statistic], args.bootstrap, args.seed)
        offsets[statistic] = {(space.ops[int(k[2:])].name if k.startswith("op") else k): v
                              for k, v in fitted.items()}
    measured = [r["measured_ms"][STATISTICS[0]] for r in rows]
    return {
        "resolution": resolution, "networks": len(rows),
        "measured_ms": {"min": min(measured), "median": float(np.median(measured)),
                        "max": max(measured)},
        "tflite_table": {"entries": len(tables[STATISTICS[0]].entries),
                         "fixed_ms": {k: lat.fixed_latency_ms(t) for k, t in tables.items()},
                         "invoke_ms": invoke_ms,
                         "distinct_pieces": len(timer.samples) - len(rows) - 1,
                         "conversions": timer.conversions, "seconds": round(table_s, 1)},
        "jax_table": {"entries": len(jax_table.entries),
                      "fixed_ms": lat.fixed_latency_ms(jax_table), "seconds": round(jax_s, 1)},
        "networks_seconds": round(networks_s, 1),
        "predictors": predictors, "op_offsets_ms": offsets,
        "loadavg": load, "rows": rows,
        "tflite_table_meta": dict(tables[STATISTICS[0]].meta),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spaces", default="",
                        help=f"name:networks:resolution,... (default {DEFAULT_SPACES})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_SPACES}, 3 repeats, 200 resamples: tests the script")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=0, help="invokes per timing (median); "
                        "default 30 (3 with --quick)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="whole networks: the repeats "
                        "spread over this many interleaved rounds of every network")
    parser.add_argument("--jax-runs", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="bootstrap resamples (default 2000, 200 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="", help="keep converted TFLite files here")
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    args.spaces = args.spaces or (QUICK_SPACES if args.quick else DEFAULT_SPACES)
    args.repeats = args.repeats or (3 if args.quick else 30)
    args.bootstrap = args.bootstrap or (200 if args.quick else 2000)
    if args.quick:
        args.jax_runs, args.rounds = min(args.jax_runs, 3), min(args.rounds, 2)
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start, load_start = time.perf_counter(), loadavg()
    log = lambda text: print(text, flush=True)  # noqa: E731
    spaces = {}
    for item in args.spaces.split(","):
        name, count, resolution = item.split(":")
        spaces[name] = measure_space(name, int(count), int(resolution), args, log)
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (loaded by now)
    cpu = machine_info.cpu_description()
    result = {
        "benchmark": "tflite_latency_validation", "quick": args.quick,
        "note": (f"latencies measured on a shared {cpu['cpus']}-vCPU "
                 f"{cpu['model_name']} ({cpu.get('microarchitecture', 'unknown core')}, "
                 f"AVX-512 {'yes' if cpu.get('avx512') else 'no'}) beside other jobs (a niced "
                 "background training job); load averages recorded per phase; TFLite timed "
                 f"with {args.threads} interpreter thread(s), XLA:CPU with its default "
                 "threads"),
        "cpu": cpu, "tensorflow": tf.__version__,
        "nice": os.nice(0), "threads": args.threads, "batch": args.batch,
        "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
        "jax_runs": args.jax_runs,
        "num_classes": args.num_classes, "bootstrap_resamples": args.bootstrap,
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spaces": spaces, "seconds": round(time.perf_counter() - start, 1),
    }
    for name, figures in spaces.items():
        log(f"{name}: {figures['networks']} networks, measured "
            f"{figures['measured_ms']['min']:.3f}-{figures['measured_ms']['max']:.3f} ms")
        for statistic, predictors in figures["predictors"].items():
            for predictor, s in predictors.items():
                texts = [f"{key} {s[key]:7.1f}% [{s[key + '_ci95'][0]:.1f}, "
                         f"{s[key + '_ci95'][1]:.1f}]" for key in ("mape", "mape_scaled")
                         if key in s]
                log(f"  {statistic:<6} {predictor:<29} tau {s['tau']:.3f} "
                    f"[{s['tau_ci95'][0]:.3f}, {s['tau_ci95'][1]:.3f}]  " + "  ".join(texts))
    if args.out:
        from dna_jax import artifacts  # pylint: disable=import-outside-toplevel
        artifacts.write_json(args.out, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
