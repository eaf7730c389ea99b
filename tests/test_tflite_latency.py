"""search.cost='tflite_ms' (issue 24): a TFLite latency table checked against the space it
costs, the pipeline's search stage under a latency budget against brute force, the errors
named before any work; and (slow) a real table measured on the TFLite interpreter.

Everything but the slow test uses synthetic tables: no TensorFlow is imported.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from dna_jax import config_files, pipeline, supervision, validate
from dna_jax import latency as lat
from dna_jax import search as S
from dna_jax import stages as stages_lib
from dna_jax.space import get_space
from dna_jax.stage_context import Context, StageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_dna.py")
COST = lat.TFLITE_COST


def synthetic_table(space, resolution=None, num_classes=10, seed=0, **meta):
    """A complete TFLite-style table of `space` with random entries (skip = 0)."""
    rng = np.random.default_rng(seed)
    entries = {key: (0.0 if key[2] == space.skip_index else float(rng.uniform(0.005, 0.3)))
               for key in lat.space_keys(space, resolution)}
    return lat.LatencyTable(entries, {
        "runtime": "tflite", "space": space.name, "space_digest": lat.space_digest(space),
        "resolution": str(resolution or space.resolution), "num_classes": str(num_classes),
        "threads": "1", "batch": "1", "fixed_ms": "0.03", **meta})


def write_rating_tables(space, folder, resolution=None, seed=0):
    rng = np.random.default_rng(seed)
    from dna_jax import costs
    for b in range(len(space.blocks)):
        enc = space.block_candidates(b)
        S.save_block_table(S.table_path(folder, space, b), S.BlockTable(
            enc, rng.uniform(0.5, 1.5, len(enc)), costs.candidate_costs(space, b, enc,
                                                                          resolution)))


def table_latency(table, space, arch_rows, resolution=None):
    """Whole-network table latency of encodings [N, B, L], by direct lookups."""
    sizes = [lat.layer_input_resolutions(space, b, resolution) for b in range(len(space.blocks))]
    return np.array([lat.fixed_latency_ms(table) + sum(
        table.lookup(b, l, op, sizes[b][l]) for b, ops in enumerate(arch)
        for l, op in enumerate(ops)) for arch in arch_rows])


# ---- the table against the space -----------------------------------------------------------

def test_a_complete_table_fits_and_its_range_brackets_every_network():
    space = get_space("small")
    table = synthetic_table(space)
    assert lat.space_table_problems(table, space, 32, 10, "tflite") == []
    assert len(lat.space_keys(space)) == 42
    low, high = lat.space_latency_range(table, space)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng).blocks for _ in range(50)]
    values = table_latency(table, space, archs)
    assert np.all((low <= values + 1e-12) & (values <= high + 1e-12))
    # the digest covers the layers, not the name
    assert lat.space_digest(space) == lat.space_digest(dataclasses.replace(space, name="x"))
    assert lat.space_digest(space) != lat.space_digest(get_space("dna_released"))


def test_an_unfitting_table_names_every_problem(tmp_path):
    space = get_space("small")
    good = synthetic_table(space)
    cases = [  # (table, fragment)
        (synthetic_table(get_space("tiny")), "measured for space 'tiny'"),
        (synthetic_table(space, resolution=64), "measured at 64 px, the search counts costs "
         "at 32 px"),
        (synthetic_table(space, num_classes=1000), "1000-class classifier, the network has "
         "10 classes"),
        (lat.LatencyTable(good.entries, {**good.meta, "runtime": "jax"}),
         "measured on runtime 'jax', not 'tflite'"),
        (lat.LatencyTable({k: v for k, v in good.entries.items() if k[:2] != (2, 1)},
                          good.meta),
         "6 of the space's 42 entries are missing: (block 2, layer 1, mb6_k3 = op 0, 2 px)"),
    ]
    for table, fragment in cases:
        path = tmp_path / "table.csv"
        lat.save_latency_table(path, table)
        with pytest.raises(ValueError) as error:
            lat.load_space_latency(path, space, 32, 10, "tflite")
        message = str(error.value)
        assert fragment in message, message
        assert "benchmarks/measure_latency.py --runtime tflite --space small --resolution " \
            "32 --num-classes 10" in message
    with pytest.raises(ValueError, match="does not exist"):
        lat.load_space_latency(tmp_path / "missing.csv", space)
    many = lat.LatencyTable({}, good.meta)
    (problem,) = lat.space_table_problems(many, space, 32)
    assert "42 of the space's 42 entries are missing" in problem and "and 34 more" in problem


# ---- the search stage under a TFLite latency budget ------------------------------------------

def _context(tmp_path, space_name="small", **search):
    """A search-stage Context over synthetic rating tables (no teacher: 10 classes)."""
    overrides = {"distill.space": space_name, "rate.cost_resolution": 0, "data.image_size": 32,
                 **{f"search.{k}": v for k, v in search.items()}}
    config = pipeline.complete_config(config_files.load_config(CONFIG, "tiny", **overrides))
    kind = dataclasses.replace(supervision.of(config), num_classes=lambda ctx: 10,
                               reference_costs=lambda ctx: {})
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    ctx = Context(config=config, workdir=str(tmp_path), mesh=mesh,
                  digests=pipeline.stage_digests(config), kind=kind)
    write_rating_tables(ctx.space, ctx.stage_dir("rate"))
    os.makedirs(ctx.stage_dir("search"), exist_ok=True)
    return ctx


def test_the_search_stage_under_a_tflite_budget_equals_brute_force(tmp_path):
    space = get_space("small")
    table = synthetic_table(space, seed=1)
    path = tmp_path / "tflite_small.json"
    lat.save_latency_table(path, table)
    rng = np.random.default_rng(0)
    budget = float(np.median(table_latency(table, space, [space.sample(rng).blocks
                                                          for _ in range(200)]))) + 1e-9
    ctx = _context(tmp_path / "run", cost=COST, budget=budget, latency_table=str(path), top_k=5)
    figures = stages_lib.run_search(ctx)

    tables = stages_lib.load_tables(ctx)
    fixed = S.space_fixed_costs(space, 32, 10)
    fixed_ms = lat.fixed_latency_ms(table)

    # Whole-network latency by direct lookups (not the stage's columns), per block candidate.
    per_block = [np.array([table_latency(table, space, [[enc if c == b else ()
                                                         for c in range(len(tables))]])[0]
                           for enc in t.encodings]) - fixed_ms for b, t in enumerate(tables)]

    def network_ms(indices):
        return fixed_ms + sum(per_block[b][indices[:, b]] for b in range(len(tables)))

    expected = S.brute_force_search(tables, {"network_ms": budget}, k=5, fixed_cost=fixed,
                                    cost_fns={"network_ms": network_ms},
                                    max_compositions=300_000)
    got = json.load(open(os.path.join(ctx.stage_dir("search"), "results.json")))
    assert [r["encodings"] for r in got] == [[list(map(int, e)) for e in r.encodings]
                                            for r in expected]
    assert [r["objective"] for r in got] == pytest.approx([r.objective for r in expected])
    for r, e in zip(got, expected):
        assert r["costs"][COST] == pytest.approx(e.costs["network_ms"]) and \
            r["costs"][COST] <= budget
    assert figures["budgets"] == {COST: budget}
    assert figures["latency_table"]["path"] == str(path)
    assert figures["latency_table"]["fixed_ms"] == "0.03"
    assert len(figures["latency_table"]["sha256"]) == 64

    # The exact front over tflite_ms: every brute-force non-dominated point, fixed part added.
    with_latency, fixed_all, _ = stages_lib.add_table_latency(ctx, tables, fixed, 10)
    front = S.pareto_front(with_latency, COST, fixed_cost=fixed_all)
    indices, obj, _ = S.enumerate_compositions(with_latency, (), max_compositions=300_000)
    cost = network_ms(indices)
    order = np.lexsort((obj, cost))
    best = np.minimum.accumulate(obj[order])
    on_front = order[np.r_[True, obj[order][1:] < best[:-1]]]
    np.testing.assert_allclose(front.cost, cost[on_front], rtol=1e-12)
    np.testing.assert_allclose(front.objective, obj[on_front], rtol=1e-12)
    assert fixed_all[COST] == fixed_ms and front.cost[0] >= fixed_ms


def test_the_search_stage_refuses_a_table_of_another_space(tmp_path):
    path = tmp_path / "tflite_tiny.csv"
    lat.save_latency_table(path, synthetic_table(get_space("tiny")))
    ctx = _context(tmp_path / "run", cost=COST, budget=1.0, latency_table=str(path))
    with pytest.raises(StageError, match="measured for space 'tiny'.*not for these layers of "
                       "space 'small'"):
        stages_lib.run_search(ctx)
    ctx = _context(tmp_path / "run2", cost=COST, budget=0.0, latency_table="")
    with pytest.raises(StageError, match="needs search.latency_table"):
        stages_lib.add_table_latency(ctx, [], {}, 10)


# ---- the same problems named before any work --------------------------------------------------

def _tiny(**overrides):
    return config_files.load_config(CONFIG, "tiny", **overrides)


def test_bad_tflite_search_values_are_named_before_any_work(tmp_path):
    tiny = get_space("tiny")  # the tiny config: 16 px, 10 classes
    good = tmp_path / "good.csv"
    lat.save_latency_table(good, synthetic_table(tiny, resolution=16))
    low, high = lat.space_latency_range(lat.load_latency_table(good), tiny, 16)
    pipeline.check_config(_tiny(**{"search.cost": COST, "search.budget": high,
                                   "search.latency_table": str(good)}))
    other = tmp_path / "small.csv"
    lat.save_latency_table(other, synthetic_table(get_space("small")))
    cases = [  # (search overrides, fragments)
        ({"latency_table": str(good)}, ["config.search.budget=0.0", "needs an absolute budget "
                                        "in milliseconds"]),
        ({"budget": 1.0}, ["config.search.latency_table=''", "--runtime tflite --space tiny "
                           "--resolution 16 --num-classes 10"]),
        ({"budget": 1.0, "latency_table": str(tmp_path / "none.csv")},
         ["none.csv: latency table file does not exist"]),
        ({"budget": 1.0, "latency_table": str(other)},
         ["measured for space 'small'", "measured at 32 px"]),
        ({"budget": low / 2, "latency_table": str(good)},
         [f"config.search.budget={low / 2!r}: is below every network of space 'tiny' at 16 px",
          f"cheapest network {low:.4g} ms"]),
        ({"budget": high, "latency_table": str(good), "params_budget": 10.0},
         ["config.search.params_budget=10.0", "raise it to at least"]),
    ]
    for search, fragments in cases:
        overrides = {"search.cost": COST, **{f"search.{k}": v for k, v in search.items()}}
        with pytest.raises(validate.ConfigError) as error:
            pipeline.check_config(_tiny(**overrides))
        message = str(error.value)
        assert len(error.value.problems) == 1, message
        for fragment in fragments:
            assert fragment in message, (fragment, message)
    with pytest.raises(ValueError, match="search.cost must be one of .*'tflite_ms'"):
        pipeline.check_config(_tiny(**{"search.cost": "latency"}))


def test_the_new_field_keeps_old_stage_hashes():
    config = _tiny()
    assert "latency_table" not in pipeline.stage_config(config, "search")["search"]
    changed = _tiny(**{"search.latency_table": "t.csv"})
    assert pipeline.stage_digests(changed)["search"] != pipeline.stage_digests(config)["search"]


# ---- a real table (TensorFlow) ----------------------------------------------------------------

@pytest.mark.slow
def test_a_measured_tflite_table_of_the_tiny_space_is_accepted(tmp_path):
    from dna_jax import tflite_latency
    space = get_space("tiny")
    timer = tflite_latency.TfliteTimer(repeats=3, warmup=1, cache_dir=str(tmp_path / "cache"))
    table = tflite_latency.measure_space_table(space, timer, 16, num_classes=10)
    assert lat.space_table_problems(table, space, 16, 10, "tflite") == []
    assert table.meta["threads"] == "1" and table.meta["batch"] == "1"
    assert float(table.meta["fixed_ms"]) > 0 and all(v > 0 for v in table.entries.values())
    converted = timer.conversions
    again = tflite_latency.TfliteTimer(repeats=3, warmup=1, cache_dir=str(tmp_path / "cache"))
    tflite_latency.measure_space_table(space, again, 16, num_classes=10)
    assert again.conversions == 0 and converted == len(timer.samples)
    # Whole networks, their invokes interleaved over rounds, and the runner's statistics.
    archs = [get_space("tiny").sample(np.random.default_rng(i)) for i in range(2)]
    timer = tflite_latency.TfliteTimer(repeats=4, warmup=1, statistic="median")
    ms = timer.time_networks(space, archs, 16, 10, rounds=2)
    assert len(ms) == 2 and all(m > 0 for m in ms)
    assert all(len(v) == 4 for v in timer.samples.values())
    from dna_jax import deploy
    runner = deploy.TfliteRunner(deploy.tflite_bytes(lambda x: x * 2.0, (1, 1, 1, 8)))
    assert runner.times_ms(5, 1).shape == (5,)
    assert 0 < runner.time_ms(5, 1, statistic="min") <= runner.time_ms(50, 1) * 10
    with pytest.raises(ValueError, match="statistic must be one of"):
        runner.time_ms(statistic="mean")
