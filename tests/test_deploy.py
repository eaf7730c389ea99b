"""Deployable files: TFLite (float32, dynamic-range int8) and StableHLO agree with the Flax
model on real Fashion-MNIST images; `dna-jax export --format` and the pipeline's deploy stage
record them (SHA-256, size, input shape) and verify them when read back.

Parity is only meaningful where the logits are: a freshly initialised network has logits of
~1e-8 (its classifier starts near zero) and the BatchNorm statistics of its initialisation.
The networks here get real-data weights cheaply (`calibrated_variables`): random
convolutions, BatchNorm statistics of 1,024 real training images, and a least-squares
classifier on their pooled features, so the logits reach ~10-20 and the networks classify
real test images far above chance (checked first, `test_reference_logits_are_meaningful`).

Tolerances, on 200 real test images (measured on this machine in parentheses):
  float32 TFLite and StableHLO: max |logit error| <= 1e-4 x the largest |logit| (3e-6 or less)
  int8 TFLite (dynamic range):  top-1 agreement with Flax >= 90% (96.5%, 98.5%) and
                                max |logit error| <= 0.25 x the largest |logit| (0.08, 0.02)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import artifacts, config_files, deploy, export, report, stages, supervision
from dna_jax import teacher as teacher_lib
from dna_jax import validate
from dna_jax.data import fashion_mnist, in_memory
from dna_jax.models import cpu_conv, zoo
from dna_jax.models.childnet import build_childnet
from dna_jax.space import Arch, get_space
from dna_jax.stage_context import Context

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT32_RELATIVE = 1e-4
INT8_RELATIVE = 0.25
INT8_TOP1 = 0.90
TEST_IMAGES = 200

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(fashion_mnist.DEFAULT_DIR, "train-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST idx files missing (make data installs them)")


def real_images(split: str, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of a split, resized and normalised as the pipeline does."""
    images, labels = fashion_mnist.load_fashion_mnist(None, split)
    images = in_memory.resize_images(images[:count], size)
    return (in_memory.normalize(images, 3, (fashion_mnist.MEAN,), (fashion_mnist.STD,)),
            labels[:count])


def calibrated_variables(module, size: int, count: int = 1024, seed: int = 0) -> dict:
    """Random convolutions, BatchNorm statistics of `count` real training images (one pass
    at momentum 0) and a ridge-regression classifier on their pooled features."""
    images, labels = real_images("train", count, size)
    variables = export.init_child(module, size, seed)
    calibrate = module.clone(layer_config=dataclasses.replace(module.layer_config,
                                                              bn_momentum=0.0))
    # Convolutions as shifted slices (cpu_conv): XLA:CPU's depthwise convolutions are slow.
    calibrate_apply = cpu_conv.with_tap_convs(calibrate.apply)
    _, updates = jax.jit(lambda v, x: calibrate_apply(v, x, train=True,
                                                      mutable=["batch_stats"]))(variables, images)
    variables = {"params": jax.device_get(variables["params"]),
                 "batch_stats": jax.device_get(updates["batch_stats"])}
    apply = cpu_conv.with_tap_convs(module.apply)
    _, features = jax.jit(lambda v, x: apply(v, x, train=False))(variables, images)
    features = np.asarray(features["pre_logits"], np.float64)
    features = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    targets = 8.0 * (np.eye(module.num_classes)[labels] - 1.0 / module.num_classes)
    weights = np.linalg.solve(features.T @ features + 1e-2 * np.eye(features.shape[1]),
                              features.T @ targets)
    variables["params"]["classifier"] = {"kernel": weights[:-1].astype(np.float32),
                                         "bias": weights[-1].astype(np.float32)}
    return variables


# A demo-space winner: the `small` space at the demo's 20 px, 1,003,976 multiply-adds (the
# demo's winner has 1,033,472); and the smallest zoo network at 16 px.
def demo_winner_like():
    space = get_space("small")
    return build_childnet(space, Arch.of([[4, 2], [2, 1], [5, 2], [2]]), 10), 20


def zoo_tiny_teacher():
    return zoo.get_model("tiny_teacher", num_classes=10), 16


NETWORKS = {"demo_winner_like": demo_winner_like, "zoo_tiny_teacher": zoo_tiny_teacher}


@dataclasses.dataclass
class Deployed:
    """A network, its deploy files (written once per module) and its Flax logits."""

    module: object
    size: int
    variables: dict
    out_dir: str
    description: dict
    images: np.ndarray
    labels: np.ndarray
    reference: np.ndarray

    def outputs(self, name: str) -> np.ndarray:
        record = next(r for r in self.description["files"] if r["file"] == name)
        data = open(os.path.join(self.out_dir, name), "rb").read()
        return deploy.run_file(data, record["format"], self.images, 1)


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def deployed(request, tmp_path_factory) -> Deployed:
    module, size = NETWORKS[request.param]()
    variables = calibrated_variables(module, size)
    fn = deploy.inference_fn(module, variables)
    out_dir = str(tmp_path_factory.mktemp(request.param))
    options = deploy.DeployOptions(formats=("tflite", "stablehlo"), timing_repeats=5,
                                   parity_images=0)
    description = deploy.write_deploy_files(fn, (1, size, size, 3), out_dir, options)
    images, labels = real_images("test", TEST_IMAGES, size)
    reference = np.asarray(jax.jit(fn)(images))
    return Deployed(module, size, variables, out_dir, description, images, labels, reference)


def test_reference_logits_are_meaningful(deployed):
    """The Flax model classifies real images far above chance, with logits of scale ~10."""
    accuracy = np.mean(deployed.reference.argmax(-1) == deployed.labels)
    assert accuracy >= 0.3, accuracy  # chance: 0.1; measured 0.52 and 0.66
    assert 2.0 <= np.abs(deployed.reference).max() <= 1e3
    assert deployed.reference.std() >= 0.5


def test_deploy_files_are_recorded_with_checksum_size_and_input_shape(deployed):
    records = {r["file"]: r for r in deployed.description["files"]}
    assert sorted(records) == ["model.stablehlo", "model.tflite", "model_int8.tflite"]
    for name, record in records.items():
        data = open(os.path.join(deployed.out_dir, name), "rb").read()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["bytes"] == len(data)
        assert record["input_shape"] == [1, deployed.size, deployed.size, 3]
    assert deployed.description["output"]["shape"] == [1, 10]
    # Dynamic-range int8 stores the weights in a quarter of the bytes (plus the graph: 41% of
    # the float32 file for the demo's net, 70% for the tiny one).
    assert records["model_int8.tflite"]["bytes"] < 0.8 * records["model.tflite"]["bytes"]
    assert deploy.verify_deploy_files(deployed.out_dir, deployed.description) == []
    latency = deployed.description["latency"]
    assert sorted(latency) == ["model.tflite", "model_int8.tflite"]
    assert all(v["median_ms"] > 0 and v["threads"] == 1 and v["batch"] == 1
               for v in latency.values())


@pytest.mark.parametrize("name", ["model.tflite", "model.stablehlo"])
def test_float32_files_agree_with_flax_on_real_images(deployed, name):
    figures = deploy.parity_figures(deployed.reference, deployed.outputs(name))
    assert figures["relative_error"] <= FLOAT32_RELATIVE, figures
    assert figures["top1_agreement"] == 1.0, figures


def test_int8_tflite_keeps_the_top1_class_on_real_images(deployed):
    figures = deploy.parity_figures(deployed.reference, deployed.outputs("model_int8.tflite"))
    assert figures["top1_agreement"] >= INT8_TOP1, figures
    assert figures["relative_error"] <= INT8_RELATIVE, figures
    assert figures["max_abs_error"] > 0  # the weights really are quantised


@pytest.mark.parametrize("deployed", ["demo_winner_like"], indirect=True)
def test_the_parity_check_fails_for_other_weights(deployed):
    """The float32 tolerance is tight enough to catch a file of other weights (BatchNorm
    statistics of the initialisation, as a converter that dropped them would give)."""
    fresh = {"params": deployed.variables["params"],
             "batch_stats": export.init_child(deployed.module, deployed.size, 0)["batch_stats"]}
    data = deploy.stablehlo_bytes(deploy.inference_fn(deployed.module, fresh),
                                  (1, deployed.size, deployed.size, 3))
    figures = deploy.parity_figures(deployed.reference,
                                    deploy.run_file(data, "stablehlo", deployed.images, 1))
    assert figures["relative_error"] > 100 * FLOAT32_RELATIVE, figures


def test_the_report_shows_tflite_latency_and_size(deployed):
    summary = report.deploy_figures(deployed.description)
    records = {r["file"]: r for r in deployed.description["files"]}
    assert summary["winner_tflite_bytes"] == records["model.tflite"]["bytes"]
    assert summary["winner_tflite_int8_ms"] > 0 and summary["deploy_threads"] == 1
    rows = "\n".join(report._deploy_rows(summary))  # pylint: disable=protected-access
    assert "| TFLite float32 latency (ms, 1 thread(s), batch 1) | n/a |" in rows
    assert f"| TFLite int8 (dynamic) file (bytes) | n/a | " \
           f"{records['model_int8.tflite']['bytes']:,} |" in rows
    assert report.deploy_figures({}) == {} and report._deploy_rows({}) == []


# ---- formats, TensorFlow, the command and the pipeline stage ----------------------------------

def test_formats_parse_and_unknown_ones_are_refused():
    assert deploy.parse_formats("all") == ("tflite", "stablehlo")
    assert deploy.parse_formats("stablehlo,tflite") == ("tflite", "stablehlo")
    assert deploy.parse_formats("none") == deploy.parse_formats("") == ()
    with pytest.raises(deploy.DeployError, match=r"unknown deploy format\(s\) \['onnx'\]"):
        deploy.parse_formats("tflite,onnx")
    with pytest.raises(SystemExit, match="dna-jax export: unknown deploy format"):
        export.main(["--space", "tiny", "--arch", "a.json", "--format", "onnx"])


def test_tflite_without_tensorflow_is_one_clear_error_and_only_when_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(deploy, "tensorflow_available", lambda: False)
    config = config_files.load_config(os.path.join(REPO, "configs", "fashion_mnist_dna.py"))
    problems = validate.Problems()
    validate.check_deploy(problems, config.deploy)  # the demo asks for 'all'
    assert len(problems.lines) == 1
    assert problems.lines[0].startswith("config.deploy.formats='all': TFLite export needs "
                                        "TensorFlow, which is not installed here")
    assert "--config.deploy.formats=stablehlo" in problems.lines[0]
    problems = validate.Problems()
    validate.check_deploy(problems, config_files.load_config(
        os.path.join(REPO, "configs", "fashion_mnist_dna.py"), "tiny").deploy)
    assert problems.lines == []  # stablehlo only: no TensorFlow needed
    out = tmp_path / "export"
    with pytest.raises(SystemExit, match=r"dna-jax export: TFLite export needs TensorFlow.*"
                                         r"--format stablehlo"):
        export.main(["--space", "tiny", "--arch", _arch_file(tmp_path), "--num-classes", "10",
                     "--format", "tflite", "--out", str(out)])
    assert not out.exists()  # refused before anything was written


def _arch_file(tmp_path) -> str:
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"blocks": [[1], [1, 0]]}))
    return str(path)


def test_export_command_records_deploy_files_and_load_exported_verifies_them(tmp_path,
                                                                            capsys):
    out = str(tmp_path / "export")
    result = export.main(["--space", "tiny", "--arch", _arch_file(tmp_path), "--num-classes",
                          "10", "--resolution", "16", "--format", "stablehlo", "--batch", "2",
                          "--out", out])
    assert "model.stablehlo" in capsys.readouterr().out
    (record,) = result["deploy"]["files"]
    assert record["file"] == "model.stablehlo" and record["input_shape"] == [2, 16, 16, 3]
    summary = artifacts.read_json(os.path.join(out, export.SUMMARY_FILE))
    assert artifacts.seal_problem(summary) is None
    assert summary["deploy"]["files"] == [record]
    assert summary["deploy"]["parity"]["model.stablehlo"]["relative_error"] <= FLOAT32_RELATIVE
    module, variables, _ = export.load_exported(out)
    exported = deploy.load_stablehlo(open(os.path.join(out, "model.stablehlo"), "rb").read())
    images = np.random.default_rng(1).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(exported.call(images)),
                               np.asarray(module.apply(variables, images)[0]), atol=1e-6)

    path = os.path.join(out, "model.stablehlo")
    with open(path, "r+b") as f:  # a flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(export.ExportError, match=rf"{path} is corrupt: its SHA-256 .* differs "
                                                 r"from the .* recorded when it was written.*"
                                                 r"export it again"):
        export.load_exported(out)
    os.remove(path)
    with pytest.raises(export.ExportError, match=rf"{path} is missing"):
        export.load_exported(out)
    # Exporting again without --format removes the old deploy files and records none.
    result = export.main(["--space", "tiny", "--arch", _arch_file(tmp_path), "--num-classes",
                          "10", "--resolution", "16", "--out", out])
    assert "deploy" not in result and not os.path.exists(path)
    export.load_exported(out)


def test_deploy_stage_writes_the_retrained_network_s_files(tmp_path):
    """The pipeline's deploy stage on a retrain/network checkpoint (StableHLO: TFLite is
    covered above), its deploy.json verified on load, a damaged file named with the fix."""
    config = config_files.load_config(os.path.join(REPO, "configs", "fashion_mnist_dna.py"),
                                      "tiny")
    module, size = zoo_tiny_teacher()
    variables = calibrated_variables(module, size, count=128)
    workdir = str(tmp_path / "run")
    network_dir = os.path.join(workdir, "retrain", stages.RETRAINED_NETWORK)
    teacher_lib.save_teacher(network_dir, "tiny_teacher", variables, 10,
                             preprocessing={"resolution": size})
    ctx = Context(config=config, workdir=workdir, mesh=None, digests={},
                  kind=supervision.of(config))
    figures = stages.run_deploy(ctx)
    (record,) = figures["files"]
    assert record["file"] == "model.stablehlo" and record["input_shape"] == [1, 16, 16, 3]
    assert figures["parity"]["model.stablehlo"]["relative_error"] <= FLOAT32_RELATIVE
    deploy_dir = os.path.join(workdir, "deploy")
    content = export.load_deployed(deploy_dir)
    assert content["network"]["name"] == "tiny_teacher"
    assert content["network"]["resolution"] == size
    assert content["preprocessing"]["mean"] == pytest.approx([fashion_mnist.MEAN] * 3)
    assert content["source"]["network_dir"] == network_dir

    # `dna-jax export --network` writes the same files, byte for byte (no source locations
    # of the caller in them: a rerun of the stage reproduces its files).
    cli_dir = str(tmp_path / "cli")
    result = export.main(["--network", network_dir, "--format", "stablehlo", "--out", cli_dir])
    assert result["files"] == content["files"]
    assert export.load_deployed(cli_dir)["network"] == content["network"]
    with pytest.raises(SystemExit, match="--space: not used with --network"):
        export.main(["--network", network_dir, "--space", "tiny"])

    artifacts.write_manifest(deploy_dir, "deploy", "0" * 16, {}, figures, 1.0)
    path = os.path.join(deploy_dir, "model.stablehlo")
    with open(path, "ab") as f:
        f.write(b"x")
    manifest = os.path.join(deploy_dir, artifacts.MANIFEST)
    with pytest.raises(deploy.DeployError, match=rf"{path} is corrupt.*remove {manifest} "
                                                 r"\(nothing else\)"):
        export.load_deployed(deploy_dir)
