#!/usr/bin/env bash
# Cloud TPU VMs and pods for dna_jax: create, install, run on every worker, logs, delete.
# Run `launch/tpu.sh --help` for the variables; launch/README.md has the walk-through.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh [--dry-run] [--yes] COMMAND [-- MAIN_ARGS...]

Commands
  create    create the TPU VM (QUEUED=1: a queued resource, then wait until it is ACTIVE)
  install   copy the repository to every worker, make a venv, pip install -e . plus jax[tpu]
  run       start `python -m dna_jax.main` on every worker (detached, DNA_JAX_DISTRIBUTED=1),
            then follow worker 0's log (FOLLOW=0: do not follow). MAIN_ARGS after `--` are
            added to the command line, e.g. -- --config.distill.num_epochs=1
  logs      follow the log of worker LOG_WORKER (default 0; `all` for every worker)
  status    the TPU's state and the job's state on every worker
  wait      block until the job has ended on every worker; fail if it failed anywhere
  stop      stop the job on every worker
  delete    delete the TPU VM (or the queued resource with its TPU)
  up        create (or reuse a READY TPU; a preempted one is deleted and created again),
            install, run; with DELETE_AFTER=1 also wait for the end and delete. After a spot
            preemption, running the same `up` again resumes the run from WORKDIR

Options
  --dry-run  print the exact commands instead of running them
  --yes      do not ask before deleting (passes --quiet to gcloud)
  -h, --help this help

Required environment
  TPU_NAME          name of the TPU VM (and of its queued resource)
  ZONE              e.g. us-central2-b
  PROJECT           Google Cloud project id
  ACCELERATOR_TYPE  (create, up) e.g. v4-32, v5litepod-16, v5p-32, v6e-16
  WORKDIR           (run, up) gs:// URL of the run's workdir; or BUCKET (below)
  TFDS_DATA_DIR     (run, up) gs:// URL of the TFDS data; or BUCKET (below)

Optional environment
  BUCKET            bucket name or gs:// URL: WORKDIR defaults to gs://BUCKET/dna_jax/TPU_NAME
                    and TFDS_DATA_DIR to gs://BUCKET/tensorflow_datasets
  TEACHER_CHECKPOINT (run, up) the teacher checkpoint (a dna_jax teacher folder, e.g. timm
                    weights converted by `dna-jax convert`): a gs:// URL every worker reads, or
                    a local folder that `run` first copies to WORKDIR/teacher_checkpoint with
                    `gcloud storage rsync`; passed as --config.teacher.checkpoint. Unset: the
                    config's own value (configs/imagenet_dna.py stops at start without one)
  SSH_VIA           how gcloud reaches the workers (ssh and scp): external (default),
                    internal (--internal-ip: from a machine inside the VPC) or iap
                    (--tunnel-through-iap: workers without external IPs)
  CONFIG            config of the run (default configs/imagenet_dna.py:tpu_v4_32)
  RUNTIME_VERSION   TPU software version (default from ACCELERATOR_TYPE: v2/v3/v4
                    tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                    v6e v2-alpha-tpuv6e)
  QUEUED            1: create through `queued-resources create` and wait (default 0)
  QUEUED_RESOURCE   queued resource name (default TPU_NAME)
  SPOT / RESERVED   1: spot or reserved capacity (default 0)
  CREATE_FLAGS      more flags for the create command, split on spaces (e.g. --network=net)
  WAIT_TIMEOUT_S    QUEUED=1: give up waiting for ACTIVE after this many seconds (0: never)
  WAIT_INTERVAL_S   QUEUED=1: seconds between state checks (default 30)
  REPO_URL          install: git URL to clone on the workers (REPO_REF: branch, tag or
                    commit, default HEAD). Unset: this working tree (tracked and untracked,
                    not ignored files) is copied as a tarball with `tpu-vm scp`
  REMOTE_PYTHON     Python on the workers (default python3.11, apt-installed if missing)
  JAX_TPU_SPEC      jax requirement (default jax[tpu]; pin with e.g. 'jax[tpu]==0.10.2')
  REMOTE_DIR        checkout on the workers, relative to ~ (default dna_jax)
  REMOTE_VENV       venv on the workers, relative to ~ (default dna_jax_venv)
  RUN_ENV           more VAR=value words for the run's environment (e.g. TF_CPP_MIN_LOG_LEVEL=2)
  FOLLOW            run, up: 1 follows worker 0's log after the start (default 1)
  LOG_WORKER        logs: worker index or `all` (default 0)
  DELETE_AFTER      up: 1 waits for the job on all workers, then deletes the TPU (default 0)

Every worker writes its log to ~/dna_jax_job/run.log and, when the job ends, copies it to
WORKDIR/launch_logs/<host>.log.
EOF
}

# ---------------------------------------------------------------------------------------
# Settings

ASSUME_YES=0
COMMAND=""

parse_settings() {
  parse_common_args "$@"
  local arg
  for arg in "${ARGS[@]}"; do
    case $arg in
      --yes | -y) ASSUME_YES=1 ;;
      -*) die "unknown option $arg (see --help)" ;;
      *)
        [[ -z $COMMAND ]] || die "one command at a time, got '$COMMAND' and '$arg'"
        COMMAND=$arg
        ;;
    esac
  done
  [[ -n $COMMAND ]] || die "no command given (see --help)"

  QUEUED=${QUEUED:-0}
  QUEUED_RESOURCE=${QUEUED_RESOURCE:-${TPU_NAME:-}}
  SPOT=${SPOT:-0}
  RESERVED=${RESERVED:-0}
  CREATE_FLAGS=${CREATE_FLAGS:-}
  WAIT_TIMEOUT_S=${WAIT_TIMEOUT_S:-0}
  WAIT_INTERVAL_S=${WAIT_INTERVAL_S:-30}
  CONFIG=${CONFIG:-configs/imagenet_dna.py:tpu_v4_32}
  REPO_URL=${REPO_URL:-}
  REPO_REF=${REPO_REF:-HEAD}
  REMOTE_PYTHON=${REMOTE_PYTHON:-python3.11}
  JAX_TPU_SPEC=${JAX_TPU_SPEC:-jax[tpu]}
  REMOTE_DIR=${REMOTE_DIR:-dna_jax}
  REMOTE_VENV=${REMOTE_VENV:-dna_jax_venv}
  RUN_ENV=${RUN_ENV:-}
  FOLLOW=${FOLLOW:-1}
  LOG_WORKER=${LOG_WORKER:-0}
  DELETE_AFTER=${DELETE_AFTER:-0}
  TEACHER_CHECKPOINT=${TEACHER_CHECKPOINT:-}
  SSH_VIA=${SSH_VIA:-external}
  case $SSH_VIA in
    external) SSH_FLAGS=() ;;
    internal) SSH_FLAGS=(--internal-ip) ;;
    iap) SSH_FLAGS=(--tunnel-through-iap) ;;
    *) die "SSH_VIA must be external, internal or iap, got '$SSH_VIA'" ;;
  esac
  local name
  for name in QUEUED SPOT RESERVED FOLLOW DELETE_AFTER; do
    require_flag "$name"
  done
  require_relative_path REMOTE_DIR
  require_relative_path REMOTE_VENV
  # Paths on the workers, expanded there.
  RDIR="\$HOME/$REMOTE_DIR"
  RVENV="\$HOME/$REMOTE_VENV"
  [[ $REMOTE_PYTHON =~ ^python3(\.[0-9]+)?$ ]] || die "REMOTE_PYTHON must look like python3.11"
  [[ $WAIT_TIMEOUT_S =~ ^[0-9]+$ && $WAIT_INTERVAL_S =~ ^[1-9][0-9]*$ ]] \
    || die "WAIT_TIMEOUT_S and WAIT_INTERVAL_S must be whole numbers of seconds"
  [[ $LOG_WORKER =~ ^([0-9]+|all)$ ]] || die "LOG_WORKER must be a worker index or 'all'"
}

# The variables each command needs; `up` checks all of them before creating anything.
check_required() {
  require_vars TPU_NAME ZONE PROJECT
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU_NAME must be lowercase letters, digits and hyphens, got '$TPU_NAME'"
  case $COMMAND in
    create) check_create_vars ;;
    run) check_run_vars ;;
    up)
      check_create_vars
      check_run_vars
      ;;
  esac
}

check_create_vars() {
  require_vars ACCELERATOR_TYPE
  if [[ -z ${RUNTIME_VERSION:-} ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE")
  fi
}

check_run_vars() {
  local bucket=${BUCKET:-}
  bucket=${bucket#gs://}
  bucket=${bucket%/}
  if [[ -n $bucket ]]; then
    WORKDIR=${WORKDIR:-gs://$bucket/dna_jax/$TPU_NAME}
    TFDS_DATA_DIR=${TFDS_DATA_DIR:-gs://$bucket/tensorflow_datasets}
  fi
  require_vars WORKDIR TFDS_DATA_DIR
  require_gcs_url WORKDIR
  require_gcs_url TFDS_DATA_DIR
  check_teacher_checkpoint
}

# TEACHER_URL: where every worker reads the teacher (empty: the config's own value).
check_teacher_checkpoint() {
  TEACHER_URL=""
  [[ -n $TEACHER_CHECKPOINT ]] || return 0
  if [[ $TEACHER_CHECKPOINT == gs://?* ]]; then
    TEACHER_URL=${TEACHER_CHECKPOINT%/}
  elif [[ -d $TEACHER_CHECKPOINT ]]; then
    [[ -f $TEACHER_CHECKPOINT/teacher.json ]] \
      || die "TEACHER_CHECKPOINT=$TEACHER_CHECKPOINT has no teacher.json: not a dna_jax teacher checkpoint (convert timm weights with \`dna-jax convert\`)"
    TEACHER_URL=${WORKDIR%/}/teacher_checkpoint
  else
    die "TEACHER_CHECKPOINT must be a gs:// URL or a local teacher checkpoint folder, got '$TEACHER_CHECKPOINT'"
  fi
}

default_runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION" ;;
  esac
}

# ---------------------------------------------------------------------------------------
# gcloud

location_flags() {
  LOCATION=(--zone="$ZONE" --project="$PROJECT")
}

# Runs a shell command line on the given workers (`all`, or an index).
on_workers() {
  local workers=$1 remote_command=$2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$workers" \
    "${SSH_FLAGS[@]}" --command="$remote_command"
}

# The worker-side job control script, called from inside the remote checkout.
worker_job() {
  echo "cd $RDIR && bash launch/worker_job.sh $*"
}

create_tpu() {
  local flags=(--accelerator-type="$ACCELERATOR_TYPE")
  ((SPOT)) && flags+=(--spot)
  ((RESERVED)) && flags+=(--reserved)
  local extra=()
  read -r -a extra <<<"$CREATE_FLAGS"
  flags+=("${extra[@]}")
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${LOCATION[@]}" \
      --node-id="$TPU_NAME" --runtime-version="$RUNTIME_VERSION" "${flags[@]}"
    wait_until_active
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
      --version="$RUNTIME_VERSION" "${flags[@]}"
  fi
}

# STATE: the TPU's (or queued resource's) state, NOT_FOUND when it does not exist. A dry run
# prints the describe command and assumes NOT_FOUND.
read_state() {
  local describe
  if ((QUEUED)); then
    describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${LOCATION[@]}"
      --format='value(state.state)')
  else
    describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}"
      --format='value(state)')
  fi
  if ((DRY_RUN)); then
    run "${describe[@]}"
    note "dry run: assuming it does not exist yet (READY/ACTIVE: reused; PREEMPTED, TERMINATED, SUSPENDED or FAILED: deleted and created again)"
    STATE=NOT_FOUND
    return 0
  fi
  echo "+ $(quote_command "${describe[@]}")" >&2
  local err
  err=$(mktemp)
  if STATE=$("${describe[@]}" 2>"$err"); then
    STATE=${STATE:-NOT_FOUND}
  elif grep -qi "not.found" "$err"; then
    STATE=NOT_FOUND
  else
    cat "$err" >&2
    rm -f "$err"
    die "cannot read the state of ${QUEUED_RESOURCE:-$TPU_NAME} (gcloud's error above)"
  fi
  rm -f "$err"
}

# `up`'s first step, safe to repeat: creates the TPU, reuses a ready one, or replaces one that
# was preempted, so re-running the same `up` after a spot preemption resumes the run.
ensure_tpu() {
  read_state
  case $STATE in
    NOT_FOUND) create_tpu ;;
    READY | ACTIVE) note "${TPU_NAME} is $STATE: reusing it" ;;
    PREEMPTED | TERMINATED | STOPPED | SUSPENDED | SUSPENDING | FAILED)
      note "${TPU_NAME} is $STATE: deleting it and creating it again (the run resumes from $WORKDIR)"
      local keep=$ASSUME_YES
      ASSUME_YES=1
      delete_tpu
      ASSUME_YES=$keep
      create_tpu
      ;;
    ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING)
      if ((QUEUED)); then
        wait_until_active
      else
        die "$TPU_NAME is $STATE; run \`up\` again once it is READY"
      fi
      ;;
    *) die "$TPU_NAME is $STATE; run \`up\` again once it is READY (or delete it)" ;;
  esac
}

# Polls the queued resource until it is ACTIVE (its TPU VM exists and is ready).
wait_until_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE"
    "${LOCATION[@]}" --format='value(state.state)')
  if ((DRY_RUN)); then
    note "repeat every ${WAIT_INTERVAL_S}s until it prints ACTIVE:"
    run "${describe[@]}"
    return 0
  fi
  local state waited=0
  note "waiting for queued resource $QUEUED_RESOURCE to become ACTIVE"
  while true; do
    state=$("${describe[@]}") || state="unknown (describe failed)"
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $QUEUED_RESOURCE is $state (see: gcloud compute tpus queued-resources describe $QUEUED_RESOURCE ${LOCATION[*]})"
        ;;
    esac
    if ((WAIT_TIMEOUT_S && waited >= WAIT_TIMEOUT_S)); then
      die "queued resource $QUEUED_RESOURCE still $state after ${WAIT_TIMEOUT_S}s (not deleted)"
    fi
    echo "$(date -u +%TZ) $QUEUED_RESOURCE: $state" >&2
    sleep "$WAIT_INTERVAL_S"
    waited=$((waited + WAIT_INTERVAL_S))
  done
  note "queued resource $QUEUED_RESOURCE is ACTIVE"
}

install_on_workers() {
  local python=$REMOTE_PYTHON fetch
  if [[ -n $REPO_URL ]]; then
    fetch=(
      "rm -rf $RDIR" "git init -q $RDIR"
      "git -C $RDIR fetch -q --depth 1 $(quote_command "$REPO_URL" "$REPO_REF")"
      "git -C $RDIR checkout -q FETCH_HEAD"
    )
  else
    copy_working_tree
    fetch=(
      "rm -rf $RDIR" "mkdir -p $RDIR"
      "tar -xzf \$HOME/dna_jax_src.tar.gz -C $RDIR" "rm -f \$HOME/dna_jax_src.tar.gz"
    )
  fi
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  # One line of statements under `set -eu`: the first failure stops the worker's install.
  local steps=(
    "set -eu"
    "if ! command -v $python >/dev/null; then $apt update -qq; $apt install -y -qq $python $python-venv; fi"
    "${fetch[@]}"
    "if [ ! -x $RVENV/bin/python ]; then $python -m venv $RVENV; fi"
    "$RVENV/bin/pip install -q --upgrade pip"
    "$RVENV/bin/pip install -q -r $RDIR/requirements.txt -e $RDIR $(quote_word "$JAX_TPU_SPEC")"
    "$RVENV/bin/python -c \"import dna_jax, jax; print(jax.__version__)\""
    "echo \"dna_jax installed on \$(hostname)\""
  )
  local joined
  joined=$(printf '%s; ' "${steps[@]}")
  on_workers all "${joined%; }"
}

# Packs the files git would commit (tracked plus untracked, not ignored) and copies them.
copy_working_tree() {
  local list="${TMPDIR:-/tmp}/dna_jax_src_$TPU_NAME.files"
  local tarball="${TMPDIR:-/tmp}/dna_jax_src_$TPU_NAME.tar.gz"
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
    || die "$REPO_ROOT is not a git working tree, so its files cannot be listed; set REPO_URL"
  run_to "$list" git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard
  run tar -czf "$tarball" -C "$REPO_ROOT" --ignore-failed-read --null --files-from="$list"
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:dna_jax_src.tar.gz" \
    "${LOCATION[@]}" --worker=all "${SSH_FLAGS[@]}"
  run rm -f "$list" "$tarball"
}

start_on_workers() {
  local main=(python -m dna_jax.main --config "$CONFIG" --workdir "$WORKDIR")
  if [[ -n $TEACHER_URL ]]; then
    if [[ $TEACHER_URL != "${TEACHER_CHECKPOINT%/}" ]]; then  # a local folder: upload it first
      run gcloud storage rsync --recursive "$TEACHER_CHECKPOINT" "$TEACHER_URL"
    fi
    main+=(--config.teacher.checkpoint="$TEACHER_URL")
  fi
  main+=("${EXTRA_ARGS[@]}")
  local env_words=()
  read -r -a env_words <<<"$RUN_ENV"
  local word
  for word in "${env_words[@]}"; do
    [[ $word =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "RUN_ENV words must be VAR=value, got '$word'"
  done
  local env_prefix
  env_prefix="DNA_JAX_DISTRIBUTED=1 TFDS_DATA_DIR=$(quote_word "$TFDS_DATA_DIR")"
  env_prefix+=" LOG_UPLOAD_DIR=$(quote_word "${WORKDIR%/}/launch_logs")"
  env_prefix+=" PATH=$RVENV/bin:\$PATH"
  ((${#env_words[@]})) && env_prefix+=" $(quote_command "${env_words[@]}")"
  on_workers all "cd $RDIR && $env_prefix bash launch/worker_job.sh start -- $(quote_command "${main[@]}")"
}

delete_tpu() {
  local quiet=()
  ((ASSUME_YES)) && quiet=(--quiet)
  if ((QUEUED)); then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${LOCATION[@]}" \
      --force "${quiet[@]}"
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" "${quiet[@]}"
  fi
}

show_status() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${LOCATION[@]}" \
      --format='value(state.state)'
  fi
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}" \
    --format='value(state,acceleratorType,runtimeVersion)'
  on_workers all "$(worker_job status)"
}

# ---------------------------------------------------------------------------------------
# Main

main() {
  parse_settings "$@"
  check_required
  location_flags
  case $COMMAND in
    create) create_tpu ;;
    install) install_on_workers ;;
    run)
      start_on_workers
      ((FOLLOW)) && on_workers 0 "$(worker_job logs)"
      ;;
    logs) on_workers "$LOG_WORKER" "$(worker_job logs)" ;;
    status) show_status ;;
    wait) on_workers all "$(worker_job wait)" ;;
    stop) on_workers all "$(worker_job stop)" ;;
    delete) delete_tpu ;;
    up)
      ensure_tpu
      install_on_workers
      start_on_workers
      if ((DELETE_AFTER)); then
        # Follow worker 0 until its job ends; `wait` then fails if any worker failed, and
        # then the TPU is kept for inspection (its logs are in WORKDIR/launch_logs as well).
        on_workers 0 "$(worker_job logs)"
        on_workers all "$(worker_job wait)"
        ASSUME_YES=1
        delete_tpu
      elif ((FOLLOW)); then
        on_workers 0 "$(worker_job logs)"
      fi
      ;;
    *) die "unknown command '$COMMAND' (see --help)" ;;
  esac
  return 0
}

main "$@"
