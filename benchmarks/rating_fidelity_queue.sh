#!/usr/bin/env bash
# Issue 19's experiments, in order, each resumable and committing its result files as it goes:
# after an interruption (or on a fresh machine, after `make setup data`) run it again and it
# continues where the committed files stop. Hours of CPU; run it niced beside other work:
#   echo 0 > /proc/sys/kernel/sched_autogroup_enabled   # else nice does not yield (autogroups)
#   nohup nice -n 8 benchmarks/rating_fidelity_queue.sh > /tmp/fidelity_queue.log 2>&1 &
# Steps, most important first: 1 the ground truth (48 stand-alone runs), 2 the fidelity table of
# the methods rated so far, 3 SPOS's rating of the ground truth's architectures (~25 min), 4 the
# DNA++ rating (ssl + rate stages, ~1 h), 5 the fidelity table of every method
# (results/fmnist28_fidelity.{json,md,png}, committed after steps 2 and 5), 6 search
# effectiveness (20 runs, hours: does the DNA winner beat the biggest net under the budget?),
# 7 its follow-up (the mean-expansion proxy's pick: 4 new runs, the 20 others copied).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

commit() {  # commit the given result paths alone (the ground truth commits itself)
  git add -- "$@" && git commit -q --only -m "results: ${MESSAGE}" -- "$@" || true
}

$PY -m dna_jax.ground_truth --config configs/fmnist28_ground_truth.py \
  --workdir workdir/fmnist28_ground_truth --out results/fmnist28_ground_truth.json --commit

fidelity_table() {  # every row whose ratings exist so far
  local extra=()
  [[ -f results/fmnist28_ratings/dna_pp/block2.npz ]] && extra+=(--rate_dir dnapp=results/fmnist28_ratings/dna_pp)
  [[ -f results/fmnist28_spos_scores.json ]] && extra+=(--arch_scores spos=results/fmnist28_spos_scores.json)
  $PY benchmarks/rating_fidelity.py --ground_truth results/fmnist28_ground_truth.json \
    --rate_dir dna=results/fmnist28_ratings/dna --rate_dir recal128=results/fmnist28_ratings/recal128 \
    --rate_dir batch=results/fmnist28_ratings/batch "${extra[@]}" --out results/fmnist28_fidelity.json
  MESSAGE="the fidelity table ($1)" commit results/fmnist28_fidelity.json \
    results/fmnist28_fidelity.md results/fmnist28_fidelity.png
}
complete_table() {  # the committed table has every method's rows (delete it to recompute)
  grep -q '"dnapp\[' results/fmnist28_fidelity.json 2>/dev/null && grep -q '"spos"' results/fmnist28_fidelity.json
}
complete_table || fidelity_table "the ground truth against DNA's ratings, macs and the other proxies"

if [[ ! -f results/fmnist28_spos_scores.json ]]; then
  $PY -m dna_jax.spos_scores --config configs/fmnist28_spos.py --workdir workdir/fmnist28_spos \
    --out results/fmnist28_spos_scores.json
  MESSAGE="SPOS scores of the ground truth's architectures" commit results/fmnist28_spos_scores.json
fi

if [[ ! -f results/fmnist28_ratings/dna_pp/block2.npz ]]; then
  $PY -m dna_jax.main --config configs/fmnist28_dna_pp.py --workdir workdir/fmnist28_dna_pp \
    --config.stages=ssl,rate
  mkdir -p results/fmnist28_ratings/dna_pp
  cp workdir/fmnist28_dna_pp/rate/block*.npz workdir/fmnist28_dna_pp/rate/block*.json \
    workdir/fmnist28_dna_pp/rate/manifest.json results/fmnist28_ratings/dna_pp/
  MESSAGE="the DNA++ rating tables of configs/fmnist28_dna_pp.py" commit results/fmnist28_ratings/dna_pp
fi

complete_table || fidelity_table "every method: DNA, DNA++, SPOS, proxies"

$PY -m dna_jax.search_effectiveness --config configs/fmnist28_search_effectiveness.py \
  --workdir workdir/fmnist28_search_effectiveness \
  --out results/fmnist28_search_effectiveness.json --commit

$PY -m dna_jax.search_effectiveness --config configs/fmnist28_search_expansion.py \
  --workdir workdir/fmnist28_search_effectiveness \
  --out results/fmnist28_search_expansion.json \
  --reuse results/fmnist28_search_effectiveness.json --commit
