#!/usr/bin/env bash
# Runs ON each TPU VM worker (launch/tpu.sh calls it through `gcloud ... ssh --worker=all`):
# starts one detached job that survives the SSH session, and stops, waits for, shows or tails it.
#
#   worker_job.sh start -- CMD [ARG...]   start CMD in the background (refused if one runs)
#   worker_job.sh status                  one line: running / finished (exit N) / not started
#   worker_job.sh logs [LINES]            the log's last lines; follows it while the job runs
#   worker_job.sh wait                    block until the job ends; exit with its exit status
#   worker_job.sh stop                    SIGTERM the job (SIGKILL after STOP_TIMEOUT_S)
#
# Environment:
#   JOB_DIR         holds run.log (every run here, appended), run.pid, run.exit (~/dna_jax_job)
#   LOG_UPLOAD_DIR  gs:// URL; when the job ends its log is copied to LOG_UPLOAD_DIR/<host>.log
#   STOP_TIMEOUT_S  seconds between SIGTERM and SIGKILL (default 60)
#   POLL_S          seconds between checks by `wait` (default 10); FOLLOW_POLL_S by `logs` (1)
set -euo pipefail

JOB_DIR=${JOB_DIR:-$HOME/dna_jax_job}
LOG_UPLOAD_DIR=${LOG_UPLOAD_DIR:-}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-60}
POLL_S=${POLL_S:-10}
FOLLOW_POLL_S=${FOLLOW_POLL_S:-1}
LOG=$JOB_DIR/run.log
PID_FILE=$JOB_DIR/run.pid
EXIT_FILE=$JOB_DIR/run.exit
HOST=$(hostname)

die() {
  echo "worker_job.sh on $HOST: error: $*" >&2
  exit 1
}

# The supervisor's pid if the job is alive, else nothing. An exited supervisor can linger as
# a zombie until the init process reaps it, so a process in state Z counts as ended.
job_pid() {
  local pid state
  [[ -f $PID_FILE ]] || return 0
  pid=$(<"$PID_FILE")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
  if [[ -n $state && $state != Z* ]]; then
    echo "$pid"
  fi
}

# Copies the log to LOG_UPLOAD_DIR with whichever Cloud Storage client the VM has.
upload_log() {
  [[ -n $LOG_UPLOAD_DIR ]] || return 0
  local dest="${LOG_UPLOAD_DIR%/}/$HOST.log"
  if command -v gcloud >/dev/null; then
    gcloud storage cp "$LOG" "$dest" || echo "could not upload the log to $dest" >&2
  elif command -v gsutil >/dev/null; then
    gsutil cp "$LOG" "$dest" || echo "could not upload the log to $dest" >&2
  else
    echo "no gcloud or gsutil: the log stays at $LOG" >&2
  fi
}

# Runs in the background with stdout/stderr on the log: the job, then its exit status.
supervise() {
  local rc=0
  echo "[$(date -u +%FT%TZ)] $HOST: $*"
  "$@" || rc=$?
  echo "$rc" >"$EXIT_FILE"
  echo "[$(date -u +%FT%TZ)] $HOST: exit status $rc"
  upload_log
  return "$rc"
}

start() {
  [[ ${1:-} == -- ]] && shift
  (($#)) || die "start needs a command: worker_job.sh start -- CMD [ARG...]"
  local pid
  pid=$(job_pid)
  [[ -z $pid ]] || die "a job is already running (pid $pid); stop it first"
  mkdir -p "$JOB_DIR"
  rm -f "$EXIT_FILE"
  # Appended: the log keeps every run started here, each opened by a dated line.
  nohup bash "${BASH_SOURCE[0]}" _supervise "$@" >>"$LOG" 2>&1 </dev/null &
  echo "$!" >"$PID_FILE"
  echo "$HOST: started pid $!, log $LOG"
}

status() {
  local pid
  pid=$(job_pid)
  if [[ -n $pid ]]; then
    echo "$HOST: running (pid $pid)"
  elif [[ -f $EXIT_FILE ]]; then
    echo "$HOST: finished (exit $(<"$EXIT_FILE"))"
  elif [[ -f $PID_FILE ]]; then
    echo "$HOST: ended without an exit status (killed?)"
  else
    echo "$HOST: not started"
  fi
}

logs() {
  local lines=${1:-200}
  [[ -f $LOG ]] || die "no log at $LOG: no job was started here"
  if [[ -z $(job_pid) ]]; then
    tail -n "$lines" "$LOG"
  else
    # Follow until the job ends (not `tail --pid`, which would wait for a zombie too).
    tail -n "$lines" -F "$LOG" &
    local tail_pid=$!
    while [[ -n $(job_pid) ]]; do
      sleep "$FOLLOW_POLL_S"
    done
    sleep "$FOLLOW_POLL_S"
    kill "$tail_pid"
    wait "$tail_pid" 2>/dev/null || true
  fi
  status
}

wait_job() {
  [[ -f $PID_FILE ]] || die "no job was started here"
  while [[ -n $(job_pid) ]]; do
    sleep "$POLL_S"
  done
  status
  [[ -f $EXIT_FILE ]] || exit 1
  exit "$(<"$EXIT_FILE")"
}

stop() {
  local pid waited=0
  pid=$(job_pid)
  if [[ -z $pid ]]; then
    status
    return 0
  fi
  # The supervisor records the exit status and uploads the log once its child has ended.
  pkill -TERM -P "$pid" || true
  while [[ -n $(job_pid) ]] && ((waited < STOP_TIMEOUT_S)); do
    sleep 1
    waited=$((waited + 1))
  done
  if [[ -n $(job_pid) ]]; then
    echo "$HOST: still running after ${STOP_TIMEOUT_S}s, sending SIGKILL" >&2
    pkill -KILL -P "$pid" || true
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # A killed TPU job can leave libtpu's lock behind; it is ours, and nothing of ours runs now.
  if [[ -O /tmp/libtpu_lockfile ]]; then
    rm -f /tmp/libtpu_lockfile
  fi
  status
}

case ${1:-} in
  start) shift && start "$@" ;;
  status) status ;;
  logs) shift && logs "$@" ;;
  wait) wait_job ;;
  stop) stop ;;
  _supervise) shift && supervise "$@" ;;
  *) die "usage: worker_job.sh start -- CMD [ARG...] | status | logs [LINES] | wait | stop" ;;
esac
