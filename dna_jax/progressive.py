"""DNA+: progressive rounds, where each round's searched and retrained network teaches the next.

Round r = 1..R runs the whole DNA pipeline (dna_jax.pipeline: teacher -> distill -> rate ->
search -> retrain -> deploy -> report) in `workdir/round_<r>/`, with a per-round config derived from the
experiment's:

  round 1   the configured teacher (trained here or loaded), exactly as a DNA run;
  round r>1 the teacher is round r-1's retrained winner, loaded from
            `round_<r-1>/retrain/network` (a teacher checkpoint that stores its architecture;
            `teacher.checkpoint` = '{workdir}/../round_<r-1>/retrain/network'),
            and the space's blocks are re-aligned to its stages (`dna_jax.space.align_space`:
            block k is supervised by the teacher's stage S - B + k, with that stage's width and
            stride), because the winner's stage widths are the space's hidden widths, not the
            first teacher's;
  every r   `search.budget_fraction` from `progressive.budget_fractions[r-1]` if > 0 (a
            fraction of THIS round's teacher's cost), and the winner scaled by
            `progressive.width_multipliers[r-1]` / `depth_multipliers[r-1]` (EfficientNet's
            compound-scaling rules) before it is retrained.

A round's config hash covers the previous round's (`teacher.upstream`), so a changed round 1
invalidates round 2. Since every round is an ordinary pipeline run with its own manifests, a
killed run resumes in the right round and stage: complete rounds are skipped stage by stage.

Stopping rule: after round r < R, if its winner's test accuracy is below its teacher's plus
`progressive.stop_margin`, the run stops (logged, and recorded in report.md and summary.json
with the reason). The workdir then holds `summary.json`, `report.md` (a table across rounds)
and `progressive.png` (accuracy vs multiply-adds of every round's teacher and winner).
"""

from __future__ import annotations

import copy
import io
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections

from dna_jax import artifacts
from dna_jax import files
from dna_jax import metrics as metrics_lib
from dna_jax import pipeline
from dna_jax import stage_context
from dna_jax import supervision
from dna_jax.report import fmt

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOT_FILE = "progressive.png"


def get_default_config() -> ml_collections.ConfigDict:
    """The pipeline's config plus a `progressive` section (its presence selects DNA+ mode).

    progressive:
      rounds: R >= 1 rounds of distill -> rate -> search -> retrain.
      budget_fractions: search.budget_fraction of each round (a fraction of that round's
        teacher's `search.cost`, replacing an absolute search.budget); an entry 0 or () keeps
        the configured search budget.
      width_multipliers, depth_multipliers: per-round EfficientNet-style scaling of the
        searched winner before it is retrained (and becomes the next teacher); () = 1.0.
      stop_early: apply the stopping rule between rounds.
      stop_margin: round r < R is followed by round r+1 only if its winner's test accuracy
        >= its teacher's + stop_margin (negative: the winner may trail by that much).
    """
    config = pipeline.get_default_config()
    config.progressive = dict(rounds=2, budget_fractions=(), width_multipliers=(),
                              depth_multipliers=(), stop_early=True, stop_margin=0.0)
    return config


def with_progressive(config: ml_collections.ConfigDict, **values: Any
                     ) -> ml_collections.ConfigDict:
    """A pipeline config (e.g. a DNA experiment's) made progressive: a copy with the
    `progressive` section of `get_default_config`, `values` overriding it (locked)."""
    result = copy.deepcopy(config)
    result.unlock()
    result.progressive = get_default_config().progressive
    for key, value in values.items():
        result.progressive[key] = value
    result.lock()
    return result


def is_progressive(config: ml_collections.ConfigDict) -> bool:
    """Whether a config asks for DNA+ (it has a `progressive` section)."""
    return "progressive" in config


def round_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, f"round_{r}")


def _per_round(values: Sequence[float], rounds: int, field: str,
               allow_zero: bool = False) -> list[float] | None:
    values = list(values or ())
    if not values:
        return None
    if len(values) != rounds:
        raise ValueError(f"config.progressive.{field} has {len(values)} entries; give one per "
                         f"round (progressive.rounds={rounds}) or none")
    if any(not (float(v) > 0 or (allow_zero and float(v) == 0)) for v in values):
        raise ValueError(f"config.progressive.{field} must be "
                         f"{'>= 0' if allow_zero else 'positive'}, got {values}")
    return [float(v) for v in values]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the field, on a progressive section the rounds cannot run."""
    cfg = config.progressive
    if not isinstance(cfg.rounds, int) or cfg.rounds < 1:
        raise ValueError(f"config.progressive.rounds must be an integer >= 1, got {cfg.rounds!r}")
    _per_round(cfg.budget_fractions, cfg.rounds, "budget_fractions", allow_zero=True)
    for field in ("width_multipliers", "depth_multipliers"):
        _per_round(cfg[field], cfg.rounds, field)
    dna = supervision.get("teacher")
    if supervision.of(config) is not dna:
        raise ValueError(f"config.supervision={config.supervision!r}: DNA+ rounds are DNA runs "
                         "(each round's winner teaches the next): use supervision='teacher'")
    if pipeline.parse_stages(config.stages) != list(dna.stages):
        raise ValueError(f"config.stages={config.stages!r}: progressive mode runs every stage "
                         f"of every round ({','.join(dna.stages)}); run a single round's "
                         "stages with the pipeline on its round_<r> folder instead")
    pipeline.check_config(round_config(config, 1))


def round_config(config: ml_collections.ConfigDict, r: int) -> ml_collections.ConfigDict:
    """The pipeline config of round r (locked): see the module docstring.

    Fields are only added where a round differs from a DNA run, so round 1 with multipliers
    1.0 has the same stage hashes as the plain pipeline on the same config (its artifacts,
    e.g. a finished DNA demo's teacher, can be copied into round_1/ and are reused).
    """
    cfg = config.progressive
    rounds = cfg.rounds
    result = copy.deepcopy(config)
    result.unlock()
    del result["progressive"]
    fractions = _per_round(cfg.budget_fractions, rounds, "budget_fractions", allow_zero=True)
    if fractions and fractions[r - 1]:  # 0 keeps the configured search budget
        result.search.budget = 0.0
        result.search.budget_fraction = fractions[r - 1]
    width = (_per_round(cfg.width_multipliers, rounds, "width_multipliers") or [1.0] * rounds)
    depth = (_per_round(cfg.depth_multipliers, rounds, "depth_multipliers") or [1.0] * rounds)
    if (width[r - 1], depth[r - 1]) != (1.0, 1.0):
        result.retrain.width_multiplier = width[r - 1]
        result.retrain.depth_multiplier = depth[r - 1]
    if r > 1:
        previous = round_config(config, r - 1)
        teacher = result.teacher
        teacher.name = pipeline.RETRAINED_NETWORK_NAME
        # Relative to round r's workdir, so a DNA+ workdir can be moved (the path is hashed).
        teacher.checkpoint = os.path.join(stage_context.WORKDIR_PLACEHOLDER, os.pardir,
                                          f"round_{r - 1}", "retrain",
                                          pipeline.RETRAINED_NETWORK)
        teacher.num_classes = 0
        teacher.align_space = True
        # What the teacher's hash must cover: the round that made it (not just its path).
        teacher.upstream = pipeline.stage_digests(previous)["retrain"]
    result.lock()
    return result


def _round_row(r: int, figures: dict[str, Any], config: ml_collections.ConfigDict,
               margin: float) -> dict[str, Any]:
    retrain = figures.get("retrain_figures", {})
    teacher_acc, winner_acc = figures.get("teacher_accuracy"), figures.get("winner_accuracy")
    improvement = (None if teacher_acc is None or winner_acc is None
                   else float(winner_acc) - float(teacher_acc))
    return {
        "round": r,
        "teacher": ("configured: " + config.teacher.name if r == 1
                    else f"round {r - 1} winner"),
        "teacher_accuracy": teacher_acc, "winner_accuracy": winner_acc,
        "improvement": improvement,
        "meets_margin": improvement is not None and improvement >= margin,
        "teacher_macs": figures.get("teacher_macs"), "winner_macs": figures.get("winner_macs"),
        "teacher_params": figures.get("teacher_params"),
        "winner_params": figures.get("winner_params"),
        "budget_fraction": (None if config.search.budget
                            else float(config.search.budget_fraction)),
        "budget": figures.get("budget"),
        "searched_macs": figures.get("searched_macs"),
        "width_multiplier": float(config.retrain.get("width_multiplier", 1.0)),
        "depth_multiplier": float(config.retrain.get("depth_multiplier", 1.0)),
        "winner_block_strings": retrain.get("block_strings") or figures.get(
            "winner_block_strings"),
        "wall_seconds": figures.get("pipeline_wall_seconds"),
        "stages": figures.get("stages"),
    }


def run_progressive(config: ml_collections.ConfigDict, workdir: str,
                    mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Runs (or resumes) the DNA+ rounds; returns the figures of the run.

    Returns:
      {'rounds': one row per round run (teacher and winner accuracy, multiply-adds, params,
      budget, multipliers, wall seconds, stages ran/skipped), 'round_accuracies',
      'rounds_run', 'stopped_early', 'stop_reason', 'final_accuracy', 'final_macs',
      'wall_seconds'} (also workdir/summary.json).
    """
    check_config(config)
    watch = metrics_lib.Stopwatch()
    workdir = files.absolute(workdir)
    cfg = config.progressive
    rows: list[dict[str, Any]] = []
    stop_reason = None
    for r in range(1, cfg.rounds + 1):
        rcfg = round_config(config, r)
        if r > 1:
            _check_previous_network(stage_context.resolve_workdir_path(
                rcfg.teacher.checkpoint, round_dir(workdir, r)), r)
        logging.info("DNA+ round %d/%d -> %s", r, cfg.rounds, round_dir(workdir, r))
        figures = pipeline.run_pipeline(rcfg, round_dir(workdir, r), mesh=mesh)
        figures["retrain_figures"] = artifacts.read_manifest(
            os.path.join(round_dir(workdir, r), "retrain"))["figures"]
        figures["searched_macs"] = artifacts.read_manifest(
            os.path.join(round_dir(workdir, r), "search"))["figures"]["winner"]["costs"].get(
                "macs")
        row = _round_row(r, figures, rcfg, cfg.stop_margin)
        rows.append(row)
        logging.info("DNA+ round %d: teacher accuracy %s, winner accuracy %s (%s multiply-adds)",
                     r, row["teacher_accuracy"], row["winner_accuracy"], row["winner_macs"])
        if r < cfg.rounds and cfg.stop_early and not row["meets_margin"]:
            stop_reason = (f"round {r}'s winner accuracy {fmt(row['winner_accuracy'], '.4f')} "
                           f"is below its teacher's {fmt(row['teacher_accuracy'], '.4f')} + "
                           f"stop_margin {cfg.stop_margin:g}; rounds {r + 1}..{cfg.rounds} "
                           "not run")
            logging.warning("DNA+ stops early: %s", stop_reason)
            break
    summary = {
        "rounds": rows,
        "round_accuracies": [{"round": row["round"], "teacher_accuracy": row["teacher_accuracy"],
                              "winner_accuracy": row["winner_accuracy"]} for row in rows],
        "rounds_run": len(rows), "rounds_planned": cfg.rounds,
        "stopped_early": stop_reason is not None, "stop_reason": stop_reason,
        "stop_margin": cfg.stop_margin,
        "final_accuracy": rows[-1]["winner_accuracy"], "final_macs": rows[-1]["winner_macs"],
        "rounds_wall_seconds": float(sum(row["wall_seconds"] or 0.0 for row in rows)),
    }
    if jax.process_index() == 0:
        plot_progress(rows, os.path.join(workdir, PLOT_FILE))
        artifacts.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
        artifacts.write_text(os.path.join(workdir, REPORT_FILE),
                             render_report(summary, config, workdir))
    summary["wall_seconds"] = watch.elapsed()
    return summary


def _check_previous_network(checkpoint: str, r: int) -> None:
    """Round r's teacher must exist: round r-1's retrain stage writes it."""
    if not files.exists(os.path.join(checkpoint, "teacher.json")):
        raise pipeline.StageError(
            f"round {r}'s teacher {checkpoint} is missing although round {r - 1} is complete "
            f"(round {r - 1}'s retrain stage was made by an older dna_jax, which did not "
            f"write retrain/{pipeline.RETRAINED_NETWORK} in multi-process runs): move "
            f"round_{r - 1}/retrain and round_{r - 1}/report aside and run again to retrain it")


def plot_progress(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Accuracy vs multiply-adds: each round's teacher -> winner, as arrows."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row in rows:
        if None in (row["teacher_macs"], row["teacher_accuracy"], row["winner_macs"],
                    row["winner_accuracy"]):
            continue
        color = colors[(row["round"] - 1) % len(colors)]
        ax.annotate("", xy=(row["winner_macs"], row["winner_accuracy"]),
                    xytext=(row["teacher_macs"], row["teacher_accuracy"]),
                    arrowprops=dict(arrowstyle="->", color=color, alpha=0.6))
        ax.scatter([row["teacher_macs"]], [row["teacher_accuracy"]], marker="o", color=color,
                   label=f"round {row['round']} teacher")
        ax.scatter([row["winner_macs"]], [row["winner_accuracy"]], marker="*", s=120,
                   color=color, label=f"round {row['round']} winner")
    ax.set_xlabel("multiply-adds")
    ax.set_ylabel("test accuracy")
    ax.set_title("DNA+: teacher -> retrained winner per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    files.write_bytes(path, buffer.getvalue())
    plt.close(fig)


def render_report(summary: dict[str, Any], config: ml_collections.ConfigDict,
                  workdir: str) -> str:
    """report.md of a DNA+ run: one row per round, the stopping decision, the plot."""
    cfg = config.progressive
    lines = [
        f"# DNA+ run: {workdir}", "",
        f"Space `{config.distill.space}`, {summary['rounds_run']} of {cfg.rounds} rounds run; "
        f"round 1's teacher is `{config.teacher.name}`, round r > 1's is round r-1's retrained "
        f"winner. Stopping rule: continue while winner accuracy >= teacher accuracy + "
        f"{cfg.stop_margin:g}" + ("" if cfg.stop_early else " (disabled)") + ".", "",
        "| round | teacher | teacher acc. | winner acc. | winner - teacher | teacher macs | "
        "searched macs | winner macs | winner params | budget fraction | width x depth | "
        "wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rounds"]:
        lines.append(
            f"| {row['round']} | {row['teacher']} | {fmt(row['teacher_accuracy'], '.4f')} | "
            f"{fmt(row['winner_accuracy'], '.4f')} | {fmt(row['improvement'], '+.4f')} | "
            f"{fmt(row['teacher_macs'], ',')} | {fmt(row['searched_macs'], ',')} | "
            f"{fmt(row['winner_macs'], ',')} | {fmt(row['winner_params'], ',')} | "
            f"{fmt(row['budget_fraction'], 'g')} | {row['width_multiplier']:g} x "
            f"{row['depth_multiplier']:g} | {fmt(row['wall_seconds'], '.1f')} |")
    lines += ["", ("**Stopped early**: " + summary["stop_reason"] + ".") if
              summary["stopped_early"] else "Every planned round ran.", "",
              f"![accuracy vs multiply-adds]({PLOT_FILE})", "", "## Winners", ""]
    for row in summary["rounds"]:
        lines += [f"Round {row['round']} (details: [round_{row['round']}/report.md]"
                  f"(round_{row['round']}/{pipeline.REPORT_FILE})):", "", "```",
                  *[" | ".join(stage) for stage in row["winner_block_strings"] or []], "```",
                  ""]
    return "\n".join(lines)


__all__ = ["get_default_config", "with_progressive", "is_progressive", "check_config",
           "round_config", "run_progressive", "plot_progress", "render_report", "round_dir"]
