r"""Ranking fidelity: Kendall tau / Spearman rho of DNA, SPOS and cost ratings vs stand-alone accuracy.

    .venv/bin/python benchmarks/ranking.py --config configs/fashion_mnist_ranking.py \
        --workdir workdir/fashion_mnist_ranking

Runs `dna_jax.ranking.run_ranking` (see its docstring: the sample, the three ratings, the
statistics and the sign convention): a re-run resumes, reusing every finished stand-alone
training, the SPOS supernet and the DNA stages. Writes `<workdir>/ranking/results.json` and
`<workdir>/ranking/ranking.png`. Any config field can be overridden
(`--config.ranking.num_archs=30`, `--config.dna_workdir=workdir/fashion_mnist_dna`). The last
output line is one JSON object: kendall_dna, kendall_spos, kendall_flops, kendall_params,
spearman_*, top_k_* (each with a bootstrap interval `*_ci`), num_archs, wall_seconds.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dna_jax import ranking  # noqa: E402

if __name__ == "__main__":
    ranking.run()
