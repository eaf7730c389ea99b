"""The report stage: summary.json (every stage's headline figures) and report.md.

The common part (winner, budget, rating, search, wall times) is the same for every
supervision kind; the kind adds its own figures and lines (`Supervision.report_figures`,
`report_lines`): DNA the teacher and the distillation, DNA++ the SSL loss curve.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from dna_jax import artifacts
from dna_jax import files
from dna_jax import stage_context
from dna_jax.stage_context import Context

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOTS = ("pareto_front.png", "score_histograms.png")

# The reference-network entries of the summary; a kind without one leaves them None.
_REFERENCE_KEYS = ("teacher_accuracy", "teacher_macs", "teacher_params", "teacher_dna_flops",
                   "macs_ratio", "accuracy_gap", "distill_val_loss_ratio",
                   "distill_updates_per_op")


def fmt(value: Any, spec: str = "") -> str:
    """`value` formatted with `spec`, or 'n/a' when missing (report tables)."""
    if value is None:
        return "n/a"
    return format(value, spec) if spec else str(value)


def run_report(ctx: Context) -> dict[str, Any]:
    """summary.json and report.md: every stage's headline figures in one place."""
    stage_dir = ctx.stage_dir("report")
    search, retrain, rate, deployed = (ctx.figures(s)
                                       for s in ("search", "retrain", "rate", "deploy"))
    walls = {s: artifacts.read_manifest(ctx.stage_dir(s)).get("wall_seconds")
             for s in ctx.kind.stages if s != "report"}
    blocks = rate.get("blocks", {})
    summary = {
        **dict.fromkeys(_REFERENCE_KEYS),
        "winner_accuracy": retrain.get("test_accuracy"),
        "winner_macs": retrain.get("macs"), "winner_params": retrain.get("params"),
        "winner_dna_flops": retrain.get("dna_flops"),
        "budget": search.get("budgets"), "search_cost": ctx.config.search.cost,
        "winner_block_strings": search.get("block_strings"),
        "winner_encoding": search.get("winner", {}).get("encodings"),
        "winner_score": search.get("winner", {}).get("score"),
        "best_per_block": {k: v.get("best") for k, v in blocks.items()},
        "candidates_rated": rate.get("candidates"),
        "fit_mse_var": {k: v.get("fit_mse_var") for k, v in blocks.items()},
        "stage_wall_seconds": walls,
        "wall_seconds": float(sum(v for v in walls.values() if v)),
        **deploy_figures(deployed),
        **ctx.kind.report_figures(ctx),
    }
    if stage_context.is_main_process():
        for name in PLOTS:
            source = os.path.join(ctx.stage_dir("search"), name)
            if files.exists(source):
                files.makedirs(stage_dir)
                files.copyfile(source, os.path.join(stage_dir, name))
        artifacts.write_json(os.path.join(ctx.workdir, SUMMARY_FILE), summary)
        artifacts.write_text(os.path.join(ctx.workdir, REPORT_FILE), render_report(summary, ctx))
    return summary


# summary.json's key prefix of each deploy file's size and latency: winner_tflite_ms, ...
DEPLOY_KEYS = {"model.tflite": "tflite", "model_int8.tflite": "tflite_int8",
               "model.stablehlo": "stablehlo"}


def deploy_figures(deployed: Mapping[str, Any]) -> dict[str, Any]:
    """The winner's deploy files in summary.json: winner_<kind>_bytes and, for TFLite,
    winner_<kind>_ms (median latency) with deploy_threads / deploy_batch / deploy_cpu."""
    out: dict[str, Any] = {}
    latency = deployed.get("latency") or {}
    for record in deployed.get("files") or []:
        key = DEPLOY_KEYS.get(record["file"], record["file"])
        out[f"winner_{key}_bytes"] = record["bytes"]
        if record["file"] in latency:
            out[f"winner_{key}_ms"] = latency[record["file"]]["median_ms"]
            out["deploy_threads"] = latency[record["file"]]["threads"]
            out["deploy_batch"] = latency[record["file"]]["batch"]
    if latency:
        out["deploy_cpu"] = (deployed.get("machine") or {}).get("cpu")
    return out


def _deploy_rows(summary: Mapping[str, Any]) -> list[str]:
    """Rows of the teacher/winner table for the winner's deploy files (none without)."""
    rows = []
    batch, threads = summary.get("deploy_batch"), summary.get("deploy_threads")
    for key, label in (("tflite", "TFLite float32"), ("tflite_int8", "TFLite int8 (dynamic)"),
                       ("stablehlo", "StableHLO")):
        if summary.get(f"winner_{key}_ms") is not None:
            rows.append(f"| {label} latency (ms, {threads} thread(s), batch {batch}) | n/a | "
                        f"{summary[f'winner_{key}_ms']:.3f} |")
        if summary.get(f"winner_{key}_bytes") is not None:
            rows.append(f"| {label} file (bytes) | n/a | {summary[f'winner_{key}_bytes']:,} |")
    return rows


def _deploy_note(summary: Mapping[str, Any]) -> list[str]:
    if not any(k.startswith("winner_") and k.endswith("_bytes") and summary[k] is not None
               for k in summary):
        return []
    note = "The winner's deploy files are in `deploy/` (deploy.json: SHA-256, input shape, parity)."
    if summary.get("deploy_cpu"):
        note += (f" Latency: the median of the TFLite interpreter's invocations on "
                 f"{summary['deploy_cpu']}.")
    return [note, ""]


def render_report(summary: Mapping[str, Any], ctx: Context) -> str:
    """The human-readable report (markdown)."""
    lines = [
        f"# {ctx.kind.label} run: {files.absolute(ctx.workdir)}", "",
        f"Space `{ctx.kind.space_name(ctx.config)}` ({ctx.space.size():,} architectures), "
        f"budget {summary['budget']}.", "",
        "| | teacher | winner |", "|---|---|---|",
        f"| test accuracy | {fmt(summary['teacher_accuracy'], '.4f')} | "
        f"{fmt(summary['winner_accuracy'], '.4f')} |",
        f"| multiply-adds | {fmt(summary['teacher_macs'], ',')} | "
        f"{fmt(summary['winner_macs'], ',')} |",
        f"| params | {fmt(summary['teacher_params'], ',')} | "
        f"{fmt(summary['winner_params'], ',')} |",
        f"| dna_flops | {fmt(summary['teacher_dna_flops'], ',')} | "
        f"{fmt(summary['winner_dna_flops'], ',')} |", *_deploy_rows(summary), "",
        *_deploy_note(summary),
        "## Chosen architecture", "",
        f"Encoding {summary['winner_encoding']}, score {fmt(summary['winner_score'], '.4f')}.",
        "", "```", *[" | ".join(stage) for stage in summary["winner_block_strings"] or []], "```",
        "", "## Best candidate per block", "", "| block | ops | score |", "|---|---|---|",
    ]
    for name, best in summary["best_per_block"].items():
        if best:
            lines.append(f"| {name} | {', '.join(best['ops'])} | {best['score']:.4f} |")
    fits = {k: v for k, v in (summary.get("fit_mse_var") or {}).items() if v}
    if fits:
        lines += ["", "## How well each block's candidates fit the target", "",
                  "mse / var(target) in the rating's BatchNorm mode: best, median and worst "
                  "candidate, and the constant predictor (the per-channel mean). A block whose "
                  "best candidate does not beat the constant is rated by noise.", "",
                  "| block | best | median | worst | constant | beats constant |",
                  "|---|---|---|---|---|---|"]
        for name, fit in fits.items():
            lines.append(f"| {name} | {fit['best']:.3f} | {fit['median']:.3f} | "
                         f"{fit['worst']:.3f} | {fit['constant']:.3f} | "
                         f"{'yes' if fit['beats_constant'] else '**no**'} |")
    lines += ["", f"Candidates rated: {summary['candidates_rated']}.", "",
              *ctx.kind.report_lines(summary),
              "![Pareto front](report/pareto_front.png)", "",
              "![Score histograms](report/score_histograms.png)", "",
              "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in summary["stage_wall_seconds"].items():
        lines.append(f"| {stage} | {fmt(seconds, '.1f')} |")
    lines.append(f"| total | {summary['wall_seconds']:.1f} |")
    return "\n".join(lines) + "\n"
