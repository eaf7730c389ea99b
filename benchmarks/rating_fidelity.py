r"""Does the rating work? Every method against the ground truth, with size-controlled statistics.

    .venv/bin/python benchmarks/rating_fidelity.py \
        --ground_truth results/fmnist28_ground_truth.json \
        --rate_dir dna=workdir/fmnist28_dna/rate --out results/fmnist28_fidelity.json

`--ground_truth` may be repeated: the files (e.g. results/fmnist28_ground_truth.json and its
confirmation sample results/fmnist28_ground_truth_confirm.json) must share space, resolution
and bin centres and are read as one ground truth (`fidelity.GroundTruth.merged`). `--alpha` is
the pre-registered test's level: the bootstrap intervals are at 1 - alpha and the permutation
p-value is compared with alpha. `--rate_dir NAME=DIR` may be repeated (e.g. a second rating of
the same supernet in BatchNorm 'batch' mode, or a DNA++ rating); each adds
`NAME[<metric>,<aggregation>]` rows. `--arch_scores NAME=FILE` (repeatable) adds a
per-architecture rating, e.g. SPOS's (`python -m dna_jax.spos_scores`). Size (macs,
effective_macs, params, dna_flops), shape (depth, mean_expansion, mean_kernel: exploratory),
SynFlow and a seeded random score are always compared. `--beyond macs,mean_expansion` (the
default; exploratory) adds every rating's partial Spearman given those predictions together.
Works on a partial ground truth (the architectures trained so far). Writes the JSON (every
statistic with its bootstrap interval at 1 - alpha, the noise ceiling, the files and alpha), a
markdown table beside it (`.md`) and a plot (`.png`); the last output line is one JSON object
with the headline figures (Kendall tau and partial Spearman per method, the noise ceiling).
See dna_jax/fidelity.py for the methods and statistics.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from dna_jax import artifacts, fidelity  # noqa: E402

flags.DEFINE_multi_string("ground_truth", None, "A dna_jax.ground_truth results file "
                          "(repeatable: files of the same bins, read as one).")
flags.DEFINE_multi_string("rate_dir", [], "NAME=DIR of rating tables (repeatable).")
flags.DEFINE_multi_string("arch_scores", [], "NAME=FILE of per-architecture scores, e.g. "
                          "python -m dna_jax.spos_scores's (repeatable).")
flags.DEFINE_string("out", None, "Where the JSON goes (.md and .png beside it).")
flags.DEFINE_integer("top_k", 5, "k of the top-k overlap.")
flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples.")
flags.DEFINE_integer("permutations", 2000, "Permutations of the within-bin test (0: none).")
flags.DEFINE_integer("min_archs", 6, "Refuse to compare fewer trained architectures.")
flags.DEFINE_float("alpha", 0.05, "The pre-registered test's level: bootstrap intervals at "
                   "1 - alpha, permutation p-value below alpha.")
flags.DEFINE_list("beyond", ["macs", "mean_expansion"], "Exploratory: every rating's partial "
                  "Spearman given these predictions together ('' = none).")
flags.mark_flags_as_required(["ground_truth", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    start = time.perf_counter()
    if not 0.0 < FLAGS.alpha < 1.0:
        raise SystemExit(f"--alpha must be in (0, 1), got {FLAGS.alpha}")
    truth = fidelity.GroundTruth.merged([artifacts.read_json(p) for p in FLAGS.ground_truth])
    if len(truth) < FLAGS.min_archs:
        raise SystemExit(f"{', '.join(FLAGS.ground_truth)}: {len(truth)} architectures trained "
                         f"so far, fewer than --min_archs={FLAGS.min_archs}")
    predictions = dict(truth.costs)
    predictions.update(fidelity.shape_features(truth.space, truth.archs))
    predictions["synflow"] = fidelity.synflow_scores(truth.space, truth.archs, truth.resolution)
    predictions["random"] = np.random.default_rng(0).normal(size=len(truth))
    for item in FLAGS.rate_dir:
        name, _, directory = item.partition("=")
        if not directory:
            raise SystemExit(f"--rate_dir {item!r}: expected NAME=DIR")
        tables = fidelity.load_block_tables(directory, truth.space)
        for key, values in fidelity.dna_predictions(tables, truth.archs).items():
            predictions[key.replace("dna", name, 1)] = values
    for item in FLAGS.arch_scores:
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--arch_scores {item!r}: expected NAME=FILE")
        predictions[name] = fidelity.arch_score_predictions(artifacts.read_json(path), truth)
    result = fidelity.compare_all(truth, predictions, top_k=FLAGS.top_k,
                                  num_resamples=FLAGS.resamples,
                                  num_permutations=FLAGS.permutations,
                                  confidence=1.0 - FLAGS.alpha)
    files = FLAGS.ground_truth
    result.update({"ground_truth": files[0] if len(files) == 1 else list(files),
                   "alpha": FLAGS.alpha, "rate_dirs": FLAGS.rate_dir,
                   "arch_scores": FLAGS.arch_scores,
                   "runs": len(truth.data["runs"]),
                   "archs_with_seeds": int(sum(len(s) >= 2 for s in truth.seeds)),
                   "predictions": {k: v.tolist() for k, v in predictions.items()},
                   "accuracy": truth.accuracy.tolist(), "bins": truth.bins.tolist(),
                   "seconds": time.perf_counter() - start})
    base = os.path.splitext(FLAGS.out)[0]
    decision = None
    if fidelity.PRIMARY in result["methods"]:
        decision = fidelity.verdict(result, alpha=FLAGS.alpha)
        decision["kendall_difference"] = fidelity.kendall_difference(
            truth, predictions[decision["primary"]], predictions[decision["best_size"]],
            num_resamples=FLAGS.resamples, confidence=1.0 - FLAGS.alpha)
        result["verdict"] = decision
    controls = [c for c in FLAGS.beyond if c]
    if controls:
        result["beyond"] = fidelity.beyond_controls(
            truth, predictions, controls, num_resamples=FLAGS.resamples,
            confidence=1.0 - FLAGS.alpha)
    artifacts.write_json(FLAGS.out, json.loads(json.dumps(result, default=float),
                                               parse_constant=lambda _: None))
    text = fidelity.render_table(result)
    if decision is not None:
        text = fidelity.render_verdict(decision) + "\n" + text
    if "beyond" in result:
        text += "\n" + fidelity.render_beyond(result["beyond"])
    artifacts.write_text(f"{base}.md", text)
    shown = [m for m in ("macs", "synflow", fidelity.PRIMARY, "dna[mse_var,rank]")
             if m in predictions]
    fidelity.plot(truth, predictions, shown, f"{base}.png")
    print(text)
    headline = {name: {"kendall": s["kendall"], "partial_spearman": s.get("partial_spearman"),
                       "partial_spearman_p": s.get("partial_spearman_p")}
                for name, s in result["methods"].items()}
    print(json.dumps({"num_archs": len(truth), "noise": result["noise"], "verdict": decision,
                      "methods": headline, "out": FLAGS.out}, default=float))


if __name__ == "__main__":
    app.run(main)
