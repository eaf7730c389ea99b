r"""python -m dna_jax.search_effectiveness --config configs/fmnist28_search_effectiveness.py --workdir workdir/fmnist28_search_effectiveness --out results/fmnist28_search_effectiveness.json --commit

Search effectiveness on fmnist28 (issue 19, item 6; see dna_jax/search_effectiveness.py): the
DNA winner vs the largest net vs random nets of near-equal cost. Two budgets, 2.8M and 4.8M
multiply-adds (near two of the ground truth's bin centres, 2.81M and 4.82M, so ground-truth
nets of that size exist for reference). At each: the exact search's winner on the DNA rating
tables in results/fmnist28_ratings/dna (from configs/fmnist28_dna.py; the search settings
copied from that config: combine, standardize, unfit_blocks, rank_normalize), the largest
net under the budget (exact over the 25.4M architectures; ties drawn with seed 0), and 3
random nets within 10% below the budget (from a 200,000-architecture uniform pool, seed 0),
each trained stand-alone with seeds 0 and 1 and the ground truth's recipe (the `standalone`
section of configs/fmnist28_ground_truth.py: 2 epochs; measured here, the file's first 10 runs
took 313-805 s each on the 2-vCPU AMD EPYC beside a niced DNA++ run (one took 1,789 s: it was
paused during a CI run), so the 20 runs take about 3 hours: resumable, commit the file as it
grows). Read the file's `pooled` comparisons (see
dna_jax/search_effectiveness.py; the primary one, fixed before the first run, is the DNA
winner minus the size pick averaged over both budgets); `--report FILE` prints it as markdown. Add
`--config.tables.variants=recal128=results/fmnist28_ratings/recal128` for the winner of the
128-image-recalibration tables as one more contender (a new --out: it is another config).
`--plan_only` prints the selection and trains nothing.
Measured (2026-12-07, 20 of 20 runs, the registered primary comparison): the DNA winner minus
the size pick averaged over both budgets +0.27 points [-0.23, +0.76] (t interval, seed SD
0.31 points pooled over the 10 networks, 10 df): not resolved; minus the random nets +0.31
[-0.13, +0.75]; per budget +0.08 (2.8M) and +0.46 (4.8M) points.
`:tiny` is the tests' variant (the `tiny` space, a few steps; the test sets tables.rate_dir to
tables it writes).
"""

import ml_collections

from dna_jax import config_files, search_effectiveness

BUDGETS = (2.8e6, 4.8e6)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = config_files.variant(arg)
    tiny = variant == "tiny"
    config = search_effectiveness.get_default_config()
    config.space = "fmnist28"
    config.resolution = 28
    config.num_classes = 10
    config.cost = "macs"
    config.budgets = BUDGETS
    config.tables.rate_dir = "results/fmnist28_ratings/dna"
    config.tables.variants = ""  # e.g. "recal128=results/fmnist28_ratings/recal128"
    dna_search = config_files.sibling_config(__file__, "fmnist28_dna").search
    for key in ("combine", "standardize", "unfit_blocks", "rank_normalize"):
        config.search[key] = dna_search[key]
    config.contenders.seed = 0
    config.contenders.pool_size = 200_000
    config.contenders.num_random = 3
    config.contenders.random_tolerance = 0.10
    config.num_seeds = 2
    # The ground truth's recipe, so these accuracies are comparable with its file.
    ground_truth = config_files.sibling_config(__file__, "fmnist28_ground_truth",
                                               "tiny" if tiny else None, unlocked=True)
    config.standalone = ground_truth.standalone
    if tiny:  # 8 architectures of 0.26M-0.31M multiply-adds at 16 px
        config.space = "tiny"
        config.resolution = 16
        config.budgets = (306_096.0, 296_000.0)
        config.tables.rate_dir = "tiny_tables_set_by_the_test"
        config.contenders.pool_size = 200
        config.contenders.random_tolerance = 0.2
        config.standalone.total_steps = 2
        config.standalone.log_every_steps = 1
        config.standalone.checkpoint_every_steps = 2
    config.lock()
    return config
