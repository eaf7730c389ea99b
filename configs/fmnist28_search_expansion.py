r"""python -m dna_jax.search_effectiveness --config configs/fmnist28_search_expansion.py --workdir workdir/fmnist28_search_effectiveness --out results/fmnist28_search_expansion.json --reuse results/fmnist28_search_effectiveness.json --commit

Follow-up to the search-effectiveness experiment (configs/fmnist28_search_effectiveness.py):
the same two budgets, tables, selection seed and recipe, plus one contender per budget picked
by a FREE proxy, the mean expansion ratio, which in the exploratory rows of the fidelity table
(added after the pre-registered test) ranked the 36 ground-truth networks as well as DNA and
said more beyond size (partial Spearman +0.37 [+0.02, +0.68] against DNA's +0.31). Its pick:
among networks whose every searched layer has expansion 6 (the highest mean expansion the
space allows), the largest under the budget (exact; ties drawn with seed 0 after the other
picks, which are therefore the first experiment's). --reuse copies the first file's 20 runs
(same networks, recipe and seeds), so only the 2 new networks x 2 seeds are trained, in the
same workdir (their folders are new contender indices). The reading is fixed in the README
before the runs (primary: `dna_minus_mean_expansion` over both budgets, pooled seed SD).
Measured (2026-12-07, 4 new runs of 5-9 min on the 2-vCPU AMD EPYC, 20 copied): DNA winner minus
the mean-expansion pick over both budgets +0.09 points [-0.36, +0.54] (seed SD 0.29 points
pooled over 12 networks, 12 df): not resolved; the pick minus the size pick +0.18
[-0.27, +0.63]; the picks: 2,795,296 and 4,799,872 multiply-adds.
`:tiny` is the tests' variant (see configs/fmnist28_search_effectiveness.py).
"""

import ml_collections

from dna_jax import config_files


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = config_files.sibling_config(__file__, "fmnist28_search_effectiveness", arg,
                                         unlocked=True)
    config.contenders.features = "mean_expansion"
    config.lock()
    return config
