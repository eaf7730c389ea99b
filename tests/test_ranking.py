"""Ranking fidelity: the statistics, the stratified sample, the SPOS supernet, a tiny run.

The statistics are checked on hand-made rankings (perfect, reversed, tied) and against scipy
where it is importable; the whole-network SPOS supernet with a fixed path must compute exactly
the child network of that architecture; a tiny end-to-end run (3 architectures of the `tiny`
space, a few steps per part) must produce finite figures, resume without retraining, and
refuse a changed config.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dna_jax import config_files, costs as costs_lib
from dna_jax import ranking, ranking_stats, spos
from dna_jax.models.childnet import build_childnet
from dna_jax.models.single_path import SinglePathSupernet, arch_path, child_variables
from dna_jax.space import Arch, get_space
from dna_jax.supernet import paths as paths_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_ranking.py")


# ---- statistics --------------------------------------------------------------------------------


def test_perfect_and_reversed_rankings():
    truth = np.array([0.7, 0.9, 0.8, 0.6, 0.95])
    assert ranking_stats.kendall_tau(truth, 2 * truth + 1) == pytest.approx(1.0)
    assert ranking_stats.spearman_rho(truth, np.exp(truth)) == pytest.approx(1.0)
    assert ranking_stats.kendall_tau(truth, -truth) == pytest.approx(-1.0)
    assert ranking_stats.spearman_rho(truth, -truth ** 3) == pytest.approx(-1.0)
    assert ranking_stats.top_k_overlap(truth, truth, 2) == 1.0
    assert ranking_stats.top_k_overlap(truth, -truth, 2) == 0.0


def test_ties_by_hand():
    # Pairs of x=[1,2,2,3], y=[1,2,3,4]: 5 concordant, 1 tied in x only.
    # tau_b = 5 / sqrt((6 - 1) * 6); ranks of x: 1, 2.5, 2.5, 4 -> rho = 4.5 / sqrt(4.5 * 5).
    x, y = [1, 2, 2, 3], [1, 2, 3, 4]
    assert ranking_stats.kendall_tau(x, y) == pytest.approx(5 / np.sqrt(30))
    assert ranking_stats.spearman_rho(x, y) == pytest.approx(4.5 / np.sqrt(22.5))
    np.testing.assert_array_equal(ranking_stats.average_ranks([3, 1, 3, 2, 3]),
                                  [4, 1, 4, 2, 4])
    assert np.isnan(ranking_stats.kendall_tau([1, 1, 1], [1, 2, 3]))
    assert np.isnan(ranking_stats.spearman_rho([1, 2, 3], [5, 5, 5]))


def test_statistics_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.integers(0, 6, size=25).astype(float)  # many ties
        y = x + rng.integers(-3, 4, size=25)
        assert ranking_stats.kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y)[0])
        assert ranking_stats.spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


def test_top_k_overlap_by_hand():
    truth = [0.9, 0.8, 0.7, 0.6]
    prediction = [1.0, 0.0, 3.0, 2.0]  # predicted order: 2, 3, 0, 1
    assert ranking_stats.top_k_overlap(truth, prediction, 2) == 0.0
    assert ranking_stats.top_k_overlap(truth, prediction, 3) == pytest.approx(2 / 3)
    assert ranking_stats.top_k_overlap(truth, prediction, 4) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        ranking_stats.top_k_overlap(truth, prediction, 5)


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=40)
    prediction = truth + rng.normal(size=40)
    tau = ranking_stats.kendall_tau(truth, prediction)
    low, high = ranking_stats.bootstrap_interval(truth, prediction, ranking_stats.kendall_tau,
                                                 num_resamples=300, seed=3)
    assert low < tau < high and 0.0 < low and high < 1.0
    again = ranking_stats.bootstrap_interval(truth, prediction, ranking_stats.kendall_tau,
                                             num_resamples=300, seed=3)
    other = ranking_stats.bootstrap_interval(truth, prediction, ranking_stats.kendall_tau,
                                             num_resamples=300, seed=4)
    assert again == (low, high) and other != (low, high)
    # A wider confidence gives a wider interval.
    wide = ranking_stats.bootstrap_interval(truth, prediction, ranking_stats.kendall_tau,
                                            num_resamples=300, seed=3, confidence=0.99)
    assert wide[0] <= low and wide[1] >= high


def test_compare_sign_convention_for_a_loss():
    accuracy = np.array([0.80, 0.85, 0.90, 0.70])
    loss = np.array([0.5, 0.4, 0.3, 0.7])  # lower loss, higher accuracy: a perfect rating
    out = ranking_stats.compare(accuracy, -loss, top_k=2, num_resamples=20)
    assert out["kendall"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
    assert out["top_k"] == 1.0 and out["k"] == 2
    assert ranking_stats.compare(accuracy, loss, top_k=2, num_resamples=20)["kendall"] == \
        pytest.approx(-1.0)


# ---- stratified sampling -----------------------------------------------------------------------


def _block_flops(space, arch, resolution):
    return sum(int(costs_lib.candidate_costs(space, b, np.asarray([ops]), resolution)
                   ["dna_flops"][0]) for b, ops in enumerate(arch.blocks))


def test_stratified_sample_spreads_over_the_cost_range():
    space = get_space("small")
    archs = ranking.stratified_sample(space, 20, seed=0, pool_size=5000, resolution=20)
    assert len(set(archs)) == 20
    for arch in archs:
        space.validate(arch)
    flops = np.asarray([_block_flops(space, a, 20) for a in archs])
    assert np.all(np.diff(flops) >= 0)  # bin order, cheapest first
    # A uniform sample of the same size, for the spread it would have.
    rng = np.random.default_rng(0)
    pool = np.asarray([_block_flops(space, space.sample(rng), 20) for _ in range(2000)])
    low, high = np.quantile(pool, [0.05, 0.95])
    assert flops.min() <= low and flops.max() >= high
    # Every cost decile of the pool holds about its share (2 of 20) of the sample.
    deciles = np.quantile(pool, np.linspace(0, 1, 11))
    counts = np.histogram(np.clip(flops, deciles[0], deciles[-1]), deciles)[0]
    assert counts.min() >= 1 and counts.max() <= 4, counts
    assert ranking.stratified_sample(space, 20, seed=0, pool_size=5000, resolution=20) == archs
    assert ranking.stratified_sample(space, 20, seed=1, pool_size=5000, resolution=20) != archs


def test_stratified_sample_needs_enough_distinct_architectures():
    with pytest.raises(ValueError, match="distinct"):
        ranking.stratified_sample(get_space("tiny"), 9, seed=0, pool_size=100, resolution=16)


# ---- the whole-network SPOS supernet -----------------------------------------------------------


def _skip_space():
    """The tiny space with skip ops allowed (its block1 layer 1 may be the identity)."""
    space = get_space("tiny")
    blocks = tuple(dataclasses.replace(b, allow_skip=True) for b in space.blocks)
    return dataclasses.replace(space, name="tiny_skip", blocks=blocks)


@pytest.mark.parametrize("blocks", [((1,), (0, 1)), ((0,), (1, 2))])
def test_fixed_path_supernet_is_the_child_network(blocks):
    space = _skip_space()
    arch = Arch.of(blocks)
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    supernet = SinglePathSupernet(space, num_classes=10)
    path = jnp.asarray(arch_path(arch))
    variables = supernet.init(jax.random.key(1), images, path, train=False)
    child = build_childnet(space, arch, num_classes=10)
    child_init = child.init(jax.random.key(2), images, train=False)
    extracted = child_variables(space, arch, variables)
    # The extraction fills exactly the child's variable tree.
    assert jax.tree.structure(extracted) == jax.tree.structure(child_init)
    assert jax.tree.map(jnp.shape, extracted) == jax.tree.map(jnp.shape, child_init)
    for train in (False, True):
        kwargs = dict(mutable=["batch_stats"]) if train else {}
        out_super = supernet.apply(variables, images, path, train=train, **kwargs)
        out_child = child.apply(extracted, images, train=train, **kwargs)
        logits_super = out_super[0][0] if train else out_super[0]
        logits_child = out_child[0][0] if train else out_child[0]
        np.testing.assert_allclose(logits_super, logits_child, rtol=1e-5, atol=1e-5)
    # Another path gives other logits (the path is really used).
    other = jnp.asarray(arch_path(Arch.of(((0,), (0, 0)))))
    assert not np.allclose(supernet.apply(variables, images, other)[0],
                           supernet.apply(variables, images, path)[0])


def test_spos_step_moves_only_the_sampled_path():
    space = get_space("tiny")
    config = _tiny_config()
    trainer = spos.make_trainer(config.standalone, space, 10, total_steps=5, steps_per_epoch=5)
    state = trainer.init(jax.random.key(0), (16, 16, 3))
    batch = {"image": jax.random.normal(jax.random.key(1), (8, 16, 16, 3)),
             "label": jnp.arange(8) % 10}
    rng = jax.random.key(5)
    new_state, metrics = jax.jit(trainer.train_step)(state, batch, rng)
    assert np.isfinite(metrics["loss"])
    branches = np.asarray(paths_lib.sample_network_path(trainer.table, rng, state.step))
    for i, choices in enumerate(trainer.table):
        for j in range(len(choices)):
            before = state.params[f"layers_{i}"][f"ops_{j}"]
            after = new_state.params[f"layers_{i}"][f"ops_{j}"]
            moved = any(not np.array_equal(a, b) for a, b in
                        zip(jax.tree.leaves(before), jax.tree.leaves(after)))
            assert moved == (j == branches[i]), (i, j, branches[i])
    assert not np.array_equal(state.params["stem"]["conv"]["kernel"],
                              new_state.params["stem"]["conv"]["kernel"])


# ---- a tiny end-to-end run ---------------------------------------------------------------------


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
    return config_files.load_config(CONFIG, "tiny", **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ranking"))
    return workdir, ranking.run_ranking(_tiny_config(), workdir)


def test_tiny_run_reports_finite_statistics(finished):
    workdir, summary = finished
    assert summary["num_archs"] == 3
    for method in ranking.METHODS:
        for name in ("kendall", "spearman"):
            value = summary[f"{name}_{method}"]
            assert np.isfinite(value) and -1.0 <= value <= 1.0, (name, method, value)
            low, high = summary[f"{name}_{method}_ci"]
            assert low <= high
        assert 0.0 <= summary[f"top_k_{method}"] <= 1.0
    assert "NEGATED sum of block scores" in summary["sign_convention"]
    assert summary["wall_seconds"] > 0
    results = json.load(open(os.path.join(workdir, "ranking", "results.json")))
    archs = results["architectures"]
    assert len(archs) == 3 and len({tuple(map(tuple, a["blocks"])) for a in archs}) == 3
    # The DNA score is the sum of the architecture's block scores in the rating tables.
    space = get_space("tiny")
    for a in archs:
        total = 0.0
        for b, ops in enumerate(a["blocks"]):
            table = np.load(os.path.join(workdir, "dna", "rate", f"{space.blocks[b].name}.npz"))
            row = np.flatnonzero((table["encodings"] == ops).all(axis=1))
            assert len(row) == 1
            total += float(table["score"][row[0]])
        assert a["dna_score"] == pytest.approx(total)
        assert 0.0 <= a["test_accuracy"] <= 1.0 and 0.0 <= a["spos_val_accuracy"] <= 1.0
    # The DNA rating's statistics use the NEGATED score (lower loss = better).
    accuracy = [a["test_accuracy"] for a in archs]
    assert summary["kendall_dna"] == pytest.approx(
        ranking_stats.kendall_tau(accuracy, [-a["dna_score"] for a in archs]))
    png = open(os.path.join(workdir, "ranking", "ranking.png"), "rb").read()
    assert png.startswith(b"\x89PNG")
    for i in range(3):
        assert os.path.exists(os.path.join(workdir, "ranking", "archs", str(i), "result.json"))


def test_tiny_run_resumes_without_retraining(finished):
    workdir, summary = finished
    result = os.path.join(workdir, "ranking", "archs", "1", "result.json")
    before = json.load(open(result))
    stamp = os.path.getmtime(os.path.join(workdir, "ranking", "archs", "0", "result.json"))
    os.remove(result)  # as if killed after the training of architecture 1 finished
    again = ranking.run_ranking(_tiny_config(), workdir)
    after = json.load(open(result))
    assert after["test_accuracy"] == before["test_accuracy"]
    assert os.path.getmtime(os.path.join(workdir, "ranking", "archs", "0", "result.json")) == \
        stamp
    figures = json.load(open(os.path.join(workdir, "ranking", "archs", "1", "figures.json")))
    assert figures["steps_this_run"] == 0  # resumed from its final checkpoint
    for key in ("kendall_dna", "kendall_spos", "kendall_flops", "spearman_dna"):
        assert again[key] == summary[key]


def test_tiny_run_refuses_another_config(finished):
    workdir, _ = finished
    with pytest.raises(ranking.RankingError, match="another config"):
        ranking.run_ranking(_tiny_config(**{"standalone.total_steps": 5}), workdir)


def test_benchmark_prints_the_json_line(finished):
    """benchmarks/ranking.py on the finished workdir: everything is reused, one JSON line."""
    workdir, summary = finished
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "ranking.py"), "--config",
         f"{CONFIG}:tiny", "--workdir", workdir],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("kendall_dna", "kendall_spos", "kendall_flops", "spearman_dna", "num_archs",
                "wall_seconds"):
        assert key in last
    assert last["kendall_dna"] == summary["kendall_dna"] and last["num_archs"] == 3
