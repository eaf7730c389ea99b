r"""DNA+ on ImageNet: progressive rounds from the paper's DNA setup (documented, not run here).

    python -m dna_jax.main --config configs/imagenet_dna_plus.py:gpu8 --workdir /data/dna_plus/imagenet \
        --config.teacher.checkpoint=/path/to/tf_efficientnet_b7_converted

Round 1 is configs/imagenet_dna.py (same variant): a converted `tf_efficientnet_b7` teacher,
the `dna_paper` space (`,space=released` for the released code's), the authors' distillation
and rating recipe, the search under 460M dna_flops. Round 1's winner is scaled up before it is
retrained (below) and teaches round 2, whose blocks are re-aligned to the winner's stages;
round 2's winner is retrained at its searched size. The workdir gets round_1/, round_2/ (each a
DNA workdir), report.md, summary.json and progressive.png; the last output line is one JSON
object with `round_accuracies` per round.

Choices the paper leaves open (REFERENCE.md section 5), recorded here:
  * winner scaling: round 1's winner x1.1 width, x1.2 depth (EfficientNet's compound
    coefficients for phi = 1: about 1.45x the multiply-adds) before retraining, so the next
    teacher is larger than the networks it rates; round 2's winner unscaled (the final network).
  * budget schedule: round 1 the absolute 460M dna_flops of configs/imagenet_dna.py
    (`budget_fractions` entry 0 keeps it); round 2 0.7 x its teacher's dna_flops, i.e. about
    the round-1 search's size again (0.7 x 1.45 ~ 1), so the final network is comparable with
    DNA's.
  * stopping rule: round 1's teacher is B7 (84.4% top-1, ~80x the winner's cost), which no
    winner beats; round 2 runs if round 1's winner is within 6 points of it
    (`stop_margin` = -0.06).
Variants: `gpu1`, `gpu8` (single-process runs: the retrained winner that teaches the next round
is written by one process; multi-host pods are not supported for DNA+ yet). Expected: not
measured (no ImageNet, no accelerator here); the paper reports 78.9% top-1 for the DNA family's
MBConv result without giving DNA+'s per-round figures.
"""


import ml_collections

from dna_jax import config_files, progressive

_VARIANTS = ("gpu1", "gpu8")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or "").split(",") if p]
    if any(p.startswith("tpu") for p in parts):
        raise ValueError(f"Unknown config arg {arg!r}: DNA+ runs single-process variants "
                         f"{_VARIANTS} (multi-host pods are not supported for DNA+ yet).")
    if not any(p in _VARIANTS for p in parts):
        parts.insert(0, "gpu8")
    config = config_files.sibling_config(__file__, "imagenet_dna", ",".join(parts))
    return progressive.with_progressive(
        config, rounds=2, budget_fractions=(0.0, 0.7), width_multipliers=(1.1, 1.0),
        depth_multipliers=(1.2, 1.0), stop_early=True, stop_margin=-0.06)
