r"""DNA++ (self-supervised blocks, no teacher) on the `fmnist28` space: the fidelity setup.

    python -m dna_jax.main --config configs/fmnist28_dna_pp.py --workdir workdir/fmnist28_dna_pp \
        --config.stages=ssl,rate

The DNA++ row of the rating-fidelity table (issue 19): the `fmnist28` space's three blocks
trained one after another by self-supervision (configs/fashion_mnist_dna_pp.py's recipe: 2
paths per step, BYOL views, collapse guards, AdamW), SSL_STEPS steps of batch 64 per block:
each block sees about as many images (160k) as in DNA's 3-epoch distillation
(configs/fmnist28_dna.py: 1,287 steps of 128); every candidate rated by its SSL loss against the population
centre on 4 held-out batches of 250 (BatchNorm recalibrated on 2,048 fixed views), 28 px.
`benchmarks/rating_fidelity.py --rate_dir dnapp=workdir/fmnist28_dna_pp/rate` compares it.
The search budget is absolute (no teacher): 2.8M multiply-adds.
Measured (2026-12-07, 2-vCPU AMD EPYC Zen 3, stages ssl,rate; the last hour beside a
stand-alone training job, so an upper bound): ssl 7,500 steps in 6,468 s (block 2, on 7x7 maps
fed by the first two blocks' chosen paths, ran at ~0.9 steps/s against ~3 for block 0 idle),
final SSL loss 3.03 / 2.72 / 3.01, output std 0.95 / 0.95 / 0.93 (no collapse); rating of the
882 candidates 734 s. Against the 36-network ground truth: `dnapp[ssl_loss,sum]` Kendall tau
+0.10 [-0.19, +0.35], partial Spearman given multiply-adds -0.02 [-0.34, +0.32] (p 0.234): no
ranking signal (README "Does the rating work?"); tables in results/fmnist28_ratings/dna_pp.
"""

import ml_collections

from dna_jax import config_files

SSL_STEPS = 2500


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_files.variant(arg)
    config = config_files.sibling_config(__file__, "fashion_mnist_dna_pp",
                                         "tiny" if variant == "tiny" else None, unlocked=True)
    if variant == "tiny":
        config.lock()
        return config
    config.data.image_size = config.retrain.data.image_size = 28
    config.ssl.space = "fmnist28"
    config.ssl.num_steps = SSL_STEPS
    config.ssl.checkpoint_every_steps = 200
    config.ssl.augment.blur_sigma = (0.14, 1.4)  # pixels at 28 px (20 px: 0.1-1.0)
    config.rate.cost_resolution = 28
    config.rate.recalibration_images = 2048
    config.search.budget = 2.8e6
    config.lock()
    return config
