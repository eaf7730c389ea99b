"""DNA+ (dna_jax.progressive): rounds where the retrained winner teaches the next round.

One tiny two-round run (`configs/fashion_mnist_dna_plus.py:tiny`: 16 px Fashion-MNIST, a few
steps per stage, round 2's winner scaled x1.5 in width) is shared by the module: every round's
artifacts, the round-2 teacher being round 1's retrained winner, the re-aligned supernet, the
summary / report / plot, the command line, a run killed in round 2 that resumes there, and the
stopping rule. The re-alignment rule itself and the stored-architecture teacher checkpoints are
tested on their own (cheap, no training).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import (artifacts, config_files, pipeline, progressive, stage_context, stages,
                     supervision)
from dna_jax import teacher as teacher_lib
from dna_jax.models import zoo
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.supernet import block_input_channels, build_supernet_blocks
from dna_jax.netspec import NetworkSpec
from dna_jax.space import align_space, get_space

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_dna_plus.py")


def plus_config(arg="tiny", **overrides):
    return config_files.load_config(CONFIG, arg, **overrides)


def _manifest(workdir, r, stage):
    return artifacts.read_manifest(os.path.join(workdir, f"round_{r}", stage))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, figures) of one complete tiny two-round run."""
    workdir = str(tmp_path_factory.mktemp("dna_plus"))
    return workdir, progressive.run_progressive(plus_config(), workdir)


# ---- the tiny two-round run --------------------------------------------------------------------


def test_two_rounds_write_every_artifact_and_the_summary(finished):
    workdir, figures = finished
    assert figures["rounds_run"] == 2 and not figures["stopped_early"]
    assert figures["stop_reason"] is None
    for r, row in enumerate(figures["rounds"], start=1):
        assert row["round"] == r
        assert row["stages"] == {s: "ran" for s in supervision.get("teacher").stages}
        for stage in supervision.get("teacher").stages:
            assert _manifest(workdir, r, stage)["stage"] == stage
        for key in ("teacher_accuracy", "winner_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert row["improvement"] == pytest.approx(row["winner_accuracy"]
                                                   - row["teacher_accuracy"])
        assert row["wall_seconds"] > 0
    assert [a["round"] for a in figures["round_accuracies"]] == [1, 2]
    assert figures["final_accuracy"] == figures["rounds"][1]["winner_accuracy"]
    summary = artifacts.read_json(os.path.join(workdir, progressive.SUMMARY_FILE))
    assert summary["rounds"][1]["winner_macs"] == figures["rounds"][1]["winner_macs"]
    report = open(os.path.join(workdir, progressive.REPORT_FILE)).read()
    assert re.search(r"^\| 1 \| configured: tiny_teacher \|", report, re.M), report
    assert re.search(r"^\| 2 \| round 1 winner \|", report, re.M), report
    assert "Every planned round ran." in report
    with open(os.path.join(workdir, progressive.PLOT_FILE), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_round1_winner_teaches_round2_whose_winner_is_scaled(finished):
    workdir, figures = finished
    one, two = figures["rounds"]
    assert (one["width_multiplier"], one["depth_multiplier"]) == (1.0, 1.0)
    assert one["winner_macs"] == one["searched_macs"]
    assert one["winner_macs"] <= 0.5 * one["teacher_macs"]
    # Round 2's teacher is round 1's retrained winner: same costs, same test accuracy.
    teacher = _manifest(workdir, 2, "teacher")["figures"]
    assert teacher["source"] == "checkpoint"
    assert teacher["checkpoint"] == os.path.join(workdir, "round_1", "retrain", "network")
    assert two["teacher_macs"] == one["winner_macs"]
    assert two["teacher_params"] == one["winner_params"]
    assert two["teacher_accuracy"] == pytest.approx(one["winner_accuracy"], abs=1e-6)
    # Round 2 searched under its teacher's full cost (budget fraction 1.0), then its winner
    # was scaled x1.5 in width: the tiny space's widths 8 (first layer) / 12 / 16 become
    # make_divisible(12, 18, 24) = 16 / 24 / 24, and the network grew.
    assert two["budget_fraction"] == 1.0
    assert two["searched_macs"] <= two["teacher_macs"]
    assert (two["width_multiplier"], two["depth_multiplier"]) == (1.5, 1.0)
    strings = _manifest(workdir, 2, "retrain")["figures"]["block_strings"]
    assert [int(re.search(r"_c(\d+)", stage[-1]).group(1)) for stage in strings] == [16, 24, 24]
    assert two["winner_macs"] > two["searched_macs"]
    # ... and was saved as a teacher checkpoint for a next round, architecture included.
    spec = teacher_lib.teacher_network_spec(
        "", os.path.join(workdir, "round_2", "retrain", "network"))
    assert spec.stage_channels == (16, 24, 24) and spec.stem_channels == 16


def _supernet_out_widths(workdir, r):
    """Output channels of the last layer's ops of every supernet block (from its manifest)."""
    shapes = artifacts.read_json(os.path.join(workdir, f"round_{r}", "distill", "supernet",
                                              "supernet.json"))["shapes"]
    widths = {}
    for key, (shape, _) in shapes.items():
        match = re.match(r"\['block(\d)'\]\['params'\]\['layers_(\d)'\]\['ops_\d'\]"
                         r"\['conv_pwl'\]\['conv'\]\['kernel'\]", key)
        if match:
            k, l = int(match.group(1)), int(match.group(2))
            if l == get_space("tiny").blocks[k].num_layers - 1:
                widths.setdefault(k, set()).add(shape[-1])
    return [widths[k] for k in sorted(widths)]


def test_round2_supernet_is_realigned_to_the_winner(finished):
    workdir, _ = finished
    # Round 1 regresses tiny_teacher's stages 1, 2 (16, 24 channels); round 2 round 1's
    # winner's stages 1, 2 (the space's hidden widths 12, 16).
    assert _supernet_out_widths(workdir, 1) == [{16}, {24}]
    assert _supernet_out_widths(workdir, 2) == [{12}, {16}]
    # The retrained child networks still have the space's hidden widths (12, 16) before scaling.
    arch = json.loads(_manifest(workdir, 2, "search")["figures"]["arch"])
    assert arch["space"] == "tiny"
    strings = _manifest(workdir, 2, "search")["figures"]["block_strings"]
    assert [int(re.search(r"_c(\d+)", stage[-1]).group(1)) for stage in strings] == [8, 12, 16]


def test_main_prints_per_round_accuracies(finished):
    """`python -m dna_jax.main` on the finished workdir: all skipped, one JSON last line."""
    workdir, figures = finished
    out = subprocess.run(
        [sys.executable, "-m", "dna_jax.main", f"--config={CONFIG}:tiny", f"--workdir={workdir}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["round_accuracies"] == figures["round_accuracies"]
    assert [row["stages"] for row in last["rounds"]] == [
        {s: "skipped" for s in supervision.get("teacher").stages}] * 2


class _Killed(Exception):
    pass


def _copy_rounds(source, target, round2_stages):
    shutil.copytree(os.path.join(source, "round_1"), os.path.join(target, "round_1"))
    for stage in round2_stages:
        shutil.copytree(os.path.join(source, "round_2", stage),
                        os.path.join(target, "round_2", stage))


def test_killed_in_round2_resumes_in_round2(finished, tmp_path, monkeypatch):
    workdir, figures = finished
    killed = str(tmp_path / "killed")
    # A run that finished round 1 and round 2's first four stages, then died in retraining.
    _copy_rounds(workdir, killed, ("teacher", "distill", "rate", "search"))

    def dying_retrain(ctx):
        raise _Killed(f"killed in {ctx.workdir}")

    monkeypatch.setitem(pipeline.RUNNERS, "retrain", dying_retrain)
    with pytest.raises(_Killed, match="round_2"):
        progressive.run_progressive(plus_config(), killed)
    assert os.path.exists(os.path.join(killed, "round_2", "retrain", pipeline.STARTED_FILE))
    monkeypatch.undo()

    resumed = progressive.run_progressive(plus_config(), killed)
    one, two = resumed["rounds"]
    assert one["stages"] == {s: "skipped" for s in supervision.get("teacher").stages}
    assert two["stages"] == {"teacher": "skipped", "distill": "skipped", "rate": "skipped",
                             "search": "skipped", "retrain": "ran", "deploy": "ran",
                             "report": "ran"}
    # The same figures as the uninterrupted run.
    for key in ("teacher_accuracy", "winner_macs", "winner_params", "searched_macs"):
        assert two[key] == figures["rounds"][1][key], key
    assert two["winner_accuracy"] == pytest.approx(figures["rounds"][1]["winner_accuracy"],
                                                   abs=1e-6)


def test_stopping_rule_stops_after_round1_and_says_so(finished, tmp_path):
    workdir, figures = finished
    stopped = str(tmp_path / "stopped")
    _copy_rounds(workdir, stopped, ())
    config = plus_config(**{"progressive.stop_early": True, "progressive.stop_margin": 1.0})
    result = progressive.run_progressive(config, stopped)
    assert result["rounds_run"] == 1 and result["stopped_early"]
    assert "stop_margin 1" in result["stop_reason"] and "rounds 2..2 not run" in result[
        "stop_reason"]
    assert result["rounds"][0]["winner_accuracy"] == figures["rounds"][0]["winner_accuracy"]
    assert not os.path.exists(os.path.join(stopped, "round_2"))
    summary = artifacts.read_json(os.path.join(stopped, progressive.SUMMARY_FILE))
    assert summary["stopped_early"] and summary["stop_reason"] == result["stop_reason"]
    assert "**Stopped early**" in open(os.path.join(stopped, progressive.REPORT_FILE)).read()


def test_missing_previous_network_is_named(finished, tmp_path):
    workdir, _ = finished
    old = str(tmp_path / "old")
    _copy_rounds(workdir, old, ())
    shutil.rmtree(os.path.join(old, "round_1", "retrain", pipeline.RETRAINED_NETWORK))
    with pytest.raises(pipeline.StageError, match=r"round 2's teacher .*round_1/retrain/network"):
        progressive.run_progressive(plus_config(), old)
    assert not os.path.exists(os.path.join(old, "round_2"))


# ---- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,field", [
    ({"progressive.rounds": 0}, "progressive.rounds"),
    ({"progressive.width_multipliers": (1.5,)}, "progressive.width_multipliers"),
    ({"progressive.depth_multipliers": (1.0, -1.0)}, "progressive.depth_multipliers"),
    ({"progressive.budget_fractions": (0.5, 1.0, 1.0)}, "progressive.budget_fractions"),
    ({"stages": "teacher,distill"}, "config.stages"),
])
def test_bad_progressive_config_names_the_field(overrides, field, tmp_path):
    with pytest.raises(ValueError, match=re.escape(field)):
        progressive.run_progressive(plus_config(**overrides), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_round_configs():
    config = plus_config(arg=None)
    # Round 1 is the DNA demo: same stage hashes, so its artifacts can be reused.
    one = progressive.round_config(config, 1)
    assert pipeline.stage_digests(one) == pipeline.stage_digests(
        config_files.load_config(os.path.join(REPO, "configs", "fashion_mnist_dna.py")))
    two = progressive.round_config(config, 2)
    assert two.teacher.checkpoint == "{workdir}/../round_1/retrain/network"
    assert stage_context.resolve_workdir_path(two.teacher.checkpoint, "/w/round_2") == (
        "/w/round_1/retrain/network")
    assert two.teacher.align_space and two.search.budget_fraction == 1.0
    # Round 2's hashes follow round 1's: a changed round-1 retrain invalidates round 2.
    changed = plus_config(arg=None, **{"retrain.total_steps": 7})
    assert (pipeline.stage_digests(progressive.round_config(changed, 2))["teacher"]
            != pipeline.stage_digests(two)["teacher"])


# ---- re-alignment ------------------------------------------------------------------------------


def _scaled_small_child():
    space = get_space("small")
    arch = space.sample(np.random.default_rng(0))
    return stages.scale_network_spec(space.to_network_spec(arch), 1.4, 1.2)


def test_align_reproduces_the_presets():
    for space, teacher in (("small", "fmnist_teacher"), ("tiny", "tiny_teacher"),
                           ("dna_paper", "efficientnet_b7"), ("dna_released", "efficientnet_b7")):
        assert align_space(get_space(space), zoo.get_network_spec(teacher)) == get_space(space)


def test_align_to_a_scaled_winner_and_to_b0():
    small = get_space("small")
    child = _scaled_small_child()
    assert child.stage_channels == (16, 24, 32, 64, 88)  # unlike fmnist_teacher's 24/40/80/96
    aligned = align_space(small, child)
    assert [b.out_channels for b in aligned.blocks] == [24, 32, 64, 88]
    assert [b.teacher_stage for b in aligned.blocks] == [1, 2, 3, 4]
    assert [b.stride for b in aligned.blocks] == [b.stride for b in small.blocks]
    assert [b.hidden_channels for b in aligned.blocks] == [16, 24, 48, 64]
    assert aligned.name == "small" and aligned.size() == small.size()
    assert block_input_channels(aligned, child) == [3, 24, 32, 64]
    with pytest.raises(ValueError, match="block 1 .*outputs 40 channels"):
        block_input_channels(small, child)
    # The paper's space with a B0 teacher (B7's widths are 48/80/160/224/384/640).
    b0 = align_space(get_space("dna_paper"), zoo.get_network_spec("efficientnet_b0"))
    assert [b.out_channels for b in b0.blocks] == [24, 40, 80, 112, 192, 320]
    assert [b.stride for b in b0.blocks] == [2, 2, 2, 1, 2, 1]


def test_align_takes_the_teachers_last_stages():
    # Four stages for two blocks: block 0 also covers stages 0-1 (stem + first layer).
    teacher = NetworkSpec.from_strings(
        "deep", 8, [["ds_r1_k3_s1_c8"], ["ir_r1_k3_s1_e3_c12"], ["ir_r2_k3_s2_e3_c20"],
                    ["ir_r1_k3_s2_e3_c28"]], 32, stem_stride=1)
    aligned = align_space(get_space("tiny"), teacher)
    assert [(b.teacher_stage, b.out_channels, b.stride) for b in aligned.blocks] == [
        (2, 20, 2), (3, 28, 2)]
    assert block_input_channels(aligned, teacher) == [3, 20]


def test_align_errors_name_the_block_and_stage():
    with pytest.raises(ValueError, match=r"block 0 \(block0\).*stage 3.*must be 1 or 2"):
        align_space(get_space("tiny"), zoo.get_network_spec("fmnist_teacher"))
    with pytest.raises(ValueError, match="at least 7 stages.*has 3"):
        align_space(get_space("dna_paper"), zoo.get_network_spec("tiny_teacher"))


def test_realigned_blocks_map_teacher_features_to_teacher_features():
    """Each re-aligned supernet block maps its input teacher feature to the shape of its
    target teacher feature (width and resolution), for every op (abstract evaluation)."""
    child = _scaled_small_child()
    space = align_space(get_space("small"), child)
    teacher = EfficientNet(spec=child, num_classes=10)
    image = jax.ShapeDtypeStruct((2, 20, 20, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: teacher.init(jax.random.key(0), x), image)
    features = jax.eval_shape(lambda v, x: teacher.apply(v, x, method=EfficientNet.forward_stages),
                              variables, image)
    for k, block in enumerate(build_supernet_blocks(space, child)):
        stage = space.blocks[k].teacher_stage
        x = image if k == 0 else features[f"stage{stage - 1}"]
        for op in space.layer_choices(k, 0):
            path = jnp.asarray([op] * space.blocks[k].num_layers, jnp.int32)
            out = jax.eval_shape(lambda x, p=path: block.init_with_output(
                jax.random.key(0), x, p, False)[0], x)
            assert out.shape == features[f"stage{stage}"].shape, (k, op)


# ---- teachers with a stored architecture -------------------------------------------------------


def test_teacher_checkpoint_with_a_stored_architecture(tmp_path):
    spec = NetworkSpec.from_strings("winner", 8, [["ds_r1_k3_s1_c8_se0.25"],
                                                  ["ir_r2_k5_s2_e3_c24_se0.25"]], 32, 1)
    module = EfficientNet(spec=spec, num_classes=10)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    path = str(tmp_path / "net")
    teacher_lib.save_teacher(path, "winner", variables, 10, spec=spec,
                             layer_config=module.layer_config)
    assert teacher_lib.teacher_network_spec("ignored", path) == spec
    for name in ("winner", ""):
        loaded, restored = teacher_lib.load_teacher(name, path)
        assert loaded.spec == spec and loaded.num_classes == 10
        np.testing.assert_array_equal(restored["params"]["classifier"]["kernel"],
                                      variables["params"]["classifier"]["kernel"])
    with pytest.raises(teacher_lib.TeacherCheckpointError, match="'other' requested"):
        teacher_lib.load_teacher("other", path)
    with pytest.raises(teacher_lib.TeacherCheckpointError, match="5 requested"):
        teacher_lib.load_teacher("winner", path, num_classes=5)
