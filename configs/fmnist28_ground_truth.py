r"""Ground truth for rating fidelity on native 28 px Fashion-MNIST (the `fmnist28` space).

    python -m dna_jax.ground_truth --config configs/fmnist28_ground_truth.py \
        --workdir workdir/fmnist28_ground_truth --out results/fmnist28_ground_truth.json --commit

36 architectures in 6 cost bins (6 per bin, each within 2% of its bin's multiply-adds; bin
centres log-spaced over the 0.05-99.95% range of the space's cost: 1.64M to 6.31M), each
trained stand-alone with seed 0, and one architecture per bin with 3 seeds; the pilot (4 of
those x 2 seeds) runs first. Recipe: the teacher's (AdamW, cosine, label smoothing 0.1, flip), native 28 px, batch
256, EPOCHS epochs on train[:55000], tested on the whole test split, BatchNorm momentum 0.9.
Resumable; the file in results/ is the ground truth (see dna_jax/ground_truth.py).
Measured 2026-12-06 (2-core CPU): the pilot's 8 runs gave test accuracies 0.8759-0.8859, seed
SD 0.0009 against a spread of 0.0088 (0.10 of it: 2 epochs meet the quarter rule); a run
trains in 389-536 s on the idle machine. Complete on 2026-12-07 (48 runs, 13 h of training
on the shared CPU over three sessions): mean test accuracies 0.8754-0.8868 over the 36 networks,
seed SD 0.21 points (6 networks x 3 seeds) against a spread of 1.14 points (0.18 of it: still
inside the quarter rule), noise ceiling
Kendall tau +0.68 [+0.58, +0.77]; the fidelity table on it: results/fmnist28_fidelity.md. The
whole file: results/fmnist28_ground_truth.json.
`:tiny` is the tests' variant (the `tiny` space, a few steps).
"""

import ml_collections

from dna_jax import config_files, ground_truth

EPOCHS = 2.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_files.variant(arg)
    config = ground_truth.get_default_config()
    config.space = "fmnist28"
    config.resolution = 28
    config.sample.seed = 0
    config.sample.pool_size = 200_000
    config.sample.num_bins = 6
    config.sample.per_bin = 6
    config.sample.bin_tolerance = 0.02
    config.sample.low_quantile = 0.0005  # bin centres 1.64M ... 6.31M multiply-adds: 3.8x
    config.sample.high_quantile = 0.9995
    config.sample.cost = "macs"
    config.seeds.multi_seed_per_bin = 1
    config.seeds.num_seeds = 3
    config.seeds.pilot_archs = 4

    standalone = config_files.sibling_config(__file__, "fashion_mnist_teacher", unlocked=True)
    standalone.model.name = "child"
    standalone.model.bn_momentum = 0.9
    data = standalone.data
    data.image_size = 28
    data.batch_size = 256
    data.train_split = "train[:55000]"
    data.eval_split = "test"
    standalone.num_epochs = EPOCHS
    standalone.log_every_steps = 100
    standalone.checkpoint_every_steps = 200
    config.standalone = standalone

    if variant == "tiny":
        config.space = "tiny"
        config.resolution = 16
        config.sample.pool_size = 200
        config.sample.num_bins = 2
        config.sample.per_bin = 2
        config.sample.bin_tolerance = 0.3
        config.seeds.multi_seed_per_bin = 1
        config.seeds.num_seeds = 2
        config.seeds.pilot_archs = 1
        data.image_size = 16
        data.batch_size = 32
        data.eval_batch_size = 100
        data.train_split = "train[:512]"
        data.eval_split = "test[:200]"
        standalone.total_steps = 6
        standalone.model.bn_momentum = 0.01
        standalone.log_every_steps = 3
        standalone.checkpoint_every_steps = 3
    config.lock()
    return config
