"""Search speed: exact Pareto front, one budget, two budgets, top-k and beam search.

Cases (issue 7): 6 blocks x 1,296 candidates (4 layers x 6 ops, the DNA block size) and 5
blocks x 46,656 (6 layers x 6 ops). Two kinds of tables:
  * `random`: every candidate gets independent random costs (params, macs) and a score that
    falls loosely with macs plus noise: the hard case, no cost ties;
  * `layered`: `dna_jax.search.synthetic_block_tables`, costs summed from per-layer op costs
    as in real spaces (many ties, small block fronts).
For each: time of the full front, of the best network under one macs budget (the front's
median cost), under macs and params budgets at once, of the top 10, and of beam search (width
`--beam-width`), and whether beam search found the exact optimum. Times are the median of
`--repeats` runs (the first run is reported separately: it includes numpy warm-up). A sweep
over beam widths 1..256 on the two-budget problem shows from which width the beam is exact.

  .venv/bin/python benchmarks/search_speed.py [--repeats 3] [--beam-width 256] [--quick]

The last line is one JSON object; `front_seconds`, `budget_seconds`, `beam_seconds` and
`beam_found_optimum` are the 6 x 1,296 `random` case (target: front under 1 s on 2 cores).
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

from dna_jax import search as S  # noqa: E402  (after the path insert)


def random_tables(seed: int, num_blocks: int, num_layers: int, num_ops: int = 6
                  ) -> list[S.BlockTable]:
    """Tables with independent random costs per candidate (no ties)."""
    rng = np.random.default_rng(seed)
    n = num_ops ** num_layers
    grids = np.meshgrid(*[np.arange(num_ops)] * num_layers, indexing="ij")
    encodings = np.stack([g.ravel() for g in grids], axis=1).astype(np.int32)
    tables = []
    for b in range(num_blocks):
        macs = rng.integers(2_000_000, 40_000_000, n) * (num_blocks - b)
        params = rng.integers(10_000, 500_000, n) * (b + 1)
        relative = (macs - macs.min()) / (macs.max() - macs.min())
        score = 1.0 + 0.5 * (1.0 - relative) + rng.normal(0.0, 0.15, n)
        tables.append(S.BlockTable(encodings, score, {"macs": macs, "params": params},
                                   source=f"<random block {b}>"))
    return tables


def timed(fn, repeats: int):
    """(first-run seconds, median seconds of `repeats` more runs, last value)."""
    start = time.perf_counter()
    value = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times) if times else first, value


def run_case(tables, repeats: int, beam_width: int) -> dict:
    """Every measurement of one set of tables."""
    first, front_s, front = timed(lambda: S.pareto_front(tables, "macs"), repeats)
    budget = float(np.median(front.cost))
    _, budget_s, best = timed(lambda: S.search(tables, {"macs": budget})[0], repeats)
    params_budget = float(best.costs["params"]) * 0.9  # binding: the macs-optimum is cut off
    budgets2 = {"macs": budget, "params": params_budget}
    _, two_s, best2 = timed(lambda: S.search(tables, budgets2)[0], repeats)
    _, topk_s, top = timed(lambda: S.search(tables, {"macs": (budget * 0.9, budget)}, k=10),
                           repeats)
    _, beam_s, beam = timed(lambda: S.beam_search(tables, {"macs": budget},
                                                  width=beam_width)[0], repeats)
    _, beam2_s, beam2 = timed(lambda: S.beam_search(tables, budgets2, width=beam_width)[0],
                              repeats)
    assert best.objective == front.best_under(budget).objective  # two exact methods agree
    sweep = {}
    for width in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        try:
            found = S.beam_search(tables, budgets2, width=width)[0].objective
        except ValueError:  # a narrow beam may find nothing feasible
            found = np.inf
        sweep[width] = bool(found == best2.objective)
    assert best2.costs["params"] <= params_budget and best2.objective >= best.objective
    return {
        "blocks": len(tables), "candidates_per_block": len(tables[0]),
        "compositions": float(np.prod([float(len(t)) for t in tables])),
        "front_points": len(front), "front_seconds": front_s, "front_first_seconds": first,
        "budget": budget, "budget_seconds": budget_s, "two_budget_seconds": two_s,
        "top10_interval_seconds": topk_s, "top10_found": len(top),
        "beam_width": beam_width, "beam_seconds": beam_s,
        "beam_found_optimum": bool(beam.objective == best.objective),
        "beam_two_budget_seconds": beam2_s,
        "beam_two_budget_found_optimum": bool(beam2.objective == best2.objective),
        "beam_two_budget_optimum_by_width": sweep,
        "beam_min_width_for_optimum": min([w for w, ok in sweep.items()
                                           if ok and all(sweep[v] for v in sweep if v > w)],
                                          default=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beam-width", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="only the 6 x 1,296 cases")
    parser.add_argument("--out", help="also write the JSON figures to this file")
    args = parser.parse_args()
    shapes = [(6, 4)] + ([] if args.quick else [(5, 6)])
    results = {}
    for kind, make in (("random", random_tables),
                       ("layered", lambda seed, nb, nl: S.synthetic_block_tables(seed, nb, nl))):
        for num_blocks, num_layers in shapes:
            name = f"{kind}_{num_blocks}x{6 ** num_layers}"
            figures = run_case(make(args.seed, num_blocks, num_layers), args.repeats,
                               args.beam_width)
            results[name] = figures
            print(f"{name:<16} front {figures['front_seconds']:.4f} s ({figures['front_points']}"
                  f" points)  one budget {figures['budget_seconds']:.4f} s  two budgets "
                  f"{figures['two_budget_seconds']:.4f} s  top-10 "
                  f"{figures['top10_interval_seconds']:.4f} s  beam(W={args.beam_width}) "
                  f"{figures['beam_seconds']:.4f} s optimum={figures['beam_found_optimum']}"
                  f"/{figures['beam_two_budget_found_optimum']} (two budgets: exact from "
                  f"W={figures['beam_min_width_for_optimum']})")
    head = results["random_6x1296"]
    summary = {"front_seconds": head["front_seconds"], "budget_seconds": head["budget_seconds"],
               "two_budget_seconds": head["two_budget_seconds"],
               "beam_seconds": head["beam_seconds"],
               "beam_found_optimum": head["beam_found_optimum"],
               "cpu_count": os.cpu_count(), "cases": results}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
