"""A `gs://` workdir, on a non-local filesystem reached through the code path a real bucket
takes (tests/fake_gcs.py: an fsspec filesystem registered for gs, served by etils.epath).

What runs on it here: the driver (workdir lock, start-up cleanup, every stage's skip / changed
decision from its manifest, started.json), the rating tables and the search stage's reading
of them and its budgets, plots and JSON, and the report stage (summary.json, report.md, the
copied plots, its manifest). What does not: stages that save or restore an Orbax checkpoint
(teacher training, distill, rate's supernet, the search stage's export, retrain), because
Orbax writes gs:// arrays through tensorstore's own GCS driver, which the fake does not reach.
Their artifacts are made by a local run and uploaded. A scheme Orbax cannot use is refused
at start.
"""

import json
import logging
import os

import jax
import numpy as np
import pytest

from dna_jax import artifacts, config_files, files, integrity, pipeline, rating_table, supervision
from dna_jax import teacher as teacher_lib
from dna_jax import search as search_lib
from dna_jax import stages as stages_lib
from dna_jax import validate
from dna_jax.stage_context import Context
from fake_gcs import fake_gcs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_dna.py")
URL = "gs://bucket/runs/tiny"


def tiny_config(**overrides):
    return config_files.load_config(CONFIG, "tiny", **overrides)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """(workdir, figures) of one complete tiny run on a local folder."""
    workdir = str(tmp_path_factory.mktemp("local"))
    return workdir, pipeline.run_pipeline(tiny_config(), workdir)


@pytest.fixture
def gcs(local_run, monkeypatch, tmp_path):
    """The local run's workdir uploaded to the in-memory gs://, the cwd an empty folder (a URL
    turned into a local path would show up in it)."""
    monkeypatch.chdir(tmp_path)
    with fake_gcs(monkeypatch) as store:
        local, _ = local_run
        for root, _, names in os.walk(local):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    files.write_bytes(f"{URL}/{os.path.relpath(path, local)}", f.read())
        yield store
    assert os.listdir(tmp_path) == [], "a gs:// path was written as a local folder"


def _context(config, workdir):
    config = pipeline.complete_config(config)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    return Context(config=config, workdir=workdir, mesh=mesh,
                   digests=pipeline.stage_digests(config), kind=supervision.of(config))


def test_the_driver_and_the_report_run_on_a_gs_workdir(local_run, gcs, caplog):
    local, figures = local_run
    for name in ("report/manifest.json", "summary.json", "report.md",
                 "report/pareto_front.png"):
        files.remove(f"{URL}/{name}")
    # What a preempted run leaves: its lock details, a staging folder, an atomic-write temporary.
    files.write_text(f"{URL}/lock.json", json.dumps({"host": "worker-3", "pid": 7}))
    files.write_text(f"{URL}/distill/supernet.tmp/variables/x", "partial")
    files.write_text(f"{URL}/search/.front.json.x1.tmp", "partial")
    with caplog.at_level(logging.WARNING):
        result = pipeline.run_pipeline(tiny_config(), URL + "/")
    stages = supervision.get("teacher").stages
    assert result["stages"] == {s: "ran" if s == "report" else "skipped" for s in stages}
    assert "a remote workdir cannot be locked" in caplog.text and "worker-3" in caplog.text
    assert not files.exists(f"{URL}/distill/supernet.tmp")
    assert not files.exists(f"{URL}/search/.front.json.x1.tmp")
    assert files.read_text(f"{URL}/lock.json") == ""  # released
    # The report, from the manifests on gs://, equals the local run's.
    assert result["winner_accuracy"] == figures["winner_accuracy"]
    local_summary = artifacts.read_json(os.path.join(local, pipeline.SUMMARY_FILE))
    assert artifacts.read_json(f"{URL}/{pipeline.SUMMARY_FILE}") == local_summary
    assert files.read_text(f"{URL}/report.md").startswith(f"# DNA run: {URL}\n")
    with open(os.path.join(local, "report", "pareto_front.png"), "rb") as f:
        assert files.read_bytes(f"{URL}/report/pareto_front.png") == f.read()
    assert artifacts.stage_status(f"{URL}/report", pipeline.stage_digests(
        pipeline.complete_config(tiny_config()))["report"]) == "complete"
    assert "/bucket/runs/tiny/report/started.json" in gcs
    again = pipeline.run_pipeline(tiny_config(), URL)
    assert again["stages"] == {s: "skipped" for s in stages}


def test_a_changed_config_on_a_gs_workdir_is_named(gcs):
    changed = tiny_config(stages="search", **{"search.budget_fraction": 0.52})
    with pytest.raises(artifacts.ConfigChangedError, match="budget_fraction: 0.5 -> 0.52"):
        pipeline.run_pipeline(changed, URL)


def test_the_search_reads_its_tables_from_gs_as_from_a_local_folder(local_run, gcs):
    local, _ = local_run
    there, here = _context(tiny_config(), URL), _context(tiny_config(), local)
    remote_tables, local_tables = stages_lib.load_tables(there), stages_lib.load_tables(here)
    for a, b in zip(remote_tables, local_tables, strict=True):
        np.testing.assert_array_equal(a.encodings, b.encodings)
        np.testing.assert_array_equal(a.score, b.score)
        assert a.costs.keys() == b.costs.keys()
    assert remote_tables[0].source.startswith(f"{URL}/rate/")
    for block in there.space.blocks:
        assert (rating_table.block_fit(there.stage_dir("rate"), block.name)
                == rating_table.block_fit(here.stage_dir("rate"), block.name))
    budgets = stages_lib.search_budgets(there)
    assert budgets == stages_lib.search_budgets(here)
    results = search_lib.search(remote_tables, budgets, k=2)
    assert [r.to_dict() for r in results] == [r.to_dict()
                                              for r in search_lib.search(local_tables, budgets, k=2)]
    front = search_lib.pareto_front(remote_tables, "macs")
    search_lib.plot_pareto_front(front, f"{URL}/plots/front.png", chosen=results[:1])
    assert files.read_bytes(f"{URL}/plots/front.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # A damaged table on gs:// is caught by its recorded SHA-256, like a local one.
    path = remote_tables[1].source
    data = bytearray(files.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    files.write_bytes(path, bytes(data))
    with pytest.raises(ValueError, match="is corrupt: its SHA-256 differs"):
        stages_lib.load_tables(there)


def test_a_teacher_checkpoint_on_gs_is_read_and_verified_through_epath(local_run, gcs):
    local, _ = local_run
    here, there = os.path.join(local, "teacher", "checkpoint"), f"{URL}/teacher/checkpoint"
    metadata = teacher_lib.read_teacher_metadata(there)
    assert metadata == teacher_lib.read_teacher_metadata(here)
    assert teacher_lib.teacher_network_spec("", there) == teacher_lib.teacher_network_spec("",
                                                                                           here)
    variables = f"{there}/{teacher_lib.VARIABLES_DIR}"
    assert integrity.problems(variables, metadata["checksums"]) == []
    # The config check reads the teacher's architecture from gs:// (budget fractions of it).
    pipeline.check_config(tiny_config(**{"teacher.checkpoint": there}), workdir=URL)


@pytest.mark.parametrize("url", ["s3://bucket/w", "memory://w"])
def test_a_workdir_orbax_cannot_use_is_refused_at_start(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(validate.ConfigError,
                       match=f"--workdir='{url}': .* is not supported: use a local folder or a "
                             "gs:// URL"):
        pipeline.run_pipeline(tiny_config(), url)
    assert os.listdir(tmp_path) == []
