r"""SPOS on the `fmnist28` space: a rating of the ground truth's architectures (issue 19).

    python -m dna_jax.spos_scores --config configs/fmnist28_spos.py \
        --workdir workdir/fmnist28_spos --out results/fmnist28_spos_scores.json

Single-path one-shot (dna_jax.spos): one whole-network supernet of the space trained on the
labels, each step one uniformly sampled path, for SPOS_EPOCHS epochs of train[:55000] with the
ground truth's recipe (configs/fmnist28_ground_truth.py: AdamW, cosine, batch 256, 28 px,
BatchNorm momentum 0.9); then every architecture of the ground-truth file is rated as a path:
BatchNorm recalibrated on 1,000 training images, accuracy on train[55000:] (held out from every
stand-alone run). SPOS_EPOCHS = 6 matches DNA's training budget on this space (a 3-epoch
teacher and a 3-epoch distillation, configs/fmnist28_dna.py). `benchmarks/rating_fidelity.py
--arch_scores spos=results/fmnist28_spos_scores.json` adds it to the fidelity table.
Measured (2026-12-07, 2-vCPU AMD EPYC Zen 3, beside the niced ground truth): 1,289 steps in
3,019 s, final training loss 1.24; rating the 36 architectures 116 s (3,138 s in all). Against
the 36-network ground truth: Kendall tau +0.36 [+0.18, +0.52] (multiply-adds +0.53), partial
Spearman given multiply-adds +0.20 [-0.29, +0.52], within-bin permutation p 0.227: no signal
beyond size (README "Does the rating work?").
`:tiny` is the tests' variant (the `tiny` space, a few steps).
"""

import ml_collections

from dna_jax import config_files
from dna_jax import spos as spos_lib

SPOS_EPOCHS = 6.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_files.variant(arg)
    truth = config_files.sibling_config(__file__, "fmnist28_ground_truth",
                                        "tiny" if variant == "tiny" else None, unlocked=True)
    config = ml_collections.ConfigDict()
    config.space = truth.space
    config.standalone = truth.standalone
    config.standalone.seed = 0
    config.spos = spos_lib.get_default_config()
    config.spos.total_steps = int(SPOS_EPOCHS * 55_000 // config.standalone.data.batch_size)
    config.spos.checkpoint_every_steps = 200
    if variant == "tiny":
        config.spos.total_steps = 4
        config.spos.val_split = "train[1024:1224]"
        config.spos.recal_split = "train[:1024]"
        config.spos.recal_batch_size = 64
        config.spos.checkpoint_every_steps = 2
        config.spos.log_every_steps = 2
    config.lock()
    return config
