r"""python -m dna_jax.ground_truth --config configs/fmnist28_ground_truth_confirm.py --workdir workdir/fmnist28_ground_truth_confirm --out results/fmnist28_ground_truth_confirm.json --commit

Not yet measured. The confirmation sample of the fmnist28 ground truth, registered before any
of its networks was trained (see README "Does the rating work?"): 18 new networks in the pool
and the 6 cost bins of configs/fmnist28_ground_truth.py (same sample seed, pool, quantiles and
2% tolerance: centres 1.64M to 6.31M multiply-adds), 3 per bin, drawn with their own rng
(`sample.pick_seed=1`) among those results/fmnist28_ground_truth.json did not sample
(`sample.exclude`); each trained stand-alone with seed 0 only (no pilot, no extra seeds: the
seed noise is the first file's). Same recipe as fmnist28_ground_truth.py. The fidelity analysis
reads both files together (`benchmarks/rating_fidelity.py --ground_truth
results/fmnist28_ground_truth.json --ground_truth results/fmnist28_ground_truth_confirm.json
--alpha ...`).
`:tiny` is the tests' variant (fmnist28_ground_truth.py's, 1 network per bin; the tests give
`sample.exclude` a tiny file).
"""

import ml_collections

from dna_jax import config_files


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_files.variant(arg)
    config = config_files.sibling_config(__file__, "fmnist28_ground_truth", arg, unlocked=True)
    config.sample.per_bin = 3
    config.sample.pick_seed = 1
    config.sample.exclude = "results/fmnist28_ground_truth.json"
    config.seeds.multi_seed_per_bin = 0
    config.seeds.pilot_archs = 0  # num_seeds stays (>= 2 is checked; unused without multi-seed)
    if variant == "tiny":
        config.sample.per_bin = 1
        config.sample.exclude = ""  # no committed tiny file: the tests write one
    config.lock()
    return config
