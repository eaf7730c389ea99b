r"""DNA++ on ImageNet: self-supervised block-wise training with BossNAS's settings, no teacher.

    python -m dna_jax.main --config configs/imagenet_dna_pp.py:tpu_v4_32 --workdir gs://BUCKET/dna_pp/imagenet

Variants as in configs/imagenet_dna.py (`gpu1`, `gpu8` default, `tpu_v4_32`, optionally
`,space=released`); the data, rating batches, search budget (460M dna_flops) and retraining
recipe are that config's, so DNA and DNA++ runs compare directly. Not run here (no ImageNet,
no accelerator); the pipeline's report gives the figures of a run. The last output line is one
JSON object with winner_accuracy, winner_macs, ssl_loss_final, ssl_output_std_final and
wall_seconds.

Self-supervision (REFERENCE.md section 5, BossNAS): blocks trained one after another for 6
epochs each, block k fed by the image through the target network's best paths of blocks < k;
4 paths per step, each with its own two BYOL views (random resized crop, flip, colour jitter
p 0.8, grayscale p 0.2, blur p 1.0 / 0.1, solarisation p 0 / 0.2); projector 4096 -> 256,
predictor 256 -> 4096 -> 256; LARS, lr 4.8 per 4096 images (linearly scaled to the
variant's batch: BossNAS reached 4096 by gradient accumulation, which dna_jax does not do),
weight decay 1e-6 off BatchNorm and biases, cosine schedule after a warm-up; EMA base
momentum 0.99 rising to 1. DNA++'s collapse guards (variance and covariance of the
normalised projections) are on with weights 1.0 and 0.04 (our choice: the paper's exact
terms were not readable, REFERENCE.md section 5). Memory: 8 views of each image at 224 px;
lower the batch (or num_paths) if a device runs out.
"""


import ml_collections

from dna_jax import config_files, pipeline, supervision

BOSSNAS_BATCH, BOSSNAS_LR = 4096, 4.8


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base = config_files.sibling_config(__file__, "imagenet_dna", arg, unlocked=True)
    config = pipeline.get_default_config()
    for section in ("seed", "mesh", "distributed", "data", "rate", "search", "retrain"):
        config[section] = base[section]
    config.supervision = "ssl"
    config.stages = ",".join(supervision.get("ssl").stages)

    ssl = config.ssl
    ssl.space = base.distill.space
    ssl.schedule = "sequential"
    ssl.num_epochs = 6.0
    ssl.num_paths = 4
    ssl.sampling = "uniform"
    ssl.optimizer = "lars"
    ssl.optimizer_kwargs = ml_collections.ConfigDict(dict(momentum=0.9, trust_coefficient=0.001,
                                                          eps=0.0))
    ssl.learning_rates = (BOSSNAS_LR * config.data.batch_size / BOSSNAS_BATCH,)
    ssl.weight_decay = 1e-6
    ssl.exclude_bn_and_bias = True
    ssl.warmup_epochs = 0.5
    ssl.base_momentum = 0.99
    ssl.projector_hidden = 4096
    ssl.projector_dim = 256
    ssl.predictor_hidden = 4096
    ssl.variance_weight = 1.0
    ssl.covariance_weight = 0.04
    ssl.padding = "same"
    ssl.bn_momentum = 0.9
    ssl.dtype = "bfloat16" if (arg or "").startswith("tpu") else "float32"
    ssl.augment.blur_sigma = (0.1, 2.0)
    ssl.log_every_steps = 100
    ssl.checkpoint_every_steps = 2000
    config.lock()
    return config
