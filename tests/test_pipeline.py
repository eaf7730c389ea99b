"""The pipeline end to end on real Fashion-MNIST (`configs/fashion_mnist_dna.py:tiny`).

One tiny run (16 px, a few steps per stage) is shared by the module: every stage's artifact and
manifest, the report, the JSON figures, re-runs that skip, subsets of stages, changed configs,
a missing upstream artifact, and a run killed during distillation that resumes to the same
supernet and ratings as the uninterrupted one.
"""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from dna_jax import artifacts, config_files, pipeline, supervision
from dna_jax import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_dna.py")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    return config_files.load_config(CONFIG, "tiny", **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir, figures) of one complete tiny run."""
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    figures = pipeline.run_pipeline(tiny_config(), workdir)
    return workdir, figures


def test_every_stage_writes_its_artifact_and_the_report(finished):
    workdir, figures = finished
    assert figures["stages"] == {s: "ran" for s in supervision.get("teacher").stages}
    for key in ("teacher_accuracy", "winner_accuracy"):
        assert 0.0 <= figures[key] <= 1.0
    assert figures["teacher_macs"] > 0 and figures["winner_macs"] > 0
    # The winner respects the budget: half the teacher's multiply-adds.
    assert figures["winner_macs"] <= 0.5 * figures["teacher_macs"]
    assert figures["wall_seconds"] > 0
    for stage in supervision.get("teacher").stages:
        manifest = artifacts.read_manifest(os.path.join(workdir, stage))
        assert manifest["stage"] == stage and manifest["wall_seconds"] >= 0
    summary = json.load(open(os.path.join(workdir, pipeline.SUMMARY_FILE)))
    assert summary["winner_macs"] == figures["winner_macs"]
    assert set(summary["stage_wall_seconds"]) == set(supervision.get("teacher").stages) - {"report"}
    report = open(os.path.join(workdir, pipeline.REPORT_FILE)).read()
    assert "Chosen architecture" in report and "ir_r1" in report
    assert os.path.exists(os.path.join(workdir, "report", "pareto_front.png"))
    # Every candidate of the `tiny` space was rated: 2 + 4.
    rate = artifacts.read_manifest(os.path.join(workdir, "rate"))["figures"]
    assert rate["candidates"] == 2 + 4
    # The retrained network is the searched one, with the costs the search reported.
    search = artifacts.read_manifest(os.path.join(workdir, "search"))["figures"]
    assert search["winner"]["costs"]["macs"] == figures["winner_macs"]
    # TensorBoard event files for the training stages.
    for stage in ("teacher", "distill", "retrain"):
        events = [f for _, _, files in os.walk(os.path.join(workdir, stage)) for f in files
                  if f.startswith("events.out.tfevents")]
        assert events, f"no TensorBoard events under {stage}/"


def test_rerun_skips_complete_stages(finished):
    workdir, figures = finished
    again = pipeline.run_pipeline(tiny_config(), workdir)
    assert again["stages"] == {s: "skipped" for s in supervision.get("teacher").stages}
    assert again["winner_accuracy"] == figures["winner_accuracy"]
    assert again["wall_seconds"] < figures["wall_seconds"]


def test_changed_config_is_reported_and_rerun_on_request(finished, tmp_path):
    workdir, _ = finished
    changed = tiny_config(stages="search", **{"search.budget_fraction": 0.52})
    with pytest.raises(artifacts.ConfigChangedError, match="budget_fraction: 0.5 -> 0.52"):
        pipeline.run_pipeline(changed, workdir)
    # A subset of stages on the existing artifacts, the old search moved aside (not lost).
    rerun = tiny_config(stages="search", on_change="rerun",
                        **{"search.budget_fraction": 0.52})
    result = pipeline.run_pipeline(rerun, workdir)
    assert result["stages"] == {"search": "ran"}
    assert any(name.startswith("search.replaced-") for name in os.listdir(workdir))
    winner = artifacts.read_manifest(os.path.join(workdir, "search"))["figures"]["winner"]
    teacher = artifacts.read_manifest(os.path.join(workdir, "teacher"))["figures"]
    assert winner["costs"]["macs"] <= 0.52 * teacher["macs"]
    # Retraining now lags behind the search it would read.
    with pytest.raises(artifacts.ConfigChangedError, match="retrain"):
        pipeline.run_pipeline(tiny_config(stages="report", **{"search.budget_fraction": 0.52}),
                              workdir)


def test_missing_upstream_artifact_names_the_stage(tmp_path):
    with pytest.raises(pipeline.StageError, match="'teacher'"):
        pipeline.run_pipeline(tiny_config(stages="rate"), str(tmp_path))


def test_bad_config_values_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="config.stages"):
        pipeline.run_pipeline(tiny_config(stages="teacher,distil"), str(tmp_path))
    with pytest.raises(ValueError, match="search.method"):
        pipeline.run_pipeline(tiny_config(**{"search.method": "greedy"}), str(tmp_path))
    assert os.listdir(tmp_path) == []


class _Killed(Exception):
    pass


def test_killed_distillation_resumes_to_the_same_result(finished, tmp_path, monkeypatch):
    workdir, _ = finished
    config = tiny_config()
    killed_dir = str(tmp_path / "killed")
    pipeline.run_pipeline(tiny_config(stages="teacher"), killed_dir)

    original = data_lib.Dataset.global_batches

    def dying_batches(self, start_step=0):
        for count, batch in enumerate(original(self, start_step)):
            if self.info.training and start_step + count >= 3:
                raise _Killed(f"killed before step {start_step + count + 1}")
            yield batch

    monkeypatch.setattr(data_lib.Dataset, "global_batches", dying_batches)
    with pytest.raises(_Killed):
        pipeline.run_pipeline(tiny_config(stages="distill"), killed_dir)
    assert artifacts.stage_status(os.path.join(killed_dir, "distill"),
                                  pipeline.stage_digests(config)["distill"]) == "missing"
    monkeypatch.setattr(data_lib.Dataset, "global_batches", original)
    resumed = pipeline.run_pipeline(config, killed_dir)
    assert resumed["stages"]["teacher"] == "skipped"
    assert resumed["stages"]["distill"] == "ran"
    distill_figures = artifacts.read_manifest(os.path.join(killed_dir, "distill"))["figures"]
    assert distill_figures.get("resumed_from_step", 0) > 0

    # The resumed supernet and its ratings equal the uninterrupted run's.
    for block in ("block0", "block1"):
        with np.load(os.path.join(workdir, "rate", f"{block}.npz")) as a, \
                np.load(os.path.join(killed_dir, "rate", f"{block}.npz")) as b:
            np.testing.assert_array_equal(a["encodings"], b["encodings"])
            np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-6)
    assert resumed["winner_macs"] == artifacts.read_json(
        os.path.join(workdir, pipeline.SUMMARY_FILE))["winner_macs"]


def test_main_entry_point_prints_one_json_line(finished):
    """`python -m dna_jax.main` on the finished workdir: every stage skipped, JSON last line."""
    workdir, figures = finished
    out = subprocess.run(
        [sys.executable, "-m", "dna_jax.main", f"--config={CONFIG}:tiny", f"--workdir={workdir}",
         "--config.stages=report"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["stages"] == {"report": "skipped"}
    assert last["teacher_accuracy"] == figures["teacher_accuracy"]


def test_compilation_cache_defaults_to_the_workdir_and_never_overrides(tmp_path):
    """'auto' puts JAX's persistent cache in the workdir; a cache set already is kept."""
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        pipeline._use_compilation_cache("", str(tmp_path))  # pylint: disable=protected-access
        assert jax.config.jax_compilation_cache_dir is None
        pipeline._use_compilation_cache("auto", str(tmp_path))  # pylint: disable=protected-access
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compilation_cache")
        pipeline._use_compilation_cache("/elsewhere", str(tmp_path))  # pylint: disable=protected-access
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "compilation_cache")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
