r"""Ranking fidelity on ImageNet: DNA vs SPOS vs cost against short stand-alone trainings.

    python -m dna_jax.ranking --config configs/imagenet_ranking.py:gpu8 --workdir gs://BUCKET/dna/imagenet_ranking \
        --config.dna.teacher.checkpoint=/path/to/tf_efficientnet_b7_converted \
        --config.dna_workdir=gs://BUCKET/dna/imagenet    # reuse a finished configs/imagenet_dna.py run

Variants (`:arg`) are configs/imagenet_dna.py's (`gpu1`, `gpu8`, `tpu_v4_32`, `,space=released`);
the DNA section is exactly that config, so a finished DNA run is reused through `dna_workdir`
(its teacher, distill and rate stages are skipped when complete).

30 architectures sampled over the dna_flops range (seed 0), each trained stand-alone for 10
epochs (RMSProp-TF, cosine, batch 1024, 224 px) on train minus a held-out 50,000 and tested on
the validation split; SPOS trains one whole-network supernet for as many steps and rates each
path on the held-out 50,000 with recalibrated BatchNorm. NOT run here (no ImageNet, no
accelerator): the cost is about 31 short trainings of ~450M-dna_flops networks, roughly 300
epochs of ImageNet in all, i.e. several days on 8 GPUs. The papers report, for DNA, Kendall
tau around 0.6-0.65 against stand-alone accuracy and SPOS far lower. The last output line is
one JSON object with kendall_dna, kendall_spos, kendall_flops, spearman_dna, num_archs and
wall_seconds (also in <workdir>/ranking/results.json, plot in ranking.png).
"""


import ml_collections

from dna_jax import config_files, ranking

IMAGENET_TRAIN = 1_281_167
HELD_OUT = 50_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The ImageNet ranking config; `arg` selects configs/imagenet_dna.py's variant."""
    config = ranking.get_default_config()
    dna = config_files.sibling_config(__file__, "imagenet_dna", arg, unlocked=True)
    config.seed = dna.seed
    config.mesh = ml_collections.ConfigDict(dna.mesh.to_dict())
    config.dna = dna
    config.dna_workdir = ""

    config.ranking.num_archs = 30
    config.ranking.seed = 0
    config.ranking.pool_size = 20_000
    config.ranking.stratify_cost = "dna_flops"
    config.ranking.top_k = 5
    config.ranking.bootstrap_resamples = 2000

    # Stand-alone: the retraining recipe of imagenet_dna, cut to 10 epochs with a cosine
    # schedule and no EMA (short runs), on train minus the SPOS validation hold-out.
    standalone = ml_collections.ConfigDict(dna.retrain.to_dict())
    del standalone["inherit_weights"]
    standalone.model.name = "child"
    standalone.data.train_split = f"train[:{IMAGENET_TRAIN - HELD_OUT}]"
    standalone.data.eval_split = "validation"
    standalone.num_epochs = 10.0
    standalone.schedule.name = "cosine"
    standalone.schedule.warmup_epochs = 1.0
    standalone.ema_decay = 0.0
    standalone.model.drop_path_rate = 0.0
    standalone.eval_every_steps = 0
    config.standalone = standalone

    config.spos.total_steps = 0  # as many steps as one stand-alone run
    config.spos.val_split = f"train[{IMAGENET_TRAIN - HELD_OUT}:]"
    config.spos.recal_split = standalone.data.train_split
    config.spos.recal_batch_size = 1024
    config.spos.checkpoint_every_steps = 5000
    config.spos.log_every_steps = 500
    config.lock()
    return config
