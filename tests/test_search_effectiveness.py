"""Search effectiveness (issue 19, item 6): the selection rules, the statistics, and a tiny
end-to-end run that resumes and refuses a file made by another config or other tables."""

import itertools
import os

import numpy as np
import pytest

from dna_jax import artifacts, config_files, ground_truth, search
from dna_jax import search_effectiveness as se
from dna_jax.space import Arch, get_space

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fmnist28_search_effectiveness.py")


def _tiny_tables(folder, seed=0):
    """Random rating tables of every candidate of the `tiny` space."""
    space = get_space("tiny")
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for b, block in enumerate(space.blocks):
        enc = space.block_candidates(b)
        search.save_block_table(os.path.join(folder, f"{block.name}.npz"),
                                search.BlockTable(enc, rng.uniform(0.1, 1.0, len(enc)), {}))
    return str(folder)


def _tiny_config(tables, **overrides):
    return config_files.load_config(CONFIG, "tiny", **{"tables.rate_dir": tables, **overrides})


def _all_archs(space):
    return [Arch.of(a) for a in itertools.product(
        *[space.block_candidates(b) for b in range(len(space.blocks))])]


def test_real_config_meets_the_issue_and_selects_from_the_committed_tables():
    config = config_files.load_config(CONFIG)
    assert len(config.budgets) >= 2 and config.num_seeds >= 2
    assert config.contenders.num_random >= 3
    gt = config_files.load_config(os.path.join(REPO, "configs", "fmnist28_ground_truth.py"))
    assert config.standalone.to_dict() == gt.standalone.to_dict()  # the same recipe
    planned = se.plan(config)
    for budget in planned["budgets"]:
        picks = [planned["contenders"][i] for i in budget["picks"].values()]
        assert len({str(c["block_strings"]) for c in picks}) == len(picks)
        assert all(c["macs"] <= budget["budget"] for c in picks)
        assert planned["contenders"][budget["picks"]["size"]]["macs"] == budget["size_ties"]["cost"]
    assert len(planned["order"]) == len(planned["contenders"]) * config.num_seeds


def test_selection_rules_on_the_tiny_space(tmp_path):
    config = _tiny_config(_tiny_tables(tmp_path / "tables"))
    space = get_space("tiny")
    planned = se.plan(config)
    tables = search.prepare_tables(search.load_space_tables(config.tables.rate_dir, space,
                                                            resolution=16))
    fixed = search.space_fixed_costs(space, 16, 10)
    macs = {a: ground_truth.arch_costs(space, a, 16, 10)["macs"] for a in _all_archs(space)}
    for k, budget in enumerate(planned["budgets"]):
        picks, b = budget["picks"], budget["budget"]
        arch = {role: planned["archs"][i] for role, i in picks.items()}
        # size: the largest macs under the budget over the whole space
        assert macs[arch["size"]] == max(m for m in macs.values() if m <= b)
        # dna: search.search's winner
        winner = search.search(tables, {"macs": b}, fixed_cost=fixed)[0]
        assert arch["dna"] == Arch.of(winner.encodings)
        c = planned["contenders"][picks["dna"]]
        assert c["dna"]["dna"]["dna_objective"] == pytest.approx(winner.objective)
        # random: inside the window, distinct networks, none the dna or size pick
        randoms = [r for r in picks if r.startswith("random")]
        assert len(randoms) == config.contenders.num_random
        low = (1 - config.contenders.random_tolerance) * b
        assert all(low <= macs[arch[r]] <= b for r in randoms)
        keys = [se.network_key(space, arch[r]) for r in randoms]
        picked = {se.network_key(space, arch[r]) for r in ("dna", "size")}  # may be one net
        assert len(set(keys)) == len(keys) and not picked & set(keys)
        assert (picks["dna"] == picks["size"]) == (len(picked) == 1)
        for role, i in picks.items():  # the file's costs are the network's
            assert planned["contenders"][i]["macs"] == macs[arch[role]]
            assert [k, role] in planned["contenders"][i]["roles"]
    assert se.plan(config)["budgets"] == planned["budgets"]  # deterministic


def test_size_ties_are_networks_not_encodings():
    config = config_files.load_config(CONFIG)
    space = get_space("fmnist28")
    cost, ties = se.largest_under(space, config, 2.8e6)
    assert cost <= 2.8e6 and len(ties) > 1
    for arch in ties:
        assert ground_truth.arch_costs(space, arch, 28, 10)["macs"] == cost
    assert len({se.network_key(space, a) for a in ties}) < len(ties)  # skips elsewhere
    with pytest.raises(ValueError, match="no architecture"):
        se.largest_under(space, config, 1e5)


def test_run_order_interleaves_budgets_and_puts_seed_zero_first():
    budgets = [{"picks": {"dna": 0, "size": 1, "random0": 2}},
               {"picks": {"dna": 3, "size": 1, "random0": 4}}]
    assert se.run_order(budgets, 2) == [(0, 0), (3, 0), (1, 0), (2, 0), (4, 0),
                                        (0, 1), (3, 1), (1, 1), (2, 1), (4, 1)]


def test_summary_statistics_on_hand_made_runs():
    from scipy import stats
    budgets = [{"budget": 1.0, "picks": {"dna": 0, "size": 1, "random0": 2, "random1": 3,
                                         "random2": 4}},
               {"budget": 2.0, "picks": {"dna": 5, "size": 5, "random0": 6, "random1": 7}}]
    acc = {0: [0.90, 0.91], 1: [0.88, 0.885], 2: [0.87, 0.875], 3: [0.86], 4: [0.89, 0.88],
           5: [0.92, 0.93], 6: [0.9]}
    runs = [{"arch": a, "seed": s, "test_accuracy": v}
            for a, vals in acc.items() for s, v in enumerate(vals)]
    first, second = se.summarize(budgets, runs)
    assert first["roles"]["dna"]["mean"] == pytest.approx(0.905)
    assert first["roles"]["dna"]["sd"] == pytest.approx(np.std([0.90, 0.91], ddof=1))
    assert first["roles"]["random1"]["sd"] is None  # one seed: no SD
    means = [0.8725, 0.86, 0.885]
    assert first["random_mean"]["mean"] == pytest.approx(np.mean(means))
    vs_size = first["differences"]["dna_minus_size"]
    assert vs_size["difference"] == pytest.approx(0.905 - 0.8825)
    ci = stats.ttest_ind([0.90, 0.91], [0.88, 0.885], equal_var=False).confidence_interval()
    assert vs_size["ci95"] == pytest.approx([ci.low, ci.high])
    vs_random = first["differences"]["dna_minus_random"]
    assert vs_random["n"] == [2, 3] and vs_random["difference"] == pytest.approx(
        0.905 - np.mean(means))
    # the same net in two roles; one random net only: no interval, no invented number
    assert second["differences"]["dna_minus_size"]["same_network"] is True
    assert second["random_mean"]["nets"] == 1
    assert second["differences"]["dna_minus_random"]["ci95"] is None
    assert "reason" in second["differences"]["dna_minus_random"]
    # before any run: nothing
    empty = se.summarize(budgets, [])[0]
    assert empty["roles"]["dna"]["mean"] is None
    assert empty["differences"]["dna_minus_size"]["difference"] is None


def test_pooled_comparisons_use_every_networks_seed_noise():
    from scipy import stats
    budgets = [{"budget": 1.0, "picks": {"dna": 0, "size": 1, "random0": 2, "random1": 3}},
               {"budget": 2.0, "picks": {"dna": 4, "size": 4, "random0": 5, "random1": 6}}]
    acc = {0: [0.90, 0.91], 1: [0.88, 0.89], 2: [0.87], 3: [0.86], 4: [0.92, 0.90],
           5: [0.88], 6: [0.91]}
    runs = [{"arch": a, "seed": s, "test_accuracy": v}
            for a, vals in acc.items() for s, v in enumerate(vals)]
    pooled = se.pooled_comparisons(budgets, runs)
    # three networks with 2 seeds: df 3; the SD is Student's pooled SD of those three
    residuals = np.concatenate([np.asarray(acc[a]) - np.mean(acc[a]) for a in (0, 1, 4)])
    assert pooled["seed_sd"]["df"] == 3 and pooled["seed_sd"]["nets"] == 3
    assert pooled["seed_sd"]["sd"] == pytest.approx(np.sqrt(np.sum(residuals ** 2) / 3))
    # per budget: with the pooled SD and its df, the interval Student's t-test would give if
    # the third network's seeds were part of the comparison's noise estimate
    first = pooled["per_budget"][0]["dna_minus_size"]
    sd = pooled["seed_sd"]["sd"]
    half = stats.t.ppf(0.975, 3) * sd * np.sqrt(1 / 2 + 1 / 2)
    assert first["difference"] == pytest.approx(0.02)
    assert first["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    # two networks only: exactly Student's two-sample interval (scipy, equal_var=True)
    two = se.pooled_comparisons(budgets[:1], [r for r in runs if r["arch"] in (0, 1, 2, 3)])
    ci = stats.ttest_ind(acc[0], acc[1], equal_var=True).confidence_interval()
    assert two["per_budget"][0]["dna_minus_size"]["ci95"] == pytest.approx([ci.low, ci.high])
    # the same network at budget 2: a difference of 0 with no noise, averaged in
    assert pooled["per_budget"][1]["same_network"] is True
    over = pooled["over_budgets"]["dna_minus_size"]
    assert over["difference"] == pytest.approx(0.01)
    half = stats.t.ppf(0.975, 3) * np.sqrt(sd ** 2 * (1 / 2 + 1 / 2) / 4)
    assert over["ci95"] == pytest.approx([0.01 - half, 0.01 + half])
    # random nets: the drawn nets' spread enters (Welch-Satterthwaite over the two terms)
    vs_random = pooled["over_budgets"]["dna_minus_random"]
    d = np.mean([0.905 - 0.865, 0.91 - 0.895])
    between = (np.var([0.87, 0.86], ddof=1) + np.var([0.88, 0.91], ddof=1)) / 2
    v1, v2 = (sd ** 2 / 2) * 2 / 4, (between / 2) * 2 / 4
    df = (v1 + v2) ** 2 / (v1 ** 2 / 3 + v2 ** 2 / 2)
    half = stats.t.ppf(0.975, df) * np.sqrt(v1 + v2)
    assert vs_random["difference"] == pytest.approx(d)
    assert vs_random["df"] == pytest.approx(df)
    assert vs_random["ci95"] == pytest.approx([d - half, d + half])
    assert vs_random["between_net_sd"] == pytest.approx(np.sqrt(between))
    # a budget without its runs: no over-budget number is made up
    partial = se.pooled_comparisons(budgets, [r for r in runs if r["arch"] != 6])
    assert partial["over_budgets"]["dna_minus_size"]["difference"] is None
    assert "reason" in partial["over_budgets"]["dna_minus_random"]
    assert se.pooled_comparisons(budgets, [])["seed_sd"]["sd"] is None


def test_config_checks_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="num_seeds"):
        se.check_config(_tiny_config("x", num_seeds=1))
    with pytest.raises(ValueError, match="variants"):
        se.check_config(_tiny_config("x", **{"tables.variants": "nonsense"}))
    with pytest.raises(ValueError, match="random_tolerance or pool_size"):
        se.plan(_tiny_config(_tiny_tables(tmp_path / "t"), **{"contenders.num_random": 7}))


def test_runner_resumes_from_the_file_and_refuses_changes_with_fake_training(tmp_path,
                                                                              fake_training):
    """The runner's bookkeeping in seconds: training replaced by a stub that counts calls."""
    def check(config, index, seed, run_dir):
        assert run_dir.endswith(f"c{index:02d}_s{seed}") and "standalone" in config

    calls = fake_training(lambda index, seed: 0.5 + 0.01 * index + 0.001 * seed, check)
    tables = _tiny_tables(tmp_path / "tables")
    config = _tiny_config(tables)
    out, work = str(tmp_path / "effect.json"), str(tmp_path / "work")
    first = se.run_experiment(config, work, out, max_runs=4)
    planned = [tuple(o) for o in first["order"]]
    assert calls == planned[:4] and artifacts.read_json(out)["runs"] == first["runs"]
    data = se.run_experiment(config, work, out)
    assert calls == planned and [(r["arch"], r["seed"]) for r in data["runs"]] == planned
    assert se.run_experiment(config, work, out)["runs"] == data["runs"]
    assert calls == planned  # resumed: nothing trained again
    for entry, budget in zip(data["summary"], data["budgets"]):
        assert set(entry["roles"]) == set(budget["picks"])
        assert all(r["n"] == config.num_seeds for r in entry["roles"].values())
        assert entry["differences"]["dna_minus_random"]["ci95"] is not None
    assert data["pooled"] == se.pooled_comparisons(data["budgets"], data["runs"])
    assert data["pooled"]["over_budgets"]["dna_minus_size"]["difference"] is not None
    # a file whose statistics an older code wrote gets this code's, without training
    stale = artifacts.read_json(out)
    del stale["pooled"]
    artifacts.write_json(out, stale)
    assert se.run_experiment(config, work, out)["pooled"] == data["pooled"]
    assert artifacts.read_json(out)["pooled"] == data["pooled"] and calls == planned
    report = se.render_results(data)
    first_dna = data["summary"][0]["roles"]["dna"]
    assert f"| dna | #{first_dna['contender']} |" in report
    assert f"{100 * first_dna['mean']:.2f}" in report
    over = data["pooled"]["over_budgets"]["dna_minus_size"]
    assert f"{100 * over['difference']:+.2f}" in report and "over budgets" in report
    with pytest.raises(ValueError, match="another config"):
        se.run_experiment(_tiny_config(tables, **{"contenders.seed": 1}), work, out)
    _tiny_tables(tmp_path / "tables", seed=2)
    with pytest.raises(ValueError, match="other rating tables"):
        se.run_experiment(config, work, out)


@pytest.mark.slow
def test_tiny_end_to_end_resumes_and_refuses_another_config_or_tables(tmp_path):
    """Real stand-alone training (6 runs of 2 steps: about 5 minutes on a loaded 2-core CPU,
    compilation dominates)."""
    tables = _tiny_tables(tmp_path / "tables")
    overrides = {"budgets": (306_096.0,), "contenders.num_random": 1}
    config = _tiny_config(tables, **overrides)
    out, work = str(tmp_path / "effect.json"), str(tmp_path / "work")
    first = se.run_experiment(config, work, out, max_runs=3)
    assert len(first["runs"]) == 3 and first["progress"]["runs_planned"] == 6
    data = se.run_experiment(config, work, out)
    assert [(r["arch"], r["seed"]) for r in data["runs"]] == [tuple(o) for o in data["order"]]
    assert artifacts.read_json(out)["runs"] == data["runs"]
    for run in data["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["commit"] and run["machine"]
    summary = data["summary"][0]
    assert all(summary["roles"][r]["n"] == 2 for r in ("dna", "size", "random0"))
    assert summary["differences"]["dna_minus_size"]["difference"] is not None
    again = se.run_experiment(config, work, out)  # resume: nothing new is trained
    assert again["runs"] == data["runs"]
    with pytest.raises(ValueError, match="another config"):
        se.run_experiment(_tiny_config(tables, **overrides, num_seeds=3), work, out)
    other = _tiny_tables(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="another config|other rating tables"):
        se.run_experiment(_tiny_config(other, **overrides), work, out)
    # the same folder, rewritten with other scores: the digest catches it
    _tiny_tables(tmp_path / "tables", seed=2)
    with pytest.raises(ValueError, match="other rating tables"):
        se.run_experiment(config, work, out)


EXPANSION_CONFIG = os.path.join(REPO, "configs", "fmnist28_search_expansion.py")


def test_feature_pick_is_the_largest_net_at_the_features_maximum_and_changes_no_other_pick(
        tmp_path):
    tables = _tiny_tables(tmp_path / "tables")
    space = get_space("tiny")
    macs = {a: ground_truth.arch_costs(space, a, 16, 10)["macs"] for a in _all_archs(space)}
    # the restricted exact search, brute-forced: keep block 1's candidates whose first layer
    # is op 0, at budgets that cut between the networks
    keep = [np.ones(2, bool), space.block_candidates(1)[:, 0] == 0]
    config = _tiny_config(tables)
    for budget in sorted(macs.values()):
        allowed = {a: m for a, m in macs.items() if a.blocks[1][0] == 0 and m <= budget}
        if not allowed:
            with pytest.raises(ValueError, match="no architecture"):
                se.largest_under(space, config, budget, keep=keep)
            continue
        cost, ties = se.largest_under(space, config, budget, keep=keep)
        assert cost == max(allowed.values())
        assert set(ties) == {a for a, m in allowed.items() if m == cost}
    # the plan: the mean-kernel pick is the largest all-k5 network; nothing else changes
    budgets = {"budgets": (306_096.0,)}
    base = _tiny_config(tables, **budgets)
    with_feature = _tiny_config(tables, **budgets, **{"contenders.features": "mean_kernel"})
    planned, before = se.plan(with_feature), se.plan(base)
    assert [c["blocks"] for c in planned["contenders"][:len(before["contenders"])]] == \
        [c["blocks"] for c in before["contenders"]]
    entry = planned["budgets"][0]
    assert {r: i for r, i in entry["picks"].items() if r != "mean_kernel"} == \
        before["budgets"][0]["picks"]
    widest = {a: m for a, m in macs.items()
              if all(space.ops[o].kernel == 5 for block in a.blocks for o in block)}
    arch = planned["archs"][entry["picks"]["mean_kernel"]]
    assert arch in widest and macs[arch] == max(widest.values()) == entry["feature_ties"][
        "mean_kernel"]["cost"]
    assert "features" not in se._record(base)["contenders"]  # older files still match
    with pytest.raises(ValueError, match="contenders.features"):
        se.check_config(_tiny_config(tables, **{"contenders.features": "width"}))
    with pytest.raises(ValueError, match="no architecture"):  # no all-k5 net fits 296,000
        se.plan(_tiny_config(tables, **{"contenders.features": "mean_kernel"}))


def test_feature_masks_on_fmnist28_keep_exactly_the_layers_at_the_maximum():
    from dna_jax import fidelity
    space = get_space("fmnist28")
    for feature, best in (("mean_expansion", 6.0), ("mean_kernel", 7.0)):
        masks = se.feature_masks(space, feature)
        rng = np.random.default_rng(0)
        for _ in range(200):
            arch = space.sample(rng)
            inside = all(m[_candidate_row(space, b, ops)] for b, (m, ops) in
                         enumerate(zip(masks, arch.blocks)))
            value = fidelity.shape_features(space, [arch])[feature][0]
            assert inside == (value == best)
        # uniform samples almost never reach the maximum: draw inside the masks too
        for _ in range(50):
            arch = Arch.of(space.block_candidates(b)[rng.choice(np.flatnonzero(m))]
                           for b, m in enumerate(masks))
            assert fidelity.shape_features(space, [arch])[feature][0] == best
    depth = se.feature_masks(space, "depth")
    assert all(m.sum() == 6 ** space.blocks[b].num_layers for b, m in enumerate(depth))


def _candidate_row(space, b, ops):
    return int(np.flatnonzero((space.block_candidates(b) == np.asarray(ops)).all(axis=1))[0])


def test_expansion_follow_up_config_keeps_the_first_experiments_selection():
    first = artifacts.read_json(os.path.join(REPO, "results",
                                             "fmnist28_search_effectiveness.json"))
    config = config_files.load_config(EXPANSION_CONFIG)
    assert config.standalone.to_dict() == config_files.load_config(CONFIG).standalone.to_dict()
    planned = se.plan(config)
    n = len(first["contenders"])
    assert [c["blocks"] for c in planned["contenders"][:n]] == \
        [c["blocks"] for c in first["contenders"]]
    for budget in planned["budgets"]:
        arch = planned["archs"][budget["picks"]["mean_expansion"]]
        layers = [l for stage in get_space("fmnist28").to_network_spec(arch).stages[1:]
                  for l in stage]
        assert all(l.expansion == 6 for l in layers)
        assert planned["contenders"][budget["picks"]["mean_expansion"]]["macs"] <= budget["budget"]


def test_reuse_copies_the_same_networks_runs_and_trains_only_the_new_ones(
        tmp_path, fake_training, monkeypatch):
    from scipy import stats
    calls = fake_training(lambda index, seed: 0.5 + 0.01 * index + 0.003 * seed)
    tables = _tiny_tables(tmp_path / "tables")
    space = get_space("tiny")
    first_out, out = str(tmp_path / "first.json"), str(tmp_path / "follow.json")
    small = {"budgets": (306_096.0,), "contenders.num_random": 1}  # 3 of tiny's 8 networks
    first = se.run_experiment(_tiny_config(tables, **small), str(tmp_path / "w1"), first_out)
    # `tiny`'s one all-k5 network is the biggest (the size pick): the feature is made to pick
    # a network the first experiment did not train, so that the follow-up has one to train
    taken = {tuple(map(tuple, c["blocks"])) for c in first["contenders"]}
    target = next(a for a in _all_archs(space) if a.blocks not in taken)
    monkeypatch.setattr(se, "feature_masks", lambda space_, feature: [
        (space.block_candidates(b) == np.asarray(target.blocks[b])).all(axis=1)
        for b in range(len(space.blocks))])
    trained_first = len(calls)
    config = _tiny_config(tables, **small, **{"contenders.features": "mean_kernel"})
    data = se.run_experiment(config, str(tmp_path / "w2"), out, reuse=[first_out])
    new = calls[trained_first:]
    keys = {str(c["block_strings"]) for c in first["contenders"]}
    fresh = [i for i, c in enumerate(data["contenders"]) if str(c["block_strings"]) not in keys]
    assert fresh and sorted(new) == sorted((i, s) for i in fresh for s in range(config.num_seeds))
    assert len(data["runs"]) == len(data["order"])
    by_net = {(str(first["contenders"][r["arch"]]["block_strings"]), r["seed"]): r
              for r in first["runs"]}
    for run in data["runs"]:
        key = (str(data["contenders"][run["arch"]]["block_strings"]), run["seed"])
        if run["arch"] in fresh:
            assert "reused_from" not in run
        else:
            assert run["test_accuracy"] == by_net[key]["test_accuracy"]
            assert run["reused_from"]["file"].endswith("first.json")
    # dna minus the feature's pick, pooled over the budgets with the file's pooled seed SD
    acc = {}
    for r in data["runs"]:
        acc.setdefault(r["arch"], []).append(r["test_accuracy"])
    sd, df = data["pooled"]["seed_sd"]["sd"], data["pooled"]["seed_sd"]["df"]
    diffs = [np.mean(acc[b["picks"]["dna"]]) - np.mean(acc[b["picks"]["mean_kernel"]])
             for b in data["budgets"]]
    same = [b["picks"]["dna"] == b["picks"]["mean_kernel"] for b in data["budgets"]]
    var = sum(0 if s else sd ** 2 * (2 / config.num_seeds) for s in same) / len(diffs) ** 2
    over = data["pooled"]["over_budgets"]["dna_minus_mean_kernel"]
    assert over["difference"] == pytest.approx(np.mean(diffs))
    assert var > 0
    half = stats.t.ppf(0.975, df) * np.sqrt(var)
    assert over["ci95"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half])
    assert "mean_kernel_minus_size" in data["pooled"]["over_budgets"]
    assert "mean_kernel_minus_random" in data["pooled"]["over_budgets"]
    assert any(item.get("versus") == "mean_kernel" for item in data["pooled"]["per_budget"])
    report = se.render_results(data)
    assert "dna_minus_mean_kernel, over budgets" in report and "| mean_kernel |" in report
    # resumed: nothing copied or trained again; a file of another recipe is refused
    assert se.run_experiment(config, str(tmp_path / "w2"), out, reuse=[first_out])["runs"] \
        == data["runs"]
    assert len(calls) == trained_first + len(new)
    other = artifacts.read_json(first_out)
    other["recipe"]["total_steps"] = 3
    artifacts.write_json(str(tmp_path / "other.json"), other)
    with pytest.raises(ValueError, match="another stand-alone recipe"):
        se.run_experiment(config, str(tmp_path / "w3"), str(tmp_path / "x.json"),
                          reuse=[str(tmp_path / "other.json")])
    with pytest.raises(ValueError, match="no file"):
        se.reusable_runs([str(tmp_path / "missing.json")], {})
