"""timm -> Flax EfficientNet conversion: parity with timm, strict name table, teacher checkpoints.

Parity tests build timm models with random weights (no download), randomise BatchNorm statistics
and biases so that every converted tensor matters, and compare logits, the stem and every stage
at max abs error <= 1e-4 in float32. They need the optional `port` extra (torch, timm) and skip
without it; the teacher checkpoint tests run everywhere.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dna_jax import teacher
from dna_jax.models import zoo
from dna_jax.models.layers import TORCH_CONFIG
from dna_jax.porting import timm as port

import torchvision_shim  # tests/ is on sys.path (pytest rootdir-relative import)

TOLERANCE = 1e-4
# Non-square, and small: stride-2 layers see even (80, 72, 40, ...) and odd (9, 5) inputs, so
# TF 'same' padding is exercised on both of its asymmetric cases.
IMAGE_HW = (80, 72)


def _import_torch_timm():
    torch = pytest.importorskip("torch")
    # PyPI's torchvision (CUDA-linked) cannot load beside the CPU torch build: timm only needs
    # it at import time, so placeholders stand in (tests/torchvision_shim.py).
    torchvision_shim.install_if_broken()
    try:
        import timm  # pylint: disable=import-outside-toplevel
    except Exception as e:  # pylint: disable=broad-except
        pytest.skip(f"timm is not usable here: {type(e).__name__}: {e}")
    return torch, timm


@pytest.fixture(scope="module")
def timm_model():
    """Factory of timm EfficientNets with random weights, BatchNorm stats and biases (cached)."""
    torch, timm = _import_torch_timm()
    cache = {}

    def make(name: str, seed: int = 0, keep: bool = True):
        if name not in cache:
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False).eval()
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, torch.nn.BatchNorm2d):
                        module.weight.uniform_(0.5, 1.5, generator=generator)
                        module.bias.normal_(0.0, 0.2, generator=generator)
                        module.running_mean.normal_(0.0, 0.2, generator=generator)
                        module.running_var.uniform_(0.5, 2.0, generator=generator)
                for conv in (model.modules()):
                    if isinstance(conv, torch.nn.Conv2d) and conv.bias is not None:
                        conv.bias.normal_(0.0, 0.1, generator=generator)  # SE biases
                model.classifier.weight.normal_(0.0, 0.05, generator=generator)
                model.classifier.bias.normal_(0.0, 0.1, generator=generator)
            if not keep:
                return model
            cache[name] = model
        return cache[name]

    return make


def _images(seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3) + IMAGE_HW).astype(np.float32)


def _state_dict(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_parity(name, torch_model, variables):
    errors, scales = port.compare_with_timm(torch_model, zoo.get_model(name), variables,
                                            _images())
    print(f"\n{name}: max abs error " + ", ".join(f"{k} {v:.2e} (|timm| {scales[k]:.2f})"
                                                   for k, v in errors.items()))
    assert set(errors) == {"logits", "stem"} | {f"stage{i}" for i in range(7)}
    # The random network must not have collapsed, or a small error would prove nothing.
    assert min(scales.values()) > 0.1, scales
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, f"{name}: max abs error above {TOLERANCE}: {bad}"
    return errors


# ------------------------------------------------------------------------------------------------
# Parity with timm (needs torch + timm)


@pytest.mark.port
@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "efficientnet_b0", "tf_efficientnet_b2"])
def test_logits_and_stage_features_match_timm(name, timm_model):
    torch_model = timm_model(name)
    variables = port.convert_state_dict(name, torch_model.state_dict())
    _assert_parity(name, torch_model, variables)


@pytest.mark.port
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tf_efficientnet_b7", "efficientnet_b7", "efficientnet_b3"])
def test_large_variants_match_timm(name, timm_model):
    torch_model = timm_model(name)
    variables = port.convert_state_dict(name, torch_model.state_dict())
    _assert_parity(name, torch_model, variables)


@pytest.mark.port
@pytest.mark.slow
@pytest.mark.parametrize("name", port.SUPPORTED_MODELS)
def test_every_supported_model_converts(name, timm_model):
    torch_model = timm_model(name, keep=False)
    variables = port.convert_state_dict(name, torch_model.state_dict())
    assert len(jax.tree.leaves(variables)) == sum(
        not k.endswith("num_batches_tracked") for k in torch_model.state_dict())


@pytest.mark.port
def test_wrong_layer_options_break_parity(timm_model):
    """The parity check has teeth: TF weights run with PyTorch padding/eps are far off."""
    name = "tf_efficientnet_b0"
    torch_model = timm_model(name)
    variables = port.convert_state_dict(name, torch_model.state_dict())
    wrong = zoo.get_model(name, layer_config=TORCH_CONFIG)
    errors, _ = port.compare_with_timm(torch_model, wrong, variables, _images())
    assert errors["stem"] > 100 * TOLERANCE and errors["logits"] > TOLERANCE


# ------------------------------------------------------------------------------------------------
# The converter refuses weights that do not fit, listing every problem at once


@pytest.mark.port
def test_b0_weights_for_b2_are_refused(timm_model):
    state = timm_model("tf_efficientnet_b0").state_dict()
    with pytest.raises(port.ConversionError) as info:
        port.convert_state_dict("tf_efficientnet_b2", state)
    message = str(info.value)
    assert "tf_efficientnet_b2" in message
    assert "layout: blocks per stage: timm [1, 2, 2, 3, 3, 4, 1]" in message
    assert "layout: head channels: timm 1280, tf_efficientnet_b2 1408" in message
    assert "missing timm tensor: blocks.0.1.conv_dw.weight" in message
    assert "shape: conv_head.weight" in message


@pytest.mark.port
def test_missing_extra_and_misshapen_tensors_are_listed_together(timm_model):
    torch = pytest.importorskip("torch")
    state = _state_dict(timm_model("efficientnet_b0"))
    del state["blocks.3.1.se.conv_reduce.bias"]
    state["blocks.2.0.extra.weight"] = torch.zeros(3)
    state["bn2.running_var"] = torch.ones(7)
    with pytest.raises(port.ConversionError) as info:
        port.convert_state_dict("efficientnet_b0", state)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "missing timm tensor: blocks.3.1.se.conv_reduce.bias " \
           "(for params/blocks_6/se/conv_reduce/bias)" in message
    assert "unused timm tensor: blocks.2.0.extra.weight (3,)" in message
    assert "shape: bn2.running_var (7,) -> batch_stats/head/bn/var (7,), " \
           "the network expects (1280,)" in message


@pytest.mark.port
def test_num_classes_must_match_the_classifier(timm_model):
    with pytest.raises(port.ConversionError, match="classifier"):
        port.convert_state_dict("efficientnet_b0", timm_model("efficientnet_b0").state_dict(),
                                num_classes=10)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="supported timm models"):
        port.split_model_name("resnet50")
    assert port.split_model_name("tf_efficientnet_b7.ns_jft_in1k") == \
        ("tf_efficientnet_b7", "ns_jft_in1k")


@pytest.mark.parametrize("name", ["efficientnet_b1", "efficientnet_b4"])
def test_name_table_fills_every_flax_leaf_once(name):
    model = zoo.get_model(name)
    table = port.timm_name_table(model.spec, 1000)
    expected = teacher.flat_shapes(teacher.expected_variables(model))
    assert sorted(row.flax_path for row in table) == sorted(expected)
    assert len({row.timm_key for row in table}) == len(table)


# ------------------------------------------------------------------------------------------------
# Command line and files: .safetensors and a wrapped .pth.tar, loaded back without torch


@pytest.mark.port
def test_command_line_converts_files_and_the_teacher_loads_without_torch(timm_model, tmp_path,
                                                                          capsys):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    name = "tf_efficientnet_b0"
    torch_model = timm_model(name)
    state = {k: v.contiguous() for k, v in _state_dict(torch_model).items()}
    reference = port.convert_state_dict(name, state)

    weights = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, str(weights))
    out = tmp_path / "teacher_st"
    assert port.main(["--model", f"{name}.in1k", "--weights", str(weights), "--out", str(out),
                      "--verify", "64"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == f"{name}.in1k" and summary["arch"] == name
    assert summary["num_tensors"] == len(state)
    assert summary["num_tensors_used"] == len(state) - 49  # b0 has 49 BatchNorms
    assert summary["params"] == 5288548  # timm's tf_efficientnet_b0
    assert summary["out"] == str(out)
    assert max(summary["parity"]["max_abs_error"].values()) <= TOLERANCE
    assert summary["preprocessing"]["input_size"] == [3, 224, 224]

    # A training checkpoint: wrapped in 'state_dict', saved from DataParallel ('module.').
    pth = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, pth)
    out_pth = tmp_path / "teacher_pth"
    assert port.main(["--model", name, "--weights", str(pth), "--out", str(out_pth)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "['state_dict']" in summary["weights"]

    for directory in (out, out_pth):
        model, variables = teacher.load_teacher(name, directory, num_classes=1000)
        assert model == zoo.get_model(name, num_classes=1000)
        jax.tree.map(np.testing.assert_array_equal, variables, reference)

    # The teacher's consumers never need torch: block it and load in a fresh interpreter.
    script = ("import sys\n"
              "for blocked in ('torch', 'timm', 'safetensors'): sys.modules[blocked] = None\n"
              "from dna_jax.teacher import load_teacher\n"
              f"model, variables = load_teacher({name!r}, {str(out)!r})\n"
              "print(model.num_classes)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "1000"


@pytest.mark.port
def test_command_line_refuses_an_existing_output(timm_model, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {k: v.contiguous() for k, v in timm_model("efficientnet_b0").state_dict().items()}
    weights = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, str(weights))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        port.main(["--model", "efficientnet_b0", "--weights", str(weights),
                   "--out", str(tmp_path / "out")])


@pytest.mark.port
def test_pickled_training_checkpoints_need_consent(timm_model, tmp_path):
    import argparse  # pylint: disable=import-outside-toplevel
    torch = pytest.importorskip("torch")
    state = timm_model("efficientnet_b0").state_dict()
    path = tmp_path / "train.pth.tar"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict_ema": state}, path)
    with pytest.raises(port.ConversionError, match="--allow-pickle"):
        port.read_state_dict(path)
    loaded, origin = port.read_state_dict(path, allow_pickle=True)
    assert origin.endswith("['state_dict_ema']") and loaded.keys() == state.keys()


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        port.read_state_dict(tmp_path / "nowhere.safetensors")


# ------------------------------------------------------------------------------------------------
# Teacher checkpoints (no torch needed)


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """A saved fmnist_teacher checkpoint (random weights) and its variables."""
    model = zoo.get_model("fmnist_teacher", num_classes=10)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                             teacher.expected_variables(model))
    directory = tmp_path_factory.mktemp("teachers") / "fmnist"
    teacher.save_teacher(directory, "fmnist_teacher", variables, 10,
                         source={"note": "random"}, preprocessing={"input_size": [3, 28, 28]})
    return directory, variables


def test_teacher_round_trip_is_exact(small_teacher):
    directory, variables = small_teacher
    model, restored = teacher.load_teacher("fmnist_teacher", directory)
    assert model.num_classes == 10
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    images = np.random.default_rng(1).standard_normal((2, 28, 28, 3)).astype(np.float32)
    forward = jax.jit(model.apply)  # one compilation serves both calls
    logits, _ = forward(restored, images)
    expected, _ = forward(jax.tree.map(jax.numpy.asarray, variables), images)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
    assert teacher.teacher_preprocessing(directory) == {"input_size": [3, 28, 28]}
    half, _ = teacher.load_teacher("fmnist_teacher", directory, dtype=jax.numpy.bfloat16)
    assert half.layer_config.dtype == jax.numpy.bfloat16
    assert sorted(os.listdir(directory.parent)) == ["fmnist"]  # no staging leftovers


def test_missing_checkpoint_dir_is_named(tmp_path):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        teacher.load_teacher("tf_efficientnet_b0", missing)


def test_checkpoint_for_another_network_is_refused(small_teacher):
    directory, _ = small_teacher
    with pytest.raises(teacher.TeacherCheckpointError) as info:
        teacher.load_teacher("efficientnet_b0", directory)
    message = str(info.value)
    assert str(directory) in message
    assert "a different architecture" in message and "layer options" in message
    with pytest.raises(teacher.TeacherCheckpointError, match="10 classes, 5 requested"):
        teacher.load_teacher("fmnist_teacher", directory, num_classes=5)


def test_tf_weights_are_not_loaded_as_a_pytorch_style_network(tmp_path):
    """Same architecture, other padding/eps: the checkpoint must say no."""
    model = zoo.get_model("tf_efficientnet_b0")
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), teacher.expected_variables(model))
    directory = tmp_path / "tf_b0"
    teacher.save_teacher(directory, "tf_efficientnet_b0", zeros, 1000)
    with pytest.raises(teacher.TeacherCheckpointError, match="'padding': 'symmetric'"):
        teacher.load_teacher("efficientnet_b0", directory)


def test_variables_that_do_not_match_metadata_are_listed(small_teacher, tmp_path):
    directory, variables = small_teacher
    other = tmp_path / "seven"
    model = zoo.get_model("fmnist_teacher", num_classes=7)
    teacher.save_teacher(other, "fmnist_teacher", jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), teacher.expected_variables(model)), 7)
    swapped = tmp_path / "swapped"
    shutil.copytree(directory, swapped)
    shutil.rmtree(swapped / "variables")
    shutil.copytree(other / "variables", swapped / "variables")
    with pytest.raises(teacher.TeacherCheckpointError) as info:
        teacher.load_teacher("fmnist_teacher", swapped)
    message = str(info.value)
    assert str(swapped) in message
    assert "params/classifier/kernel: checkpoint has (640, 7) float32, the network expects " \
           "(640, 10) float32" in message
    assert "params/classifier/bias" in message


@pytest.mark.parametrize("damage", ["no_metadata", "garbage_data", "no_variables",
                                    "no_json", "bad_json"])
def test_corrupt_checkpoint_is_reported_with_its_path(small_teacher, tmp_path, damage):
    directory, _ = small_teacher
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    if damage == "no_metadata":
        os.remove(broken / "variables" / "_METADATA")
    elif damage == "garbage_data":
        for path in (broken / "variables").rglob("*"):
            if path.is_file() and path.parent.name == "d":
                path.write_bytes(b"garbage")
    elif damage == "no_variables":
        shutil.rmtree(broken / "variables")
    elif damage == "no_json":
        os.remove(broken / "teacher.json")
    else:
        (broken / "teacher.json").write_text("{not json")
    with pytest.raises(teacher.TeacherCheckpointError, match=str(broken)):
        teacher.load_teacher("fmnist_teacher", broken)


def test_a_flipped_byte_in_the_teacher_fails_its_checksums(small_teacher, tmp_path):
    directory, _ = small_teacher
    assert json.loads((directory / "teacher.json").read_text())["checksums"]
    flipped = tmp_path / "flipped"
    shutil.copytree(directory, flipped)
    data = max((p for p in (flipped / "variables").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40  # a value changes; shapes and metadata do not
    data.write_bytes(bytes(raw))
    with pytest.raises(teacher.TeacherCheckpointError,
                       match=rf"teacher checkpoint {flipped}/variables is corrupt: .*"
                             rf"{data.relative_to(flipped / 'variables')}: SHA-256"):
        teacher.load_teacher("fmnist_teacher", flipped)


def test_save_teacher_checks_variables_and_existing_dirs(small_teacher, tmp_path):
    directory, variables = small_teacher
    with pytest.raises(FileExistsError, match="already exists"):
        teacher.save_teacher(directory, "fmnist_teacher", variables, 10)
    with pytest.raises(teacher.TeacherCheckpointError, match="missing in variables"):
        teacher.save_teacher(tmp_path / "t", "fmnist_teacher", {"params": variables["params"]},
                             10)
    assert not (tmp_path / "t").exists()
