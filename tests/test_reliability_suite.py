"""The reliability suite (issue 22 item 7): each guarantee of the pipeline, one test id per
case, each asserting the outcome (the same result as an uninterrupted run, or the named error
and a fix that works).

  kill     a run dies by SIGKILL at an injected point (tests/reliability_worker.py); the
           rerun finishes with the uninterrupted run's result
  corrupt  a flipped byte in each artifact kind; the artifact is named with its fix (which,
           followed, gives the uninterrupted result) or set aside / rerun automatically
  lock     a second run on a workdir in use is refused naming the holder; the first finishes
  disk     the disk fills up during a stage: a clear error, nothing computed before is lost,
           and the rerun after freeing space finishes with the uninterrupted result
  nan      a NaN at a training step of each training stage: the run stops, the newest
           checkpoint on disk is finite, the rerun (the NaN source removed) continues from it
           to the uninterrupted result
  config   bad values refused before any work (DNA's table is in tests/test_reliability.py;
           DNA++'s here)

One tiny DNA run (`configs/fashion_mnist_dna.py:tiny`) is shared by the module; each case
works on a copy of it. README.md (Reliability) gives the counts.
"""

import errno
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dna_jax import artifacts, checkpoint, config_files, pipeline, validate
from dna_jax import data as data_lib
from dna_jax import workdir as workdir_lib
from dna_jax.errors import NonFiniteLossError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DNA = os.path.join(REPO, "configs", "fashion_mnist_dna.py")
DNA_PP = os.path.join(REPO, "configs", "fashion_mnist_dna_pp.py")
WORKER = os.path.join(REPO, "tests", "reliability_worker.py")
STAGES = ("teacher", "distill", "rate", "search", "retrain", "deploy", "report")
NAN = float("nan")

pytestmark = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Fashion-MNIST idx files missing (make data installs them)")


def dna_config(**overrides):
    return config_files.load_config(DNA, "tiny", **overrides)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished tiny DNA run (never changed: cases work on copies). Under xdist the
    workers share one: the first makes it, holding a file lock, the others wait for it."""
    import fcntl
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    workdir = str(root / "reliability_done")
    with open(root / "reliability_done.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(workdir, pipeline.SUMMARY_FILE)):
            shutil.rmtree(workdir, ignore_errors=True)
            pipeline.run_pipeline(dna_config(), workdir)
    return workdir


def copy_run(done_dir, tmp_path, drop=()):
    """A copy of the finished run without the stages in `drop` (as if never run)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(done_dir, workdir)
    for stage in drop:
        shutil.rmtree(os.path.join(workdir, stage))
    if "report" in drop:
        os.remove(os.path.join(workdir, pipeline.SUMMARY_FILE))
    return workdir


# ---- what "the same result" means ----------------------------------------------------------

_VOLATILE = ("seconds", "time", "resumed_from_step", "steps_this_run", "per_s", "sha256")


def _stable(value):
    """A stage's figures without what differs between two runs of the same computation
    (timings, how many steps this run did, where it resumed)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if not any(word in k for word in _VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def figures(workdir, stage, roots=()):
    """A stage's stable figures, the paths of its workdir and `roots` replaced by 'W' (a
    copy's figures name the folder that made them)."""
    text = json.dumps(artifacts.read_manifest(os.path.join(workdir, stage))["figures"])
    for root in sorted({workdir, *roots}, key=len, reverse=True):
        text = text.replace(root, "W")
    return _stable(json.loads(text))


def assert_same_result(workdir, done_dir, stages=STAGES):
    """Every stage's figures, the rating tables and the exported winner equal the
    uninterrupted run's."""
    for stage in stages:
        assert figures(workdir, stage, [done_dir]) == figures(done_dir, stage), stage
    if "rate" in stages:
        for path in sorted(glob.glob(os.path.join(done_dir, "rate", "*.npz"))):
            with np.load(path) as a, np.load(path.replace(done_dir, workdir)) as b:
                assert sorted(a.files) == sorted(b.files)
                for key in a.files:
                    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{path}: {key}")
    if "search" in stages:
        arch = os.path.join("search", "winner", "arch.json")
        assert open(os.path.join(workdir, arch)).read() == open(os.path.join(done_dir,
                                                                             arch)).read()


def flip_byte(path, position=None):
    """XORs one byte (default: the middle one) of a file."""
    size = os.path.getsize(path)
    position = size // 2 if position is None else position
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        f.seek(position)
        f.write(bytes([byte[0] ^ 0x10]))


def largest_file(directory):
    """The largest file of an Orbax folder's array data (its `d/` chunks: a flip there leaves
    every file readable and only changes values), else of the folder."""
    files = [p for p in glob.glob(os.path.join(directory, "**", "*"), recursive=True)
             if os.path.isfile(p)]
    data = [p for p in files if f"{os.sep}d{os.sep}" in p]
    return max(data or files, key=os.path.getsize)


def rerun(workdir, **overrides):
    return pipeline.run_pipeline(dna_config(**overrides), workdir)


# ---- kill at injected points ---------------------------------------------------------------

KILLS = [  # (kill point, stages dropped from the finished run before the killed run)
    pytest.param("npz:2", ("rate", "search", "retrain", "report"), id="kill-inside-npz-write"),
    pytest.param("manifest:retrain", ("retrain", "report"),
                 id="kill-between-last-checkpoint-and-manifest-retrain"),
    pytest.param("checkpoint:retrain:4", ("retrain", "report"),
                 id="kill-inside-checkpoint-write-retrain", marks=pytest.mark.slow),
    pytest.param("manifest-write:search", ("search", "retrain", "report"),
                 id="kill-inside-manifest-write-search", marks=pytest.mark.slow),
    pytest.param("manifest:teacher", STAGES,
                 id="kill-between-last-checkpoint-and-manifest-teacher",
                 marks=pytest.mark.slow),
    pytest.param("checkpoint:distill:4", ("distill", "rate", "search", "retrain", "report"),
                 id="kill-inside-checkpoint-write-distill", marks=pytest.mark.slow),
]


def run_worker(workdir, point, config=f"{DNA}:tiny"):
    return subprocess.run([sys.executable, WORKER, config, workdir, point],
                          capture_output=True, text=True, timeout=1200, check=False,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("point, drop", KILLS)
def test_kill(done, tmp_path, point, drop):
    workdir = copy_run(done, tmp_path, drop)
    killed = run_worker(workdir, point)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert "killed: " in killed.stdout
    result = rerun(workdir)
    ran = {stage for stage, how in result["stages"].items() if how == "ran"}
    assert ran <= set(drop)  # what finished before the kill is not redone
    assert_same_result(workdir, done)
    left = [name for _, _, files in os.walk(workdir) for name in files
            if name.endswith(".tmp")]
    assert not left, left  # the interrupted write's temporary was cleaned up


# ---- corrupted bytes in each artifact kind --------------------------------------------------


def test_corrupt_orbax_training_checkpoint_falls_back(done, tmp_path, caplog):
    """A flipped byte in the newest retrain checkpoint: set aside, the previous one used."""
    workdir = copy_run(done, tmp_path)
    checkpoints = os.path.join(workdir, "retrain", "checkpoints")
    flip_byte(largest_file(os.path.join(checkpoints, "4")))
    os.remove(os.path.join(workdir, "retrain", artifacts.MANIFEST))  # the stage resumes
    with caplog.at_level("WARNING"):
        result = rerun(workdir)
    assert result["stages"]["retrain"] == "ran"
    assert "Checkpoint step 4" in caplog.text and "differ from the checksums" in caplog.text
    assert len(glob.glob(os.path.join(checkpoints, "4.unusable-*"))) == 1  # kept, not deleted
    manifest = artifacts.read_manifest(os.path.join(workdir, "retrain"))["figures"]
    assert manifest["resumed_from_step"] == 2
    assert_same_result(workdir, done)


def _follow(error_text, workdir):
    """Carries out the fix the error names: `remove A (nothing else)`, `remove A and B`, or
    `mv A B`. Returns what was done."""
    import re
    move = re.search(r"`mv (\S+) (\S+)`", error_text)
    if move:
        os.replace(move.group(1), move.group(2))
        return f"mv {move.group(1)}"
    paths = re.findall(r"(/\S+?\.(?:json|npz))\b", error_text.split("remove ", 1)[1])
    removed = [p for p in paths if p.startswith(workdir) and os.path.exists(p)
               and ("manifest.json" in p or p.endswith(".npz"))]
    for path in removed:
        os.remove(path)
    return "remove " + " ".join(removed)


CORRUPT = [  # (what, file to flip (glob in the workdir), stage made to read it, the error
    #          class, what the message must name)
    pytest.param("teacher/checkpoint/variables", "distill", pipeline.StageError,
                 "teacher checkpoint", id="corrupt-teacher"),
    pytest.param("distill/supernet/variables", "rate", None, "variables is corrupt",
                 id="corrupt-supernet"),
    pytest.param("rate/block0.npz", "search", ValueError, "block0.npz is corrupt",
                 id="corrupt-rating-table-npz"),
    pytest.param("search/winner/arch.json", "retrain", ValueError, "arch.json is corrupt",
                 id="corrupt-arch-json"),
    pytest.param("search/winner/variables", "retrain", ValueError,
                 "exported child network's variables", id="corrupt-exported-winner"),
]


@pytest.mark.parametrize("target, reader, error_class, named", CORRUPT)
def test_corrupt_artifact_is_named_and_its_fix_works(done, tmp_path, target, reader,
                                                      error_class, named):
    from dna_jax.supernet import artifact
    workdir = copy_run(done, tmp_path)
    path = os.path.join(workdir, target)
    flip_byte(largest_file(path) if os.path.isdir(path) else path)
    # The stage that reads it has not finished (else nothing reads it): e.g. killed.
    os.remove(os.path.join(workdir, reader, artifacts.MANIFEST))
    if reader == "rate":  # one block still to rate: the supernet is loaded
        for name in ("block1.npz", "block1.json"):
            os.remove(os.path.join(workdir, "rate", name))
    error_class = error_class or artifact.SupernetCheckpointError
    with pytest.raises(error_class) as error:
        rerun(workdir)
    message = str(error.value)
    assert named in message and os.path.join(workdir, target.split("/")[0]) in message, message
    done_fix = _follow(message, workdir)
    assert done_fix not in ("remove ", ""), message
    result = rerun(workdir)
    assert result["stages"][reader] == "ran"
    assert_same_result(workdir, done)


@pytest.mark.parametrize("stage", ["teacher", "distill", "rate", "search", "retrain",
                                   "deploy", "report"])
def test_corrupt_manifest_reruns_only_its_stage(done, tmp_path, stage, caplog):
    workdir = copy_run(done, tmp_path)
    path = os.path.join(workdir, stage, artifacts.MANIFEST)
    text = open(path).read()
    # A changed byte that still parses (in the config hash: unsealed, the stage would count
    # as made by another config): only the manifest's seal can tell.
    key = '"config_hash": "'
    start = text.index(key) + len(key)
    digit = "1" if text[start] != "1" else "2"
    open(path, "w").write(text[:start] + digit + text[start + 1:])
    with caplog.at_level("WARNING"):
        result = rerun(workdir)
    assert f"{path} is corrupt" in caplog.text
    assert result["stages"] == {s: "ran" if s == stage else "skipped" for s in STAGES}
    assert_same_result(workdir, done)


def test_garbled_manifest_reruns_its_stage(done, tmp_path, caplog):
    workdir = copy_run(done, tmp_path)
    path = os.path.join(workdir, "search", artifacts.MANIFEST)
    flip_byte(path, 0)  # '{' -> 'k': not JSON
    with caplog.at_level("WARNING"):
        result = rerun(workdir)
    assert f"{path} is not valid JSON" in caplog.text
    assert result["stages"]["search"] == "ran" and result["stages"]["retrain"] == "skipped"
    assert_same_result(workdir, done)


# ---- two runs on one workdir ----------------------------------------------------------------


def test_second_concurrent_run_is_refused_and_the_first_finishes(done, tmp_path):
    workdir = copy_run(done, tmp_path, ("retrain", "report"))
    first = subprocess.Popen([sys.executable, WORKER, f"{DNA}:tiny", workdir, "none"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    try:
        lock = os.path.join(workdir, workdir_lib.LOCK_FILE)
        for _ in range(1200):  # until the first run holds the lock (its pid in the file)
            try:
                if json.load(open(lock)).get("pid") == first.pid:
                    break
            except (OSError, ValueError):
                pass
            if first.poll() is not None:
                break
            import time
            time.sleep(0.25)
        assert first.poll() is None, first.communicate()
        with pytest.raises(workdir_lib.WorkdirLockedError) as error:
            rerun(workdir)
        holder = json.load(open(lock))
        message = str(error.value)
        assert f"pid {first.pid}" in message and repr(holder["host"]) in message
        assert holder["started"] in message
        out, err = first.communicate(timeout=1200)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0 and "finished" in out, err[-3000:]
    assert_same_result(workdir, done)


# ---- a full disk ----------------------------------------------------------------------------


def _digests(workdir, stages):
    from dna_jax import integrity
    return {stage: integrity.tree_checksums(os.path.join(workdir, stage)) for stage in stages}


DISK_FULL = [  # (what fails with ENOSPC, the stages dropped before the run)
    pytest.param("npz", ("rate", "search", "retrain", "report"), id="disk-full-npz-write"),
    pytest.param("manifest", ("search",), id="disk-full-manifest-write"),
    pytest.param("checkpoint", ("retrain", "report"), id="disk-full-checkpoint-write",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("what, drop", DISK_FULL)
def test_full_disk(done, tmp_path, monkeypatch, what, drop):
    """A patched writer raises ENOSPC (a real full tmpfs: the slow test below)."""
    from dna_jax import main
    workdir = copy_run(done, tmp_path, drop)
    kept = [s for s in STAGES if s not in drop]
    before = _digests(workdir, kept)

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    if what == "npz":
        write_bytes = artifacts.write_bytes
        monkeypatch.setattr(artifacts, "write_bytes", lambda path, data: full(path) if str(
            path).endswith(".npz") else write_bytes(path, data))
    elif what == "manifest":
        monkeypatch.setattr(artifacts, "write_manifest", lambda stage_dir, *a, **k: full(
            os.path.join(stage_dir, artifacts.MANIFEST)))
    else:
        save = checkpoint.Checkpointer.save
        monkeypatch.setattr(checkpoint.Checkpointer, "save", lambda self, step, *a, **k: full(
            os.path.join(self.directory, str(step))) if step >= 2 else save(self, step, *a, **k))
    monkeypatch.setattr(main, "_CONFIG", _Flag(dna_config()))
    monkeypatch.setattr(main, "_WORKDIR", _Flag(workdir))
    with pytest.raises(SystemExit) as error:
        main.main(["dna-jax run"])
    message = str(error.value.code)
    assert message.startswith("dna-jax run: the disk is full (No space left on device: "
                              f"{workdir}/"), message
    assert "free space and rerun the same command" in message
    assert _digests(workdir, kept) == before  # nothing computed before is lost
    monkeypatch.undo()  # space freed
    result = rerun(workdir)
    assert {s for s, how in result["stages"].items() if how == "ran"} == set(drop)
    assert_same_result(workdir, done)


class _Flag:  # stands for a parsed absl flag (config_flags cannot be parsed twice per process)
    def __init__(self, value):
        self.value = value


@pytest.mark.slow
def test_full_tmpfs(done, tmp_path):
    """The workdir on a real tmpfs too small for the retrain stage (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    source = copy_run(done, tmp_path, ("retrain", "report"))
    pages = sum(-(-os.path.getsize(p) // 4096) for p in glob.glob(
        os.path.join(source, "**", "*"), recursive=True) if os.path.isfile(p))
    size = pages * 4096 + (384 << 10)  # what is there and 384 KiB: retrain needs ~1.2 MiB
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (the patched-writer cases above cover it)")
    try:
        workdir = str(mount / "run")
        shutil.copytree(source, workdir)
        before = _digests(workdir, STAGES[:4])
        out = subprocess.run([sys.executable, "-m", "dna_jax.main", f"--config={DNA}:tiny",
                              f"--workdir={workdir}"], capture_output=True, text=True,
                             timeout=1200, check=False,
                             env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 1, out.stderr[-3000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("dna-jax run: the disk is full"), out.stderr[-3000:]
        assert _digests(workdir, STAGES[:4]) == before
        subprocess.run(["mount", "-o", "remount,size=512m", str(mount)], check=True)
        result = rerun(workdir)
        assert result["stages"]["retrain"] == "ran"
        assert_same_result(workdir, done)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ---- NaN at each training stage -------------------------------------------------------------


def _nan_from_step(monkeypatch, step):
    """Every training batch (its floating-point arrays) is NaN from training step `step`
    (1-based) on."""
    original = data_lib.Dataset.host_batches

    def poisoned(self, start_step=0):
        for index, batch in enumerate(original(self, start_step)):
            if self.info.training and start_step + index + 1 >= step:
                batch = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating)
                         else v for k, v in batch.items()}
            yield batch

    monkeypatch.setattr(data_lib.Dataset, "host_batches", poisoned)


def _newest_checkpoint_is_finite(directory):
    """The newest checkpoint on disk, restored as saved: every leaf finite. Returns its step."""
    with checkpoint.Checkpointer(directory) as checkpointer:
        step = checkpointer.latest_step()
        assert step is not None, f"no checkpoint in {directory}"
        import orbax.checkpoint as ocp
        state = checkpointer._manager.restore(step, args=ocp.args.StandardRestore())
    assert checkpoint.nonfinite_leaves(state)[0] == []
    return step


NAN_STAGES = [  # (stage, stages dropped before the run, its checkpoint folder)
    pytest.param("teacher", STAGES, "teacher/train/checkpoints", id="nan-teacher"),
    pytest.param("distill", ("distill", "rate", "search", "retrain", "report"),
                 "distill/checkpoints", id="nan-distill"),
    pytest.param("retrain", ("retrain", "report"), "retrain/checkpoints", id="nan-retrain"),
]


@pytest.mark.parametrize("stage, drop, checkpoints", NAN_STAGES)
def test_nan(done, tmp_path, monkeypatch, stage, drop, checkpoints):
    """The run stops at the NaN (training step 3; checkpoints every 2 steps); the rerun,
    the NaN's source removed, continues from step 2 to the uninterrupted result (the
    stages up to this one: those after it read only its artifacts)."""
    workdir = copy_run(done, tmp_path, drop)
    upto = STAGES[:STAGES.index(stage) + 1]
    with monkeypatch.context() as patch:
        _nan_from_step(patch, 3)
        with pytest.raises(NonFiniteLossError, match=r"last good checkpoint is step 2"):
            rerun(workdir, stages=",".join(upto))
    assert _newest_checkpoint_is_finite(os.path.join(workdir, checkpoints)) == 2
    result = rerun(workdir, stages=",".join(upto))
    assert result["stages"][stage] == "ran"
    assert artifacts.read_manifest(os.path.join(workdir, stage))["figures"][
        "resumed_from_step"] == 2
    assert_same_result(workdir, done, upto)


def test_nan_ssl(tmp_path, monkeypatch):
    """DNA++'s ssl stage: against an uninterrupted ssl run."""
    config = config_files.load_config(DNA_PP, "tiny", stages="ssl")
    clean, stopped = str(tmp_path / "clean"), str(tmp_path / "stopped")
    pipeline.run_pipeline(config, clean)
    with monkeypatch.context() as patch:
        _nan_from_step(patch, 3)
        with pytest.raises(NonFiniteLossError, match=r"SSL loss .* at step 3; the last good "
                                                    r"checkpoint is step 2"):
            pipeline.run_pipeline(config, stopped)
    assert _newest_checkpoint_is_finite(os.path.join(stopped, "ssl", "checkpoints")) == 2
    result = pipeline.run_pipeline(config, stopped)
    assert result["stages"] == {"ssl": "ran"}
    assert figures(stopped, "ssl") == figures(clean, "ssl")


# ---- DNA++'s bad config values (DNA's table: tests/test_reliability.py) ---------------------

PP_BAD_VALUES = [
    ({"ssl.learning_rates": (NAN,)}, "config.ssl.learning_rates[0]=nan", "finite"),
    # Named by the ssl section's own check (config.ssl: ssl.num_steps ..., got -1): field,
    # value and fix are there, not in the config.<field>=<value> form of the others.
    ({"ssl.num_steps": -1}, "ssl.num_steps must be >= 0", "got -1"),
    ({"data.batch_size": 0}, "config.data.batch_size=0", "must be >= 1"),
    ({"search.budget": 1.0}, "config.search.budget=1.0", "raise it to at least"),
    ({"retrain.optimizer.learning_rate": -1.0}, "config.retrain.optimizer.learning_rate=-1.0",
     "must be > 0"),
    ({"data.image_size": 2}, "config.data.image_size=2", "use at least 4"),
]


@pytest.mark.parametrize("overrides, field, fix", PP_BAD_VALUES,
                         ids=["config-pp-" + ",".join(o) for o, _, _ in PP_BAD_VALUES])
def test_dna_pp_bad_values_are_named_before_any_work(tmp_path, monkeypatch, overrides, field,
                                                     fix):
    workdir = tmp_path / "run"
    monkeypatch.setattr(pipeline, "run_stage", lambda *a: pytest.fail("a stage started"))
    with pytest.raises(validate.ConfigError) as error:
        pipeline.run_pipeline(config_files.load_config(DNA_PP, "tiny", **overrides),
                              str(workdir))
    message = str(error.value)
    assert field in message and fix in message and "nothing was run" in message, message
    assert not workdir.exists()


def test_full_disk_reported_by_a_library(tmp_path, monkeypatch):
    """A full disk seen by TensorFlow's event writer (found by the tmpfs case: a
    ResourceExhaustedError, not an OSError) is the same one-line message."""
    from dna_jax import main

    class ResourceExhaustedError(Exception):
        pass

    def full(*args, **kwargs):
        try:
            raise OSError("Failed to flush 1 events")
        except OSError as cause:
            raise ResourceExhaustedError(
                "/w/retrain/events.out.tfevents.1; No space left on device\n\tFailed to flush "
                "1 events") from cause

    monkeypatch.setattr(main, "_CONFIG", _Flag(dna_config()))
    monkeypatch.setattr(main, "_WORKDIR", _Flag(str(tmp_path)))
    monkeypatch.setattr(pipeline, "run_pipeline", full)
    with pytest.raises(SystemExit) as error:
        main.main(["dna-jax run"])
    assert str(error.value.code) == (
        "dna-jax run: the disk is full (ResourceExhaustedError: /w/retrain/events.out.tfevents.1;"
        " No space left on device); free space and rerun the same command: finished stages are "
        "skipped and the interrupted one resumes from its last checkpoint.")
    monkeypatch.setattr(pipeline, "run_pipeline", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is not called a full disk
        main.main(["dna-jax run"])
