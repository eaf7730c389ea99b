"""Search: exact front and budgets against brute force, beam, original DNA search, tables, I/O."""

import dataclasses
import json
import os

import numpy as np
import pytest

from dna_jax import latency as lat
from dna_jax import search as S
from dna_jax.search import exact as search_exact, fronts as search_fronts, problem as search_problem

SEEDS = (0, 1, 2, 3)


def small_tables(seed: int, ties: bool, num_blocks: int = 3, num_layers: int = 2,
                 num_ops: int = 6) -> list[S.BlockTable]:
    """Brute-forceable tables; with `ties`, scores on a 1/8 grid and small integer costs."""
    if ties:
        return S.synthetic_block_tables(seed, num_blocks, num_layers, num_ops,
                                        integer_scores=True, cost_levels=5)
    return S.synthetic_block_tables(seed, num_blocks, num_layers, num_ops, noise=0.1)


def brute(tables, names=("macs",), **kwargs):
    return S.enumerate_compositions(tables, names, **kwargs)


def budget_points(costs: np.ndarray) -> list[float]:
    """Budgets spread over the range, including exact cost values (boundary cases)."""
    points = list(np.quantile(costs, [0.05, 0.3, 0.6, 0.95]))
    return points + [float(np.sort(costs)[len(costs) // 3])]


def objectives(results) -> list[float]:
    return [r.objective for r in results]


# ---- Pareto front ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_front_is_sorted_nondominated_and_complete(seed, ties):
    tables = small_tables(seed, ties)
    front = S.pareto_front(tables, "macs")
    assert np.all(np.diff(front.cost) > 0) and np.all(np.diff(front.objective) < 0)
    _, obj, cost = brute(tables)
    # Non-dominated: no composition is at least as good on both and better on one.
    for c, o in zip(front.cost, front.objective):
        assert not np.any((cost[:, 0] <= c) & (obj <= o) & ((cost[:, 0] < c) | (obj < o)))
    # Complete: every brute-force non-dominated value pair is on the front.
    order = np.lexsort((obj, cost[:, 0]))
    running = np.minimum.accumulate(obj[order])
    is_front = np.r_[True, obj[order][1:] < running[:-1]]
    expected = {(cost[i, 0], obj[i]) for i in order[is_front]}
    expected = {(c, min(o for cc, o in expected if cc == c)) for c, _ in expected}
    assert set(zip(front.cost.tolist(), front.objective.tolist())) == expected
    # Every point decodes to candidates with exactly that cost and objective.
    for i in range(len(front)):
        result = front.result(i)
        assert result.costs["macs"] == front.cost[i]
        assert result.objective == front.objective[i]


def test_front_fixed_cost_and_best_under():
    tables = small_tables(0, False)
    front = S.pareto_front(tables, "macs", fixed_cost=1000)
    plain = S.pareto_front(tables, "macs")
    np.testing.assert_array_equal(front.cost, plain.cost + 1000)
    budget = float(front.cost[len(front) // 2])
    result = front.best_under(budget)
    assert result.costs["macs"] == budget
    assert result.objective == S.search(tables, {"macs": budget}, fixed_cost=1000)[0].objective
    with pytest.raises(ValueError, match="cheapest possible macs is"):
        front.best_under(float(front.cost[0]) - 1)


# ---- exact search against brute force ----------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_one_cost_budgets_match_brute_force(seed, ties):
    tables = small_tables(seed, ties)
    _, _, cost = brute(tables)
    for budget in budget_points(cost[:, 0]):
        for spec, k in [(budget, 1), (budget, 5), ((0.8 * budget, budget), 3),
                        ((budget, None), 2)]:
            expected = S.brute_force_search(tables, {"macs": spec}, k=k)
            got = S.search(tables, {"macs": spec}, k=k)
            assert objectives(got) == objectives(expected), (spec, k)
            low, high = S.parse_budgets({"macs": spec})["macs"]
            assert all(low <= r.costs["macs"] <= high for r in got)
            assert len({r.indices for r in got}) == len(got)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_two_costs_match_brute_force(seed, ties):
    tables = small_tables(seed, ties)
    _, _, cost = brute(tables, ("macs", "params"))
    rng = np.random.default_rng(seed)
    for _ in range(4):
        macs, params = np.quantile(cost[:, 0], rng.uniform(0.2, 0.9)), \
            np.quantile(cost[:, 1], rng.uniform(0.2, 0.9))
        for budgets, k in [({"macs": macs, "params": params}, 1),
                           ({"macs": macs, "params": params}, 4),
                           ({"macs": (0.7 * macs, macs), "params": params}, 2),
                           ({"macs": macs, "params": (0.5 * params, None)}, 1)]:
            try:
                expected = S.brute_force_search(tables, budgets, k=k)
            except ValueError:
                with pytest.raises(ValueError, match="no architecture meets"):
                    S.search(tables, budgets, k=k)
                continue
            got = S.search(tables, budgets, k=k)
            assert objectives(got) == objectives(expected), (budgets, k)


def test_level_search_engine_matches_front_on_plain_budget():
    """The branch and bound (used for top-k, intervals, two costs) on the front's own case."""
    tables = small_tables(5, False, num_blocks=4)
    _, _, cost = brute(tables)
    for budget in budget_points(cost[:, 0]):
        problem = search_problem.make_problem(tables, {"macs": budget}, 0.0, "sum", False)
        exact = search_exact.branch_and_bound(problem, 1, None)[0]
        assert exact.objective == S.search(tables, {"macs": budget})[0].objective


@pytest.mark.parametrize("k", [1, 2])
def test_dominance_pruning_keeps_what_exactness_needs(k):
    """Dropped points have >= k kept weak dominators; undominated points always survive.

    (Ties on the sort key may also keep a few dominated points: harmless, only slower.)
    """
    rng = np.random.default_rng(k)
    n = 300
    obj = rng.integers(0, 6, n).astype(float)
    cost = rng.integers(0, 6, (n, 2)).astype(float)
    for low, high in [((-np.inf, -np.inf), (10, 10)), ((-np.inf, 3), (10, 10)),
                      ((-np.inf, 2), (10, np.inf)), ((-np.inf, -np.inf), (10, np.inf)),
                      ((1, 2), (10, 10))]:
        low, high = np.array(low, float), np.array(high, float)
        kept = np.zeros(n, bool)
        kept[search_fronts.dominance_keep(obj, cost, low, high, k)] = True
        used = np.isfinite(low) | np.isfinite(high)  # a cost with no bound plays no part
        signed = np.stack([np.where(np.isinf(low[j]), cost[:, j], -cost[:, j])
                           for j in range(2) if used[j]], 1)
        equal = np.isfinite(low) & np.isfinite(high)
        for i in range(n):
            better = (obj <= obj[i]) & np.all(signed <= signed[i], axis=1) & \
                np.all(cost[:, equal] == cost[i, equal], axis=1)
            better[i] = False
            if not kept[i]:
                assert (better & kept).sum() >= k
            if not better.any():
                assert kept[i]
        assert kept.sum() < n  # it does prune


def test_max_states_guard():
    tables = small_tables(0, False, num_blocks=4)
    _, _, cost = brute(tables, ("macs",))
    with pytest.raises(RuntimeError, match="max_states"):
        S.search(tables, {"macs": (None, float(np.median(cost)))}, k=50, max_states=5)


def test_more_than_two_costs_needs_beam():
    tables = small_tables(0, False)
    budgets = {"macs": 1e12, "params": 1e12, "latency": 1e12}
    with pytest.raises(ValueError, match="at most two"):
        S.search(tables, budgets)
    assert S.beam_search(tables, budgets, width=10**6)[0].objective == \
        S.brute_force_search(tables, budgets)[0].objective


# ---- beam search -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_wide_beam_equals_exact_and_narrow_beam_is_feasible(seed):
    tables = small_tables(seed, seed % 2 == 1)
    _, _, cost = brute(tables, ("macs", "params"))
    budgets = {"macs": float(np.median(cost[:, 0])), "params": float(np.median(cost[:, 1]))}
    exact = S.search(tables, budgets, k=3)
    wide = S.beam_search(tables, budgets, width=36 * 36, k=3)
    assert objectives(wide) == objectives(exact)
    narrow = S.beam_search(tables, budgets, width=1)[0]
    assert narrow.objective >= exact[0].objective
    assert narrow.costs["macs"] <= budgets["macs"] and narrow.costs["params"] <= budgets["params"]


def test_beam_with_non_additive_cost_callable():
    tables = small_tables(1, False)
    block_latency = [t.costs["latency"] for t in tables]

    def network_latency(choice: np.ndarray) -> np.ndarray:
        per_block = np.stack([block_latency[b][choice[:, b]] for b in range(len(tables))], 1)
        return per_block.sum(1) + 0.5 * per_block.max(1) + 3.0  # not a sum over blocks

    values = network_latency(brute(tables)[0])
    for limit in np.quantile(values, [0.1, 0.5, 0.9]):
        budgets = {"latency_net": float(limit)}
        fns = {"latency_net": network_latency}
        expected = S.brute_force_search(tables, budgets, cost_fns=fns, k=2)
        for prune in (True, False):
            got = S.beam_search(tables, budgets, cost_fns=fns, width=36 * 36, k=2,
                                prune_partial=prune)
            assert objectives(got) == objectives(expected)
            assert all(r.costs["latency_net"] <= limit for r in got)


def test_beam_reports_when_it_finds_nothing():
    tables = [S.BlockTable(np.arange(2)[:, None], [0.0, 1.0], {"macs": [10, 0]}),
              S.BlockTable(np.arange(2)[:, None], [0.0, 1.0], {"macs": [10, 0]})]
    # Only (1, 1) meets the callable's lower bound; a width-1 beam keeps block 0's row 0.
    fns = {"both": lambda choice: (choice.sum(1) == 2).astype(float)}
    with pytest.raises(ValueError, match="found none"):
        S.beam_search(tables, {"both": (0.5, None)}, cost_fns=fns, width=1, prune_partial=False)
    assert S.beam_search(tables, {"both": (0.5, None)}, cost_fns=fns, width=2,
                         prune_partial=False)[0].indices == (1, 1)


# ---- score combination -------------------------------------------------------------------------

def test_product_equals_sum_of_logs_and_can_choose_differently():
    # Block 0: (score 1, cost 1) or (score 10, cost 0); block 1: (2, 0) or (0.1, 1).
    tables = [S.BlockTable(np.arange(2)[:, None], [1.0, 10.0], {"macs": [1, 0]}),
              S.BlockTable(np.arange(2)[:, None], [2.0, 0.1], {"macs": [0, 1]})]
    by_sum = S.search(tables, {"macs": 1})[0]
    by_product = S.search(tables, {"macs": 1}, combine="product")[0]
    assert by_sum.indices == (0, 0) and by_sum.score == 3.0      # 1 + 2 < 10 + 0.1
    assert by_product.indices == (1, 1)                          # 10 * 0.1 < 1 * 2
    assert by_product.score == pytest.approx(1.0)
    assert by_product.objective == pytest.approx(np.log(10.0) + np.log(0.1))
    for seed in SEEDS:
        tables = small_tables(seed, False)
        indices, _, cost = brute(tables)
        product = np.prod([t.score[indices[:, b]] for b, t in enumerate(tables)], axis=0)
        budget = float(np.median(cost))
        best = np.min(product[cost[:, 0] <= budget])
        assert S.search(tables, {"macs": budget}, combine="product")[0].score == \
            pytest.approx(best, rel=1e-12)


def test_standardisation_z_scores_each_block():
    # Block 1's scores spread 100x wider: raw sums are decided by block 1 alone.
    tables = [S.BlockTable(np.arange(3)[:, None], [0.0, 1.0, 2.0], {"macs": [2, 1, 0]}),
              S.BlockTable(np.arange(3)[:, None], [0.0, 99.0, 100.0], {"macs": [2, 1, 0]})]
    terms = S.block_objectives(tables, standardize=True)
    for t in terms:
        assert t.mean() == pytest.approx(0.0) and t.std() == pytest.approx(1.0)
    raw = S.search(tables, {"macs": 2})[0]
    standardised = S.search(tables, {"macs": 2}, standardize=True)[0]
    # Budget 2 allows (2, 0), (1, 1), (0, 2) (and dearer-free mixes with i + j >= 2).
    assert raw.indices == (2, 0)            # raw: 2 + 0 beats 1 + 99 and 0 + 100
    # z-scores: block 0 is [-1.22, 0, 1.22], block 1 [-1.41, 0.70, 0.72]; (0, 2) = -0.51 wins.
    assert standardised.indices == (0, 2)
    assert standardised.objective == pytest.approx(min(
        terms[0][i] + terms[1][j] for i in range(3) for j in range(3) if (2 - i) + (2 - j) <= 2))
    for seed in SEEDS:
        tables = small_tables(seed, False)
        _, _, cost = brute(tables)
        budgets = {"macs": float(np.median(cost))}
        assert S.search(tables, budgets, standardize=True, k=3)[0].objective == \
            S.brute_force_search(tables, budgets, standardize=True)[0].objective


def test_score_combination_errors():
    tables = [S.BlockTable(np.arange(2)[:, None], [0.0, 1.0], {"macs": [1, 0]})]
    with pytest.raises(ValueError, match="positive scores"):
        S.search(tables, {"macs": 1}, combine="product")
    with pytest.raises(ValueError, match="standardize"):
        S.search(tables, {"macs": 1}, combine="product", standardize=True)
    with pytest.raises(ValueError, match="combine must be one of"):
        S.search(tables, {"macs": 1}, combine="max")


# ---- the original DNA search -------------------------------------------------------------------

def test_original_search_is_feasible_and_never_better_than_exact():
    misses = 0
    for seed in range(12):
        tables = small_tables(seed, seed % 2 == 0)
        _, _, cost = brute(tables)
        for budget in budget_points(cost[:, 0]):
            exact = S.search(tables, {"macs": budget})[0]
            original = S.original_dna_search(tables, "macs", budget)
            assert original is not None  # a network exists, and the outer loop sees all
            assert original.costs["macs"] <= budget
            assert original.objective >= exact.objective
            misses += original.objective > exact.objective
    assert misses < 60  # it is usually right on such small tables


def test_original_search_misses_the_optimum_on_a_constructed_case():
    # Candidates listed best score first. The prefix (A0, B1) leaves room only for C1, so the
    # innermost bound becomes "ranks < 1". The later, better prefix (A1, B0) then only tries
    # C0, which does not fit; its optimum completion C1 is never tried.
    def block(scores, costs):
        return S.BlockTable(np.arange(2)[:, None], scores, {"macs": costs})

    tables = [block([0.0, 1.0], [6, 0]), block([0.0, 5.0], [6, 0]), block([0.0, 1.0], [10, 0])]
    exact = S.search(tables, {"macs": 10})[0]
    original = S.original_dna_search(tables, "macs", 10)
    assert exact.indices == (1, 0, 1) and exact.objective == 2.0
    assert original.indices == (0, 1, 1) and original.objective == 6.0
    assert S.brute_force_search(tables, {"macs": 10})[0].objective == 2.0


def test_original_search_bounds_and_none():
    tables = small_tables(0, False, num_blocks=3)
    with pytest.raises(RuntimeError, match="max_visits"):
        S.original_dna_search(tables, "macs", 1e12, max_visits=10)
    # Feasible only through a prefix the stage maxima allow: the heuristic still returns it.
    tiny = [S.BlockTable(np.arange(2)[:, None], [0.0, 1.0], {"macs": [5, 1]})] * 2
    assert S.original_dna_search(tiny, "macs", 2).indices == (1, 1)
    with pytest.raises(ValueError, match="cheapest possible macs is 2"):
        S.original_dna_search(tiny, "macs", 1)


# ---- tables: validation, I/O -------------------------------------------------------------------

def test_block_table_round_trip(tmp_path):
    table = small_tables(0, False)[0]
    path = tmp_path / "block0.npz"
    S.save_block_table(path, table)
    loaded = S.load_block_table(path, required_costs=("macs", "params"))
    np.testing.assert_array_equal(loaded.encodings, table.encodings)
    np.testing.assert_array_equal(loaded.score, table.score)
    assert loaded.cost_names == table.cost_names
    for name in table.costs:
        np.testing.assert_array_equal(loaded.costs[name], table.costs[name])
        assert loaded.costs[name].dtype == table.costs[name].dtype
    assert loaded.source == str(path)
    assert sorted(os.listdir(tmp_path)) == ["block0.npz"]  # no temporary files left


def test_bad_tables_name_the_file_and_the_problem(tmp_path):
    enc = np.zeros((3, 2), np.int32)
    cases = {
        "empty": (np.zeros((0, 2), np.int32), np.zeros(0), {}, "empty"),
        "lengths": (enc, np.zeros(2), {}, "score has shape"),
        "nan": (enc, np.array([0.0, np.nan, 1.0]), {}, "NaN"),
        "cost_len": (enc, np.zeros(3), {"macs": np.zeros(4)}, "cost 'macs' has shape"),
        "cost_inf": (enc, np.zeros(3), {"macs": np.array([0, np.inf, 1])}, "non-finite"),
    }
    for name, (e, s, c, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, encodings=e, score=s, **{f"cost_{k}": v for k, v in c.items()})
        with pytest.raises(ValueError, match=message) as info:
            S.load_block_table(path)
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="does not exist"):
        S.load_block_table(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable"):
        S.load_block_table(tmp_path / "junk.npz")
    np.savez(tmp_path / "nocost.npz", encodings=enc, score=np.zeros(3), cost_params=np.zeros(3))
    with pytest.raises(ValueError, match=r"nocost.npz: missing cost 'macs' \(has: params\)"):
        S.load_block_table(tmp_path / "nocost.npz", required_costs=("macs",))
    table = S.load_block_table(tmp_path / "nocost.npz")
    with pytest.raises(ValueError, match="nocost.npz: block table has no cost 'macs'"):
        S.search([table], {"macs": 1.0})
    with pytest.raises(ValueError, match="encodings must be 2-D"):
        S.BlockTable(np.zeros(3, np.int32), np.zeros(3), {})


def test_impossible_budgets_name_the_cheapest_cost():
    tables = small_tables(0, False)
    least = sum(int(t.costs["macs"].min()) for t in tables)
    with pytest.raises(ValueError, match=f"cheapest possible macs is {least + 100} "):
        S.search(tables, {"macs": least + 99}, fixed_cost=100)
    most = sum(int(t.costs["macs"].max()) for t in tables)
    with pytest.raises(ValueError, match=f"largest possible macs is {most} "):
        S.search(tables, {"macs": (most + 1, None)})
    # Each budget reachable alone, not together: the error names the least params under macs.
    # Each block trades macs for params: macs <= 5 forces params 20, so params <= 5 fails.
    trade = [S.BlockTable(np.arange(2)[:, None], [0.0, 0.0], {"macs": [0, 10],
                                                              "params": [10, 0]})] * 2
    with pytest.raises(ValueError, match="no architecture meets macs <= 5 and params <= 5 "
                                         r"\(the least params of any network meeting the macs "
                                         r"budget is 20\); cheapest possible: macs 0, params 0"):
        S.search(trade, {"macs": 5, "params": 5})
    with pytest.raises(ValueError, match="plain number"):
        S.search(tables, {"macs": 1e12, "params": 1e12}, fixed_cost=5)


def test_result_costs_include_fixed_parts_and_encodings():
    tables = small_tables(2, False)
    fixed = {"macs": 1000, "params": 10}
    result = S.search(tables, {"macs": 1e12}, fixed_cost=fixed)[0]
    for name in ("macs", "params"):
        blocks = sum(int(t.costs[name][i]) for t, i in zip(tables, result.indices))
        assert result.costs[name] == blocks + fixed[name]
    assert result.encodings == tuple(tuple(int(o) for o in t.encodings[i])
                                     for t, i in zip(tables, result.indices))
    assert result.to_dict()["encodings"] == [list(e) for e in result.encodings]


# ---- plots, latency tables ---------------------------------------------------------------------

def test_plots_write_png(tmp_path):
    tables = small_tables(0, False)
    front = S.pareto_front(tables, "macs")
    chosen = [front.best_under(float(np.median(front.cost)))]
    S.plot_pareto_front(front, tmp_path / "front.png", chosen=chosen)
    S.plot_score_histograms(tables, tmp_path / "hist.png")
    for name in ("front.png", "hist.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_latency_table_round_trip_and_lookup(tmp_path, suffix):
    rng = np.random.default_rng(0)
    entries = {(b, l, o, r): float(rng.uniform(0, 2))
               for b in range(2) for l in range(2) for o in range(3) for r in (16, 8)}
    table = lat.LatencyTable(entries, {"device": "cpu", "batch": "1"})
    path = tmp_path / f"lat{suffix}"
    lat.save_latency_table(path, table)
    loaded = lat.load_latency_table(path)
    assert loaded.entries == table.entries and loaded.meta == table.meta
    block = S.BlockTable(np.array([[0, 2], [1, 1]]), [0.0, 1.0], {"macs": [1, 2]})
    with_latency = lat.add_latency_cost(block, loaded, 1, resolutions=(16, 8))
    np.testing.assert_allclose(with_latency.costs["latency"],
                               [entries[(1, 0, 0, 16)] + entries[(1, 1, 2, 8)],
                                entries[(1, 0, 1, 16)] + entries[(1, 1, 1, 8)]])
    with pytest.raises(ValueError, match="no latency for block 1, layer 0, op 0, resolution 32"):
        loaded.candidate_latency(1, np.array([[0, 0]]), (32, 8))


def test_latency_table_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        lat.load_latency_table(tmp_path / "x.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("block,layer,op,resolution,latency_ms\n0,0,0,16,1.0\n0,0,0,16,2.0\n")
    with pytest.raises(ValueError, match="line 3: duplicate"):
        lat.load_latency_table(bad)
    bad.write_text("block,layer,op,resolution,latency_ms\n0,0,0,16,-1\n")
    with pytest.raises(ValueError, match="line 2: latency must be finite and >= 0"):
        lat.load_latency_table(bad)
    bad.write_text("b,l,o,r,ms\n")
    with pytest.raises(ValueError, match="header must be"):
        lat.load_latency_table(bad)
    bad.write_text("block,layer,op,resolution,latency_ms\n0,0,1.5,16,1\n")
    with pytest.raises(ValueError, match="line 2: '1.5' is not an integer"):
        lat.load_latency_table(bad)


def test_table_latency_cost_is_searched_exactly():
    tables = small_tables(3, False)
    entries = {(b, l, o, 8): float(o + l + 0.25 * b) for b in range(3) for l in range(2)
               for o in range(6)}
    latency = lat.LatencyTable(entries)
    tables = [lat.add_latency_cost(t, latency, b, (8, 8), name="lat") for b, t in
              enumerate(tables)]
    budgets = {"lat": 8.0, "macs": float(np.median(brute(tables)[2]))}
    assert S.search(tables, budgets)[0].objective == \
        S.brute_force_search(tables, budgets)[0].objective


# ---- tables of a search space: consistency, fixed parts, budget strings ------------------------

def write_space_tables(space, folder, resolution=None):
    from dna_jax import costs
    rng = np.random.default_rng(0)
    for b in range(len(space.blocks)):
        enc = space.block_candidates(b)
        S.save_block_table(S.table_path(folder, space, b), S.BlockTable(
            enc, rng.uniform(0.5, 1.5, len(enc)), costs.candidate_costs(space, b, enc,
                                                                          resolution)))


def test_space_tables_give_whole_network_costs(tmp_path):
    from dna_jax import costs
    from dna_jax import space as sp
    space = sp.get_space("small")
    write_space_tables(space, tmp_path)
    tables = S.load_space_tables(tmp_path, space)
    assert [len(t) for t in tables] == [space.block_size(b) for b in range(len(space.blocks))]
    fixed = S.space_fixed_costs(space, num_classes=10)
    assert fixed == costs.fixed_costs(space, num_classes=10).as_dict()  # no fixed blocks
    front = S.pareto_front(tables, "macs", fixed_cost=fixed)
    for i in (0, len(front) // 2, len(front) - 1):
        result = front.result(i)
        arch = sp.Arch.of(result.encodings)
        total = costs.network_costs(space.to_network_spec(arch), space.resolution, 10).total
        assert result.costs == total.as_dict()
    # A fixed block: its table may be missing (one candidate, score 0); counted once.
    fixed_space = dataclasses.replace(space, blocks=space.blocks[:-1] + (
        dataclasses.replace(space.blocks[-1], fixed_ops=(3,)),))
    os.remove(S.table_path(tmp_path, space, 3))
    tables = S.load_space_tables(tmp_path, fixed_space)
    assert tables[3].encodings.tolist() == [[3]] and tables[3].score.tolist() == [0.0]
    fixed = S.space_fixed_costs(fixed_space, num_classes=10)
    result = S.best_under_budget(tables, {"macs": 1e12}, fixed_cost=fixed)
    arch = sp.Arch.of(result.encodings)
    total = costs.network_costs(fixed_space.to_network_spec(arch), space.resolution, 10).total
    assert result.costs == total.as_dict() and result.encodings[3] == (3,)


def test_inconsistent_space_tables_name_the_file_and_the_problem(tmp_path):
    from dna_jax import space as sp
    space = sp.get_space("small")
    with pytest.raises(ValueError, match="rating table folder does not exist"):
        S.load_space_tables(tmp_path / "none", space)
    write_space_tables(space, tmp_path, resolution=64)
    path = S.table_path(tmp_path, space, 0)
    from dna_jax import costs as analytic
    macs_64 = int(analytic.candidate_costs(space, 0, np.asarray([[0, 0]]), 64)["macs"][0])
    with pytest.raises(ValueError, match=f"{path}: macs of candidate \\[0, 0\\] is {macs_64}, but "
                                         f"space 'small' at resolution 32 gives"):
        S.load_space_tables(tmp_path, space)
    assert len(S.load_space_tables(tmp_path, space, resolution=64)) == 4
    assert len(S.load_space_tables(tmp_path, space, check_costs=False)) == 4
    good = S.load_block_table(path)
    cases = {
        "layers": (good.encodings[:, :1], "encodings have 1 layers, but block 0"),
        "op": (np.where(good.encodings == 5, 6, good.encodings),
               "uses op 6 in layer 0, which block 0 \\(block0\\) of space 'small' does not "
               "allow"),
        "repeat": (np.concatenate([good.encodings[:-1], good.encodings[:1]]),
                   "candidate \\[0, 0\\] appears 2 times"),
    }
    for name, (encodings, message) in cases.items():
        S.save_block_table(path, S.BlockTable(encodings, good.score[:len(encodings)], {}))
        with pytest.raises(ValueError, match=message) as info:
            S.load_space_tables(tmp_path, space, resolution=64)
        assert str(path) in str(info.value), name
    os.remove(path)
    with pytest.raises(ValueError, match="block0.npz: block table file does not exist"):
        S.load_space_tables(tmp_path, space)


def test_budget_strings():
    assert S.parse_budget_strings(["macs=460M", "params=:5.5e6"]) == \
        {"macs": 460e6, "params": (None, 5.5e6)}
    assert S.parse_budget_strings(["dna_flops=1k:2G"]) == {"dna_flops": (1e3, 2e9)}
    for bad, message in (("macs", "must look like"), ("macs=abc", "'abc' is not a number"),
                         ("macs=:", "bounds nothing"), ("macs=inf", "not finite")):
        with pytest.raises(ValueError, match=message):
            S.parse_budget_strings([bad])
    with pytest.raises(ValueError, match="given twice"):
        S.parse_budget_strings(["macs=1", "macs=2"])


def test_space_latency_columns_and_fixed_part(tmp_path):
    from dna_jax import space as sp
    space = sp.get_space("small")
    # The stride-2 stem halves the resolution before block 0.
    assert lat.layer_input_resolutions(space, 0) == (16, 8)
    assert [lat.layer_input_resolutions(space, b, 64) for b in range(4)] == \
        [(32, 16), (16, 8), (8, 4), (4,)]
    entries = {(b, l, o, r): 0.5 * b + 0.25 * l + 0.125 * o
               for b in range(4) for l, r in enumerate(lat.layer_input_resolutions(space, b))
               for o in range(6)}
    table = lat.LatencyTable(entries, {"fixed_ms": "1.5"})
    write_space_tables(space, tmp_path)
    tables = lat.add_space_latency(S.load_space_tables(tmp_path, space), table, space)
    fixed = {**S.space_fixed_costs(space, num_classes=10), "latency": lat.fixed_latency_ms(table)}
    result = S.best_under_budget(tables, {"latency": 8.0, "macs": 1e12}, fixed_cost=fixed)
    expected = 1.5 + sum(0.5 * b + 0.25 * l + 0.125 * o
                         for b, ops in enumerate(result.encodings) for l, o in enumerate(ops))
    assert result.costs["latency"] == pytest.approx(expected) and expected <= 8.0
    assert result.objective == S.brute_force_search(
        tables, {"latency": 8.0 - 1.5}, max_compositions=300_000)[0].objective
    with pytest.raises(ValueError, match="3 tables for the 4 blocks"):
        lat.add_space_latency(tables[:3], table, space)
    with pytest.raises(ValueError, match="meta fixed_ms is not a number"):
        lat.fixed_latency_ms(lat.LatencyTable({}, {"fixed_ms": "fast"}))


@pytest.mark.slow
def test_measure_latency_script_writes_a_loadable_table(tmp_path):
    import subprocess
    import sys
    from dna_jax import space as sp
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "lat.json"
    run = subprocess.run([sys.executable, "benchmarks/measure_latency.py", "--space", "small",
                          "--runs", "1", "--warmup", "1", "--out", str(out)], cwd=root,
                         capture_output=True, text=True, timeout=900, check=True)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    space = sp.get_space("small")
    table = lat.load_latency_table(out)
    assert figures["entries"] == len(table.entries) == 6 * 7
    assert lat.fixed_latency_ms(table) == pytest.approx(figures["fixed_ms"])
    assert figures["fixed_ms"] > 0
    for b in range(4):
        lat.add_latency_cost(S.BlockTable(space.block_candidates(b), np.zeros(
            space.block_size(b)), {}), table, b, lat.layer_input_resolutions(space, b))
