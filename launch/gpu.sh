#!/usr/bin/env bash
# dna_jax on the GPUs of this machine: a venv with jax[cuda12], memory settings, the main command.
# Run `launch/gpu.sh --help` for the variables; launch/README.md has the walk-through.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh [--dry-run] [-- MAIN_ARGS...]

Creates (or reuses) a venv, installs the package with jax for CUDA, checks that jax sees the
GPUs, then runs `python -m dna_jax.main --config CONFIG --workdir WORKDIR MAIN_ARGS...` from
the repository root. All GPUs of the machine form one mesh: no distributed initialisation.

Options
  --dry-run  print the exact commands instead of running them
  -h, --help this help

Environment (all optional)
  CONFIG            config of the run (default configs/imagenet_dna.py)
  WORKDIR           the run's workdir, local or gs:// (default workdir/imagenet_dna)
  TFDS_DATA_DIR     where TFDS finds its data (default: TFDS's own, ~/tensorflow_datasets)
  VENV              the venv, relative to the repository root or absolute (default .venv)
  PYTHON            Python (3.11+) that creates the venv if it does not exist (default python3)
  JAX_CUDA          cuda12 or cuda13: which jax[...] extra to install (default cuda12)
  JAX_GPU_SPEC      the jax requirement itself (default jax[$JAX_CUDA]; e.g. 'jax[cuda12]==0.10.2')
  INSTALL           auto: install when the venv was not yet installed with this jax requirement
                    and these package files; 1: always; 0: never (default auto)
  CHECK_GPU         1: fail before the run unless jax sees a GPU (default 1)
  XLA_PYTHON_CLIENT_PREALLOCATE   true: take the GPU memory up front (default true)
  XLA_PYTHON_CLIENT_MEM_FRACTION  share of each GPU's memory jax takes (default 0.90)
  DNA_JAX_DISTRIBUTED             1 only for a multi-machine run with its own coordinator
                                  (JAX_COORDINATOR_ADDRESS etc.; default 0)
  CUDA_VISIBLE_DEVICES            which GPUs to use (default: all)
EOF
}

parse_common_args "$@"
((${#ARGS[@]} == 0)) || die "unexpected argument '${ARGS[0]}'; main's flags go after -- (see --help)"

CONFIG=${CONFIG:-configs/imagenet_dna.py}
WORKDIR=${WORKDIR:-workdir/imagenet_dna}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-}
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
JAX_CUDA=${JAX_CUDA:-cuda12}
INSTALL=${INSTALL:-auto}
CHECK_GPU=${CHECK_GPU:-1}
XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-true}
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
DNA_JAX_DISTRIBUTED=${DNA_JAX_DISTRIBUTED:-0}

[[ $JAX_CUDA == cuda12 || $JAX_CUDA == cuda13 ]] || die "JAX_CUDA must be cuda12 or cuda13, got '$JAX_CUDA'"
JAX_GPU_SPEC=${JAX_GPU_SPEC:-jax[$JAX_CUDA]}
[[ $INSTALL == auto || $INSTALL == 0 || $INSTALL == 1 ]] || die "INSTALL must be auto, 0 or 1, got '$INSTALL'"
require_flag CHECK_GPU
[[ $XLA_PYTHON_CLIENT_PREALLOCATE =~ ^(true|false)$ ]] \
  || die "XLA_PYTHON_CLIENT_PREALLOCATE must be true or false, got '$XLA_PYTHON_CLIENT_PREALLOCATE'"
[[ $XLA_PYTHON_CLIENT_MEM_FRACTION =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] \
  || die "XLA_PYTHON_CLIENT_MEM_FRACTION must be a fraction in (0, 1], got '$XLA_PYTHON_CLIENT_MEM_FRACTION'"

# Relative paths (VENV, CONFIG, WORKDIR) are taken from the repository root.
cd "$REPO_ROOT"
venv_python=$VENV/bin/python

# ---------------------------------------------------------------------------------------
# Venv and packages

if [[ ! -x $venv_python ]]; then
  [[ $INSTALL != 0 ]] || die "no venv at $VENV and INSTALL=0"
  run "$PYTHON" -m venv "$VENV"
fi

# The stamp records what was installed: the jax requirement and a checksum of the package files.
stamp=$VENV/.dna_jax_gpu_installed
wanted="$JAX_GPU_SPEC $(cat setup.cfg pyproject.toml requirements.txt | cksum)"
installed=""
if [[ -f $stamp ]]; then
  installed=$(<"$stamp")
fi
if [[ $INSTALL == 1 || ($INSTALL == auto && $installed != "$wanted") ]]; then
  run "$venv_python" -m pip install --upgrade pip
  run "$venv_python" -m pip install -r requirements.txt -e . "$JAX_GPU_SPEC"
  run_to "$stamp" echo "$wanted"
else
  note "$VENV already has $JAX_GPU_SPEC and this package (INSTALL=1 reinstalls)"
fi

# ---------------------------------------------------------------------------------------
# Check and run

if ((CHECK_GPU)); then
  run env XLA_PYTHON_CLIENT_PREALLOCATE=false "$venv_python" -c \
    "import jax; d = jax.devices(); assert jax.default_backend() == 'gpu', f'jax sees no GPU, only {d}'; print(len(d), 'GPU(s):', d[0].device_kind)"
fi

run_env=(
  XLA_PYTHON_CLIENT_PREALLOCATE="$XLA_PYTHON_CLIENT_PREALLOCATE"
  XLA_PYTHON_CLIENT_MEM_FRACTION="$XLA_PYTHON_CLIENT_MEM_FRACTION"
  DNA_JAX_DISTRIBUTED="$DNA_JAX_DISTRIBUTED"
)
[[ -n $TFDS_DATA_DIR ]] && run_env+=(TFDS_DATA_DIR="$TFDS_DATA_DIR")
run env "${run_env[@]}" "$venv_python" -m dna_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
  "${EXTRA_ARGS[@]}"
