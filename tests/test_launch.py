"""launch/: the TPU and GPU scripts, run as a user runs them (bash, environment variables).

Dry runs are parsed back into argument lists with shlex, so the printed commands are checked
to be exactly what a shell would run. A stub `gcloud` then runs the same scripts for real: it
records every call, and runs the worker-side job control (launch/worker_job.sh) locally in a
fake worker home whose venv `python` is a stub that prints what it was given.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
# Without REPO_URL, tpu.sh packs the files git lists; a copy that is not a git tree cannot.
IN_GIT_TREE = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--is-inside-work-tree"],
                             capture_output=True).returncode == 0
needs_git_tree = pytest.mark.skipif(not IN_GIT_TREE, reason="the repository is not a git tree")
TPU_ENV = {
    "TPU_NAME": "dna-test",
    "ZONE": "us-central2-b",
    "PROJECT": "my-project",
    "ACCELERATOR_TYPE": "v4-32",
    "BUCKET": "my-bucket",
}
MAIN = ("python -m dna_jax.main --config configs/imagenet_dna.py:tpu_v4_32"
        " --workdir gs://my-bucket/dna_jax/dna-test")

GCLOUD_STUB = """#!{python} -S
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("STUB_FORBID"):
    sys.exit("gcloud must not run in a dry run")
home = os.environ["WORKER_HOME"]
with open(os.environ["STUB_LOG"]) as log:
    created = any(json.loads(line)[3:4] == ["create"] for line in log)
state_query = any(a in ("--format=value(state)", "--format=value(state.state)") for a in args)
if args[3:4] == ["describe"] and state_query and not created:
    # Before any create: the TPU (or queued resource) exists only when the test says so.
    if not os.environ.get("STUB_EXISTING"):
        sys.exit("ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: Resource not found")
    print(os.environ["STUB_EXISTING"])
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    print("READY")
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    states = os.environ.get("STUB_STATES", "ACTIVE").split(",")
    counter = os.path.join(home, ".describe_calls")
    calls = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(calls + 1))
    print(states[min(calls, len(states) - 1)])
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    if "worker_job.sh" in command:
        env = dict(os.environ, HOME=home, POLL_S="0.2", FOLLOW_POLL_S="0.2")
        sys.exit(subprocess.run(["bash", "-c", command], env=env).returncode)
"""

FAKE_PYTHON = """#!/usr/bin/env bash
echo "fake python: $* DNA_JAX_DISTRIBUTED=${DNA_JAX_DISTRIBUTED:-} TFDS_DATA_DIR=${TFDS_DATA_DIR:-}\
 PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-} FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" \
  | tee -a "${FAKE_PYTHON_LOG:-/dev/null}"
exit "${FAKE_MAIN_RC:-0}"
"""


@pytest.fixture
def sandbox(tmp_path):
    """A stub gcloud on PATH, a fake worker home (repo checkout + venv) and a clean env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(GCLOUD_STUB.format(python=sys.executable))
    gcloud.chmod(0o755)
    worker = tmp_path / "worker"
    (worker / "dna_jax_venv" / "bin").mkdir(parents=True)
    (worker / "dna_jax").symlink_to(REPO)
    fake_python = worker / "dna_jax_venv" / "bin" / "python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)
    (tmp_path / "home").mkdir()
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "LANG": "C.UTF-8",
        "STUB_LOG": str(tmp_path / "gcloud_calls.jsonl"),
        "WORKER_HOME": str(worker),
        "FAKE_PYTHON_LOG": str(tmp_path / "fake_python.log"),
    }
    return {"env": env, "tmp": tmp_path, "worker": worker}


def run_script(sandbox, script, *args, check=True, **env):
    full_env = dict(sandbox["env"], **{k: str(v) for k, v in env.items()})
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env, cwd=sandbox["tmp"],
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(sandbox, script, *args, **env):
    """Runs with --dry-run (gcloud forbidden) and returns the printed commands as argv lists."""
    proc = run_script(sandbox, script, "--dry-run", *args, STUB_FORBID=1, **env)
    assert not Path(sandbox["env"]["STUB_LOG"]).exists(), "a dry run called gcloud"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert all(line.startswith(("+ ", "# ")) for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def gcloud_calls(sandbox):
    log = Path(sandbox["env"]["STUB_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def is_gcloud(argv, *words):
    return argv[:1 + len(words)] == ["gcloud", *words]


def ssh_commands(commands, worker):
    return [flag(c, "--command") for c in commands
            if is_gcloud(c, "compute", "tpus", "tpu-vm", "ssh") and flag(c, "--worker") == worker]


def assert_valid_bash(command):
    proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
    assert proc.returncode == 0, (command, proc.stderr)


# --------------------------------------------------------------------------------------
# TPU: dry runs


@needs_git_tree
def test_tpu_up_dry_run_prints_create_install_run(sandbox):
    commands = dry_run(sandbox, "tpu.sh", "up", "--", "--config.distill.num_epochs=1",
                       **TPU_ENV)
    state, create = commands[:2]  # `up` first reads the TPU's state (a rerun reuses it)
    assert state == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "dna-test",
                     "--zone=us-central2-b", "--project=my-project", "--format=value(state)"]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dna-test"]
    assert flag(create, "--accelerator-type") == "v4-32"
    assert flag(create, "--zone") == "us-central2-b"
    assert flag(create, "--project") == "my-project"
    assert flag(create, "--version") == "tpu-ubuntu2204-base"

    # The working tree goes to every worker as a tarball.
    tar = next(c for c in commands if c[0] == "tar")
    scp = next(c for c in commands if is_gcloud(c, "compute", "tpus", "tpu-vm", "scp"))
    assert scp[5] == tar[2] and scp[6] == "dna-test:dna_jax_src.tar.gz"
    assert flag(scp, "--worker") == "all"

    install, start = ssh_commands(commands, "all")
    for command in (install, start):
        assert_valid_bash(command)
    assert "tar -xzf $HOME/dna_jax_src.tar.gz -C $HOME/dna_jax" in install
    assert ('$HOME/dna_jax_venv/bin/pip install -q -r $HOME/dna_jax/requirements.txt'
            ' -e $HOME/dna_jax "jax[tpu]"') in install
    assert "DNA_JAX_DISTRIBUTED=1" in start
    assert "TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets" in start
    assert start.endswith(f"launch/worker_job.sh start -- {MAIN} --config.distill.num_epochs=1")
    # Then worker 0's log is followed; nothing is deleted.
    assert ssh_commands(commands, "0") == ["cd $HOME/dna_jax && bash launch/worker_job.sh logs"]
    assert not any("delete" in c for c in commands)


@needs_git_tree
def test_tpu_queued_up_with_delete_after(sandbox):
    commands = dry_run(sandbox, "tpu.sh", "up", QUEUED=1, DELETE_AFTER=1,
                       **dict(TPU_ENV, ACCELERATOR_TYPE="v5litepod-16"))
    assert commands[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                               "dna-test"]
    create = commands[1]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "dna-test"]
    assert flag(create, "--node-id") == "dna-test"
    assert flag(create, "--accelerator-type") == "v5litepod-16"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "--zone") == "us-central2-b"
    describe = commands[2]
    assert is_gcloud(describe, "compute", "tpus", "queued-resources", "describe")
    assert flag(describe, "--format") == "value(state.state)"
    assert ssh_commands(commands, "all")[-1] == "cd $HOME/dna_jax && bash launch/worker_job.sh wait"
    assert commands[-1] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "dna-test",
                            "--zone=us-central2-b", "--project=my-project", "--force", "--quiet"]


def test_tpu_install_from_repo_url(sandbox):
    commands = dry_run(sandbox, "tpu.sh", "install", REPO_URL="https://github.com/me/dna jax.git",
                       REPO_REF="v0.1", JAX_TPU_SPEC="jax[tpu]==0.10.2", **TPU_ENV)
    assert len(commands) == 1  # no tarball
    (install,) = ssh_commands(commands, "all")
    assert_valid_bash(install)
    assert "fetch -q --depth 1 \"https://github.com/me/dna jax.git\" v0.1" in install
    assert "checkout -q FETCH_HEAD" in install
    assert '-e $HOME/dna_jax "jax[tpu]==0.10.2"' in install


@pytest.mark.parametrize("yes", [False, True])
def test_tpu_delete(sandbox, yes):
    commands = dry_run(sandbox, "tpu.sh", "delete", *(["--yes"] if yes else []), **TPU_ENV)
    expected = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dna-test",
                "--zone=us-central2-b", "--project=my-project"]
    assert commands == [expected + (["--quiet"] if yes else [])]


@pytest.mark.parametrize("command", ["logs", "status", "wait", "stop"])
def test_tpu_job_commands(sandbox, command):
    commands = dry_run(sandbox, "tpu.sh", command, **TPU_ENV)
    worker = "0" if command == "logs" else "all"
    assert ssh_commands(commands, worker)[-1] == (
        f"cd $HOME/dna_jax && bash launch/worker_job.sh {command}")


@pytest.mark.parametrize("command, missing, env", [
    ("create", "ACCELERATOR_TYPE", {}),
    ("up", "ZONE", {}),
    ("up", "WORKDIR", {"BUCKET": ""}),
    ("run", "TFDS_DATA_DIR", {"BUCKET": "", "WORKDIR": "gs://b/w"}),
    ("delete", "TPU_NAME", {}),
    ("install", "PROJECT", {}),
])
def test_tpu_missing_variable_is_named(sandbox, command, missing, env):
    full_env = dict(TPU_ENV, **env)
    full_env.pop(missing, None)
    proc = run_script(sandbox, "tpu.sh", "--dry-run", command, check=False, **full_env)
    assert proc.returncode != 0
    assert missing in proc.stderr and "missing required" in proc.stderr
    assert proc.stdout == ""  # `up` checks everything before creating anything


@pytest.mark.parametrize("env, message", [
    ({"WORKDIR": "/tmp/w"}, "WORKDIR must be a gs:// URL"),
    ({"QUEUED": "yes"}, "QUEUED must be 0 or 1"),
    ({"ACCELERATOR_TYPE": "v9-8"}, "set RUNTIME_VERSION"),
    ({"REMOTE_DIR": "../x"}, "REMOTE_DIR"),
])
def test_tpu_bad_values_fail_early(sandbox, env, message):
    proc = run_script(sandbox, "tpu.sh", "--dry-run", "up", check=False, **dict(TPU_ENV, **env))
    assert proc.returncode != 0 and message in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------------------
# TPU: real runs against the stub gcloud


@needs_git_tree
def test_tpu_up_runs_what_the_dry_run_prints(sandbox):
    env = dict(TPU_ENV, QUEUED=1, DELETE_AFTER=1, WAIT_INTERVAL_S=1,
               STUB_STATES="WAITING_FOR_RESOURCES,ACTIVE")
    printed = [c[1:] for c in dry_run(sandbox, "tpu.sh", "up", **env) if c[0] == "gcloud"]
    proc = run_script(sandbox, "tpu.sh", "up", **env)
    calls = gcloud_calls(sandbox)
    describe = printed[2]
    assert calls[0] == printed[0]  # the state before anything: not found, so created
    assert calls[2] == calls[3] == describe  # polled until ACTIVE
    uploads = [c for c in calls if c[:2] == ["storage", "cp"]]
    assert [c for c in calls if c[:2] != ["storage", "cp"]] == printed[:3] + [describe] + printed[3:]

    # The tarball copied to the workers holds the launch scripts, not the venv.
    with tarfile.open(sandbox["worker"] / "dna_jax_src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"launch/tpu.sh", "launch/worker_job.sh", "setup.cfg"} <= names
    assert not any(name.startswith(".venv/") for name in names)

    # The job ran with the distributed flag, its log was followed and uploaded at the end.
    assert "fake python: -m dna_jax.main --config configs/imagenet_dna.py:tpu_v4_32" in proc.stdout
    assert "DNA_JAX_DISTRIBUTED=1 TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets" in proc.stdout
    assert "finished (exit 0)" in proc.stdout
    assert len(uploads) == 1
    assert uploads[0][2] == str(sandbox["worker"] / "dna_jax_job" / "run.log")
    assert uploads[0][3].startswith("gs://my-bucket/dna_jax/dna-test/launch_logs/")


@needs_git_tree
def test_tpu_failed_job_keeps_the_tpu(sandbox):
    proc = run_script(sandbox, "tpu.sh", "up", check=False, DELETE_AFTER=1, FAKE_MAIN_RC=3,
                      **TPU_ENV)
    assert proc.returncode == 3, proc.stderr
    assert "finished (exit 3)" in proc.stdout
    assert not any("delete" in call for call in gcloud_calls(sandbox))


def test_worker_job_start_refuses_second_and_stop_ends_it(sandbox, tmp_path):
    env = dict(sandbox["env"], JOB_DIR=str(tmp_path / "job"), POLL_S="0.2", STOP_TIMEOUT_S="5")
    job = ["bash", str(LAUNCH / "worker_job.sh")]

    def worker_job(*args):
        return subprocess.run(job + list(args), env=env, capture_output=True, text=True,
                              timeout=30)

    assert "not started" in worker_job("status").stdout
    assert worker_job("start", "--", "sleep", "60").returncode == 0
    assert "running" in worker_job("status").stdout
    second = worker_job("start", "--", "true")
    assert second.returncode != 0 and "already running" in second.stderr
    assert "finished (exit 143)" in worker_job("stop").stdout
    assert worker_job("wait").returncode == 143


# --------------------------------------------------------------------------------------
# Local GPU


def test_gpu_dry_run_fresh_venv(sandbox, tmp_path):
    venv = tmp_path / "gpu venv"
    commands = dry_run(sandbox, "gpu.sh", "--", "--config.batch_size=64", VENV=venv,
                       XLA_PYTHON_CLIENT_MEM_FRACTION=".5")
    python = f"{venv}/bin/python"
    assert commands[0] == ["python3", "-m", "venv", str(venv)]
    assert commands[1] == [python, "-m", "pip", "install", "--upgrade", "pip"]
    assert commands[2] == [python, "-m", "pip", "install", "-r", "requirements.txt", "-e", ".",
                           "jax[cuda12]"]
    assert commands[-1] == ["env", "XLA_PYTHON_CLIENT_PREALLOCATE=true",
                            "XLA_PYTHON_CLIENT_MEM_FRACTION=.5", "DNA_JAX_DISTRIBUTED=0", python,
                            "-m", "dna_jax.main", "--config", "configs/imagenet_dna.py",
                            "--workdir", "workdir/imagenet_dna", "--config.batch_size=64"]


def test_gpu_cuda13_and_data_dir(sandbox, tmp_path):
    commands = dry_run(sandbox, "gpu.sh", VENV=tmp_path / "v", JAX_CUDA="cuda13",
                       TFDS_DATA_DIR="/data/tfds", XLA_PYTHON_CLIENT_PREALLOCATE="false",
                       CONFIG="configs/x.py:tiny", WORKDIR="/runs/x")
    pip = next(c for c in commands if "-e" in c)
    assert pip[-1] == "jax[cuda13]"
    main = commands[-1]
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in main and "TFDS_DATA_DIR=/data/tfds" in main
    assert main[-4:] == ["--config", "configs/x.py:tiny", "--workdir", "/runs/x"]


def test_gpu_installs_once_then_runs(sandbox, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(sandbox["worker"] / "dna_jax_venv" / "bin" / "python", venv / "bin" / "python")
    first = run_script(sandbox, "gpu.sh", VENV=venv)
    log = (tmp_path / "fake_python.log").read_text().splitlines()
    assert len(log) == 4  # pip upgrade, pip install, GPU check, main
    assert "-m pip install -r requirements.txt -e . jax[cuda12]" in log[1]
    assert "PREALLOCATE=false" in log[2]
    assert log[3].startswith("fake python: -m dna_jax.main --config configs/imagenet_dna.py")
    assert "DNA_JAX_DISTRIBUTED=0" in log[3] and "PREALLOCATE=true FRACTION=0.90" in log[3]
    assert "+ " in first.stderr  # real runs trace their commands on stderr

    run_script(sandbox, "gpu.sh", VENV=venv, CHECK_GPU=0)
    log = (tmp_path / "fake_python.log").read_text().splitlines()
    assert len(log) == 5 and "dna_jax.main" in log[4]  # installed already: no pip


@pytest.mark.parametrize("env, message", [
    ({"JAX_CUDA": "cuda11"}, "JAX_CUDA"),
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "90%"}, "XLA_PYTHON_CLIENT_MEM_FRACTION"),
    ({"INSTALL": "maybe"}, "INSTALL"),
])
def test_gpu_bad_values_are_named(sandbox, env, message):
    proc = run_script(sandbox, "gpu.sh", "--dry-run", check=False, **env)
    assert proc.returncode != 0 and message in proc.stderr and proc.stdout == ""


# --------------------------------------------------------------------------------------
# All scripts


@pytest.mark.parametrize("script", ["tpu.sh", "gpu.sh"])
def test_help(sandbox, script):
    proc = run_script(sandbox, script, "--help")
    assert "--dry-run" in proc.stdout and "Usage:" in proc.stdout


def test_scripts_are_strict_and_executable():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "tpu.sh", "gpu.sh", "worker_job.sh"}
    for script in SCRIPTS:
        if script.name != "common.sh":
            assert os.access(script, os.X_OK), script
            assert "set -euo pipefail" in script.read_text(), script
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in SCRIPTS]],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# TPU: re-running `up` (spot preemption), SSH routes, the teacher checkpoint


def _verbs(calls):
    """The gcloud calls as 'resource verb' words, e.g. 'tpu-vm create'."""
    return [" ".join(c[2:4]) for c in calls if c[:2] == ["compute", "tpus"]]


@needs_git_tree
@pytest.mark.parametrize("existing, recreated", [("PREEMPTED", True), ("TERMINATED", True),
                                                 ("READY", False)])
def test_tpu_up_again_after_preemption_recreates_or_reuses(sandbox, existing, recreated):
    proc = run_script(sandbox, "tpu.sh", "up", FOLLOW=0, STUB_EXISTING=existing, **TPU_ENV)
    verbs = _verbs(gcloud_calls(sandbox))
    assert verbs[0] == "tpu-vm describe"
    if recreated:
        assert verbs[1:3] == ["tpu-vm delete", "tpu-vm create"]
        assert "--quiet" in gcloud_calls(sandbox)[1]  # a preempted TPU goes without asking
        assert f"is {existing}: deleting it and creating it again" in proc.stderr
    else:
        assert "tpu-vm create" not in verbs and "tpu-vm delete" not in verbs
        assert "is READY: reusing it" in proc.stderr
    # Either way the code is installed and the same command starts again (it resumes).
    assert verbs[-2:] == ["tpu-vm ssh", "tpu-vm ssh"]
    start = flag_or_none(gcloud_calls(sandbox)[-1], "--command")
    assert start.endswith(f"launch/worker_job.sh start -- {MAIN}")


@needs_git_tree
def test_tpu_queued_up_again_after_suspension_recreates(sandbox):
    run_script(sandbox, "tpu.sh", "up", FOLLOW=0, QUEUED=1, WAIT_INTERVAL_S=1,
               STUB_EXISTING="SUSPENDED", **TPU_ENV)
    verbs = _verbs(gcloud_calls(sandbox))
    assert verbs[:4] == ["queued-resources describe", "queued-resources delete",
                         "queued-resources create", "queued-resources describe"]


def test_tpu_up_refuses_a_tpu_in_an_unknown_state(sandbox):
    proc = run_script(sandbox, "tpu.sh", "up", check=False, STUB_EXISTING="REPAIRING", **TPU_ENV)
    assert proc.returncode != 0 and "dna-test is REPAIRING" in proc.stderr
    assert _verbs(gcloud_calls(sandbox)) == ["tpu-vm describe"]


@needs_git_tree
@pytest.mark.parametrize("via, expected", [("internal", "--internal-ip"),
                                           ("iap", "--tunnel-through-iap")])
def test_tpu_ssh_via_reaches_every_ssh_and_scp(sandbox, via, expected):
    commands = dry_run(sandbox, "tpu.sh", "up", SSH_VIA=via, **TPU_ENV)
    reaching = [c for c in commands if is_gcloud(c, "compute", "tpus", "tpu-vm")
                and c[4] in ("ssh", "scp")]
    assert len(reaching) == 4  # scp of the tree, install, start, follow the log
    assert all(expected in c for c in reaching)
    plain = dry_run(sandbox, "tpu.sh", "logs", **TPU_ENV)
    assert not any(f in plain[0] for f in ("--internal-ip", "--tunnel-through-iap"))


def test_tpu_bad_ssh_via_is_named(sandbox):
    proc = run_script(sandbox, "tpu.sh", "--dry-run", "logs", check=False, SSH_VIA="vpn",
                      **TPU_ENV)
    assert proc.returncode != 0 and "SSH_VIA must be external, internal or iap" in proc.stderr


def _start_command(commands):
    return next(c for c in ssh_commands(commands, "all") if "worker_job.sh start" in c)


def test_tpu_local_teacher_checkpoint_is_uploaded_then_passed(sandbox, tmp_path):
    teacher = tmp_path / "tf_efficientnet_b7"
    teacher.mkdir()
    (teacher / "teacher.json").write_text("{}")
    commands = dry_run(sandbox, "tpu.sh", "run", TEACHER_CHECKPOINT=str(teacher), **TPU_ENV)
    url = "gs://my-bucket/dna_jax/dna-test/teacher_checkpoint"
    upload = commands.index(["gcloud", "storage", "rsync", "--recursive", str(teacher), url])
    start = _start_command(commands)
    assert commands.index(next(c for c in commands if flag_or_none(c, "--command") == start)) \
        > upload  # uploaded before the workers start
    assert start.endswith(f"{MAIN} --config.teacher.checkpoint={url}")


def test_tpu_gcs_teacher_checkpoint_is_passed_as_is(sandbox):
    url = "gs://weights/tf_efficientnet_b7"
    commands = dry_run(sandbox, "tpu.sh", "run", TEACHER_CHECKPOINT=url + "/", **TPU_ENV)
    assert not any(c[1:2] == ["storage"] for c in commands)
    assert _start_command(commands).endswith(f"{MAIN} --config.teacher.checkpoint={url}")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "has no teacher.json"),
    (lambda p: None, "must be a gs:// URL or a local teacher checkpoint folder"),
])
def test_tpu_bad_teacher_checkpoint_fails_before_anything(sandbox, tmp_path, make, message):
    path = tmp_path / "teacher"
    make(path)
    proc = run_script(sandbox, "tpu.sh", "--dry-run", "up", check=False,
                      TEACHER_CHECKPOINT=str(path), **TPU_ENV)
    assert proc.returncode != 0 and message in proc.stderr and proc.stdout == ""


def flag_or_none(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    return values[0] if values else None


# --------------------------------------------------------------------------------------
# Every launcher command the READMEs show runs (as a dry run)


def _documented_commands():
    """(env, script, args) of each `launch/*.sh` command in README.md and launch/README.md."""
    found = []
    for readme in (REPO / "README.md", LAUNCH / "README.md"):
        text = readme.read_text().replace("\\\n", " ")  # join continued lines
        for line in text.splitlines():
            for match in re.finditer(
                    r"((?:[A-Z_]+=\S+\s+)*)launch/(tpu|gpu)\.sh((?:[ \t]+[^`\n#|]*)?)", line):
                env = dict(word.split("=", 1) for word in match.group(1).split())
                found.append((str(readme.relative_to(REPO)), env, match.group(2) + ".sh",
                              shlex.split(match.group(3))))
    return found


DOCUMENTED = _documented_commands()


def test_the_readmes_show_launcher_commands():
    scripts = {script for _, _, script, _ in DOCUMENTED}
    assert scripts == {"tpu.sh", "gpu.sh"} and len(DOCUMENTED) >= 12


@pytest.mark.parametrize("readme, env, script, args", DOCUMENTED,
                         ids=[f"{r}:{s} {' '.join(a)}" for r, _, s, a in DOCUMENTED])
def test_every_documented_launcher_command_dry_runs(sandbox, readme, env, script, args):
    args = [a for a in args if a != "--dry-run"]
    # the TPU settings of launch/README.md's step 2; a command's own variables come on top
    full_env = dict(TPU_ENV, **env) if script == "tpu.sh" else dict(env)
    dry_run(sandbox, script, *args, **full_env)
