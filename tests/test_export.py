"""Export: search result -> arch.json + child network (Orbax), weight inheritance, CLI."""

import json
import os

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import cli, costs
from dna_jax import export as E
from dna_jax import search as S
from dna_jax import space as sp
from dna_jax.models.supernet import SupernetBlock
from dna_jax.netspec import LayerSpec

RES = 16
CLASSES = 5


def tiny_space() -> sp.SearchSpace:
    """Two blocks, two ops (+ skip in block1). Block0's hidden width equals its teacher width
    (12), so all of block0 and block1's first layer fit the child exactly; block1's last layer
    maps to the teacher's 16 channels in the supernet, 12 in the child."""
    blocks = (sp.BlockSpec("block0", 2, 12, 12, 2, 1),
              sp.BlockSpec("block1", 2, 12, 16, 2, 2, allow_skip=True))
    return sp.SearchSpace(name="tiny_export", blocks=blocks, ops=(sp.DNA_OPS[0], sp.DNA_OPS[3]),
                          stem_channels=8, stem_stride=1,
                          first_layer=LayerSpec("ds", 3, 1, 1, 8, 0.25), head_channels=32,
                          resolution=RES)


def write_tables(space, folder, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for b in range(len(space.blocks)):
        enc = space.block_candidates(b)
        table = S.BlockTable(enc, rng.uniform(0.5, 1.5, len(enc)),
                             costs.candidate_costs(space, b, enc))
        S.save_block_table(S.table_path(folder, space, b), table)


def supernet_variables(space):
    """Random supernet variables of the right shapes (no initialiser to compile)."""
    inputs = {0: jnp.zeros((1, RES, RES, 3)), 1: jnp.zeros((1, RES // 2, RES // 2, 12))}
    rng = np.random.default_rng(10)
    out = {}
    for k, channels in enumerate((3, 12)):
        block = SupernetBlock(space, k, channels)
        shapes = jax.eval_shape(lambda x, b=block: b.init(jax.random.key(0), x, jnp.zeros(
            2, jnp.int32), train=False), inputs[k])
        out[f"block{k}"] = jax.tree.map(
            lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    space = tiny_space()
    folder = tmp_path_factory.mktemp("export")
    write_tables(space, folder / "rate")
    tables = S.load_space_tables(folder / "rate", space)
    fixed = S.space_fixed_costs(space, RES, CLASSES)
    front = S.pareto_front(tables, "macs", fixed_cost=fixed)
    # A budget whose best network uses block1's second layer (not the skip op 2).
    deep = [i for i in range(len(front)) if front.result(i).encodings[1][1] != 2]
    result = front.result(deep[-1])
    assert S.best_under_budget(tables, {"macs": result.costs["macs"]},
                               fixed_cost=fixed).indices == result.indices
    supernet = supernet_variables(space)
    summary = E.export_winner(space, result, str(folder / "winner"), num_classes=CLASSES,
                              resolution=RES, supernet_variables=supernet, seed=3)
    return space, result, supernet, summary, str(folder / "winner")


def test_export_costs_equal_search_and_costs_py(exported):
    space, result, _, summary, out = exported
    arch = sp.Arch.of(result.encodings)
    expected = costs.network_costs(space.to_network_spec(arch), RES, CLASSES).total
    for name in ("params", "macs", "dna_flops"):
        assert summary[name] == result.costs[name] == getattr(expected, name)
    assert summary["params_in_variables"] == expected.params
    assert summary["search_costs_match"] and summary["cost_mismatch"] == {}
    assert summary["search"]["indices"] == list(result.indices)
    assert summary["ops"] == {"block0": [space.op_name(o) for o in arch.blocks[0]],
                              "block1": [space.op_name(o) for o in arch.blocks[1]]}
    data = json.loads(open(os.path.join(out, "arch.json")).read())
    assert sp.Arch.from_json(json.dumps(data)) == arch
    assert data["block_strings"] == summary["block_strings"] == \
        space.to_network_spec(arch).to_strings()
    assert space.arch_from_strings(data["block_strings"]) == arch
    assert json.loads(open(os.path.join(out, E.SUMMARY_FILE)).read()) == summary


def test_checkpoint_restores_and_inherits_what_fits(exported):
    space, result, supernet, summary, out = exported
    module, variables, arch = E.load_exported(out, space=space)
    assert arch == sp.Arch.of(result.encodings)
    report = json.loads(open(os.path.join(out, E.INHERITANCE_FILE)).read())
    assert len(report["inherited"]) == summary["inherited_leaves"] > 0
    assert len(report["fresh"]) == summary["fresh_leaves"] > 0
    flat = traverse_util.flatten_dict(variables)
    assert {"/".join(k) for k in flat} == set(report["inherited"]) | \
        {p for p, _ in report["fresh"]}
    sources = E.supernet_sources(space, arch)
    for path in report["inherited"]:
        key = tuple(path.split("/"))
        block, prefix = sources[key[1]]
        source = supernet[block][key[0]]
        for part in (*prefix, *key[2:]):
            source = source[part]
        np.testing.assert_array_equal(flat[key], np.asarray(source), err_msg=path)
    units = {tuple(p.split("/")[1:3]) for p in report["inherited"]}
    fresh_units = {tuple(p.split("/")[1:3]) for p, _ in report["fresh"]}
    # Everything up to block1's last layer fits; that one only up to its projection (teacher
    # width 16 != hidden 12); head and classifier have no counterpart.
    layers = ("conv_pw", "conv_dw", "se", "conv_pwl")
    assert {("stem", "conv"), ("stem", "bn"), ("blocks_0", "conv_dw")} <= units
    assert {(f"blocks_{i}", u) for i in (1, 2, 3) for u in layers} <= units
    assert {("blocks_4", "conv_pw"), ("blocks_4", "conv_dw"), ("blocks_4", "se")} <= units
    assert fresh_units == {("blocks_4", "conv_pwl"), ("head", "conv"), ("head", "bn"),
                           ("classifier", "kernel"), ("classifier", "bias")}
    reasons = dict(report["fresh"])
    # The whole unit is fresh for the first mismatch found in it (BN statistics: 12 vs 16).
    assert reasons["params/blocks_4/conv_pwl/conv/kernel"] == (
        "batch_stats/blocks_4/conv_pwl/bn/mean has shape (12,), "
        "block1/batch_stats/layers_1/ops_1/conv_pwl/bn/mean (16,)".replace(
            "ops_1", f"ops_{arch.blocks[1][1]}"))
    assert reasons["params/head/conv/kernel"] == "no supernet counterpart"


def test_skip_ops_have_no_child_layer():
    space = tiny_space()
    sources = E.supernet_sources(space, sp.Arch.of([[0, 1], [1, 2]]))
    assert sources == {"stem": ("block0", ("stem",)), "blocks_0": ("block0", ("first",)),
                       "blocks_1": ("block0", ("layers_0", "ops_0")),
                       "blocks_2": ("block0", ("layers_1", "ops_1")),
                       "blocks_3": ("block1", ("layers_0", "ops_1"))}
    assert len(space.to_network_spec(sp.Arch.of([[0, 1], [1, 2]])).stages[2]) == 1


def test_inherited_layers_compute_what_the_supernet_computes(exported):
    space, result, supernet, _, out = exported
    module, variables, arch = E.load_exported(out, space=space)
    x = jax.random.normal(jax.random.key(0), (2, RES, RES, 3))
    block0, block1 = SupernetBlock(space, 0, 3), SupernetBlock(space, 1, 12)
    op = arch.blocks[1][0]
    h = jax.random.normal(jax.random.key(1), (2, RES // 2, RES // 2, 12))

    @jax.jit  # one compilation is cheaper than running these layers op by op
    def both(variables, supernet, x, h):
        child = (module.apply(variables, x, 0, 1, False, method=module.forward_stages)["stage0"],
                 module.apply(variables, h, method=lambda m, y: m.blocks[3](y, False)))
        parent = (block0.apply(supernet["block0"], x, False, method=block0.prepare_input),
                  block1.apply(supernet["block1"], h, 0, op, False, method=block1.apply_op))
        return child, parent

    child, parent = both(variables, supernet, x, h)
    for c, p in zip(child, parent):  # stem + first layer; block1's first layer (teacher input)
        np.testing.assert_allclose(c, p, rtol=1e-5, atol=1e-5)


def test_export_bad_input(exported, tmp_path):
    space, _, supernet, _, _ = exported
    with pytest.raises(ValueError, match=r"block 0 \(block0\), layer 1: this block does not "
                                         r"allow skip ops"):
        E.export_winner(space, sp.Arch.of([[0, 2], [0, 0]]), str(tmp_path), num_classes=2)
    with pytest.raises(ValueError, match="supernet variables have no 'block1'"):
        E.inherit_supernet_weights(space, sp.Arch.of([[0, 0], [0, 0]]), {},
                                   {"block0": supernet["block0"]})
    with pytest.raises(ValueError, match="no complete export"):
        E.load_exported(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        E.load_supernet_variables(str(tmp_path / "nope"))


def run_cli(capsys, *argv):
    assert cli.main(["export", *argv]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_cli_export_from_tables_and_from_arch_json(tmp_path, capsys, monkeypatch):
    space = tiny_space()
    monkeypatch.setitem(sp.PRESETS, space.name, tiny_space)
    write_tables(space, tmp_path / "rate", seed=1)
    tables = S.load_space_tables(tmp_path / "rate", space)
    fixed = S.space_fixed_costs(space, RES, CLASSES)
    macs = S.pareto_front(tables, "macs", fixed_cost=fixed).cost
    budget = int(np.median(macs))
    expected = S.best_under_budget(tables, {"macs": budget}, fixed_cost=fixed)
    lines, figures = run_cli(capsys, "--space", space.name, "--table-dir",
                             str(tmp_path / "rate"), "--budget", f"macs={budget}",
                             "--num-classes", str(CLASSES))
    assert figures["out_dir"] == str(tmp_path / "export")
    assert figures["arch"] == [list(e) for e in expected.encodings]
    assert figures["macs"] == expected.costs["macs"] <= budget
    assert figures["params"] == expected.costs["params"] and figures["search_costs_match"]
    assert any(line.startswith("  block1 ") for line in lines)
    out = tmp_path / "again"
    _, again = run_cli(capsys, "--space", space.name, "--arch",
                       str(tmp_path / "export" / "arch.json"), "--num-classes", str(CLASSES),
                       "--out", str(out))
    assert again["arch"] == figures["arch"] and again["params"] == figures["params"]
    assert (out / E.SUMMARY_FILE).exists()
    # A budget below every network names the cheapest possible cost.
    with pytest.raises(SystemExit, match=f"cheapest possible macs is {int(macs[0])}"):
        cli.main(["export", "--space", space.name, "--table-dir", str(tmp_path / "rate"),
                  "--budget", f"macs={int(macs[0]) - 1}", "--num-classes", str(CLASSES)])
    with pytest.raises(SystemExit, match="block1.npz: block table file does not exist"):
        os.remove(tmp_path / "rate" / "block1.npz")
        cli.main(["export", "--space", space.name, "--table-dir", str(tmp_path / "rate"),
                  "--budget", "macs=1G"])
    with pytest.raises(SystemExit, match="budget 'macs' must look like"):
        cli.main(["export", "--space", space.name, "--table-dir", str(tmp_path / "rate"),
                  "--budget", "macs"])


def test_supernet_checkpoint_layouts(exported, tmp_path):
    import orbax.checkpoint as ocp
    _, _, supernet, _, _ = exported
    state = {"params": {k: v["params"] for k, v in supernet.items()},
             "batch_stats": {k: v["batch_stats"] for k, v in supernet.items()},
             "step": np.asarray(7)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(tmp_path / "variables"), jax.device_get(supernet))
    checkpointer.save(str(tmp_path / "manager" / "12" / "default"), jax.device_get(state))
    checkpointer.save(str(tmp_path / "other"), {"weights": np.zeros(3)})
    checkpointer.wait_until_finished()
    for folder in ("variables", "manager"):
        loaded = E.load_supernet_variables(str(tmp_path / folder))
        assert sorted(loaded) == ["block0", "block1"]
        for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(jax.device_get(supernet))):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="other: expected supernet variables .* found: weights"):
        E.load_supernet_variables(str(tmp_path / "other"))


def test_cli_supernet_folders_and_unwritable_out(exported, tmp_path, capsys, monkeypatch):
    from dna_jax import distill, teacher
    from dna_jax.supernet import artifact as artifact_lib
    space, _, supernet, _, winner = exported
    monkeypatch.setitem(sp.PRESETS, space.name, tiny_space)
    arch = os.path.join(winner, E.ARCH_FILE)
    common = ["--space", space.name, "--arch", arch, "--num-classes", str(CLASSES),
              "--resolution", str(RES)]
    # The pipeline's artifact folder (<workdir>/distill/supernet) and its variables/ both work.
    artifact = str(tmp_path / "W" / "distill" / "supernet")
    artifact_lib.save_supernet(artifact, jax.device_get(supernet))
    for folder in (artifact, os.path.join(artifact, artifact_lib.SUPERNET_ITEM)):
        _, figures = run_cli(capsys, *common, "--out", str(tmp_path / "out"), "--supernet",
                             folder)
        assert figures["from_supernet"] and figures["inherited_leaves"] > 0
    # One network's variables (here the exported child's) or a teacher are named as such.
    with pytest.raises(SystemExit, match="one network's variables .* not a supernet's .* "
                                         "<workdir>/distill/supernet"):
        cli.main(["export", *common, "--supernet", os.path.join(winner, E.VARIABLES_DIR)])
    fake_teacher = tmp_path / "teacher"
    os.makedirs(fake_teacher / teacher.VARIABLES_DIR)
    (fake_teacher / teacher.METADATA_FILE).write_text("{}")
    for folder in (fake_teacher, fake_teacher / teacher.VARIABLES_DIR):
        with pytest.raises(SystemExit, match="is a teacher checkpoint .* not a supernet"):
            cli.main(["export", *common, "--supernet", str(folder)])
    # An --out that cannot be written is one line, not a traceback.
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the export .* choose a writable --out"):
        cli.main(["export", *common, "--out", str(tmp_path / "file" / "export")])
