r"""Runs the DNA pipeline from a config file: `python -m dna_jax.main --config C --workdir D`.

    python -m dna_jax.main --config configs/fashion_mnist_dna.py --workdir workdir/fmnist
    python -m dna_jax.main --config configs/fashion_mnist_dna.py --workdir W --config.stages=rate,search

Any config field can be overridden on the command line (`--config.distill.num_epochs=2`). The
run ends by printing one JSON object with its figures (also in <workdir>/summary.json when the
report stage ran). A config with a `progressive` section (configs/*_dna_plus.py) runs DNA+
rounds instead (dna_jax.progressive). The logic lives in dna_jax.pipeline and
dna_jax.progressive; this file only parses flags.
"""

from __future__ import annotations

import errno
import sys
from typing import Sequence

import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from dna_jax import host_memory, metrics, pipeline, progressive, sharding, validate
from dna_jax import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pipeline config (file.py[:arg]), e.g. configs/fashion_mnist_dna.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of every stage's artifacts (one run "
                               "at a time: it is locked while a run uses it).")
flags.mark_flags_as_required(["config", "workdir"])


def define_flags() -> None:
    """The flags are defined when this module is imported (dna_jax.cli's --help calls this)."""


class _QuietLibraries(py_logging.Filter):
    """Drops the INFO chatter of Orbax and TensorFlow (dozens of lines per checkpoint)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        noisy = ("/orbax/", "/tensorflow/", "/tensorflow_datasets/")
        return record.levelno >= py_logging.WARNING or not any(
            part in record.pathname for part in noisy)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = _CONFIG.value
    sharding.initialize_distributed(config.distributed)
    try:
        if progressive.is_progressive(config):  # DNA+: rounds of the pipeline
            figures = progressive.run_progressive(config, _WORKDIR.value)
        else:
            figures = pipeline.run_pipeline(config, _WORKDIR.value)
    except (validate.ConfigError, workdir_lib.WorkdirLockedError) as error:
        raise SystemExit(f"dna-jax run: {error}") from None  # the message says it all
    except Exception as error:  # pylint: disable=broad-except  # only a full disk is caught
        full = _disk_full(error)
        if full is None:
            raise
        raise SystemExit(f"dna-jax run: the disk is full ({full}); free space "
                         "and rerun the same command: finished stages are skipped and the "
                         "interrupted one resumes from its last checkpoint.") from error
    print(metrics.final_line(figures), flush=True)


_DISK_FULL = ("No space left on device", "Disk quota exceeded")


def _disk_full(error: BaseException) -> str | None:
    """What says the disk is full in `error` or its causes, else None: an OSError with
    ENOSPC/EDQUOT ('No space left on device: <file>'), or the same words in an error of a
    library that writes files its own way (TensorFlow's event writer raises
    ResourceExhaustedError, Orbax/TensorStore their own errors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return (f"{error.strerror}"
                    f"{': ' + str(error.filename) if error.filename else ''}")
        text = str(error)
        for words in _DISK_FULL:
            if words in text:
                line = next(line for line in text.splitlines() if words in line)
                return f"{type(error).__name__}: {line.strip()[:300]}"
        error = error.__cause__ or error.__context__
    return None


def run(argv: Sequence[str] | None = None) -> None:
    """Entry point; `argv` excludes the program name (None = sys.argv)."""
    args = sys.argv if argv is None else ["dna-jax run", *argv]
    host_memory.keep_freed_memory()  # before JAX starts its CPU threads
    app.run(main, argv=args)


if __name__ == "__main__":
    run()
