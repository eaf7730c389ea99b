"""Rating fidelity (issue 19): the size-controlled statistics, the ground-truth sample and run
order, effective multiply-adds, the rating's fit diagnostics, the comparison of methods, and a
tiny ground-truth run (slow) that resumes from its file.
"""

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dna_jax import artifacts, config_files, costs as costs_lib, fidelity
from dna_jax import ground_truth, rate as rate_lib, ranking_stats
from dna_jax.models import zoo
from dna_jax.netspec import LayerSpec, NetworkSpec
from dna_jax.space import Arch, align_space, get_space
from dna_jax.supernet import paths, update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GT_CONFIG = os.path.join(REPO, "configs", "fmnist28_ground_truth.py")


# ---- statistics --------------------------------------------------------------------------------


def test_partial_spearman_removes_what_size_explains():
    rng = np.random.default_rng(0)
    cost = rng.uniform(1, 10, size=60)
    quality = rng.normal(size=60)  # what an architecture adds beyond its size
    accuracy = np.log(cost) + quality
    # Cost alone correlates with accuracy but says nothing beyond itself.
    assert ranking_stats.spearman_rho(accuracy, cost) > 0.4
    # The cost itself has nothing left once the cost is partialled out (undefined), and a
    # noisy copy of it scores near 0.
    assert np.isnan(ranking_stats.partial_spearman(accuracy, cost * 2.0, cost))
    assert abs(ranking_stats.partial_spearman(accuracy, cost + rng.normal(size=60), cost)) < 0.3
    # A rating that sees the quality keeps a high partial correlation; log(cost) as the
    # control gives the same value (ranks).
    rating = quality + 0.1 * rng.normal(size=60)
    partial = ranking_stats.partial_spearman(accuracy, rating, cost)
    assert partial > 0.6
    assert ranking_stats.partial_spearman(accuracy, rating, np.log(cost)) == pytest.approx(partial)


def test_partial_spearman_with_several_controls_equals_the_precision_matrix_formula():
    rng = np.random.default_rng(1)
    cost, width = rng.uniform(1, 10, size=40), rng.normal(size=40)
    accuracy = np.log(cost) + width + 0.5 * rng.normal(size=40)
    rating = width + cost + rng.normal(size=40)
    # independent route: -P_xy / sqrt(P_xx P_yy), P the inverse of the ranks' correlations
    ranks = np.stack([stats_rank(v) for v in (accuracy, rating, cost, width)])
    precision = np.linalg.inv(np.corrcoef(ranks))
    expected = -precision[0, 1] / np.sqrt(precision[0, 0] * precision[1, 1])
    two = ranking_stats.partial_spearman(accuracy, rating, np.stack([cost, width], axis=1))
    assert two == pytest.approx(expected)
    # one control as a column is the one-control statistic
    assert ranking_stats.partial_spearman(accuracy, rating, cost[:, None]) == pytest.approx(
        ranking_stats.partial_spearman(accuracy, rating, cost))
    with pytest.raises(ValueError, match="control has shape"):
        ranking_stats.partial_spearman(accuracy, rating, np.ones((39, 2)))


def stats_rank(values):
    from scipy import stats
    return stats.rankdata(values)


def test_within_bin_tau_and_regret():
    truth = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    bins = np.array([0, 0, 0, 1, 1, 1])
    # Perfect inside each bin but the bins swapped: overall tau is low, within-bin tau 1.
    prediction = np.array([11.0, 12.0, 13.0, 1.0, 2.0, 3.0])
    assert ranking_stats.within_bin_tau(truth, prediction, bins) == pytest.approx(1.0)
    assert ranking_stats.kendall_tau(truth, prediction) < 0.0
    # Pair-count weights: a bin of 3 (3 pairs) at +1 and a bin of 2 (1 pair) at -1 -> 0.5.
    assert ranking_stats.within_bin_tau([1, 2, 3, 4, 5], [1, 2, 3, 5, 4],
                                        [0, 0, 0, 1, 1]) == pytest.approx(0.5)
    cost = np.array([1, 2, 3, 4, 5, 6])
    assert ranking_stats.regret(truth, prediction, cost, 3.5) == pytest.approx(0.0)
    assert ranking_stats.regret(truth, prediction, cost, 6) == pytest.approx(27.0)
    assert np.isnan(ranking_stats.regret(truth, prediction, cost, 0.5))


def test_compare_gives_every_statistic_with_an_interval():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=30)
    out = ranking_stats.compare(truth, truth + rng.normal(size=30), top_k=5, num_resamples=200,
                                cost=rng.uniform(size=30), bins=np.arange(30) // 6,
                                budgets=(0.5,))
    for name in ("kendall", "spearman", "top_k", "partial_spearman", "within_bin_kendall",
                 "regret@0.5"):
        assert out[f"{name}_low"] <= out[name] <= out[f"{name}_high"], name
    assert "partial_spearman_p" not in out  # permutations are opt-in


def _binned_sample(rng, informative: bool):
    """36 networks in 6 cost bins; accuracy = size + a per-network part; the rating knows the
    size and (if informative) the per-network part."""
    bins = np.repeat(np.arange(6), 6)
    cost = np.exp(bins + rng.uniform(-0.02, 0.02, size=36))
    own = rng.normal(size=36)
    accuracy = 0.5 * bins + own
    rating = bins + (own if informative else rng.normal(size=36)) + 0.3 * rng.normal(size=36)
    return accuracy, rating, cost, bins


def test_within_bin_permutation_test_holds_its_level_and_finds_real_signal():
    rng = np.random.default_rng(0)
    # Under the null (the rating knows only the size) p is roughly uniform: ~5% below 0.05.
    null_ps = {name: [] for name in ranking_stats.PERMUTATION_STATISTICS}
    for _ in range(200):
        accuracy, rating, cost, bins = _binned_sample(rng, informative=False)
        for name in null_ps:
            null_ps[name].append(ranking_stats.within_bin_permutation_p(
                accuracy, rating, bins, statistic=name, cost=cost, num_permutations=199,
                seed=int(rng.integers(1 << 30))))
    for name, ps in null_ps.items():
        ps = np.asarray(ps)
        assert np.all((ps > 0) & (ps <= 1)), name
        assert 0.01 <= np.mean(ps < 0.05) <= 0.10, (name, np.mean(ps < 0.05))
        assert 0.4 <= np.mean(ps > 0.5) <= 0.6, (name, np.mean(ps > 0.5))
    # A rating that knows each network's own part is found (p at its floor 1/200).
    accuracy, rating, cost, bins = _binned_sample(rng, informative=True)
    out = ranking_stats.compare(accuracy, rating, top_k=5, num_resamples=50, cost=cost,
                                bins=bins, num_permutations=199)
    assert out["partial_spearman_p"] == pytest.approx(0.005)
    assert out["within_bin_kendall_p"] == pytest.approx(0.005)
    # Size alone has nothing to add within bins.
    assert ranking_stats.within_bin_permutation_p(
        accuracy, cost, bins, statistic="within_bin_kendall", num_permutations=199) > 0.05
    with pytest.raises(ValueError, match="bins has shape"):
        ranking_stats.within_bin_permutation_p(accuracy, rating, bins[:5],
                                               statistic="within_bin_kendall")
    with pytest.raises(ValueError, match="needs the cost"):
        ranking_stats.within_bin_permutation_p(accuracy, rating, bins,
                                               statistic="partial_spearman")


def test_vectorised_permutation_statistics_equal_the_scipy_ones():
    rng = np.random.default_rng(3)
    accuracy, rating, cost, bins = _binned_sample(rng, informative=True)
    rating = np.round(rating, 1)  # ties, as real ratings and accuracies have
    accuracy = np.round(accuracy, 1)
    partial = ranking_stats._partial_spearman_of_permutations(accuracy, rating, cost)
    within = ranking_stats._within_bin_tau_of_permutations(accuracy, rating, bins)
    for _ in range(5):
        order = np.arange(36)
        for b in range(6):
            order[bins == b] = rng.permutation(np.flatnonzero(bins == b))
        assert partial(order[None])[0] == pytest.approx(
            ranking_stats.partial_spearman(accuracy, rating[order], cost), abs=1e-9)
        assert within(order[None])[0] == pytest.approx(
            ranking_stats.within_bin_tau(accuracy, rating[order], bins), abs=1e-9)


def test_vectorised_bootstrap_statistics_equal_the_scipy_loop():
    rng = np.random.default_rng(4)
    accuracy, rating, cost, bins = _binned_sample(rng, informative=True)
    accuracy, rating = np.round(accuracy, 1), np.round(rating, 1)  # ties
    rows = ranking_stats.row_statistics(accuracy, rating, cost=cost, bins=bins)
    plain = {"kendall": lambda i: ranking_stats.kendall_tau(accuracy[i], rating[i]),
             "spearman": lambda i: ranking_stats.spearman_rho(accuracy[i], rating[i]),
             "partial_spearman": lambda i: ranking_stats.partial_spearman(
                 accuracy[i], rating[i], cost[i]),
             "within_bin_kendall": lambda i: ranking_stats.within_bin_tau(
                 accuracy[i], rating[i], bins[i])}
    index = rng.integers(0, 36, size=(40, 36))
    index[0] = np.arange(36)
    index[1] = 5  # every value tied: undefined
    index[2, :30] = 0  # one bin holds most of the resample
    for name, function in plain.items():
        expected = np.asarray([function(i) for i in index])
        np.testing.assert_allclose(rows[name](index), expected, atol=1e-9, err_msg=name)
        assert np.isnan(expected[1])
    # Same resamples, same interval, with and without the rows.
    for name, statistic, extra in (("kendall", ranking_stats.kendall_tau, ()),
                                   ("partial_spearman", ranking_stats.partial_spearman, (cost,)),
                                   ("within_bin_kendall", ranking_stats.within_bin_tau, (bins,))):
        slow = ranking_stats.bootstrap_interval(accuracy, rating, statistic, num_resamples=100,
                                                extra=extra)
        fast = ranking_stats.bootstrap_interval(accuracy, rating, statistic, num_resamples=100,
                                                extra=extra, rows=rows[name])
        np.testing.assert_allclose(fast, slow, atol=1e-9, err_msg=name)
    with pytest.raises(RuntimeError, match="vectorised statistic"):
        ranking_stats.bootstrap_interval(accuracy, rating, ranking_stats.kendall_tau,
                                         num_resamples=10, rows=rows["spearman"])


# ---- costs -------------------------------------------------------------------------------------


def test_effective_macs_count_only_taps_inside_the_image():
    # A 3x3 conv on a 2x2 map: each output sees 2x2 of the 3x3 taps.
    assert costs_lib._inside_taps(2, 3, 1) == 4 and costs_lib._inside_taps(1, 7, 1) == 1
    # Stride 2 on 28: TF SAME pads one pixel after, which the last output reads.
    assert costs_lib._inside_taps(28, 3, 2) == 14 * 3 - 1
    spec = NetworkSpec(name="n", stem_channels=8, stages=((LayerSpec("ir", 7, 1, 6, 8, 0.0),),),
                       head_channels=16, stem_stride=1)
    full = costs_lib.network_costs(spec, 7, 10).total.macs
    effective = costs_lib.effective_macs(spec, 7, 10)
    # Only the 3x3 stem and the 7x7 depthwise conv lose taps (at 7x7: 7 - 3 per side).
    lost_dw = 48 * (49 * 49 - sum(min(i + 3, 6) - max(i - 3, 0) + 1 for i in range(7)) ** 2)
    lost_stem = 3 * 8 * (9 * 49 - (3 * 7 - 2) ** 2)
    assert full - effective == lost_dw + lost_stem
    b0 = zoo.get_network_spec("efficientnet_b0")
    assert 0.95 < costs_lib.effective_macs(b0, 224, 1000) / costs_lib.network_costs(
        b0, 224, 1000).total.macs < 1.0


def test_fmnist28_space_differs_where_the_issue_asks():
    space = get_space("fmnist28")
    assert align_space(space, zoo.get_network_spec("fmnist28_teacher")) == space
    for b in range(len(space.blocks)):
        assert space.block_size(b) == 6 * 7 * 7  # depth 1-3 and 6 MBConv ops
        size = costs_lib.block_input_size(space, b, 28)
        if b:
            assert size >= 7
    rng = np.random.default_rng(0)
    macs = [costs_lib.network_costs(space.to_network_spec(space.sample(rng)), 28, 10).total.macs
            for _ in range(500)]
    cheapest = costs_lib.network_costs(space.to_network_spec(Arch.of([(3, 6, 6)] * 3)), 28,
                                       10).total.macs
    dearest = costs_lib.network_costs(space.to_network_spec(Arch.of([(2, 2, 2)] * 3)), 28,
                                      10).total.macs
    assert dearest / cheapest >= 3 and cheapest <= min(macs) and max(macs) <= dearest


# ---- the ground-truth sample -------------------------------------------------------------------


def test_cost_bins_hold_distinct_near_equal_cost_architectures():
    config = config_files.load_config(GT_CONFIG)
    space = get_space(config.space)
    sample = ground_truth.cost_stratified_sample(space, config.sample, config.resolution)
    assert len(sample) == config.sample.num_bins * config.sample.per_bin
    assert len({s["arch"] for s in sample}) == len(sample)
    for s in sample:
        macs = costs_lib.network_costs(space.to_network_spec(s["arch"]), 28, 10).total.macs
        assert macs == s["cost"]
        assert abs(macs / s["bin_centre"] - 1) <= config.sample.bin_tolerance
    centres = sorted({s["bin_centre"] for s in sample})
    assert centres[-1] / centres[0] >= 3.0
    # Deterministic.
    again = ground_truth.cost_stratified_sample(space, config.sample, config.resolution)
    assert [s["arch"] for s in again] == [s["arch"] for s in sample]


def test_run_order_pilot_first_then_stratified_then_extra_seeds():
    order = ground_truth.run_order(num_bins=6, per_bin=6, multi_seed_per_bin=1, num_seeds=3,
                                   pilot_archs=4)
    assert len(order) == len(set(order)) == 36 + 6 * 2
    pilot = order[:8]
    assert {s for _, s in pilot} == {0, 1} and len({a for a, _ in pilot}) == 4
    assert {a for a, _ in pilot} <= {b * 6 for b in range(6)}
    # After the pilot, seed 0 of every architecture before any extra seed.
    first_extra = next(i for i, (_, s) in enumerate(order[8:]) if s > 0) + 8
    assert {a for a, s in order[:first_extra] if s == 0} == set(range(36))
    # The first 6 seed-0 runs after the pilot hit 6 different bins (partial files stratified).
    seed0 = [a for a, s in order[8:] if s == 0][:6]
    assert len({a // 6 for a in seed0}) >= 5


CONFIRM_CONFIG = os.path.join(REPO, "configs", "fmnist28_ground_truth_confirm.py")


def test_shape_features_read_the_child_network_without_identity_ops():
    """Checked against the committed ground truth's block strings, parsed here by hand."""
    committed = artifacts.read_json(os.path.join(REPO, "results", "fmnist28_ground_truth.json"))
    space = get_space("fmnist28")
    archs = committed["sample"]["archs"][:8]
    features = fidelity.shape_features(space, [Arch.of(a["blocks"]) for a in archs])
    for i, a in enumerate(archs):
        layers = [(int(re.search(r"_r(\d+)", s).group(1)), int(re.search(r"_k(\d+)", s).group(1)),
                   int(re.search(r"_e(\d+)", s).group(1)))
                  for stage in a["block_strings"][1:] for s in stage]
        repeats = [r for r, _, _ in layers]
        assert features["depth"][i] == sum(repeats)
        assert features["mean_kernel"][i] == pytest.approx(
            np.average([k for _, k, _ in layers], weights=repeats))
        assert features["mean_expansion"][i] == pytest.approx(
            np.average([e for _, _, e in layers], weights=repeats))
    # identity ops are not layers: the same first block with and without them
    first = Arch.of(archs[0]["blocks"])
    skip = space.skip_index
    deeper = [list(b) for b in first.blocks]
    assert skip in deeper[0] or skip in deeper[1] or skip in deeper[2]
    full = [[op if op != skip else 0 for op in b] for b in deeper]
    both = fidelity.shape_features(space, [first, Arch.of(full)])
    missing = sum(op == skip for b in deeper for op in b)
    assert both["depth"][1] - both["depth"][0] == missing


def test_the_committed_ground_truth_is_still_drawn_and_the_confirmation_sample_is_new():
    """The new sample fields change nothing for the committed file (its record and its 36
    architectures); the confirmation sample is 3 new architectures in each of its 6 bins."""
    committed = artifacts.read_json(os.path.join(REPO, "results", "fmnist28_ground_truth.json"))
    config = config_files.load_config(GT_CONFIG)
    record = ground_truth._sample_record(config)
    assert "pick_seed" not in record and "exclude" not in record
    assert artifacts.to_jsonable(record) == committed["sample"]["record"]
    space = get_space(config.space)
    sample = ground_truth.cost_stratified_sample(space, config.sample, config.resolution)
    assert [[list(b) for b in s["arch"].blocks] for s in sample] == [
        a["blocks"] for a in committed["sample"]["archs"]]
    confirm = config_files.load_config(CONFIRM_CONFIG)
    ground_truth.check_config(confirm)
    assert ground_truth._sample_record(confirm)["exclude"] == "results/fmnist28_ground_truth.json"
    new = ground_truth.cost_stratified_sample(space, confirm.sample, confirm.resolution)
    assert len(new) == 18 and len({s["arch"] for s in new}) == 18
    assert not {s["arch"] for s in new} & {s["arch"] for s in sample}
    centres = {s["bin"]: s["bin_centre"] for s in sample}
    assert all(s["bin_centre"] == centres[s["bin"]] for s in new)
    assert [s["bin"] for s in new] == [b for b in range(6) for _ in range(3)]
    order = ground_truth.run_order(6, 3, confirm.seeds.multi_seed_per_bin,
                                  confirm.seeds.num_seeds, confirm.seeds.pilot_archs)
    assert sorted(order) == [(a, 0) for a in range(18)]


def _tiny_exclude_file(path, **record_changes):
    """The tiny ground truth's file before any run (its record changed as given)."""
    config = config_files.load_config(GT_CONFIG, "tiny")
    space = get_space(config.space)
    sample = ground_truth.cost_stratified_sample(space, config.sample, config.resolution)
    data = ground_truth.new_file(config, space, sample, [])
    data["sample"]["record"].update(record_changes)
    artifacts.write_json(str(path), data)
    return sample


def test_pick_seed_and_exclude_draw_new_architectures_in_the_same_bins(tmp_path):
    excluded = _tiny_exclude_file(tmp_path / "gt.json")
    base = config_files.load_config(GT_CONFIG, "tiny")
    space = get_space(base.space)
    # The defaults, given explicitly, are the sample as before.
    explicit = config_files.load_config(GT_CONFIG, "tiny", **{"sample.pick_seed": -1,
                                                              "sample.exclude": ""})
    assert ([s["arch"] for s in ground_truth.cost_stratified_sample(space, explicit.sample, 16)]
            == [s["arch"] for s in excluded])
    config = config_files.load_config(CONFIRM_CONFIG, "tiny", **{
        "sample.exclude": str(tmp_path / "gt.json"), "sample.per_bin": 2})
    ground_truth.check_config(config)
    sample = ground_truth.cost_stratified_sample(space, config.sample, config.resolution)
    assert [s["bin"] for s in sample] == [0, 0, 1, 1]
    assert not {s["arch"] for s in sample} & {s["arch"] for s in excluded}
    centres = {s["bin"]: s["bin_centre"] for s in excluded}
    assert all(s["bin_centre"] == centres[s["bin"]] for s in sample)
    again = ground_truth.cost_stratified_sample(space, config.sample, config.resolution)
    assert [s["arch"] for s in again] == [s["arch"] for s in sample]
    record = ground_truth._sample_record(config)
    assert record["pick_seed"] == 1 and record["exclude"] == str(tmp_path / "gt.json")
    # Another pick seed, no exclusion: the same centres, picks of its own.
    other = config_files.load_config(CONFIRM_CONFIG, "tiny", **{"sample.per_bin": 2,
                                                                "sample.pick_seed": 7})
    drawn = ground_truth.cost_stratified_sample(space, other.sample, other.resolution)
    assert all(s["bin_centre"] == centres[s["bin"]] for s in drawn)


@pytest.mark.parametrize("overrides,changes,match", [
    ({"sample.exclude": "missing.json"}, {}, "no such file"),
    ({}, {"space": "small"}, "space='small'"),
    ({}, {"resolution": 20}, "config.resolution=16"),
    ({}, {"pool_size": 300}, "config.sample.pool_size=200"),
    ({}, {"bin_tolerance": 0.2}, "config.sample.bin_tolerance=0.3"),
    ({}, {"cost": "params"}, "config.sample.cost='macs'"),
    ({"sample.pick_seed": -1}, {}, "needs config.sample.pick_seed >= 0"),
    ({"sample.pick_seed": -2, "sample.exclude": ""}, {}, "pick_seed must be -1"),
])
def test_a_bad_exclusion_is_refused_naming_the_field(tmp_path, overrides, changes, match):
    _tiny_exclude_file(tmp_path / "gt.json", **changes)
    config = config_files.load_config(CONFIRM_CONFIG, "tiny", **{
        "sample.exclude": str(tmp_path / "gt.json"), **overrides})
    with pytest.raises(ValueError, match=re.escape(match)):
        ground_truth.check_config(config)


def test_not_a_ground_truth_file_is_refused(tmp_path):
    artifacts.write_json(str(tmp_path / "x.json"), {"format_version": 1, "runs": []})
    config = config_files.load_config(CONFIRM_CONFIG, "tiny",
                                      **{"sample.exclude": str(tmp_path / "x.json")})
    with pytest.raises(ValueError, match="is not a ground-truth file"):
        ground_truth.check_config(config)


def test_seed_zero_only_run_order_and_runner_with_fake_training(tmp_path, fake_training):
    order = ground_truth.run_order(num_bins=6, per_bin=3, multi_seed_per_bin=0, num_seeds=3,
                                   pilot_archs=0)
    assert sorted(order) == [(a, 0) for a in range(18)]
    assert len({a % 3 for a, _ in order[:6]}) == 1  # interleaved over the bins
    calls = fake_training(lambda index, seed: 0.5 + 0.01 * index)
    _tiny_exclude_file(tmp_path / "gt.json")
    config = config_files.load_config(CONFIRM_CONFIG, "tiny",
                                      **{"sample.exclude": str(tmp_path / "gt.json")})
    out, work = str(tmp_path / "confirm.json"), str(tmp_path / "work")
    data = ground_truth.run_ground_truth(config, work, out)
    assert calls == [(0, 0), (1, 0)] and [tuple(o) for o in data["order"]] == calls
    assert data["pilot"] == {} and data["noise"] == {"archs_with_seeds": 0}
    assert data["sample"]["record"]["pick_seed"] == 1
    assert ground_truth.run_ground_truth(config, work, out)["runs"] == data["runs"]
    assert calls == [(0, 0), (1, 0)]  # resumed: nothing trained again
    truth = fidelity.GroundTruth.merged([artifacts.read_json(str(tmp_path / "gt.json")),
                                         artifacts.read_json(out)])
    assert len(truth) == 2 and np.isnan(truth.seed_sd())


def test_seed_noise_pooled_sd_and_quarter_rule():
    runs = [{"arch": 0, "seed": 0, "test_accuracy": 0.80}, {"arch": 0, "seed": 1, "test_accuracy": 0.82},
            {"arch": 1, "seed": 0, "test_accuracy": 0.90}, {"arch": 1, "seed": 1, "test_accuracy": 0.90}]
    noise = ground_truth.seed_noise(runs)
    assert noise["seed_sd"] == pytest.approx(np.sqrt(0.0002 / 2))
    assert noise["spread"] == pytest.approx(0.09)
    assert noise["meets_quarter_rule"]


# ---- the rating's fit diagnostics, decay mask, updates per op ---------------------------------


def test_constant_predictor_baseline_and_unfit_warning(caplog):
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(2, 16, 3, 3, 4)) * np.array([1.0, 2.0, 3.0, 4.0]) + np.array(
        [5.0, 0.0, -5.0, 1.0])
    stats = rate_lib.teacher_batch_stats(targets)
    # The per-channel mean explains the channel offsets: constant mse / var < 1.
    assert np.all(stats["constant_mse"] / stats["var"] < 0.7)
    fit = rate_lib.fit_summary(np.array([0.9, 0.5, 0.3]), 0.4)
    assert fit == {"best": 0.3, "median": 0.5, "worst": 0.9, "constant": 0.4,
                   "beats_constant": True}
    with caplog.at_level(logging.WARNING):
        assert not rate_lib.warn_if_unfit("block0", fit)
        assert rate_lib.warn_if_unfit("block3", rate_lib.fit_summary(np.array([1.9, 2.6]), 0.8))
    assert "block3" in caplog.text and "constant predictor" in caplog.text


def test_weight_decay_skips_one_dimensional_parameters():
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    optimizer = update.make_optimizer("sgd", weight_decay=0.5)
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,)), "bias": jnp.ones((2,))}
    zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    assert np.all(np.asarray(updates["kernel"]) != 0)
    assert np.all(np.asarray(updates["scale"]) == 0) and np.all(np.asarray(updates["bias"]) == 0)


def test_updates_per_op_counts_choices_per_layer():
    out = paths.updates_per_op(get_space("fmnist28"), 700)
    # First layer 6 ops, the others 6 + skip: (700/6 + 2 * 700/7) / 3.
    assert out["block0"] == pytest.approx((700 / 6 + 2 * 100) / 3)
    assert paths.updates_per_op(get_space("small"), 600)["block0"] == pytest.approx(100)


# ---- the comparison ----------------------------------------------------------------------------


TINY_ENCODINGS = [[[a], [b, c]] for a in range(2) for b in range(2) for c in range(2)]


def _fake_truth(space_name="tiny", encodings=TINY_ENCODINGS, per_bin=4, centres=(1.0, 1.0)):
    space = get_space(space_name)
    archs, runs = [], []
    rng = np.random.default_rng(0)
    for i, blocks in enumerate(encodings):
        archs.append({"index": i, "bin": i // per_bin, "bin_centre": centres[i // per_bin],
                      "blocks": blocks,
                      **ground_truth.arch_costs(space, Arch.of(blocks), 16, 10)})
        for seed in (0, 1) if i % per_bin == 0 else (0,):
            runs.append({"arch": i, "seed": seed,
                         "test_accuracy": 0.5 + 0.01 * i + 0.002 * rng.normal()})
    return {"format_version": 1, "sample": {"record": {"space": space_name, "resolution": 16},
                                            "archs": archs}, "runs": runs}


def _fake_tables(space, truth, fit_block1=True):
    tables = []
    for b, block in enumerate(space.blocks):
        encodings = space.block_candidates(b)
        loss = -encodings.sum(1).astype(float)  # more/larger ops = lower loss
        tables.append({"rows": {tuple(e): i for i, e in enumerate(encodings)},
                       "metrics": {"cl_loss": loss, "mse_var": loss + 10},
                       "fit": {"beats_constant": b == 0 or fit_block1}})
    return tables


def test_dna_predictions_aggregations_and_comparison(tmp_path):
    truth = fidelity.GroundTruth(_fake_truth())
    assert len(truth) == 8 and truth.seed_sd() > 0
    tables = _fake_tables(truth.space, truth, fit_block1=False)
    predictions = fidelity.dna_predictions(tables, truth.archs)
    assert set(predictions) == {f"dna[{m},{a}]" for m in ("cl_loss", "mse_var")
                                for a in fidelity.AGGREGATIONS}
    expected = np.asarray([sum(sum(b) for b in a.blocks) for a in truth.archs], float)
    np.testing.assert_allclose(predictions["dna[cl_loss,sum]"], expected)
    # fit_blocks leaves out block 1 (its best does not beat the constant predictor).
    np.testing.assert_allclose(predictions["dna[cl_loss,fit_blocks]"],
                               [a.blocks[0][0] for a in truth.archs])
    # Rank and z-score aggregations are monotone per block: same order as the sum here.
    for aggregation in ("rank", "zscore"):
        assert ranking_stats.kendall_tau(predictions[f"dna[cl_loss,{aggregation}]"],
                                         expected) > 0.8
    predictions["macs"] = truth.costs["macs"]
    predictions["synflow"] = fidelity.synflow_scores(truth.space, truth.archs, 16)
    assert np.all(np.isfinite(predictions["synflow"])) and np.all(predictions["synflow"] > 0)
    result = fidelity.compare_all(truth, predictions, top_k=2, num_resamples=50)
    assert result["num_archs"] == 8 and result["noise"]["seed_sd"] > 0
    assert -1 <= result["noise"]["simulated_kendall"] <= 1
    table = fidelity.render_table(result)
    assert "dna[cl_loss,sum]" in table and "partial Spearman" in table
    assert table.startswith("8 architectures in ") and "noise ceiling" in table
    # Regret in accuracy points: the rendered cell is 100x the statistic.
    first_budget = next(k for k in result["methods"]["macs"] if k.startswith("regret@")
                        and not k.endswith(("_low", "_high")))
    row = next(line for line in table.splitlines() if line.startswith("| macs |"))
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    column = next(i for i, c in enumerate(header.split(" | ")) if c.startswith("regret (points)"))
    shown = float(row.split(" | ")[column].split(" [")[0])
    assert shown == pytest.approx(100 * result["methods"]["macs"][first_budget], abs=0.006)
    fidelity.plot(truth, predictions, ["macs", "dna[cl_loss,sum]"], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    # beyond several controls: the sum rows and the non-DNA rows, the controls left out
    predictions.update(fidelity.shape_features(truth.space, truth.archs))
    beyond = fidelity.beyond_controls(truth, predictions, ["macs", "depth"], num_resamples=50)
    assert set(beyond["methods"]) == {"dna[cl_loss,sum]", "dna[mse_var,sum]", "synflow",
                                      "mean_expansion", "mean_kernel"}
    controls = np.stack([predictions["macs"], predictions["depth"]], axis=1)
    for name, row in beyond["methods"].items():
        value = ranking_stats.partial_spearman(truth.accuracy, predictions[name], controls)
        assert row["partial_spearman"] == pytest.approx(value, nan_ok=True)
        if np.isfinite(value):
            assert row["partial_spearman_low"] <= value <= row["partial_spearman_high"]
    assert "given macs and depth" in fidelity.render_beyond(beyond)
    with pytest.raises(ValueError, match="control 'params' is not a prediction"):
        fidelity.beyond_controls(truth, predictions, ["params"])


# ---- a tiny ground truth, resumed ------------------------------------------------------------


@pytest.mark.slow
def test_tiny_ground_truth_runs_resumes_and_refuses_another_config(tmp_path):
    out, work = tmp_path / "gt.json", tmp_path / "work"
    cmd = [sys.executable, "-m", "dna_jax.ground_truth", f"--config={GT_CONFIG}:tiny",
           f"--workdir={work}", f"--out={out}"]
    first = subprocess.run(cmd + ["--max_runs=2"], capture_output=True, text=True, cwd=REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    data = artifacts.read_json(str(out))
    assert len(data["runs"]) == 2 and data["pilot"]  # the pilot: 1 arch x 2 seeds
    assert data["pilot"]["archs_with_seeds"] == 1
    second = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert second.returncode == 0, second.stderr[-2000:]
    data = artifacts.read_json(str(out))
    planned = [tuple(o) for o in data["order"]]
    assert [(r["arch"], r["seed"]) for r in data["runs"]] == planned
    for run in data["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["commit"] and run["machine"]
    for arch in data["sample"]["archs"]:
        assert arch["effective_macs"] <= arch["macs"]
    changed = subprocess.run(cmd + ["--config.standalone.total_steps=7"], capture_output=True,
                             text=True, cwd=REPO)
    assert changed.returncode != 0 and "another config" in changed.stderr


def test_prepare_tables_excludes_unfit_blocks_and_rank_normalises():
    from dna_jax import search  # pylint: disable=import-outside-toplevel
    costs = {"macs": np.array([1, 2, 3])}
    tables = [search.BlockTable(np.array([[0], [1], [2]]), np.array([0.5, 0.1, 9.0]), costs),
              search.BlockTable(np.array([[0], [1], [2]]), np.array([3.0, 1.0, 2.0]), costs)]
    fits = [{"beats_constant": True}, {"beats_constant": False}]
    kept = search.prepare_tables(tables, fits)
    np.testing.assert_array_equal(kept[1].score, tables[1].score)
    excluded = search.prepare_tables(tables, fits, unfit_blocks="exclude")
    np.testing.assert_array_equal(excluded[0].score, tables[0].score)
    np.testing.assert_array_equal(excluded[1].score, [0.0, 0.0, 0.0])
    ranked = search.prepare_tables(tables, fits, rank_normalize=True)
    np.testing.assert_allclose(ranked[0].score, [2 / 3, 1 / 3, 1.0])
    with pytest.raises(ValueError, match="unfit_blocks"):
        search.prepare_tables(tables, fits, unfit_blocks="drop")


def test_per_architecture_scores_are_matched_by_blocks_and_oriented():
    truth = fidelity.GroundTruth(_fake_truth())
    archs = [[list(b) for b in a.blocks] for a in reversed(truth.archs)]  # any order
    losses = [float(sum(sum(b) for b in a)) for a in archs]
    scores = {"method": "spos", "archs": archs, "scores": losses, "higher_is_better": False}
    np.testing.assert_allclose(fidelity.arch_score_predictions(scores, truth),
                               [-sum(sum(b) for b in a.blocks) for a in truth.archs])
    scores["higher_is_better"] = True
    np.testing.assert_allclose(fidelity.arch_score_predictions(scores, truth),
                               [sum(sum(b) for b in a.blocks) for a in truth.archs])
    with pytest.raises(ValueError, match="has no spos score: the file rated another sample"):
        fidelity.arch_score_predictions({**scores, "archs": archs[1:], "scores": losses[1:]},
                                        truth)


@pytest.mark.slow
def test_spos_scores_rate_every_sampled_architecture(tmp_path):
    config = config_files.load_config(GT_CONFIG, "tiny")
    space = get_space(config.space)
    sample = ground_truth.cost_stratified_sample(space, config.sample, config.resolution)
    truth_path = tmp_path / "truth.json"
    artifacts.write_json(str(truth_path), {"format_version": 1, "runs": [], "sample": {
        "record": {"space": config.space, "resolution": config.resolution},
        "archs": [{"blocks": [list(b) for b in s["arch"].blocks]} for s in sample]}})
    out = tmp_path / "spos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dna_jax.spos_scores", "--config",
         os.path.join(REPO, "configs", "fmnist28_spos.py") + ":tiny", "--workdir",
         str(tmp_path / "w"), "--out", str(out), "--ground_truth", str(truth_path)],
        capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = artifacts.read_json(str(out))
    assert scores["archs"] == [[list(b) for b in s["arch"].blocks] for s in sample]
    assert len(scores["scores"]) == len(sample)
    assert all(0.0 <= s <= 1.0 for s in scores["scores"]) and scores["higher_is_better"]


def _row(kendall, partial=None, low=None, p=None):
    row = {"kendall": kendall}
    if partial is not None:
        row.update(partial_spearman=partial, partial_spearman_low=low, partial_spearman_p=p)
    return row


def test_the_pre_registered_verdict_needs_all_three_conditions():
    base = {"macs": _row(0.50), "params": _row(0.55), "random": _row(0.9, 0.9, 0.5, 0.001)}
    passing = {**base, fidelity.PRIMARY: _row(0.56, 0.30, 0.02, 0.01)}
    v = fidelity.verdict({"methods": passing})
    assert v["passed"] and v["best_size"] == "params"  # the best size baseline, not macs
    assert fidelity.render_verdict(v).startswith(f"Pre-registered test, {fidelity.PRIMARY}: PASSED")
    for change, failed in ((dict(kendall=0.54), "tau_at_least_size"),
                           (dict(partial_spearman_low=-0.01), "partial_interval_above_zero"),
                           (dict(partial_spearman_p=0.05), "permutation_p_below_alpha")):
        v = fidelity.verdict({"methods": {**passing,
                                          fidelity.PRIMARY: {**passing[fidelity.PRIMARY],
                                                             **change}}})
        assert not v["passed"] and not v[failed], change
        assert "NOT PASSED" in fidelity.render_verdict(v)
    with pytest.raises(ValueError, match="pre-registered row"):
        fidelity.verdict({"methods": base})
    with pytest.raises(ValueError, match="size baseline"):
        fidelity.verdict({"methods": {fidelity.PRIMARY: passing[fidelity.PRIMARY]}})


def test_merged_ground_truths_keep_bins_and_pool_seed_noise_per_file():
    first = _fake_truth(encodings=TINY_ENCODINGS[:4], per_bin=2, centres=(1.0, 2.0))
    second = _fake_truth(encodings=TINY_ENCODINGS[4:], per_bin=2, centres=(1.0, 2.0))
    one, two = fidelity.GroundTruth(first), fidelity.GroundTruth(second)
    truth = fidelity.GroundTruth.merged([first, second])
    assert len(truth) == len(one) + len(two) == 8
    np.testing.assert_array_equal(truth.bins, np.concatenate([one.bins, two.bins]))
    np.testing.assert_allclose(truth.accuracy, np.concatenate([one.accuracy, two.accuracy]))
    assert len(set(truth.archs)) == 8 and truth.archs == one.archs + two.archs
    assert truth.costs["macs"].tolist() == one.costs["macs"].tolist() + two.costs["macs"].tolist()
    # Seed noise pooled over both files' two-seed architectures (arch 0 of each file: the
    # runs of different files are not one architecture's).
    pairs = [[r["test_accuracy"] for r in d["runs"] if r["arch"] == a]
             for d in (first, second) for a in (0, 2)]
    assert all(len(p) == 2 for p in pairs) and len(truth.data["runs"]) == 12
    assert truth.seed_sd() == pytest.approx(np.sqrt(np.mean([np.var(p, ddof=1) for p in pairs])))
    assert truth.noise_ceiling(num_draws=10)["two_seed_archs"] == 4
    assert fidelity.GroundTruth.merged([first]).accuracy.tolist() == one.accuracy.tolist()
    with pytest.raises(ValueError, match="bin centres"):
        fidelity.GroundTruth.merged([first, _fake_truth(encodings=TINY_ENCODINGS[4:], per_bin=2,
                                                        centres=(1.0, 2.0 * (1 + 1e-6)))])
    with pytest.raises(ValueError, match="distinct architectures"):
        fidelity.GroundTruth.merged([first, first])
    other = {**second, "sample": {**second["sample"], "record": {"space": "tiny",
                                                                 "resolution": 20}}}
    with pytest.raises(ValueError, match="resolution"):
        fidelity.GroundTruth.merged([first, other])
    with pytest.raises(ValueError, match="at least one"):
        fidelity.GroundTruth.merged([])


def test_confidence_sets_the_interval_and_the_verdict_refuses_another_alpha():
    truth = fidelity.GroundTruth(_fake_truth())
    rng = np.random.default_rng(1)
    predictions = {"macs": truth.costs["macs"],
                   fidelity.PRIMARY: truth.accuracy + 0.01 * rng.normal(size=len(truth))}
    results = {c: fidelity.compare_all(truth, predictions, top_k=2, num_resamples=300,
                                       num_permutations=50, confidence=c) for c in (0.95, 0.975)}
    widths = {c: [r["methods"][m][f"{s}_high"] - r["methods"][m][f"{s}_low"]
                  for m in predictions for s in ("kendall", "spearman", "partial_spearman")]
              for c, r in results.items()}
    pairs = [(w95, w975) for w95, w975 in zip(widths[0.95], widths[0.975])
             if np.isfinite(w95)]  # macs given macs: undefined
    assert len(pairs) == 5 and all(w975 >= w95 for w95, w975 in pairs)
    assert sum(w975 for _, w975 in pairs) > sum(w95 for w95, _ in pairs)
    assert results[0.975]["confidence"] == 0.975
    for c, r in results.items():  # the point estimates do not depend on the level
        assert r["methods"]["macs"]["kendall"] == results[0.95]["methods"]["macs"]["kendall"]
    v = fidelity.verdict(results[0.975], alpha=0.025)
    assert v["confidence"] == 0.975 and "97.5% interval" in fidelity.render_verdict(v)
    assert "95% interval" in fidelity.render_verdict(fidelity.verdict(results[0.95]))
    assert "intervals: 97.5% bootstrap" in fidelity.render_table(results[0.975])
    with pytest.raises(ValueError, match="confidence 0.95"):
        fidelity.verdict(results[0.95], alpha=0.025)
    with pytest.raises(ValueError, match="confidence 0.975"):
        fidelity.verdict(results[0.975])


def test_kendall_difference_is_paired_and_shown_in_the_verdict():
    """tau(a) - tau(b) on the same resampled networks: a rating against itself differs by
    exactly 0 in every resample; a perfect rating beats a noisy one; (a)'s line shows it."""
    truth = fidelity.GroundTruth(_fake_truth())
    rng = np.random.default_rng(3)
    noisy = truth.accuracy + 0.02 * rng.normal(size=len(truth))
    same = fidelity.kendall_difference(truth, noisy, noisy, num_resamples=200)
    assert (same["value"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    better = fidelity.kendall_difference(truth, truth.accuracy, noisy, num_resamples=200)
    assert better["value"] == pytest.approx(
        1.0 - ranking_stats.kendall_tau(noisy, truth.accuracy))
    assert 0.0 <= better["low"] <= better["value"] <= better["high"]
    predictions = {"macs": truth.costs["macs"], fidelity.PRIMARY: noisy}
    v = fidelity.verdict(fidelity.compare_all(truth, predictions, top_k=2, num_resamples=100,
                                              num_permutations=20))
    v["kendall_difference"] = fidelity.kendall_difference(
        truth, predictions[v["primary"]], predictions[v["best_size"]], num_resamples=100)
    line = fidelity.render_verdict(v).splitlines()[1]
    assert line.startswith("- (a)") and "paired difference" in line and "95% interval" in line
