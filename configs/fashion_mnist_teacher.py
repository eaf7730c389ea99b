r"""Fashion-MNIST teacher: a small EfficientNet-style network, trained on 2 CPU cores.

    python -m dna_jax.retrain --config configs/fashion_mnist_teacher.py --workdir /tmp/fmnist_teacher

Measured on this project's 2-core CPU: test_accuracy 0.902 (top-5 0.998) after 2,344 steps (5
epochs, 20 px, batch 128, stride-2-stem fmnist_teacher, 385,502 params, 2.16M multiply-adds per
image), 333 s of training and 345 s wall with light background load (901 images/s; 1,041
images/s on the idle machine, benchmarks/train_throughput.py). Deterministic: the demo pipeline
gets the same 0.902. Two epochs gave 0.879. The last output line is a JSON object with the
figures (also in <workdir>/figures.json).
`configs/fashion_mnist_teacher.py:tiny` is a seconds-long smoke run used by the tests.
"""

import ml_collections

from dna_jax import config_files, retrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The teacher config; arg 'tiny' gives the test variant."""
    variant = config_files.variant(arg)
    config = retrain.get_default_config()
    config.seed = 0

    config.data.source = "fashion_mnist"  # Offline idx files, /usr/share/datasets/fashion-mnist.
    config.data.image_size = 20  # stride-2 stem: 10 px after it; 28 px costs 2x more
    config.data.channels = 3  # Grayscale tiled to RGB, as an ImageNet-style net expects.
    config.data.batch_size = 128
    config.data.eval_batch_size = 500
    config.data.augment = "flip"

    config.model.name = "fmnist_teacher"
    config.model.drop_rate = 0.1
    config.model.drop_path_rate = 0.0

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 6e-3
    config.optimizer.lr_base_batch = 256
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.05
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 0.1
    config.num_epochs = 5.0
    config.label_smoothing = 0.1
    config.ema_decay = 0.0
    config.log_every_steps = 100
    config.checkpoint_every_steps = 200

    if variant == "tiny":
        config.data.image_size = 16
        config.data.batch_size = 32
        config.data.eval_batch_size = 200
        config.data.train_split = "train[:512]"
        config.data.eval_split = "test[:400]"
        config.model.stages = (("ds_r1_k3_s1_c8",), ("ir_r1_k3_s2_e2_c16",))
        config.model.stem_channels = 8
        config.model.stem_stride = 2
        config.model.head_channels = 32
        config.model.name = "fmnist_teacher_tiny"
        config.total_steps = 8
        config.log_every_steps = 4
        config.checkpoint_every_steps = 4
    config.lock()
    return config
