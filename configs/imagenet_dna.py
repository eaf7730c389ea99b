r"""DNA on ImageNet: the paper's setup (EfficientNet-B7 teacher, MBConv space, authors' recipe).

    python -m dna_jax.main --config configs/imagenet_dna.py:gpu8 --workdir gs://BUCKET/dna/imagenet \
        --config.teacher.checkpoint=/path/to/tf_efficientnet_b7_converted

Variants (`:arg`): `gpu1` (one GPU, batch 64), `gpu8` (default; 8 GPUs, batch 8 x 64 = 512, as
the authors), `tpu_v4_32` (a v4-32 pod: 16 chips, 4 hosts, batch 1024, bfloat16 teacher, workdir
and TFDS data on GCS: the data dir is $TFDS_DATA_DIR, which launch/tpu.sh sets; start it
with launch/tpu.sh). Add `,space=released` for the released
code's [2,4,4,4,4,1] space instead of the paper's depth-searched one.

Before: build the TFDS copy of imagenet2012 (`tfds build imagenet2012 --manual_dir=...`) and
convert the timm teacher (`python -m dna_jax.porting.timm --model tf_efficientnet_b7 --weights
tf_efficientnet_b7.safetensors --out DIR`, README "ImageNet teacher"). Not run here (no
ImageNet, no accelerator). Expected, from the paper: a DNA-c-like network (about 466M
dna_flops) retrained to about 77.8% top-1; the pipeline's report gives the figures of the run.
The last output line is one JSON object with teacher_accuracy, winner_accuracy, teacher_macs,
winner_macs and wall_seconds.
"""

import ml_collections
from ml_collections import config_dict

from dna_jax import pipeline

_VARIANTS = {
    # name: (global batch, mesh shape, teacher dtype, data dir)
    "gpu1": (64, (-1,), "float32", ""),
    "gpu8": (512, (-1,), "float32", ""),
    # '' = $TFDS_DATA_DIR (launch/tpu.sh sets it to gs://BUCKET/tensorflow_datasets)
    "tpu_v4_32": (1024, (-1,), "bfloat16", ""),
}


def _parse(arg: str | None) -> tuple[str, str]:
    variant, space = "gpu8", "dna_paper"
    for part in filter(None, (arg or "").split(",")):
        if part in _VARIANTS:
            variant = part
        elif part == "space=released":
            space = "dna_released"
        elif part == "space=paper":
            space = "dna_paper"
        else:
            raise ValueError(f"Unknown config arg {part!r}; use one of {sorted(_VARIANTS)} and "
                             "optionally space=paper|released.")
    return variant, space


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, space = _parse(arg)
    batch, mesh_shape, teacher_dtype, data_dir = _VARIANTS[variant]
    config = pipeline.get_default_config()
    config.seed = 42  # REFERENCE.md section 3.
    config.mesh.shape = mesh_shape
    config.distributed = "auto"

    data = config.data
    data.source = "tfds"
    data.name = "imagenet2012"
    data.data_dir = data_dir
    data.image_size = 224
    data.channels = 3
    data.batch_size = batch
    data.eval_batch_size = batch
    data.augment = "imagenet"
    data.train_split = "train"
    data.eval_split = "validation"
    data.shuffle_buffer = 16_384

    # The teacher: converted timm tf_efficientnet_b7 weights. Required: a run without
    # --config.teacher.checkpoint=DIR (local or gs://) stops at start naming the field.
    config.teacher.name = "tf_efficientnet_b7"
    config.teacher.checkpoint = config_dict.placeholder(str)
    config.teacher.num_classes = 1000

    # Distillation: the authors' recipe (Adam, wd 1e-4, per-block lr, x0.9 per epoch, 20 epochs).
    distill = config.distill
    distill.space = space
    distill.num_epochs = 20.0
    distill.learning_rates = (0.002, 0.005, 0.005, 0.005, 0.005, 0.002)
    distill.lr_decay = 0.9
    distill.lr_decay_epochs = 1.0
    distill.optimizer = "adam"
    distill.weight_decay = 1e-4
    distill.sampling = "uniform"
    distill.teacher_dtype = teacher_dtype
    distill.padding = "same"
    distill.val_split = "validation[:10000]"
    distill.val_every_steps = 5000
    distill.val_num_batches = 20
    distill.checkpoint_every_steps = 2000

    # Rating: the original's 19 validation batches, BN recalibrated on the first train batch.
    rate = config.rate
    rate.split = "validation"
    rate.num_batches = 19
    rate.batch_size = 64
    rate.cost_resolution = 224
    rate.memory_budget_bytes = 8 * 1024 ** 3

    # Search: the released script's 460M dna_flops budget (a DNA-c-sized network).
    config.search.cost = "dna_flops"
    config.search.budget = 460e6
    config.search.top_k = 5

    # Retraining: the originals' timm recipe (RMSProp-TF, lr 0.256 per 4096, EMA, drop-path 0.2).
    retrain = config.retrain
    retrain.data = ml_collections.ConfigDict(data.to_dict())
    retrain.data.batch_size = max(batch * 4, 256)
    retrain.optimizer.name = "rmsprop_tf"
    retrain.optimizer.learning_rate = 0.256
    retrain.optimizer.lr_base_batch = 4096
    retrain.optimizer.weight_decay = 1e-5
    retrain.schedule.name = "exponential"
    retrain.schedule.warmup_epochs = 5.0
    retrain.schedule.decay_rate = 0.97
    retrain.schedule.decay_epochs = 2.4
    retrain.num_epochs = 450.0
    retrain.label_smoothing = 0.1
    retrain.ema_decay = 0.9999
    retrain.model.drop_rate = 0.2
    retrain.model.drop_path_rate = 0.2
    retrain.model.dtype = "bfloat16" if variant.startswith("tpu") else "float32"
    retrain.checkpoint_every_steps = 5000
    retrain.eval_every_steps = 10_000
    config.lock()
    return config
