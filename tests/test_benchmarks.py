"""benchmarks/original_dna_rate.py and benchmarks/accelerator_suite.py: arguments, run-time
patches, the peak table, and (slow) the suite's tiny mode with TensorFlow made unimportable;
benchmarks/tflite_latency_validation.py: its statistics, and (slow) its --quick run."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import accelerator_suite  # noqa: E402  (benchmarks/)
import original_dna_rate  # noqa: E402  (benchmarks/)
import tflite_latency_validation as tflite_validation  # noqa: E402  (benchmarks/)

# A stand-in for the original's `dna` package, written for these tests (not the original's
# code): the interface `original_dna_rate.py` drives, with the CUDA-only calls the original
# makes (`.cuda()` on data, `torch.cuda.synchronize()`), which fail on a CPU torch unpatched.
_FAKE_DISTILL_TRAIN = '''
import torch

def _potential(supernet, teacher=None, eval_loader=None, loss_fn=None, args=None, stage=None,
               stage_model_pool=None, use_target=False, reset_data=None):
    losses = [0.0] * len(stage_model_pool)
    for step, (inputs, _) in enumerate(eval_loader):
        if step == args.potential_eval_times - 1:
            break
        reset = reset_data[0].cuda()
        _, reset_last = teacher(reset, end_block=stage)
        guides, last_guide = teacher.forward(inputs, end_block=stage)
        for i, encoding in enumerate(stage_model_pool):
            supernet.train()
            supernet(reset_last, encoding=encoding)
            supernet.eval()
            out = supernet(last_guide, encoding=encoding)
            torch.cuda.synchronize()
            losses[i] += loss_fn(out, guides).item()
    print("potentials", losses)
    return {"loss": losses}
'''
_FAKE_SUPERNET = '''
import torch

PRIMITIVES = ["a", "b", "c", "d", "e", "f"]

class StudentSuperNet(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(48, 80, 1, stride=2)

    def get_layers(self, block):
        return 4

    def forward(self, x, encoding=None):
        return self.conv(x) * (1 + sum(encoding))
'''


def _fake_original(tmp_path):
    dna = tmp_path / "DNA" / "searching" / "dna"
    dna.mkdir(parents=True)
    (dna / "__init__.py").write_text("")
    (dna / "distill_train.py").write_text(_FAKE_DISTILL_TRAIN)
    (dna / "student_supernet.py").write_text(_FAKE_SUPERNET)
    return tmp_path / "DNA"


def test_original_rate_arguments(tmp_path, capsys):
    repo = _fake_original(tmp_path)
    args = original_dna_rate.parse_args(["--dna-repo", str(repo), "--num-candidates", "3"])
    assert args.searching_dir == str(repo / "searching")
    assert (args.num_candidates, args.batch, args.rating_batches) == (3, 32, 1)
    # The searching/ folder itself is accepted too.
    args = original_dna_rate.parse_args(["--dna-repo", str(repo / "searching")])
    assert args.searching_dir == str(repo / "searching") and args.num_candidates == 0
    for bad in (["--dna-repo", str(tmp_path)], [], ["--dna-repo", str(repo), "--batch", "0"],
                ["--dna-repo", str(repo), "--num-candidates", "1297"]):
        with pytest.raises(SystemExit):
            original_dna_rate.parse_args(bad)
    capsys.readouterr()


def test_original_rate_patches_cuda_calls_on_cpu(tmp_path):
    """The script runs a CUDA-only `_potential` on a CPU torch: the patches work."""
    pytest.importorskip("torch")
    repo = _fake_original(tmp_path)
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "original_dna_rate.py"),
         "--dna-repo", str(repo), "--num-candidates", "3", "--batch", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert figures["candidates_rated"] == 3 and figures["candidates"] == 1296
    assert figures["extrapolated"] and figures["cpu_patches"]
    # Both figures are rounded (to 1 ms and 10 ms): allow for that.
    assert figures["seconds_all_candidates"] == pytest.approx(
        figures["seconds"] * 1296 / 3, rel=1e-3, abs=0.0005 * 1296 / 3 + 0.005)
    assert len(figures["mse_first"]) == 3 and figures["bn_mode"] == "recalibrate"
    assert "potentials" not in run.stdout  # the original's prints go to /dev/null
    assert figures["sample"] == "first" and figures["keep_freed_memory"] is False
    # --sample random rates other candidates (the fake's output grows with the encoding);
    # --keep-freed-memory 1 gives the original our allocator settings (glibc here).
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "original_dna_rate.py"),
         "--dna-repo", str(repo), "--num-candidates", "3", "--batch", "2", "--device", "cpu",
         "--sample", "random", "--sample-seed", "1", "--keep-freed-memory", "1"],
        capture_output=True, text=True, timeout=300, check=True)
    sampled = json.loads(run.stdout.strip().splitlines()[-1])
    assert sampled["sample"] == "random" and sampled["candidates_rated"] == 3
    assert sampled["keep_freed_memory"] is True
    assert sampled["mse_first"] != figures["mse_first"]
    # The patches are undone afterwards (checked in-process on the context manager).
    import torch  # pylint: disable=import-outside-toplevel
    before = torch.Tensor.cuda
    with original_dna_rate.cpu_patches(torch, enabled=True):
        x = torch.zeros(1)
        assert x.cuda() is x
        torch.cuda.synchronize()
    assert torch.Tensor.cuda is before


def test_suite_peaks_and_arguments():
    assert accelerator_suite.peak_tflops("NVIDIA H100 80GB HBM3")["bfloat16"] == 989.0
    assert accelerator_suite.peak_tflops("NVIDIA H100 PCIe")["bfloat16"] == 756.0
    assert accelerator_suite.peak_tflops("NVIDIA H200")["float32"] == 67.0
    assert accelerator_suite.peak_tflops("NVIDIA A100-SXM4-80GB")["float32"] == 19.5
    assert accelerator_suite.peak_tflops("cpu") is None
    assert accelerator_suite.mfu(494.5e12, 989.0) == 0.5
    assert accelerator_suite.mfu(1e12, None) is None
    args = accelerator_suite.parse_args([])
    assert (args.space, args.teacher, args.resolution) == ("dna_released", "efficientnet_b7", 224)
    assert (args.distill_batch, args.original_candidates) == (64, 0)
    assert args.dtypes == ["bfloat16", "float32"]
    args = accelerator_suite.parse_args(["--tiny", "--skip", "original"])
    assert (args.space, args.teacher, args.original_candidates) == ("tiny", "tiny_teacher", 3)
    assert args.skip == {"original"}
    for bad in (["--dtypes", "float16"], ["--skip", "teacher"]):
        with pytest.raises(SystemExit):
            accelerator_suite.parse_args(bad)


_BLOCK_TENSORFLOW = textwrap.dedent('''
    import sys

    class _Blocker:
        """Makes TensorFlow, tfds, clu and TensorBoard unimportable (a GPU image without them)."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu", "tensorboard"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Blocker())
''')


@pytest.mark.slow
def test_accelerator_suite_tiny_without_tensorflow(tmp_path):
    """`accelerator_suite.py --tiny` with TensorFlow/clu blocked: its JSON line holds together.

    The original's loop runs if $DNA_ORIGINAL_REPO names a checkout of changlin31/DNA, else
    the suite must report it skipped.
    """
    (tmp_path / "sitecustomize.py").write_text(_BLOCK_TENSORFLOW)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]),
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a one-GPU machine
    check = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env,
                           capture_output=True, text=True, check=False)
    assert check.returncode != 0 and "blocked" in check.stderr
    repo = os.environ.get("DNA_ORIGINAL_REPO", "")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_suite.py"),
               "--tiny", "--budget-s", "1500"] + (["--dna-repo", repo] if repo else [])
    run = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=1800, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tiny"] and result["backend"] == "cpu" and result["peak_tflops"] is None
    for mode in ("recalibrate", "batch"):
        rating = result["rate"][mode]
        assert rating["bn_mode"] == mode and rating["like_for_like"] == (mode == "recalibrate")
        assert rating["candidates"] == 4 and rating["max_abs_mse_difference"] < 1e-5
        assert rating["candidates_per_second"] == pytest.approx(4 / rating["seconds"], rel=0.01,
                                                                abs=0.0005)  # rounded
        assert rating["warm_seconds"] > 0
    original = result["original"]
    if repo:
        assert original["candidates_rated"] == 3 and original["extrapolated"]
        # Tiny shapes against the real block: no speed-up may be claimed.
        assert "not computed" in result["rate_summary"]["recalibrate"]["speedup_vs_original"]
    else:
        assert "no --dna-repo" in original["skipped"]
    for dtype in ("bfloat16", "float32"):
        distill = result["distill"][dtype]
        assert distill["dtype"] == dtype and distill["teacher"] == "tiny_teacher"
        assert distill["all_blocks_images_per_s"] == pytest.approx(
            2 / distill["all_blocks_step_s"])
        assert sorted(distill["sequential_block_step_s"]) == ["block0", "block1"]
        assert distill["all_blocks_mfu"] is None  # no peak for a CPU
        # Analytic model FLOPs: the sequential schedule repeats the teacher per block.
        assert (distill["sequential_model_flops_per_image_batch"]
                > distill["all_blocks_model_flops_per_step"] > 0)
    assert result["seconds"] < 1500


# ---- benchmarks/tflite_latency_validation.py -------------------------------------------------

def test_tflite_validation_statistics():
    v = tflite_validation
    assert v.mape([1.0, 2.0], [1.1, 1.0]) == pytest.approx(30.0)
    # An exact per-op offset model is recovered leave-one-out; the min-norm fit copes with
    # collinear columns (every network has the same number of layers).
    rng = np.random.default_rng(0)
    counts = rng.multinomial(7, [1 / 3] * 3, size=12)
    predicted = rng.uniform(1.0, 2.0, 12)
    measured = predicted + counts @ np.array([-0.05, 0.02, 0.1]) + 0.3
    np.testing.assert_allclose(v.loo_offsets(measured, predicted, counts), measured)
    fitted = v.fit_offsets(measured, predicted, counts)
    np.testing.assert_allclose(np.c_[counts, np.ones(12)] @ fitted, measured - predicted)
    np.testing.assert_allclose(v.loo_scale(2.5 * predicted, predicted), 2.5 * predicted)
    scores = v.score(measured, predicted, num_resamples=50)
    assert scores["mape"] > 0 and len(scores["mape_ci95"]) == 2 and -1 <= scores["tau"] <= 1
    assert "mape" not in v.score(measured, predicted, with_mape=False, num_resamples=50)
    args = v.parse_args(["--quick"])
    assert (args.spaces, args.repeats, args.bootstrap) == (v.QUICK_SPACES, 3, 200)
    args = v.parse_args([])
    assert args.spaces == "small:60:32,dna_released:30:224" and args.threads == 1


@pytest.mark.slow
def test_tflite_validation_quick_run(tmp_path):
    out = tmp_path / "validation.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks",
                                                       "tflite_latency_validation.py"),
                          "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    tiny = result["spaces"]["tiny"]
    assert tiny["networks"] == 5 and tiny["tflite_table"]["entries"] == 6
    assert set(tiny["predictors"]) == {"min", "median"}
    for predictors in tiny["predictors"].values():
        assert set(predictors) == {"tflite_table", "tflite_table-invoke_overhead",
                                   "tflite_table+op_offsets", "jax_table", "macs"}
        assert "mape" not in predictors["macs"] and "mape_scaled" in predictors["macs"]
    for row in tiny["rows"]:
        assert row["jax_table_ms"] > 0 and row["pieces"] == 5
        for statistic in ("min", "median"):
            assert 0 < row["measured_ms"]["min"] <= row["measured_ms"]["median"]
            assert row["tflite_table_ms"][statistic] > 0
    assert tiny["tflite_table_meta"]["runtime"] == "tflite"
    assert len(result["loadavg_start"]) == 3 and result["threads"] == 1
