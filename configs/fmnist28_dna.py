r"""DNA on native 28 px Fashion-MNIST with the `fmnist28` space: the rating-fidelity setup.

    python -m dna_jax.main --config configs/fmnist28_dna.py --workdir workdir/fmnist28_dna \
        --config.stages=teacher,distill,rate

The space where architectures differ (issue 19): every searched layer's input is at least
7x7 (3/5/7 kernels are distinct functions), depth 1-3 per block (identity op after each
block's first layer) and expansion 3 or 6, 294 candidates per block (882 rated), networks from
1.0M to 7.1M multiply-adds. Teacher `fmnist28_teacher` (5.5M multiply-adds, stages aligned
with the blocks: 7 px after a stride-2 block 0), trained here with the demo's teacher recipe
at 28 px for TEACHER_EPOCHS epochs. Distillation DISTILL_EPOCHS epochs (fair sampling: about
steps / 7 updates per op), rating of every candidate with BatchNorm recalibrated on 2,048
training images and 4 held-out batches of 250. Its rating tables are what
`benchmarks/rating_fidelity.py` compares with the ground truth in
results/fmnist28_ground_truth.json (configs/fmnist28_ground_truth.py).
Measured 2026-12-06 on the 2-core CPU, loaded by other jobs (upper bounds): teacher 0.9009
test accuracy (1,512 s), distillation 1,287 steps (194 updates per op per block; validation
loss 0.41 / 0.23 / 0.18 of its start; 1,259 s), rating 882 candidates in 357 s; every block's
best candidate fits its target (mse / var 0.26 / 0.24 / 0.15, constant predictor 1.00). Not the demo: `make
demo` stays on the 20 px `small` space (15-minute budget); see the README's "Does the rating
work?" for why and what was measured.
"""

import ml_collections

from dna_jax import config_files

TEACHER_EPOCHS = 3.0
DISTILL_EPOCHS = 3.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_files.variant(arg)
    config = config_files.sibling_config(__file__, "fashion_mnist_dna",
                                         "tiny" if variant == "tiny" else None, unlocked=True)
    if variant == "tiny":
        config.lock()
        return config
    for section in (config.data, config.teacher.train.data, config.retrain.data):
        section.image_size = 28
    config.teacher.name = config.teacher.train.model.name = "fmnist28_teacher"
    config.teacher.train.model.bn_momentum = 0.9
    config.teacher.train.num_epochs = TEACHER_EPOCHS
    config.teacher.train.data.batch_size = 256
    config.distill.space = "fmnist28"
    config.distill.num_epochs = DISTILL_EPOCHS
    config.distill.lr_decay_epochs = 0.5
    config.rate.cost_resolution = 28
    config.rate.recalibration_images = 2048
    config.retrain.model.bn_momentum = 0.9
    config.lock()
    return config
