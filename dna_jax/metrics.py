"""Metric writers, progress reports and the final JSON figures of a run.

Only process 0 writes metrics and files (TensorBoard + log); other processes get a writer that
drops everything, so every process can run the same code.

clu is imported where it is used, not at import time: clu's writers import TensorFlow, and the
modules that import this one (e.g. `dna_jax.distill`) must stay importable in an image without
it (`benchmarks/accelerator_suite.py`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import numpy as np

from dna_jax import artifacts


def create_writer(workdir: str | None, *, asynchronous: bool = True) -> metric_writers.MetricWriter:
    """TensorBoard (under workdir) + log on process 0; a no-op writer on the others."""
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.create_default_writer(workdir, asynchronous=asynchronous)


def report_progress(num_train_steps: int, writer: metric_writers.MetricWriter,
                    every_secs: float = 60.0, every_steps: int | None = None
                    ) -> periodic_actions.ReportProgress:
    """clu's ReportProgress: logs steps/s, percent done and ETA; writes steps_per_sec."""
    from clu import periodic_actions  # pylint: disable=import-outside-toplevel
    return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_secs=every_secs, every_steps=every_steps)


def log_parameter_overview(params: Any, msg: str = "Parameters") -> int:
    """Logs a table of parameter names, shapes and sizes (process 0); returns the count."""
    from clu import parameter_overview  # pylint: disable=import-outside-toplevel
    count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
            include_stats=False, msg=f"{msg}: {count:,}")
    return count


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def write_json(path: str, obj: dict[str, Any]) -> None:
    """Writes JSON atomically (temporary file, then rename) on process 0."""
    if jax.process_index() != 0:
        return
    artifacts.write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True))


def final_line(figures: dict[str, Any]) -> str:
    """The run's last output line: one JSON object with its figures."""
    return json.dumps(_jsonable(figures), sort_keys=True)


class Stopwatch:
    """Wall time since construction, in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
