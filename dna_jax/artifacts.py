"""Stage artifacts: atomic files, manifests and config hashes.

Every pipeline stage writes under `workdir/<stage>/` and finishes by writing `manifest.json`
(last, atomically). A stage whose manifest exists with the same config hash is complete and
skipped; one whose hash differs was produced by another config, which is reported (with the
keys that changed) rather than silently overwritten.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import platform
from typing import Any, Mapping

import numpy as np

from dna_jax import files

MANIFEST = "manifest.json"


class ConfigChangedError(RuntimeError):
    """An artifact exists for a different config than the one asked for."""


def write_bytes(path: str, data: bytes) -> None:
    """The one atomic write of the library's small files (dna_jax.files.write_bytes: a
    temporary file, fsynced and renamed locally; one request to an object store)."""
    files.write_bytes(path, data)


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (temporary file, then rename)."""
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
    try:
        return json.loads(files.read_text(path))
    except FileNotFoundError:
        raise
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to recompute") from e


def write_npz(path: str, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def to_jsonable(obj: Any) -> Any:
    """Converts numpy/jax scalars and arrays, tuples and ConfigDicts to plain JSON values."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "tolist") and hasattr(obj, "shape"):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def config_hash(*parts: Any) -> str:
    """A short stable hash of config sections (and upstream hashes)."""
    text = json.dumps([to_jsonable(p) for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import flax  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel

    import dna_jax  # pylint: disable=import-outside-toplevel
    return {"dna_jax": dna_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "python": platform.python_version()}


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key, "<missing>"), new.get(key, "<missing>"),
                         f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def stage_status(stage_dir: str, digest: str) -> str:
    """'missing', 'complete' (same config) or 'changed' (written by another config).

    An unreadable manifest, or one without a config hash (written by hand, damaged), does not
    mark the stage complete: it is 'missing' (the stage runs again, resuming its own
    checkpoints, and writes a new manifest), with a warning naming the file.
    """
    path = os.path.join(stage_dir, MANIFEST)
    if not files.exists(path):
        return "missing"
    try:
        manifest = read_json(path)
    except ValueError as error:
        logging.warning("%s; the stage counts as not done and runs again.", error)
        return "missing"
    if not isinstance(manifest, dict) or not manifest.get("config_hash"):
        logging.warning("%s has no config_hash (not written by a finished stage); the stage "
                        "counts as not done and runs again.", path)
        return "missing"
    return "complete" if manifest.get("config_hash") == digest else "changed"


def config_changes(old: Any, new: Any) -> str:
    """'key: old -> new; ...' for the (first 20) keys that differ between two configs."""
    changes = _diff(to_jsonable(old), to_jsonable(new))
    return "; ".join(changes[:20]) or "an upstream stage changed"


def describe_change(stage_dir: str, config: Any) -> str:
    """The config keys that differ between an existing artifact and `config`."""
    return config_changes(read_json(os.path.join(stage_dir, MANIFEST)).get("config", {}), config)


def write_manifest(stage_dir: str, stage: str, digest: str, config: Any,
                   figures: Mapping[str, Any], wall_seconds: float) -> None:
    """Marks a stage complete: written last, so a half-written stage is never 'complete'."""
    write_json(os.path.join(stage_dir, MANIFEST), {
        "stage": stage, "config_hash": digest, "config": to_jsonable(config),
        "figures": to_jsonable(figures), "wall_seconds": wall_seconds, "versions": versions(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def read_manifest(stage_dir: str) -> dict:
    return read_json(os.path.join(stage_dir, MANIFEST))
