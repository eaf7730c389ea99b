r"""SPOS's rating of a ground truth's architectures (a row of the fidelity table, issue 19).

    python -m dna_jax.spos_scores --config configs/fmnist28_spos.py \
        --workdir workdir/fmnist28_spos --out results/fmnist28_spos_scores.json \
        [--ground_truth results/fmnist28_ground_truth.json]

Trains the single-path one-shot supernet of the config's space on labels
(`dna_jax.ranking.run_spos`: resumable from its checkpoints, its result reused when the same
config and architectures ask again) and rates EVERY architecture of the ground-truth file's
sample as a path (validation accuracy with recalibrated BatchNorm; trained or not yet, so the
scores stay valid as the ground truth grows). Writes a versioned JSON file
(`format_version` 1: the method, `higher_is_better`, the architectures' blocks and their
scores, the SPOS figures, the config, the command and the machine) that
`benchmarks/rating_fidelity.py --arch_scores spos=FILE` reads. The last output line is one JSON
object.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence

import ml_collections

from dna_jax import artifacts
from dna_jax import data as data_lib
from dna_jax import ground_truth, ranking
from dna_jax import host_memory
from dna_jax import sharding as sharding_lib
from dna_jax.space import Arch, get_space

FORMAT_VERSION = 1


def score_ground_truth(config: ml_collections.ConfigDict, truth_path: str, workdir: str,
                       out_path: str, command: str = "") -> dict[str, Any]:
    """Trains (or reuses) the SPOS supernet and writes the scores of every sampled
    architecture of the ground truth at `truth_path` to `out_path`; returns the file's content."""
    start = time.perf_counter()
    truth = artifacts.read_json(truth_path)
    if truth["sample"]["record"]["space"] != config.space:
        raise ValueError(f"{truth_path} samples space "
                         f"{truth['sample']['record']['space']!r}, the config trains "
                         f"{config.space!r}: use the matching config")
    space = get_space(config.space)
    archs = [Arch.of(a["blocks"]) for a in truth["sample"]["archs"]]
    cfg = config.standalone
    mesh = sharding_lib.mesh_from_config(cfg.mesh)
    train_data = data_lib.make_dataset(cfg.data, cfg.data.train_split, training=True,
                                       mesh=mesh, seed=cfg.seed)
    result = ranking.run_spos(config, space, archs, workdir, train_data, mesh)
    out = {"format_version": FORMAT_VERSION, "method": "spos", "score": "val_accuracy",
           "higher_is_better": True, "space": config.space,
           "ground_truth": truth_path,
           "archs": [[list(b) for b in a.blocks] for a in archs],
           "scores": result["val_accuracy"], "val_loss": result["val_loss"],
           "figures": {k: v for k, v in result.items()
                       if k not in ("key", "val_accuracy", "val_loss")},
           "config": artifacts.to_jsonable(config), "command": command,
           "machine": ground_truth.machine(), "seconds": time.perf_counter() - start}
    artifacts.write_json(out_path, out)
    return out


def run(argv: Sequence[str] | None = None) -> None:
    """python -m dna_jax.spos_scores --config ... --workdir ... --out ..."""
    from absl import app, flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    config_flags.DEFINE_config_file("config", None, "SPOS config (configs/fmnist28_spos.py).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "SPOS checkpoints and result (not committed).")
    flags.DEFINE_string("out", None, "The JSON file of scores (commit it).")
    flags.DEFINE_string("ground_truth", "results/fmnist28_ground_truth.json",
                        "The dna_jax.ground_truth file whose architectures are rated.")
    flags.mark_flags_as_required(["config", "workdir", "out"])

    def main(args: Sequence[str]) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(args[1:])}")
        f = flags.FLAGS
        out = score_ground_truth(f.config, f.ground_truth, f.workdir, f.out,
                                 command=" ".join(sys.argv))
        print(json.dumps({"archs": len(out["archs"]), "out": f.out,
                          "val_accuracy_range": [min(out["scores"]), max(out["scores"])],
                          "seconds": out["seconds"]}, default=float), flush=True)

    host_memory.keep_freed_memory()  # before JAX starts its CPU threads
    app.run(main, argv=sys.argv if argv is None else ["dna_jax.spos_scores", *argv])


if __name__ == "__main__":
    run()
