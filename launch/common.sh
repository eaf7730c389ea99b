# shellcheck shell=bash
# Shared helpers for the launch scripts: argument parsing, dry-run execution, variable checks.
# Sourced, never run: `source "$(dirname "${BASH_SOURCE[0]}")/common.sh"`.
#
# A script defines `usage` (prints its help), then calls `parse_common_args "$@"`. Afterwards
# DRY_RUN is 0 or 1, ARGS holds the remaining arguments before `--` and EXTRA_ARGS those after
# it (passed on to `python -m dna_jax.main`). Every command with an effect goes through `run`,
# so `--dry-run` prints exactly what would be executed, one command a line, prefixed by "+ ".

# EXTRA_ARGS and REPO_ROOT are for the scripts that source this file.
DRY_RUN=0
ARGS=()
EXTRA_ARGS=()
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"

# Prints an error naming the script and exits with status 1.
die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

# Quotes one word for a POSIX shell: bare when it is safe, else double-quoted when that needs
# no escapes, else single-quoted. Of a --flag=value word only the value is quoted, which reads
# better: --command='cd x && y'.
quote_word() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  elif [[ $word != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces: the result can be pasted into a shell.
quote_command() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it ("+ cmd") on stdout instead.
# In a real run the same line goes to stderr before the command starts.
run() {
  if ((DRY_RUN)); then
    echo "+ $(quote_command "$@")"
  else
    echo "+ $(quote_command "$@")" >&2
    "$@"
  fi
}

# Like `run`, with the command's standard output written to the file named first.
run_to() {
  local file=$1
  shift
  if ((DRY_RUN)); then
    echo "+ $(quote_command "$@") > $(quote_word "$file")"
  else
    echo "+ $(quote_command "$@") > $(quote_word "$file")" >&2
    "$@" >"$file"
  fi
}

# A progress line: a shell comment in dry-run output, a "==>" line on stderr otherwise.
note() {
  if ((DRY_RUN)); then
    echo "# $*"
  else
    echo "==> $*" >&2
  fi
}

# Fails with one message naming every listed variable that is unset or empty.
require_vars() {
  local name missing=()
  for name in "$@"; do
    [[ -n ${!name:-} ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    die "missing required environment variable(s): ${missing[*]} (see $(basename "$0") --help)"
  fi
}

# Fails unless the named variable holds a gs:// URL (multi-host runs need shared storage).
require_gcs_url() {
  local name=$1
  [[ ${!name} == gs://?* ]] || die "$name must be a gs:// URL shared by all hosts, got '${!name}'"
}

# Fails unless the named variable is 0 or 1.
require_flag() {
  local name=$1
  [[ ${!name} == 0 || ${!name} == 1 ]] || die "$name must be 0 or 1, got '${!name}'"
}

# Fails unless the named variable is a relative path of plain names (safe to embed unquoted).
require_relative_path() {
  local name=$1
  [[ ${!name} =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ && ${!name} != *..* ]] \
    || die "$name must be a relative path of plain names, got '${!name}'"
}

# Handles --dry-run, -h/--help and `--`; everything else is left for the script in ARGS.
parse_common_args() {
  while (($#)); do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        # shellcheck disable=SC2034
        EXTRA_ARGS=("$@")
        break
        ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}
