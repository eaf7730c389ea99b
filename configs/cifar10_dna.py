r"""DNA on CIFAR-10 (TFDS): a teacher trained here, the `small` MBConv space, 32 px.

    tfds build cifar10 --data_dir=$HOME/tensorflow_datasets   # once, on a machine with internet
    python -m dna_jax.main --config configs/cifar10_dna.py --workdir workdir/cifar10_dna

The same stages as configs/fashion_mnist_dna.py with CIFAR-10's colour images: teacher
`fmnist_teacher` (an EfficientNet-style net for 28-32 px) trained for 30 epochs, one
distillation epoch of the four supernet blocks, every candidate rated, the best network under
half the teacher's multiply-adds retrained for 30 epochs. Not run here (no CIFAR-10 download
offline); on one GPU it takes well under an hour. The last output line is one JSON object with
teacher_accuracy, winner_accuracy, teacher_macs, winner_macs and wall_seconds.
"""

import ml_collections

from dna_jax import pipeline, retrain


def _trainer(data: ml_collections.ConfigDict, epochs: float) -> ml_collections.ConfigDict:
    config = retrain.get_default_config()
    config.data = ml_collections.ConfigDict(data.to_dict())
    config.data.train_split = "train"
    config.model.name = "fmnist_teacher"
    config.model.drop_rate = 0.2
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 4e-3
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.05
    config.schedule.warmup_epochs = 1.0
    config.num_epochs = epochs
    config.checkpoint_every_steps = 1000
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/cifar10_dna.py takes no argument, got {arg!r}")
    config = pipeline.get_default_config()
    data = config.data
    data.source = "tfds"
    data.name = "cifar10"
    data.image_size = 32
    data.channels = 3
    data.batch_size = 128
    data.eval_batch_size = 500
    data.augment = "crop_flip"
    data.crop_padding = 4
    data.train_split = "train[:45000]"
    data.eval_split = "test"

    config.teacher.name = "fmnist_teacher"
    config.teacher.train = _trainer(data, 30.0)

    distill = config.distill
    distill.space = "small"
    distill.num_epochs = 1.0
    distill.learning_rates = (0.002, 0.005, 0.005, 0.002)
    distill.lr_decay_epochs = 0.25
    distill.sampling = "fair"
    distill.val_split = "train[45000:47500]"

    config.rate.split = "train[47500:]"
    config.rate.num_batches = 4
    config.rate.batch_size = 250
    config.rate.cost_resolution = 32

    config.search.cost = "macs"
    config.search.budget_fraction = 0.5
    config.retrain = _trainer(data, 30.0)
    config.retrain.inherit_weights = False
    config.lock()
    return config
