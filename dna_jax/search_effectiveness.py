r"""Search effectiveness: does the DNA winner beat the biggest net, and random nets, of its size?

    python -m dna_jax.search_effectiveness --config configs/fmnist28_search_effectiveness.py \
        --workdir workdir/fmnist28_search_effectiveness \
        --out results/fmnist28_search_effectiveness.json [--commit] [--max_runs N] [--plan_only]
        [--reuse OTHER_FILE.json]
    python -m dna_jax.search_effectiveness --config ... \
        --report results/fmnist28_search_effectiveness.json

Issue 19, item 6. At each budget of `config.budgets` (in `config.cost`, multiply-adds), the
CONTENDERS are:
  * `dna`: the exact search's winner on the DNA rating tables (`config.tables.rate_dir`) under
    the budget, with the pipeline's search settings (`config.search`: combine, standardize,
    unfit_blocks, rank_normalize, as `dna_jax.pipeline.run_search` applies them through
    `search.prepare_tables` and `search.search` with k=1; the config file copies them from
    configs/fmnist28_dna.py, the run that made the tables);
  * `dna_<name>`: the same for every extra table folder of `config.tables.variants`
    ('name=dir,name=dir'; e.g. the 128-image recalibration), off by default;
  * `size`: the best-by-size net, the architecture with the LARGEST cost under the budget,
    found exactly over the whole space (every block's candidates, meet in the middle on the
    additive block costs). Architectures that tie on that cost (permuted layers, or the same
    network with its identity ops elsewhere) are reduced to distinct networks (block strings)
    and one is drawn with the selection seed; the file records how many tied;
  * `random<i>`: `config.contenders.num_random` networks drawn at random among architectures
    whose cost lies in [(1 - random_tolerance) x budget, budget] (size-controlled, so what
    they differ in from `dna` is what the rating adds beyond size): the space's uniform
    sampler (each layer uniform over its legal ops, `ranking.distinct_pool`, the ground
    truth's pool) draws `pool_size` architectures with the selection seed, those inside the
    window are shuffled and taken in turn, skipping any whose network equals the `dna`, `size`
    or an earlier random pick's (so they are distinct networks);
  * `<feature>` (off by default; `config.contenders.features`, names of FEATURES): a free
    proxy's pick, the network whose shape feature (`fidelity.shape_features`: mean expansion
    ratio, mean kernel, depth) is the highest the space allows (every searched layer that is
    not the identity at the largest expansion, or kernel; for depth, no identity layer), the
    largest of those under the budget (`largest_under` on the restricted space, ties drawn
    with the selection seed after every other pick of every budget, so adding a feature
    changes neither the other picks nor their contender indices).
    Compared like `dna` (minus `size`, minus the random nets), and `dna` minus it.
A network that is a contender at both budgets, or in two roles (e.g. the DNA winner is also
the biggest net), is one contender and is trained once; its roles say where it counts.

Every contender is trained stand-alone `config.num_seeds` times (seeds 0..n-1) with the
ground truth's recipe (`config.standalone`, the same section as
configs/fmnist28_ground_truth.py, so the accuracies are comparable with that file) through
`ground_truth.train_one` (checkpointed in `<workdir>/runs/c<contender>_s<seed>/`: a killed run
resumes, a finished one is reused). Order: seed 0 of every contender, interleaved over the
budgets and roles (dna of budget 1, dna of budget 2, size of 1, size of 2, random0 of 1, ...),
then seed 1, and so on, so a partial file is balanced. After each run the JSON file is
rewritten atomically and, with --commit, committed on its own (`ground_truth.commit_file`); a
fresh machine with only the committed file continues where it stopped. --plan_only prints the
selection (costs and DNA scores) and trains nothing. --reuse FILE copies FILE's runs of the same
network (block strings), recipe and seed instead of training them again (each copy says where
it came from in `reused_from`): a follow-up that adds a contender trains only the new one.

The file (format_version 1): `record` (every selection setting), `recipe` (the stand-alone
config), `tables` (each table folder's source, digest of the tables the search composes, score
metric and fit per block), `contenders` (blocks, block strings, params / macs / dna_flops /
effective macs, the DNA score of each under the tables (`dna_objective`: the sum of the
per-block terms the search minimises; `dna_score`: the sum of block scores), roles),
`budgets` (the picks and the window), `order`, `runs` (contender, seed, test accuracy and
loss, steps, seconds, commit, machine) and `summary`. A file made by another config, other
tables or another selection is refused (ValueError: use another --out).

The summary (per budget, recomputed from the runs after every run, never filled in before
the runs exist): per role the mean and SD (ddof 1) over seeds; `random_mean`: the mean over
the random nets of their mean accuracy, and the SD across nets; and for `dna` (and each
variant) the difference from `size` and from the random nets with a 95% Welch t-interval
(`scipy.stats.ttest_ind(equal_var=False).confidence_interval`). Against `size` the samples are
the two nets' seeds; against the random nets they are the DNA net's seeds and the random nets'
mean accuracies (the net is the unit that was drawn, so the interval covers the spread between
random nets, not only seed noise). An interval needs >= 2 values on each side with some
spread; otherwise its fields are null with the reason. With 2 seeds the t-interval has about
1-2 degrees of freedom and is wide: it is what 2 seeds can say on their own.

`pooled` (the comparisons to read): seed noise is a property of the recipe, not of one
network, so its SD is pooled over every contender with >= 2 seeds (the within-network mean
square: with 10 networks x 2 seeds, 10 degrees of freedom instead of Welch's 1-2), assuming it
is the same for every network (the ground truth's 6 networks x 3 seeds are consistent with
it: per-network SDs 0.11-0.30 points, each on 2 degrees of freedom). Per budget: each DNA
role minus `size`, SE = SD x sqrt(1/n1 + 1/n2), t with the pooled df (a difference of 0 and
no noise where they are the same network). Over budgets, the mean of the per-budget
differences: minus `size` (the same pooled noise), and minus the random nets,
where the drawn net is the unit: the between-random-net variance of their mean accuracies,
pooled over budgets (df = sum of nets - 1), enters beside the DNA nets' seed noise, with
Welch-Satterthwaite df. `half_width` is what the design can resolve. The file's statistics are
recomputed from its runs by the running code (also when every run is done), so a file written
by older code is brought up to date without training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Any, Sequence

import ml_collections
import numpy as np

from dna_jax import artifacts
from dna_jax import costs as costs_lib
from dna_jax import ground_truth
from dna_jax import host_memory
from dna_jax import metrics as metrics_lib
from dna_jax import rating_table
from dna_jax import retrain as retrain_lib
from dna_jax.space import Arch, SearchSpace, get_space

FORMAT_VERSION = 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DNA = "dna"
SIZE = "size"
RANDOM = "random"
# Networks picked by a free shape feature of `fidelity.shape_features` (exploratory contenders,
# `config.contenders.features`): the network whose feature is the highest the space allows,
# the largest of those under the budget.
FEATURES = ("mean_expansion", "mean_kernel", "depth")


# ---- configuration -----------------------------------------------------------------------------


def get_default_config() -> ml_collections.ConfigDict:
    """Every field a search-effectiveness run reads.

    Fields:
      space, resolution, num_classes: the search space, the image size the costs are counted
        at and the classes of the head (the tables' costs must match them).
      cost: the budgets' cost (`macs`); budgets: absolute budgets in that cost.
      tables: rate_dir (the rating tables' folder, relative to the repository root or
        absolute), variants ('name=dir,...': extra table folders, each adding a `dna_<name>`
        contender; '' = none).
      search: the pipeline's search settings (combine, standardize, unfit_blocks,
        rank_normalize), see dna_jax.pipeline.get_default_config.
      contenders: seed (the selection's: size ties, the random pool and draws), pool_size,
        num_random, random_tolerance (the random nets' window is
        [(1 - random_tolerance) x budget, budget]), features (comma-separated names of
        FEATURES, each adding a contender picked by that shape feature; '' = none).
      num_seeds: stand-alone trainings per contender (seeds 0..num_seeds-1).
      standalone: a full trainer config (dna_jax.retrain); its `seed` is set per run.
    """
    config = ml_collections.ConfigDict()
    config.space = "fmnist28"
    config.resolution = 28
    config.num_classes = 10
    config.cost = "macs"
    config.budgets = (2.8e6, 4.8e6)
    config.tables = dict(rate_dir="results/fmnist28_ratings/dna", variants="")
    config.search = dict(combine="sum", standardize=False, unfit_blocks="keep",
                         rank_normalize=False)
    config.contenders = dict(seed=0, pool_size=200_000, num_random=3, random_tolerance=0.10,
                             features="")
    config.num_seeds = 2
    config.standalone = retrain_lib.get_default_config()
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the field."""
    get_space(config.space)
    if config.cost not in costs_lib.COST_NAMES:
        raise ValueError(f"config.cost must be one of {costs_lib.COST_NAMES}, got {config.cost!r}")
    if not config.budgets or any(b <= 0 for b in config.budgets):
        raise ValueError(f"config.budgets must be positive numbers, got {config.budgets}")
    if len(set(config.budgets)) != len(config.budgets):
        raise ValueError(f"config.budgets repeats a budget: {config.budgets}")
    c = config.contenders
    if c.num_random < 1 or c.pool_size < 1:
        raise ValueError(f"config.contenders: num_random and pool_size must be >= 1, got "
                         f"{c.num_random}, {c.pool_size}")
    if not 0.0 < c.random_tolerance < 1.0:
        raise ValueError(f"config.contenders.random_tolerance must be in (0, 1), got "
                         f"{c.random_tolerance}")
    unknown = set(feature_roles(config)) - set(FEATURES)
    if unknown:
        raise ValueError(f"config.contenders.features: {sorted(unknown)} not in {FEATURES}")
    if config.num_seeds < 2:
        raise ValueError(f"config.num_seeds must be >= 2 (a mean and SD need two), got "
                         f"{config.num_seeds}")
    if not config.tables.rate_dir:
        raise ValueError("config.tables.rate_dir is empty: set the rating tables' folder")
    table_dirs(config)


def feature_roles(config: ml_collections.ConfigDict) -> list[str]:
    """The feature-picked roles of `config.contenders.features`, in order."""
    names = [s.strip() for s in config.contenders.get("features", "").split(",") if s.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"config.contenders.features repeats a name: {names}")
    return names


def picked_role(role: str) -> bool:
    """A role whose net a rule chose for its merit (DNA's rating or a shape feature), compared
    against `size` and the random nets; not `size` or a random net."""
    return role.startswith(DNA) or role in FEATURES


def table_dirs(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{role: absolute table folder}: 'dna' and one 'dna_<name>' per variant."""
    def resolve(path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(REPO, path)

    out = {DNA: resolve(config.tables.rate_dir)}
    for item in filter(None, (s.strip() for s in config.tables.variants.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip().isidentifier() or not path.strip():
            raise ValueError(f"config.tables.variants: {item!r} is not 'name=folder'")
        role = f"{DNA}_{name.strip()}"
        if role in out:
            raise ValueError(f"config.tables.variants repeats {name!r}")
        out[role] = resolve(path.strip())
    return out


# ---- the tables --------------------------------------------------------------------------------


def load_tables(rate_dir: str, space: SearchSpace, config: ml_collections.ConfigDict) -> dict:
    """The tables the search composes (as the pipeline's search stage prepares them), with
    their digest, fits and score metric."""
    from dna_jax import search as search_lib  # pylint: disable=import-outside-toplevel
    tables = rating_table.load_space_tables(rate_dir, space, resolution=config.resolution)
    fits = [rating_table.block_fit(rate_dir, block.name) for block in space.blocks]
    tables = search_lib.prepare_tables(tables, fits, config.search.unfit_blocks,
                                       config.search.rank_normalize)
    digest = hashlib.sha256()
    metrics = []
    for b, table in enumerate(tables):
        for array in (table.encodings, table.score, table.cost(config.cost)):
            array = np.ascontiguousarray(array)
            digest.update(str((b, array.dtype.str, array.shape)).encode() + array.tobytes())
        path = os.path.join(rate_dir, f"{space.blocks[b].name}.npz")
        metric = None
        if os.path.exists(path):
            with np.load(path, allow_pickle=False) as data:
                metric = str(data["score_metric"]) if "score_metric" in data.files else None
        metrics.append(metric)
    return {"tables": tables, "digest": digest.hexdigest()[:16], "fits": fits,
            "score_metrics": metrics}


def _source(path: str) -> str:
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def dna_scores(tables: Sequence[Any], arch: Arch, config: ml_collections.ConfigDict
               ) -> dict[str, Any]:
    """The rating of one architecture: the search's objective (sum of the per-block terms it
    minimises), the sum of block scores and the block scores."""
    from dna_jax import search as search_lib  # pylint: disable=import-outside-toplevel
    objs = search_lib.block_objectives(tables, config.search.combine, config.search.standardize)
    rows = [_row(t, ops, b) for b, (t, ops) in enumerate(zip(tables, arch.blocks))]
    block_scores = [float(t.score[r]) for t, r in zip(tables, rows)]
    return {"dna_objective": float(sum(float(o[r]) for o, r in zip(objs, rows))),
            "dna_score": float(np.prod(block_scores) if config.search.combine == "product"
                               else sum(block_scores)),
            "block_scores": block_scores}


def _row(table: Any, ops: Sequence[int], b: int) -> int:
    hit = np.flatnonzero((table.encodings == np.asarray(ops)[None, :]).all(axis=1))
    if len(hit) != 1:
        raise ValueError(f"{table.source}: candidate {list(ops)} of block {b} is not in the table")
    return int(hit[0])


# ---- the contenders ----------------------------------------------------------------------------


def dna_winner(tables: Sequence[Any], space: SearchSpace, config: ml_collections.ConfigDict,
               budget: float) -> Arch:
    """`search.search`'s best network under the budget, as the pipeline's search stage."""
    from dna_jax import search as search_lib  # pylint: disable=import-outside-toplevel
    fixed = search_lib.space_fixed_costs(space, config.resolution, config.num_classes)
    result = search_lib.search(tables, {config.cost: float(budget)}, k=1, fixed_cost=fixed,
                               combine=config.search.combine,
                               standardize=config.search.standardize)[0]
    return Arch.of(result.encodings)


def _fixed_cost(space: SearchSpace, config: ml_collections.ConfigDict) -> int:
    """Stem, first layer and head: a network's cost = this + its blocks' candidate costs."""
    from dna_jax import search as search_lib  # pylint: disable=import-outside-toplevel
    return search_lib.space_fixed_costs(space, config.resolution, config.num_classes)[config.cost]


def network_key(space: SearchSpace, arch: Arch) -> tuple:
    """What makes two encodings the same network (the identity ops removed)."""
    return tuple(tuple(s) for s in space.to_network_spec(arch).to_strings())


def largest_under(space: SearchSpace, config: ml_collections.ConfigDict, budget: float,
                  max_prefix: int = 5_000_000, keep: Sequence[np.ndarray] | None = None
                  ) -> tuple[float, list[Arch]]:
    """The largest whole-network cost <= budget over EVERY architecture of the space (not
    only the rated candidates), and every architecture (encoding) with exactly that cost.
    `keep` (a boolean mask over each block's candidates) restricts the space.

    Exact: the sums of all blocks but the last are enumerated and sorted (294^2 for
    fmnist28), then each candidate of the last block finds its best partner by binary search.
    """
    candidates = [space.block_candidates(b) for b in range(len(space.blocks))]
    if keep is not None:
        candidates = [enc[np.asarray(k, bool)] for enc, k in zip(candidates, keep)]
        if any(len(enc) == 0 for enc in candidates):
            raise ValueError(f"space {space.name!r}: a block has no candidate left to pick from")
    columns = [np.asarray(costs_lib.candidate_costs(space, b, enc, config.resolution)[config.cost],
                          np.int64) for b, enc in enumerate(candidates)]
    fixed = _fixed_cost(space, config)
    prefix = np.zeros(1, np.int64)
    prefix_rows = np.zeros((1, 0), np.int64)
    for col in columns[:-1]:
        if len(prefix) * len(col) > max_prefix:
            raise ValueError(f"space {space.name!r}: {len(prefix) * len(col):,} partial "
                             f"networks exceed {max_prefix:,}; the exact size pick needs a "
                             "smaller space")
        prefix_rows = np.concatenate([np.repeat(prefix_rows, len(col), axis=0),
                                      np.tile(np.arange(len(col)), len(prefix))[:, None]], axis=1)
        prefix = (prefix[:, None] + col[None, :]).reshape(-1)
    order = np.argsort(prefix, kind="stable")
    prefix, prefix_rows = prefix[order], prefix_rows[order]
    room = np.floor(budget - fixed) - columns[-1]
    pos = np.searchsorted(prefix, room, side="right") - 1
    ok = pos >= 0
    if not ok.any():
        raise ValueError(f"no architecture of space {space.name!r} fits {config.cost} <= "
                         f"{budget:,.0f}")
    totals = np.where(ok, prefix[np.maximum(pos, 0)] + columns[-1], -1)
    best = int(totals.max())
    ties = []
    for last in np.flatnonzero(totals == best):
        need = best - columns[-1][last]
        lo, hi = np.searchsorted(prefix, [need, need + 1])
        for i in range(lo, hi):
            rows = [*prefix_rows[i], last]
            ties.append(Arch.of(enc[r] for enc, r in zip(candidates, rows)))
    return float(best + fixed), ties


def _largest_pick(space: SearchSpace, config: ml_collections.ConfigDict, budget: float,
                  rng: np.random.Generator, keep: Sequence[np.ndarray] | None = None
                  ) -> tuple[Arch, dict[str, Any]]:
    """One network of the largest cost under the budget (`largest_under`), drawn with `rng`
    among the tied NETWORKS (encodings that differ only in layer order or where the identity
    ops sit are one network), and the record of the tie (cost, encodings, networks)."""
    cost, ties = largest_under(space, config, budget, keep=keep)
    tie_nets = {network_key(space, a): a for a in ties}
    arch = list(tie_nets.values())[int(rng.integers(len(tie_nets)))]
    return arch, {"cost": cost, "encodings": len(ties), "networks": len(tie_nets)}


def feature_masks(space: SearchSpace, feature: str) -> list[np.ndarray]:
    """Per block, the candidates whose every searched layer gives `feature` (a name of
    FEATURES, as `fidelity.shape_features` computes it) the highest value the space allows:
    the mean expansion (mean kernel) of a network is at its maximum exactly when every layer
    that is not the identity has the largest expansion (kernel); the depth when no layer is
    the identity."""
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}: one of {FEATURES}")
    skip = space.skip_index
    if feature == "depth":
        layer_ok = {o: o != skip for o in range(skip + 1)}
    else:
        attr = "expansion" if feature == "mean_expansion" else "kernel"
        best = max(getattr(op, attr) for op in space.ops)
        layer_ok = {o: o == skip or getattr(space.ops[o], attr) == best for o in range(skip + 1)}
    ok = np.vectorize(layer_ok.__getitem__, otypes=[bool])
    return [ok(space.block_candidates(b)).all(axis=1) for b in range(len(space.blocks))]


def _draw_distinct(candidates: Sequence[Arch], space: SearchSpace, rng: np.random.Generator,
                   taken: set, num: int) -> list[Arch]:
    """`num` of `candidates` in a random order whose networks are not in `taken` nor repeat."""
    out = []
    for i in rng.permutation(len(candidates)):
        key = network_key(space, candidates[i])
        if key in taken:
            continue
        taken.add(key)
        out.append(candidates[i])
        if len(out) == num:
            break
    return out


def select_contenders(config: ml_collections.ConfigDict, space: SearchSpace,
                      tables_by_role: dict[str, list]) -> dict[str, Any]:
    """The contenders of every budget (see the module docstring); deterministic.

    Returns:
      {'contenders': [{'arch': Arch, 'roles': [[budget index, role]]}], 'budgets':
       [{'budget', 'window', 'picks': {role: contender index}, 'size_ties': {...},
         'random_in_window': n}]}

    Raises:
      ValueError: fewer than `num_random` distinct networks in a budget's window (widen
        `random_tolerance` or grow `pool_size`).
    """
    from dna_jax import ranking  # pylint: disable=import-outside-toplevel
    c = config.contenders
    rng = np.random.default_rng(c.seed)
    pool_blocks, first, pool_costs = ranking.distinct_pool(space, c.pool_size, rng,
                                                           config.resolution, config.cost)
    fixed = _fixed_cost(space, config)
    pool_total = pool_costs[first].astype(np.float64) + fixed
    contenders: list[dict[str, Any]] = []
    index_of: dict[tuple, int] = {}

    def add(arch: Arch, b: int, role: str) -> int:
        key = network_key(space, arch)
        if key not in index_of:
            index_of[key] = len(contenders)
            contenders.append({"arch": arch, "roles": []})
        contenders[index_of[key]]["roles"].append([b, role])
        return index_of[key]

    budgets = []
    for b, budget in enumerate(config.budgets):
        picks: dict[str, int] = {}
        taken: set = set()
        for role, tables in tables_by_role.items():
            arch = dna_winner(tables, space, config, budget)
            picks[role] = add(arch, b, role)
            taken.add(network_key(space, arch))
        size_arch, size_ties = _largest_pick(space, config, budget, rng)
        picks[SIZE] = add(size_arch, b, SIZE)
        taken.add(network_key(space, size_arch))
        low = (1.0 - c.random_tolerance) * budget
        inside = first[(pool_total >= low) & (pool_total <= budget)]
        window = [Arch.of(block[i] for block in pool_blocks) for i in inside]
        drawn = _draw_distinct(window, space, rng, taken, c.num_random)
        if len(drawn) < c.num_random:
            raise ValueError(f"budget {budget:,.0f}: {len(drawn)} distinct networks (other than "
                             f"the dna and size picks) with {config.cost} in [{low:,.0f}, "
                             f"{budget:,.0f}] in a pool of {c.pool_size}, fewer than "
                             f"num_random={c.num_random}: raise config.contenders."
                             "random_tolerance or pool_size")
        for i, arch in enumerate(drawn):
            picks[f"{RANDOM}{i}"] = add(arch, b, f"{RANDOM}{i}")
        budgets.append({"budget": float(budget), "window": [float(low), float(budget)],
                        "picks": picks,
                        "size_ties": size_ties,
                        "random_in_window": int(len(inside))})
    # After every other pick of every budget, so that adding features changes none of them
    # (neither the draws nor the contender indices).
    for feature in feature_roles(config):
        masks = feature_masks(space, feature)
        for b, entry in enumerate(budgets):
            arch, ties = _largest_pick(space, config, entry["budget"], rng, keep=masks)
            entry["picks"][feature] = add(arch, b, feature)
            entry.setdefault("feature_ties", {})[feature] = ties
    return {"contenders": contenders, "budgets": budgets}


def run_order(budgets: Sequence[dict[str, Any]], num_seeds: int) -> list[tuple[int, int]]:
    """(contender, seed): per seed, role by role (dna first, then size, then the random ones),
    each role interleaved over the budgets; a contender already placed is skipped."""
    roles = list(budgets[0]["picks"])
    order, done = [], set()
    for seed in range(num_seeds):
        for role in roles:
            for budget in budgets:
                item = (budget["picks"][role], seed)
                if item not in done:
                    done.add(item)
                    order.append(item)
    return order


# ---- statistics --------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {"n": len(values), "mean": float(np.mean(values)) if values else None,
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None, "values": values}


def welch_interval(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) with scipy's Welch t 95% interval, or nulls and the reason."""
    from scipy import stats  # pylint: disable=import-outside-toplevel
    out: dict[str, Any] = {"difference": None, "ci95": None, "p_value": None, "df": None,
                           "n": [len(a), len(b)], "method": "Welch t (scipy.stats.ttest_ind, "
                           "equal_var=False)"}
    if len(a) < 2 or len(b) < 2:
        out["reason"] = "needs >= 2 values on each side"
        return out
    out["difference"] = float(np.mean(a) - np.mean(b))
    if np.var(a) == 0 and np.var(b) == 0:
        out["reason"] = "no spread on either side"
        return out
    result = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False)
    ci = result.confidence_interval(0.95)
    out.update(ci95=[float(ci.low), float(ci.high)], p_value=float(result.pvalue),
               df=float(result.df))
    return out


def summarize(budgets: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]
              ) -> list[dict[str, Any]]:
    """Per budget: per role mean/SD over seeds; the random nets' mean; every picked role's
    (DNA's, a feature's) difference from `size` and from the random nets (see the module
    docstring)."""
    accuracies: dict[int, list[float]] = {}
    for r in runs:
        accuracies.setdefault(r["arch"], []).append(r["test_accuracy"])
    out = []
    for budget in budgets:
        picks = budget["picks"]
        roles = {role: {"contender": i, **_stats(accuracies.get(i, []))}
                 for role, i in picks.items()}
        random_means = [roles[r]["mean"] for r in picks
                        if r.startswith(RANDOM) and roles[r]["n"] > 0]
        entry = {"budget": budget["budget"], "roles": roles,
                 "random_mean": {"nets": len(random_means),
                                 "mean": float(np.mean(random_means)) if random_means else None,
                                 "sd_across_nets": (float(np.std(random_means, ddof=1))
                                                    if len(random_means) > 1 else None)},
                 "differences": {}}
        for role in picks:
            if not picked_role(role):
                continue
            own = roles[role]["values"]
            if picks[role] == picks[SIZE]:
                vs_size = {"same_network": True, "difference": 0.0 if own else None}
            else:
                vs_size = welch_interval(own, roles[SIZE]["values"])
            entry["differences"][f"{role}_minus_size"] = vs_size
            entry["differences"][f"{role}_minus_random"] = welch_interval(own, random_means)
        out.append(entry)
    return out


def pooled_seed_sd(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The seed-to-seed SD pooled over every network with >= 2 seeds (`ground_truth.seed_noise`,
    the within-network mean square), its degrees of freedom and how many networks gave it."""
    noise = ground_truth.seed_noise(runs)
    seeds: dict[int, int] = {}
    for r in runs:
        seeds[r["arch"]] = seeds.get(r["arch"], 0) + 1
    return {"sd": noise.get("seed_sd"), "df": int(sum(n - 1 for n in seeds.values())),
            "nets": noise["archs_with_seeds"]}


def _t_interval(difference: float, terms: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """difference +- t x SE, where SE^2 = sum of variance terms, each (variance, df); the
    degrees of freedom by Welch-Satterthwaite (one term: its own df)."""
    from scipy import stats  # pylint: disable=import-outside-toplevel
    var = float(sum(v for v, _ in terms))
    out: dict[str, Any] = {"difference": float(difference)}
    if var <= 0.0:
        out.update(ci95=None, se=0.0, df=None, reason="no variance (the same network?)")
        return out
    df = var ** 2 / sum(v ** 2 / d for v, d in terms if v > 0)
    half = float(stats.t.ppf(0.975, df)) * np.sqrt(var)
    out.update(ci95=[float(difference - half), float(difference + half)],
               se=float(np.sqrt(var)), df=float(df), half_width=float(half))
    return out


def pooled_comparisons(budgets: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]]
                       ) -> dict[str, Any]:
    """The comparisons with the seed noise pooled over every network (see the module
    docstring): per budget each picked role (DNA's, a feature's) minus `size`, and over all
    budgets (the mean of the per-budget differences) minus `size` and minus the random nets;
    with feature roles, also `dna` minus each feature's pick (per budget and over budgets).
    Null with a reason until every budget has the runs it needs."""
    noise = pooled_seed_sd(runs)
    out: dict[str, Any] = {
        "seed_sd": noise,
        "method": ("seed noise pooled over every contender with >= 2 seeds (assumed equal for "
                   "all networks of the recipe); t intervals, Welch-Satterthwaite df where "
                   "the between-random-net variance enters"),
        "per_budget": [], "over_budgets": {}}
    accuracies: dict[int, list[float]] = {}
    for r in runs:
        accuracies.setdefault(r["arch"], []).append(float(r["test_accuracy"]))
    sd, df = noise["sd"], noise["df"]
    roles = list(budgets[0]["picks"]) if budgets else []
    pairs = [(role, SIZE) for role in roles if picked_role(role)]
    pairs += [(DNA, role) for role in roles if role in FEATURES and DNA in roles]
    for role, other in pairs:
        key, random_key = f"{role}_minus_{other}", f"{role}_minus_{RANDOM}"
        with_random = other == SIZE  # a picked role against size also faces the random nets
        diffs, vs_random, complete = [], [], True
        for budget in budgets:
            picks = budget["picks"]
            own, theirs = accuracies.get(picks[role], []), accuracies.get(picks[other], [])
            randoms = ([accuracies.get(i, []) for r, i in picks.items() if r.startswith(RANDOM)]
                       if with_random else [])
            if not own or not theirs or sd is None or any(not r for r in randoms):
                complete = False
                continue
            same = picks[role] == picks[other]
            d = 0.0 if same else float(np.mean(own) - np.mean(theirs))
            var = 0.0 if same else sd ** 2 * (1 / len(own) + 1 / len(theirs))
            item = {"budget": budget["budget"], "role": role}
            if other != SIZE:
                item["versus"] = other
            out["per_budget"].append({**item, key: _t_interval(d, [(var, df)]),
                                      "same_network": same})
            diffs.append((d, var))
            if with_random:
                means = [float(np.mean(r)) for r in randoms]
                vs_random.append((float(np.mean(own) - np.mean(means)), len(own), means))
        if not complete or not diffs:
            needs = f"{role}, {other} and random" if with_random else f"{role} and {other}"
            out["over_budgets"][key] = {
                "difference": None, "reason": f"needs every budget's {needs} runs and a pooled "
                                              "seed SD"}
            if with_random:
                out["over_budgets"][random_key] = dict(out["over_budgets"][key])
            continue
        b = len(diffs)
        out["over_budgets"][key] = _t_interval(
            float(np.mean([d for d, _ in diffs])), [(sum(v for _, v in diffs) / b ** 2, df)])
        if not with_random:
            continue
        # Random nets: the drawn net is the unit, so their spread (between-net variance of
        # their means, pooled over budgets) enters beside the picked net's seed noise.
        between_df = sum(len(m) - 1 for _, _, m in vs_random)
        if between_df < 1:
            out["over_budgets"][random_key] = {
                "difference": float(np.mean([d for d, _, _ in vs_random])),
                "ci95": None, "reason": "needs >= 2 random nets at some budget"}
            continue
        between = sum(float(np.var(m, ddof=1)) * (len(m) - 1)
                      for _, _, m in vs_random if len(m) > 1) / between_df
        entry = _t_interval(
            float(np.mean([d for d, _, _ in vs_random])),
            [(sum(sd ** 2 / n for _, n, _ in vs_random) / b ** 2, df),
             (sum(between / len(m) for _, _, m in vs_random) / b ** 2, between_df)])
        entry["between_net_sd"] = float(np.sqrt(between))
        out["over_budgets"][random_key] = entry
    return out


# ---- the runs ----------------------------------------------------------------------------------


def _record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    contenders = config.contenders.to_dict()
    if not contenders.get("features"):  # files made before the field existed still match
        contenders.pop("features", None)
    return artifacts.to_jsonable({
        "space": config.space, "resolution": config.resolution,
        "num_classes": config.num_classes, "cost": config.cost,
        "budgets": [float(b) for b in config.budgets], "tables": config.tables.to_dict(),
        "search": config.search.to_dict(), "contenders": contenders,
        "num_seeds": config.num_seeds})


def plan(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The tables, the selection and the order: everything but the training; deterministic."""
    check_config(config)
    space = get_space(config.space)
    loaded = {role: load_tables(path, space, config) for role, path in table_dirs(config).items()}
    selection = select_contenders(config, space, {r: t["tables"] for r, t in loaded.items()})
    contenders = []
    for i, c in enumerate(selection["contenders"]):
        arch = c["arch"]
        contenders.append({
            "index": i, "roles": c["roles"], "blocks": [list(b) for b in arch.blocks],
            "block_strings": space.to_network_spec(arch).to_strings(),
            **ground_truth.arch_costs(space, arch, config.resolution, config.num_classes),
            "dna": {role: dna_scores(t["tables"], arch, config) for role, t in loaded.items()}})
    tables = {role: {"source": _source(table_dirs(config)[role]), "digest": t["digest"],
                     "score_metrics": t["score_metrics"],
                     "fits": artifacts.to_jsonable(t["fits"])} for role, t in loaded.items()}
    return {"archs": [c["arch"] for c in selection["contenders"]], "contenders": contenders,
            "budgets": selection["budgets"], "tables": tables,
            "order": run_order(selection["budgets"], config.num_seeds)}


def _check_file(data: dict[str, Any], out: str, record: dict, recipe: dict,
                planned: dict[str, Any]) -> None:
    if data["record"] != record or data["recipe"] != recipe:
        raise ValueError(f"{out} was made by another config "
                         f"({artifacts.config_changes(data['record'], record)}; recipe "
                         f"{'same' if data['recipe'] == recipe else 'changed'}): use another --out")
    old = {r: t["digest"] for r, t in data["tables"].items()}
    new = {r: t["digest"] for r, t in planned["tables"].items()}
    if old != new:
        raise ValueError(f"{out} was made from other rating tables (digests {old} now {new}): "
                         "use another --out")
    if ([c["blocks"] for c in data["contenders"]] != [c["blocks"] for c in planned["contenders"]]
            or data["budgets"] != artifacts.to_jsonable(planned["budgets"])):
        raise ValueError(f"{out} holds other contenders than this code selects from the same "
                         "config and tables (the selection changed?): use another --out")


def reusable_runs(paths: Sequence[str], recipe: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """{(network_key, seed): run} from other search-effectiveness files trained
    with the same recipe: the same network, recipe and seed is the same experiment (a run's
    contender index only names its folder), so it is copied, not trained again.

    Raises:
      ValueError: a file is missing or was trained with another recipe.
    """
    found: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        data = ground_truth.load_file(path)
        if data is None:
            raise ValueError(f"--reuse: no file at {path}")
        if data["recipe"] != recipe:
            raise ValueError(f"--reuse {path}: trained with another stand-alone recipe "
                             f"({artifacts.config_changes(data['recipe'], recipe)}); its runs "
                             "are not this experiment's")
        for run in data["runs"]:
            c = data["contenders"][run["arch"]]
            key = (tuple(tuple(s) for s in c["block_strings"]), run["seed"])  # = network_key
            found.setdefault(key, {**{k: v for k, v in run.items() if k != "reused_from"},
                                   "reused_from": run.get("reused_from") or {
                                       "file": _source(os.path.abspath(path)),
                                       "contender": run["arch"]}})
    return found


def run_experiment(config: ml_collections.ConfigDict, workdir: str, out: str,
                   commit: bool = False, max_runs: int = 0, command: str = "",
                   reuse: Sequence[str] = ()) -> dict[str, Any]:
    """Trains what the file does not hold yet, in order, first copying the runs of the same
    networks, recipe and seeds from the `reuse` files; returns the file's content."""
    from dna_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel

    space = get_space(config.space)
    planned = plan(config)
    workdir, out = os.path.abspath(workdir), os.path.abspath(out)
    record = _record(config)
    recipe = artifacts.to_jsonable(config.standalone.to_dict())
    data = ground_truth.load_file(out)
    if data is not None:
        _check_file(data, out, record, recipe, planned)
    else:
        data = artifacts.to_jsonable({
            "format_version": FORMAT_VERSION,
            "description": ("search effectiveness (issue 19, item 6): the DNA winner vs the "
                            "largest net vs random nets of near-equal cost under each budget, "
                            f"space {space.name!r}, each trained stand-alone with "
                            f"{config.num_seeds} seeds (dna_jax.search_effectiveness)"),
            "command": command, "record": record, "recipe": recipe,
            "tables": planned["tables"], "contenders": planned["contenders"],
            "budgets": planned["budgets"], "order": [list(o) for o in planned["order"]],
            "runs": [], "summary": []})
    done = {(r["arch"], r["seed"]) for r in data["runs"]}
    reusable = reusable_runs(reuse, recipe)
    copied = []
    for index, seed in planned["order"]:
        key = (network_key(space, planned["archs"][index]), seed)
        if (index, seed) not in done and key in reusable:
            data["runs"].append({**reusable[key], "arch": index})
            done.add((index, seed))
            copied.append((index, seed))
    if copied:
        _save(data, out, commit, f"search effectiveness: {len(copied)} runs of the same "
                                 f"networks, recipe and seeds copied from {', '.join(reuse)} "
                                 f"({len(data['runs'])}/{len(data['order'])} runs)")
        logging.info("search effectiveness: %d runs copied from %s: %s", len(copied),
                     ", ".join(reuse), copied)
    mesh = sharding_lib.mesh_from_config(config.standalone.mesh)
    run_data = ground_truth.RunData(config.standalone, mesh)
    trained = 0
    for index, seed in planned["order"]:
        if (index, seed) in done:
            continue
        if max_runs and trained >= max_runs:
            break
        arch = planned["archs"][index]
        roles = ", ".join(f"{r}@{config.budgets[b]:,.0f}" for b, r in
                          planned["contenders"][index]["roles"])
        logging.info("search effectiveness: contender %d (%s) seed %d: %s", index, roles, seed,
                     arch)
        eval_data = run_data.eval()
        result = ground_truth.train_one(config, space, arch, index, seed,
                                        os.path.join(workdir, "runs", f"c{index:02d}_s{seed}"),
                                        run_data.train(seed), eval_data, mesh)
        data["runs"].append(result)
        done.add((index, seed))
        trained += 1
        _save(data, out, commit, f"search effectiveness: contender {index} ({roles}) seed "
                                 f"{seed} ({len(data['runs'])}/{len(data['order'])} runs, test "
                                 f"accuracy {result['test_accuracy']:.4f})")
    # A file made by older code gets this code's statistics (the runs are the data).
    if data["runs"] and (data["summary"] != summarize(data["budgets"], data["runs"]) or
                         data.get("pooled") != pooled_comparisons(data["budgets"], data["runs"])):
        _save(data, out, commit, "search effectiveness: the statistics recomputed from the runs "
                                 "by this code")
    return data


def _save(data: dict[str, Any], out: str, commit: bool, message: str) -> None:
    """The statistics recomputed from the runs, the file written atomically (by process 0)
    and, with `commit`, committed on its own."""
    import jax  # pylint: disable=import-outside-toplevel
    data["summary"] = summarize(data["budgets"], data["runs"])
    data["pooled"] = pooled_comparisons(data["budgets"], data["runs"])
    data["progress"] = {"runs_done": len(data["runs"]), "runs_planned": len(data["order"])}
    if jax.process_index() == 0:
        artifacts.write_json(out, data)
        if commit:
            ground_truth.commit_file(out, message)


def render_plan(planned: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """The selection as text: per budget, each role's network, costs and DNA scores."""
    lines = ["tables: " + ", ".join(f"{r}={t['source']} ({t['digest']})"
                                     for r, t in planned["tables"].items())]
    for b in planned["budgets"]:
        lines.append(f"budget {config.cost} <= {b['budget']:,.0f} (random window "
                     f"[{b['window'][0]:,.0f}, {b['window'][1]:,.0f}]: {b['random_in_window']} "
                     f"of the pool; largest cost {b['size_ties']['cost']:,.0f} shared by "
                     f"{b['size_ties']['encodings']} encodings, {b['size_ties']['networks']} "
                     "networks)")
        for role, i in b["picks"].items():
            c = planned["contenders"][i]
            dna = c["dna"][DNA]
            lines.append(f"  {role:10s} #{i:<2d} macs {c['macs']:>9,} eff {c['effective_macs']:>9,}"
                         f" params {c['params']:>7,}  dna {dna['dna_objective']:.4f} "
                         f"{[round(s, 4) for s in dna['block_scores']]}  "
                         f"{' | '.join(' '.join(s) for s in c['block_strings'][1:])}")
    lines.append(f"runs planned: {len(planned['order'])} ({len(planned['contenders'])} "
                 f"networks x {config.num_seeds} seeds)")
    return "\n".join(lines)


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _interval(entry: dict[str, Any]) -> str:
    if entry.get("difference") is None:
        return f"n/a ({entry.get('reason', 'no runs')})"
    text = _pct(entry["difference"], signed=True)
    if entry.get("ci95"):
        lo, hi = entry["ci95"]
        text += f" [{_pct(lo, True)}, {_pct(hi, True)}]"
    elif entry.get("same_network"):
        text += " (the same network)"
    return text


def _role_order(role: str) -> tuple[int, str]:
    """dna roles first, then feature picks, size, the random nets (the file's JSON sorts
    keys)."""
    rank = (0 if role.startswith(DNA) else 1 if role in FEATURES else 2 if role == SIZE
            else 3)
    return (rank, role)


def render_results(data: dict[str, Any]) -> str:
    """The file as markdown (accuracies in points): per budget each role's network, cost,
    DNA objective and test accuracy mean / SD / seeds; then the pooled comparisons."""
    lines = [f"Search effectiveness: {len(data['runs'])} of {len(data['order'])} runs "
             "(test accuracy in %, mean and SD over seeds).", ""]
    for entry, budget in zip(data["summary"], data["budgets"]):
        lines += [f"Budget {budget['budget']:,.0f} multiply-adds:", "",
                  "| role | contender | macs | DNA objective | accuracy | SD | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for role, stats_ in sorted(entry["roles"].items(), key=lambda kv: _role_order(kv[0])):
            c = data["contenders"][stats_["contender"]]
            lines.append(f"| {role} | #{stats_['contender']} | {c['macs']:,} | "
                         f"{c['dna'][DNA]['dna_objective']:.4f} | {_pct(stats_['mean'])} | "
                         f"{_pct(stats_['sd'])} | {stats_['n']} |")
        lines.append("")
    pooled = data.get("pooled")
    if pooled:
        noise = pooled["seed_sd"]
        lines += [f"Seed SD pooled over {noise['nets']} networks: {_pct(noise['sd'])} points "
                  f"({noise['df']} df). Differences in points, 95% t intervals:", "",
                  "| comparison | difference |", "|---|---|"]
        for item in pooled["per_budget"]:
            key = f"{item['role']}_minus_{item.get('versus', SIZE)}"
            lines.append(f"| {key} at {item['budget']:,.0f} | "
                         f"{_interval({**item[key], 'same_network': item['same_network']})} |")
        for key, entry in sorted(pooled["over_budgets"].items(),
                                 key=lambda kv: (kv[0].endswith("_random"), kv[0])):
            lines.append(f"| **{key}, over budgets** | {_interval(entry)} |")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> None:
    from absl import flags  # pylint: disable=import-outside-toplevel
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    absl_logging.set_verbosity(absl_logging.INFO)
    f = flags.FLAGS
    if f.plan_only:
        print(render_plan(plan(f.config), f.config), flush=True)
        return
    if f.report:
        data = ground_truth.load_file(f.report)
        if data is None:
            raise ValueError(f"--report: no file at {f.report}")
        print(render_results(data), flush=True)
        return
    if not f.workdir or not f.out:
        raise ValueError("--workdir and --out are required (or --plan_only)")
    data = run_experiment(f.config, f.workdir, f.out, commit=f.commit, max_runs=f.max_runs,
                          command=" ".join(sys.argv), reuse=f.reuse or ())
    print(metrics_lib.final_line({"runs_done": len(data["runs"]),
                                  "runs_planned": len(data["order"]),
                                  "summary": data["summary"], "pooled": data.get("pooled"),
                                  "out": os.path.abspath(f.out)}),
          flush=True)


def run(argv: Sequence[str] | None = None) -> None:
    """python -m dna_jax.search_effectiveness --config ... --workdir ... --out ..."""
    from absl import app, flags  # pylint: disable=import-outside-toplevel
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    config_flags.DEFINE_config_file("config", None, "Search-effectiveness config "
                                    "(file.py[:arg]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints of the runs (not committed).")
    flags.DEFINE_string("out", None, "The versioned JSON file of results (commit it).")
    flags.DEFINE_bool("commit", False, "git-commit the JSON file after every finished run.")
    flags.DEFINE_integer("max_runs", 0, "Stop after this many new runs (0 = all).")
    flags.DEFINE_multi_string("reuse", [], "Another search-effectiveness file with the same "
                              "recipe: its runs of the same networks and seeds are copied.")
    flags.DEFINE_bool("plan_only", False, "Print the contenders and train nothing.")
    flags.DEFINE_string("report", None, "Print this results file as markdown; train nothing.")
    flags.mark_flags_as_required(["config"])
    host_memory.keep_freed_memory()  # before JAX starts its CPU threads
    app.run(main, argv=sys.argv if argv is None else ["dna_jax.search_effectiveness", *argv])


if __name__ == "__main__":
    run()
