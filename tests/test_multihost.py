"""Multi-host on CPU: the distillation step in 2 processes equals the same step in 1.

Two processes start `jax.distributed.initialize` with a localhost coordinator and gloo CPU
collectives (2 CPU devices each, so the mesh spans 4 devices over 2 hosts); each feeds its half
of the global batch. Both must see the per-block losses one process computes on the whole batch
(2 devices): the all-blocks step, its BatchNorm statistics and its gradients are global.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


_RUNS = iter(range(1 << 30))


def _start_all(commands, env, tmp_path, cwd=None) -> tuple[list[subprocess.Popen], list]:
    """Starts every worker; returns the processes and the paths of their logs.

    Each worker writes to its own file, not a pipe: read one pipe after another and a worker
    that fills its 64 KiB pipe blocks in a log call while the others wait for it in a
    collective (this deadlocked the pipeline tests once their logs grew)."""
    run = next(_RUNS)
    paths = [tmp_path / f"worker_{os.getpid()}_{run}_{i}.log" for i in range(len(commands))]
    procs = []
    for command, path in zip(commands, paths):
        with open(path, "w") as handle:  # the child keeps its own descriptor
            procs.append(subprocess.Popen(command, env=env, cwd=cwd, stdout=handle,
                                          stderr=subprocess.STDOUT, text=True))
    return procs, paths


def _kill_left(procs: list[subprocess.Popen]) -> None:
    """Kills (and reaps) the workers still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait_all(commands, env, tmp_path, timeout: float, cwd=None
              ) -> list[tuple[subprocess.Popen, str]]:
    """Starts every worker, waits for all (at most `timeout` seconds in all, then kills the
    ones left), returns (process, its output) of each."""
    procs, paths = _start_all(commands, env, tmp_path, cwd)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        _kill_left(procs)
    return [(p, path.read_text()) for p, path in zip(procs, paths)]


def _run(num_processes: int, tmp_path) -> list[dict]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    outs = [str(tmp_path / f"p{num_processes}_{i}.json") for i in range(num_processes)]
    finished = _wait_all([[sys.executable, WORKER, str(i), str(num_processes), str(port), outs[i]]
                          for i in range(num_processes)], env, tmp_path, timeout=600)
    for p, log in finished:
        assert p.returncode == 0, log[-3000:]
    return [json.load(open(o)) for o in outs]


def test_two_processes_see_the_single_process_loss(tmp_path):
    single = _run(1, tmp_path)[0]
    pair = _run(2, tmp_path)
    assert single["devices"] == 2 and single["processes"] == 1
    assert [r["processes"] for r in pair] == [2, 2] and pair[0]["devices"] == 4
    for result in pair:
        np.testing.assert_allclose(result["losses"], single["losses"], rtol=2e-5, atol=1e-7)
    # The step changed the weights: the second step's losses differ from the first's.
    assert not np.allclose(single["losses"][0], single["losses"][1])


PIPELINE_WORKER = os.path.join(HERE, "multihost_pipeline_worker.py")
REPO = os.path.dirname(HERE)


# A tiny pipeline takes 3-5 minutes in 2 processes on 2 idle cores, 10-15 beside a training
# job (DNA+: two of them); the limit only stops a run that hangs.
PIPELINE_TIMEOUT_S = 3600


def _pipeline_commands(num_processes: int, config: str, workdir: str, tmp_path,
                       local_devices: int = 1, overrides: dict | None = None
                       ) -> tuple[list[list[str]], list[str]]:
    """The workers' command lines and the files their figures go to."""
    port = _free_port()
    tag = next(_RUNS)
    outs = [str(tmp_path / f"pipeline_{tag}_p{num_processes}_{i}.json")
            for i in range(num_processes)]
    commands = [[sys.executable, PIPELINE_WORKER, str(i), str(num_processes), str(port),
                 config, workdir, outs[i], str(local_devices), json.dumps(overrides or {})]
                for i in range(num_processes)]
    return commands, outs


def _stages(config: str) -> tuple[str, ...]:
    """The stages the pipeline of `config` ('path.py:arg') runs, from its supervision."""
    from dna_jax import config_files, supervision  # pylint: disable=import-outside-toplevel
    path, _, arg = config.partition(":")
    return supervision.of(config_files.load_config(path, arg or None)).stages


def _worker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}


def _run_pipeline(num_processes: int, config: str, workdir: str, tmp_path,
                  local_devices: int = 1, overrides: dict | None = None,
                  logs: list | None = None) -> list[dict]:
    """Runs the pipeline in `num_processes` workers on `workdir`; their figures (and, into
    `logs` if given, their output)."""
    commands, outs = _pipeline_commands(num_processes, config, workdir, tmp_path,
                                        local_devices, overrides)
    finished = _wait_all(commands, _worker_env(), tmp_path, timeout=PIPELINE_TIMEOUT_S,
                         cwd=REPO)
    for i, (p, log) in enumerate(finished):
        assert p.returncode == 0, f"process {i} (exit {p.returncode}):\n{log[-4000:]}"
    if logs is not None:
        logs.extend(log for _, log in finished)
    return [json.load(open(o)) for o in outs]


# ---- a 2-process run equals a 1-process run ------------------------------------------------
#
# The 1-process run has 2 local CPU devices: the same 2-device mesh, the same compiled SPMD
# programs and (dna_jax.data.in_memory) the same global batch of every training step, each
# device holding the same rows as in the 2-process run. A 2-participant all-reduce is a + b,
# which IEEE addition gives bitwise the same in either order, so training, rating and search
# see the same numbers. What may differ is evaluation: its examples are split between the
# devices differently (strided per process vs contiguous in one process), so a loss summed
# per device and then over devices rounds differently (float32, ~1e-7 relative). Hence:
# architectures, encodings, counts and strings exactly; floats within RTOL (accuracies are
# k/80 here, so RTOL leaves them exact); timings and volatile fields not compared.
RTOL, ATOL = 1e-5, 1e-7
_VOLATILE = ("seconds", "wall", "time_s", "per_s", "per_sec", "created", "sha256", "versions")


def _assert_same(a, b, where: str, workdirs: tuple[str, str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            if not any(v in str(key) for v in _VOLATILE):
                _assert_same(a[key], b[key], f"{where}/{key}", workdirs)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", workdirs)
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, f"{where}: {a!r} != {b!r}"
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, str) and isinstance(b, str):
        assert a.replace(workdirs[0], "<workdir>") == b.replace(workdirs[1], "<workdir>"), \
            f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _assert_same_run(pair_dir: str, single_dir: str) -> list[str]:
    """Every summary, rating table and search result of two workdirs agree (see above);
    returns the files compared."""
    compared = []
    for root, _, files in os.walk(single_dir):
        rel = os.path.relpath(root, single_dir)
        if any(part in ("compilation_cache", "checkpoints", "train") for part in rel.split(os.sep)):
            continue
        for name in sorted(files):
            path = os.path.normpath(os.path.join(rel, name))
            single, pair = os.path.join(single_dir, path), os.path.join(pair_dir, path)
            wanted = (name == "summary.json" or (os.path.basename(rel) == "rate" and
                                                  name.endswith((".npz", ".json")))
                      or (os.path.basename(rel) == "search" and name == "results.json"))
            if not wanted or name in ("started.json", "manifest.json"):  # run records
                continue
            assert os.path.exists(pair), f"the 2-process run has no {path}"
            if name.endswith(".npz"):
                with np.load(single) as x, np.load(pair) as y:
                    assert sorted(x.files) == sorted(y.files), path
                    for key in x.files:
                        if x[key].dtype.kind == "f":
                            np.testing.assert_allclose(y[key], x[key], rtol=RTOL, atol=ATOL,
                                                       err_msg=f"{path}:{key}")
                        else:
                            np.testing.assert_array_equal(y[key], x[key], f"{path}:{key}")
            else:
                _assert_same(json.load(open(pair)), json.load(open(single)), path,
                             (pair_dir, single_dir))
            compared.append(path)
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["fashion_mnist_dna.py", "fashion_mnist_dna_pp.py"])
def test_a_tiny_pipeline_runs_in_two_processes_on_one_workdir(config_file, tmp_path):
    """Every stage of DNA (teacher training, distillation, rating, search, export, retraining,
    report) and of DNA++ (ssl, ...) in 2 processes on one shared workdir: both finish, agree,
    and a rerun skips every stage."""
    config = os.path.join(REPO, "configs", config_file) + ":tiny"
    stages = _stages(config)
    workdir = str(tmp_path / "shared")
    pair = _run_pipeline(2, config, workdir, tmp_path)
    assert [r["processes"] for r in pair] == [2, 2] and pair[0]["devices"] == 2
    for result in pair:
        assert result["figures"]["stages"] == {s: "ran" for s in stages}
    first, second = (r["figures"] for r in pair)
    for key in ("winner_accuracy", "winner_macs", "teacher_accuracy", "winner_block_strings"):
        assert first[key] == second[key], key  # every host reports the same run
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["winner_macs"] == first["winner_macs"]
    again = _run_pipeline(2, config, workdir, tmp_path)
    assert all(r["figures"]["stages"] == {s: "skipped" for s in stages} for r in again)


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["fashion_mnist_dna.py"])
def test_two_processes_equal_one_process(config_file, tmp_path):
    """The tiny DNA pipeline in 2 processes (1 device each) equals it in 1 process with 2
    devices: figures, summary.json, every rating table and rating summary, the search
    results (`_assert_same_run`: architectures exactly, floats within RTOL)."""
    config = os.path.join(REPO, "configs", config_file) + ":tiny"
    pair_dir, single_dir = str(tmp_path / "pair"), str(tmp_path / "single")
    pair = _run_pipeline(2, config, pair_dir, tmp_path)
    single = _run_pipeline(1, config, single_dir, tmp_path, local_devices=2)[0]
    assert single["processes"] == 1 and single["devices"] == 2
    _assert_same(pair[0]["figures"], single["figures"], "figures", (pair_dir, single_dir))
    compared = _assert_same_run(pair_dir, single_dir)
    assert "summary.json" in compared and any(p.endswith(".npz") for p in compared)
    assert os.path.join("search", "results.json") in compared


@pytest.mark.slow
def test_two_dna_plus_rounds_run_in_two_processes(tmp_path):
    """DNA+ chains rounds multi-process: round 2's teacher is round 1's retrained winner,
    written by process 0 and read by both; both rounds equal a 1-process run on 2 devices
    (`_assert_same_run` on each round and the top summary).

    Round 2's distillation once aborted here with a gloo collective mismatch: XLA:CPU started
    block 0's stem BatchNorm all-reduce before the one inside block 1's `lax.switch` on one
    process and after it on the other (both took the same branch). Supernet steps on a
    multi-device CPU mesh now select their ops instead (`sharding.flat_collectives`)."""
    config = os.path.join(REPO, "configs", "fashion_mnist_dna_plus.py") + ":tiny"
    pair_dir, single_dir = str(tmp_path / "shared"), str(tmp_path / "single")
    pair = _run_pipeline(2, config, pair_dir, tmp_path)
    first, second = (r["figures"] for r in pair)
    assert first["rounds_run"] == second["rounds_run"] == 2
    assert first["round_accuracies"] == second["round_accuracies"]
    assert os.path.exists(os.path.join(pair_dir, "round_1", "retrain", "network",
                                       "teacher.json"))
    single = _run_pipeline(1, config, single_dir, tmp_path, local_devices=2)[0]
    _assert_same(first, single["figures"], "figures", (pair_dir, single_dir))
    compared = _assert_same_run(pair_dir, single_dir)
    for r in (1, 2):
        assert os.path.join(f"round_{r}", "search", "results.json") in compared
        assert any(p.startswith(os.path.join(f"round_{r}", "rate")) and p.endswith(".npz")
                   for p in compared)
    assert "summary.json" in compared


# ---- a process killed mid-stage -----------------------------------------------------------
#
# Distillation long enough (40 steps, a checkpoint every 4) that a kill after the first
# checkpoint lands inside the stage; the same overrides in every run compared.
KILL_OVERRIDES = {"distill.num_steps": 40, "distill.checkpoint_every_steps": 4}
SURVIVOR_S = 600  # how long the survivor may take to notice its peer died and exit


def _wait_for(condition, procs, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        exited = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
        assert not exited, f"processes {exited} exited before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_process_killed_mid_stage_resumes_to_the_same_result(tmp_path):
    """Issue 21: the tiny DNA pipeline in 2 processes; process 0 (the coordinator and the
    writer of the small files) is SIGKILLed in the distillation stage once its first
    checkpoint exists. Its peer must notice and exit by itself (bounded: it is killed, and
    the test fails, after SURVIVOR_S). The same command then resumes on the same workdir:
    the teacher is skipped, distillation resumes from its checkpoint, and the summary, every
    rating table and the search results equal a 1-process run on 2 devices (`_assert_same_run`,
    RTOL: the programs are the same, the resumed state is the checkpoint's bitwise, and the
    training batches of step s depend only on s)."""
    config = os.path.join(REPO, "configs", "fashion_mnist_dna.py") + ":tiny"
    pair_dir, single_dir = str(tmp_path / "pair"), str(tmp_path / "single")
    commands, _ = _pipeline_commands(2, config, pair_dir, tmp_path, overrides=KILL_OVERRIDES)
    procs, logs = _start_all(commands, _worker_env(), tmp_path, cwd=REPO)
    distill = os.path.join(pair_dir, "distill")
    try:
        _wait_for(lambda: os.path.isdir(os.path.join(distill, "checkpoints", "4")), procs,
                  PIPELINE_TIMEOUT_S, "distillation checkpoint 4")
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait()
        try:
            procs[1].wait(timeout=SURVIVOR_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process 1 still runs {SURVIVOR_S} s after process 0 was killed "
                        f"(it would hang):\n{logs[1].read_text()[-3000:]}")
        survivor_s = time.monotonic() - killed
    finally:
        _kill_left(procs)
    assert procs[0].returncode == -signal.SIGKILL
    assert procs[1].returncode != 0, "process 1 finished without its peer"
    # The kill landed inside the stage: no manifest, a checkpoint to resume from.
    assert not os.path.exists(os.path.join(distill, "manifest.json"))
    print(f"process 1 exited ({procs[1].returncode}) {survivor_s:.1f} s after the kill; "
          f"its log ends:\n{logs[1].read_text()[-1500:]}")

    resumed_logs: list[str] = []
    pair = _run_pipeline(2, config, pair_dir, tmp_path, overrides=KILL_OVERRIDES,
                         logs=resumed_logs)
    stages = _stages(config)
    assert stages[:2] == ("teacher", "distill") and "deploy" in stages
    for result, log in zip(pair, resumed_logs):  # the teacher finished before the kill
        assert result["figures"]["stages"] == {s: "skipped" if s == "teacher" else "ran"
                                               for s in stages}
        assert "Resumed distillation from step" in log
    single = _run_pipeline(1, config, single_dir, tmp_path, local_devices=2,
                           overrides=KILL_OVERRIDES)[0]
    figures = {k: v for k, v in pair[0]["figures"].items() if k != "stages"}
    _assert_same(figures, {k: v for k, v in single["figures"].items() if k != "stages"},
                 "figures", (pair_dir, single_dir))
    compared = _assert_same_run(pair_dir, single_dir)
    assert "summary.json" in compared and any(p.endswith(".npz") for p in compared)
    assert os.path.join("search", "results.json") in compared
