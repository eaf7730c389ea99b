"""Reliability of the pipeline: bad config values refused before any work, one run per workdir,
stale temporaries cleaned, a NaN teacher stopped and resumed after the fix, a training stage
rerun after its last checkpoint, the CLI's errors.

Everything here runs on `configs/fashion_mnist_dna.py:tiny`; only the teacher test trains
(the tiny teacher, 4 steps).
"""

import json
import os
import subprocess
import sys

import pytest

from dna_jax import artifacts, cli, config_files, pipeline, retrain, validate
from dna_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist_dna.py")
NAN, INF = float("nan"), float("inf")
needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Fashion-MNIST idx files missing (make data installs them)")


def tiny_config(**overrides):
    return config_files.load_config(CONFIG, "tiny", **overrides)


# ---- config validation: every bad value named before any work ------------------------------

def _no_work(*args):
    raise AssertionError("a stage started: the bad value was not caught")


BAD_VALUES = [  # (overrides, the field named, a fragment of the fix)
    ({"search.budget": 1.0}, "config.search.budget=1.0", "raise it to at least 258,992"),
    ({"search.params_budget": 10.0}, "config.search.params_budget=10.0",
     "raise it to at least 6,869"),
    ({"search.budget_fraction": 0.0}, "config.search.budget_fraction=0.0", "must be > 0"),
    ({"search.budget_fraction": -0.5}, "config.search.budget_fraction=-0.5", "must be > 0"),
    ({"search.budget_fraction": 0.01}, "config.search.budget_fraction=0.01",
     "raise it to at least 0.452 (the teacher costs 573,472 macs)"),
    ({"data.image_size": 2}, "config.data.image_size=2", "use at least 4"),
    ({"teacher.train.data.image_size": 2}, "config.teacher.train.data.image_size=2",
     "total stride 4 of teacher 'tiny_teacher'"),
    ({"rate.cost_resolution": 3}, "config.rate.cost_resolution=3", "use at least 4"),
    ({"teacher.train.total_steps": 0, "teacher.train.num_epochs": 0.0},
     "config.teacher.train.num_epochs=0.0", "must be > 0 when teacher.train.total_steps is 0"),
    ({"retrain.total_steps": -1}, "config.retrain.total_steps=-1", "must be >= 0"),
    ({"retrain.num_epochs": -1.0}, "config.retrain.num_epochs=-1.0", "must be >= 0"),
    ({"data.batch_size": -4}, "config.data.batch_size=-4", "must be >= 1"),
    ({"teacher.train.data.batch_size": 0}, "config.teacher.train.data.batch_size=0",
     "must be >= 1"),
    ({"mesh.num_devices": 4, "data.batch_size": 18}, "config.data.batch_size=18",
     "divisible by the 4 devices of the mesh: use 16 or 20"),
    ({"mesh.num_devices": 4, "retrain.data.eval_batch_size": 10},
     "config.retrain.data.eval_batch_size=10", "use 12"),
    ({"mesh.num_devices": 64}, "config.mesh.num_devices=64", "devices exist"),
    ({"retrain.optimizer.learning_rate": NAN}, "config.retrain.optimizer.learning_rate=nan",
     "must be a finite number"),
    ({"teacher.train.optimizer.learning_rate": -0.1},
     "config.teacher.train.optimizer.learning_rate=-0.1", "must be > 0"),
    ({"distill.learning_rates": (NAN,)}, "config.distill.learning_rates[0]=nan",
     "must be a finite number"),
    ({"distill.weight_decay": INF}, "config.distill.weight_decay=inf", "finite"),
    ({"rate.num_batches": 0}, "config.rate.num_batches", ">= 1"),
    ({"search.top_k": 0}, "config.search.top_k=0", "must be >= 1"),
    ({"teacher.train.keep_checkpoints": 0}, "config.teacher.train.keep_checkpoints=0",
     "must be >= 1"),
]


@pytest.mark.parametrize("overrides, field, fix", BAD_VALUES,
                         ids=[",".join(o) for o, _, _ in BAD_VALUES])
def test_bad_values_are_named_before_any_work(tmp_path, monkeypatch, overrides, field, fix):
    workdir = tmp_path / "run"
    monkeypatch.setattr(pipeline, "run_stage", _no_work)
    with pytest.raises(validate.ConfigError) as error:
        pipeline.run_pipeline(tiny_config(**overrides), str(workdir))
    message = str(error.value)
    assert field in message and fix in message, message
    assert "nothing was run" in message
    assert not workdir.exists()  # no stage directory, not even the workdir


def test_every_problem_is_listed_at_once():
    config = tiny_config(**{"search.budget_fraction": 0.0, "data.batch_size": -1,
                            "retrain.optimizer.learning_rate": NAN})
    with pytest.raises(validate.ConfigError) as error:
        pipeline.check_config(config)
    assert len(error.value.problems) == 3, error.value.problems


def test_only_the_stages_that_run_are_checked():
    # A retraining typo does not stop a rating-only run; the search budget is not checked
    # when the search does not run.
    pipeline.check_config(tiny_config(stages="teacher,distill,rate",
                                      **{"retrain.num_epochs": 0.0, "search.budget": 1.0}))


def test_the_cost_range_brackets_every_network_of_the_space():
    import numpy as np

    from dna_jax import costs
    from dna_jax.space import get_space
    space = get_space("tiny")
    ranges = validate.space_cost_range(space, 16, 10)
    rng = np.random.default_rng(0)
    for _ in range(20):
        spec = space.to_network_spec(space.sample(rng))
        total = costs.network_costs(spec, 16, 10).total.as_dict()
        for name, (low, high) in ranges.items():
            assert low <= total[name] <= high, name
    assert validate.total_stride(space) == 4


# ---- the workdir lock ------------------------------------------------------------------------


def test_a_second_acquisition_is_refused_naming_the_holder(tmp_path):
    first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(workdir_lib.WorkdirLockedError) as error:
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
        holder = json.load(open(tmp_path / workdir_lib.LOCK_FILE))
        message = str(error.value)
        assert f"pid {os.getpid()}" in message and repr(holder["host"]) in message
        assert holder["started"] in message
    finally:
        first.release()
    workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()  # free again


def test_a_run_in_another_process_holds_the_workdir(tmp_path):
    code = ("import sys, time; from dna_jax import workdir as w; "
            "w.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {holder.pid} on host"):
            pipeline.run_pipeline(tiny_config(), str(tmp_path))
        assert os.listdir(tmp_path) == [workdir_lib.LOCK_FILE]  # no stage was started
    finally:
        holder.kill()
        holder.wait()
    # Killed (as by kill -9): its lock is taken over.
    with workdir_lib.WorkdirLock(str(tmp_path)).acquire():
        assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))["pid"] == os.getpid()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"host": os.uname().nodename, "pid": dead.pid, "started": "2026-01-01T00:00:00",
             "command": "dna-jax run"}
    with open(tmp_path / workdir_lib.LOCK_FILE, "w") as f:
        json.dump(stale, f)
    with caplog.at_level("WARNING"):
        lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    try:
        assert f"pid {dead.pid}" in caplog.text and "dead" in caplog.text
        assert json.load(open(tmp_path / workdir_lib.LOCK_FILE))["pid"] == os.getpid()
    finally:
        lock.release()


# ---- stale temporaries -----------------------------------------------------------------------


def test_stale_temporaries_are_cleaned_at_start(tmp_path):
    stale = ["teacher/.manifest.json.x1.tmp", "distill/supernet.tmp/variables/a",
             "distill/supernet.old/supernet.json", "teacher/checkpoint.tmp-ab12/teacher.json",
             "retrain/checkpoints/4.orbax-checkpoint-tmp-99/x", "rate/tmpq1.tmp"]
    kept = ["rate/block0.npz", "distill/supernet/supernet.json",
            "compilation_cache/entry.tmp", "rate.replaced-20260101-000000/block0.tmp"]
    for name in stale + kept:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        open(tmp_path / name, "w").close()
    # A search-only run on this workdir stops (no ratings), but cleaned up first.
    with pytest.raises(pipeline.StageError, match="needs the 'teacher' artifact"):
        pipeline.run_pipeline(tiny_config(stages="search"), str(tmp_path))
    for name in stale:  # the temporary file or folder itself is gone
        temporary = next(i for i, part in enumerate(name.split("/"))
                         if workdir_lib._is_temporary(part))
        assert not os.path.exists(tmp_path.joinpath(*name.split("/")[:temporary + 1])), name
    assert os.path.isdir(tmp_path / "retrain" / "checkpoints")
    for name in kept:
        assert os.path.exists(tmp_path / name), name
    assert open(tmp_path / workdir_lib.LOCK_FILE).read() == ""  # released


# ---- NaN in the teacher stage, then a training stage rerun after its last checkpoint ---------


@needs_fmnist
def test_teacher_nan_stop_fixed_resume_and_rerun_after_the_last_checkpoint(tmp_path,
                                                                           monkeypatch):
    config = tiny_config(stages="teacher")
    nan_lr = tiny_config(stages="teacher", **{"teacher.train.optimizer.learning_rate": NAN})
    with monkeypatch.context() as patch:  # validation would refuse the NaN before any work
        patch.setattr(validate, "validate_pipeline_config", lambda *args, **kwargs: None)
        with pytest.raises(retrain.NonFiniteLossError, match="last good checkpoint is none"):
            pipeline.run_pipeline(nan_lr, str(tmp_path))
    checkpoints = tmp_path / "teacher" / "train" / "checkpoints"
    assert not [name for name in os.listdir(checkpoints) if name.isdigit()]  # nothing NaN saved
    # The fixed config is another config for the unfinished stage: named, and resumable.
    with pytest.raises(artifacts.ConfigChangedError, match="on_change=resume"):
        pipeline.run_pipeline(config, str(tmp_path))
    resumed = tiny_config(stages="teacher", on_change="resume")
    first = pipeline.run_pipeline(resumed, str(tmp_path))["teacher"]
    assert first["train_loss"] == first["train_loss"]  # finite, not NaN
    # Killed between the last checkpoint and the manifest: the manifest is missing.
    os.remove(tmp_path / "teacher" / artifacts.MANIFEST)
    again = pipeline.run_pipeline(config, str(tmp_path))
    assert again["stages"] == {"teacher": "ran"}
    figures = artifacts.read_manifest(str(tmp_path / "teacher"))["figures"]
    assert figures["steps_this_run"] == 0 and figures["resumed_from_step"] == figures["steps"]
    for key in ("train_loss", "train_accuracy", "test_accuracy", "test_loss"):
        assert figures[key] == first[key], key  # re-evaluated, not NaN


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "train"])
def test_absl_commands_list_their_flags(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--workdir" in out and "--config.FIELD=VALUE" in out


@pytest.mark.parametrize("argv, fragment", [
    (["info", "--resolution", "-3"], "argument --resolution: must be a positive integer, got -3"),
    (["info", "--resolution", "0"], "must be a positive integer, got 0"),
    (["info", "--num-classes", "x"], "expected an integer, got 'x'"),
    (["export", "--space", "tiny", "--arch", "a.json", "--resolution", "-5"],
     "argument --resolution: must be an integer >= 0, got -5"),
])
def test_bad_numeric_arguments_are_one_line_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err, err


def test_bad_arguments_exit_nonzero_without_a_traceback():
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "dna_jax.cli", "info", "--resolution", "-3"],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "dna-jax info: error: argument --resolution: must be a positive integer, got -3 "
        "(see dna-jax info --help)"]


def test_a_nonfinite_state_is_never_checkpointed(tmp_path):
    import numpy as np

    from dna_jax import checkpoint as checkpoint_lib
    good = {"w": np.ones(3, np.float32), "step": np.int32(1)}
    bad = {"w": np.asarray([1.0, np.nan, np.inf], np.float32), "step": np.int32(2)}
    with checkpoint_lib.Checkpointer(str(tmp_path), save_every_steps=1) as checkpointer:
        assert checkpointer.save(1, good)
        checkpointer.wait()
        with pytest.raises(checkpoint_lib.NonFiniteStateError,
                           match=r"step 2 holds NaN/inf in 1 of 1 leaves .*'w'.* last good "
                                 r"checkpoint is step 1"):
            checkpointer.save(2, bad)
        assert checkpointer.all_steps() == [1]
        restored = checkpointer.restore(good)
    assert checkpoint_lib.nonfinite_leaves(restored) == ([], 1)


def test_an_unusable_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, caplog):
    import glob

    import numpy as np
    import orbax.checkpoint as ocp

    from dna_jax import checkpoint as checkpoint_lib
    states = {step: {"w": np.full(64, step, np.float32)} for step in (1, 2)}
    with checkpoint_lib.Checkpointer(str(tmp_path), save_every_steps=1) as checkpointer:
        for step, state in states.items():
            checkpointer.save(step, state)
        # A NaN state written behind the checker's back (as a flipped byte would make it).
        checkpointer._manager.save(3, args=ocp.args.StandardSave(
            {"w": np.full(64, np.nan, np.float32)}), force=True)
    with caplog.at_level("WARNING"):
        with checkpoint_lib.Checkpointer(str(tmp_path)) as checkpointer:
            restored, step = checkpointer.restore_latest_good(states[1])
            assert step == 2 and np.all(restored["w"] == 2)
            assert checkpointer.all_steps() == [1, 2]
    assert "step 3" in caplog.text and "NaN/inf in 1 of 1 leaves" in caplog.text
    assert len(glob.glob(str(tmp_path / "3.unusable-*"))) == 1  # set aside, not deleted
    # Damaged files (every file of step 2 truncated): step 1 is used.
    for path in glob.glob(str(tmp_path / "2" / "**" / "*"), recursive=True):
        if os.path.isfile(path) and "_CHECKPOINT_METADATA" not in path:
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 2))
    with checkpoint_lib.Checkpointer(str(tmp_path)) as checkpointer:
        restored, step = checkpointer.restore_latest_good(states[1])
        assert step == 1 and np.all(restored["w"] == 1)
    assert len(glob.glob(str(tmp_path / "2.unusable-*"))) == 1


def test_a_flipped_byte_with_finite_values_fails_its_checksums_and_is_set_aside(tmp_path,
                                                                                caplog):
    import glob

    import numpy as np

    from dna_jax import checkpoint as checkpoint_lib
    states = {step: {"w": np.full(4096, step, np.float32)} for step in (1, 2)}
    with checkpoint_lib.Checkpointer(str(tmp_path), save_every_steps=1) as checkpointer:
        for step, state in states.items():
            checkpointer.save(step, state)
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "*.sha256.json"))) == [
        "1.sha256.json", "2.sha256.json"]
    files = [p for p in glob.glob(str(tmp_path / "2" / "**" / "*"), recursive=True)
             if os.path.isfile(p)]
    data_file = max(files, key=os.path.getsize)  # the array bytes
    with open(data_file, "r+b") as f:
        f.seek(os.path.getsize(data_file) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with caplog.at_level("WARNING"):
        with checkpoint_lib.Checkpointer(str(tmp_path)) as checkpointer:
            restored, step = checkpointer.restore_latest_good(states[1])
    assert step == 1 and np.all(restored["w"] == 1)
    assert "differ from the checksums recorded" in caplog.text
    assert os.path.relpath(data_file, tmp_path / "2") in caplog.text  # the file is named
    moved = glob.glob(str(tmp_path / "2.unusable-*"))
    assert len(moved) == 1 and os.path.exists(os.path.join(moved[0], "recorded.sha256.json"))


# ---- damaged artifacts: named, with advice that works ----------------------------------------


def test_a_damaged_manifest_does_not_count_as_complete(tmp_path, caplog):
    path = tmp_path / artifacts.MANIFEST
    with caplog.at_level("WARNING"):
        for text, reason in (("{}", "has no config_hash"), ("{garbled", "not valid JSON")):
            path.write_text(text)
            assert artifacts.stage_status(str(tmp_path), "abc") == "missing"
            assert reason in caplog.text and str(path) in caplog.text


def test_a_garbled_arch_json_is_named_with_the_fix(tmp_path):
    from dna_jax import export
    winner = tmp_path / "search" / "winner"
    winner.mkdir(parents=True)
    (winner / export.SUMMARY_FILE).write_text(json.dumps({"format": export.EXPORT_FORMAT}))
    (winner / export.ARCH_FILE).write_text('{"blocks": [[0, 1], [')
    with pytest.raises(export.ExportError, match=r"arch.json is not a readable architecture "
                                                r".*export it again \(dna-jax export\)"):
        export.load_exported(str(winner))
    # In a pipeline workdir (search/winner) the fix names the search stage's manifest.
    (tmp_path / "search" / artifacts.MANIFEST).write_text("{}")
    with pytest.raises(export.ExportError, match=rf"remove {tmp_path}/search/manifest.json "
                                                r"\(nothing else\) and rerun the same command: "
                                                r"the search stage then runs again"):
        export.load_exported(str(winner))


def test_a_sealed_manifest_with_a_changed_figure_does_not_count_as_complete(tmp_path, caplog):
    stage = tmp_path / "teacher"
    artifacts.write_manifest(str(stage), "teacher", "abc", {"lr": 0.1},
                             {"test_accuracy": 0.8125}, 1.0)
    assert artifacts.stage_status(str(stage), "abc") == "complete"
    assert artifacts.read_manifest(str(stage))["figures"] == {"test_accuracy": 0.8125}
    path = stage / artifacts.MANIFEST
    path.write_text(path.read_text().replace("0.8125", "0.9125"))  # still valid JSON
    with caplog.at_level("WARNING"):
        assert artifacts.stage_status(str(stage), "abc") == "missing"
    assert f"{path} is corrupt: its content has SHA-256" in caplog.text
    assert "the teacher stage counts as not done and runs again" in caplog.text
    with pytest.raises(artifacts.ManifestError, match=r"rerun with the 'teacher' stage in "
                                                      r"config.stages"):
        artifacts.read_manifest(str(stage))


def test_a_damaged_supernet_of_a_finished_stage_says_to_remove_its_manifest(tmp_path):
    from dna_jax.supernet import artifact
    supernet = tmp_path / "distill" / "supernet"
    os.makedirs(supernet)
    (supernet / artifact.SUPERNET_MANIFEST).write_text("{garbled")
    (tmp_path / "distill" / artifacts.MANIFEST).write_text("{}")
    with pytest.raises(artifact.SupernetCheckpointError,
                       match=r"remove .*distill/manifest.json \(nothing else\) and rerun"):
        artifact.load_supernet(str(supernet), {"block0": {}})


def test_a_flipped_byte_in_the_supernet_is_named_with_the_fix(tmp_path):
    import glob

    import numpy as np

    from dna_jax.supernet import artifact
    variables = {"block0": {"params": {"w": np.arange(4096, dtype=np.float32)}}}
    supernet = str(tmp_path / "distill" / "supernet")
    artifact.save_supernet(supernet, variables)
    (tmp_path / "distill" / artifacts.MANIFEST).write_text("{}")
    restored = artifact.load_supernet(supernet, variables)
    np.testing.assert_array_equal(restored["block0"]["params"]["w"],
                                  variables["block0"]["params"]["w"])
    data = max((p for p in glob.glob(os.path.join(supernet, "variables", "**", "*"),
                                      recursive=True) if os.path.isfile(p)), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(artifact.SupernetCheckpointError,
                       match=r"variables is corrupt: .*SHA-256.*remove .*distill/manifest.json "
                             r"\(nothing else\) and rerun"):
        artifact.load_supernet(supernet, variables)


class _Flag:  # stands for a parsed absl flag (config_flags cannot be parsed twice per process)
    def __init__(self, value):
        self.value = value


def test_run_command_reports_bad_values_and_a_full_disk_in_one_message(tmp_path, monkeypatch):
    import errno

    from dna_jax import main
    bad = tiny_config(**{"search.budget_fraction": 0.0, "data.batch_size": -1})
    monkeypatch.setattr(main, "_CONFIG", _Flag(bad))
    monkeypatch.setattr(main, "_WORKDIR", _Flag(str(tmp_path / "w")))
    with pytest.raises(SystemExit) as error:
        main.main(["dna-jax run"])
    message = str(error.value.code)
    assert message.startswith("dna-jax run: 2 bad config value(s), nothing was run:\n  config.")
    assert "config.search.budget_fraction=0.0: must be > 0" in message
    assert "config.data.batch_size=-1: must be >= 1" in message
    assert not (tmp_path / "w").exists()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/w/teacher/x")

    monkeypatch.setattr(main, "_CONFIG", _Flag(tiny_config()))
    monkeypatch.setattr(pipeline, "run_pipeline", full_disk)
    with pytest.raises(SystemExit, match=r"the disk is full \(No space left on device: "
                                         r"/w/teacher/x\); free space and rerun the same "
                                         r"command"):
        main.main(["dna-jax run"])
