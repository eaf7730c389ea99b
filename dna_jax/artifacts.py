"""Stage artifacts: atomic files, manifests and config hashes.

Every pipeline stage writes under `workdir/<stage>/` and finishes by writing `manifest.json`
(last, atomically). A stage whose manifest exists with the same config hash is complete and
skipped; one whose hash differs was produced by another config, which is reported (with the
keys that changed) rather than silently overwritten.

A manifest is sealed: its `sha256` field is the SHA-256 of the rest of its content in
canonical form (`content_digest`), so a changed byte that still parses (a figure, the config
hash) is found, not believed. A manifest whose seal fails does not mark its stage complete
(the stage runs again, resuming its own checkpoints) and a reader of its figures stops naming
the file. Other small JSON artifacts (the export's summary) are sealed the same way.
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
SEAL = "sha256"  # the field of a sealed JSON object that holds the digest of the rest


class ConfigChangedError(RuntimeError):
    """An artifact exists for a different config than the one asked for."""


class ManifestError(ValueError):
    """A stage's manifest is unreadable or fails its seal (changed after it was written)."""


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


def content_digest(obj: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON object's content, its `sha256` field left out: keys sorted, no
    whitespace, so the digest of what `write_json` wrote equals that of what `read_json` reads
    back (floats, NaN included, round-trip exactly)."""
    content = {k: v for k, v in to_jsonable(obj).items() if k != SEAL}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(obj: Mapping[str, Any]) -> dict[str, Any]:
    """`obj` with its `sha256` field: the digest of the rest (`content_digest`)."""
    content = {k: v for k, v in to_jsonable(obj).items() if k != SEAL}
    return {**content, SEAL: content_digest(content)}


def seal_problem(obj: Any) -> str | None:
    """What is wrong with a sealed JSON object, or None: its content does not hash to its
    `sha256` field. An object without the field (written before seals existed) passes."""
    if not isinstance(obj, dict):
        return f"not a JSON object but {type(obj).__name__}"
    if SEAL not in obj:
        return None
    actual = content_digest(obj)
    if actual != obj[SEAL]:
        return (f"its content has SHA-256 {actual[:12]}..., the {SEAL} recorded when it was "
                f"written is {str(obj[SEAL])[:12]}...")
    return None


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


def manifest_problem(stage_dir: str) -> str | None:
    """Why the stage's existing manifest cannot be trusted (names the file), or None when it
    is sound or absent: unreadable JSON, no config hash, or a failed seal."""
    path = os.path.join(stage_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        manifest = read_json(path)
    except (ValueError, UnicodeDecodeError) as error:
        return f"{path} is not valid JSON ({error})"
    if not isinstance(manifest, dict) or not manifest.get("config_hash"):
        return f"{path} has no config_hash (not written by a finished stage)"
    problem = seal_problem(manifest)
    if problem:
        return f"{path} is corrupt: {problem}"
    return None


def stage_status(stage_dir: str, digest: str) -> str:
    """'missing', 'complete' (same config) or 'changed' (written by another config).

    An unreadable manifest, one without a config hash (written by hand, damaged) or one whose
    seal fails (a changed byte) does not mark the stage complete: it is 'missing' (the stage
    runs again, resuming its own checkpoints, and writes a new manifest), with a warning
    naming the file. Only that stage reruns: the stages after it keep theirs (their hashes
    cover its config, not its bytes).
    """
    path = os.path.join(stage_dir, MANIFEST)
    if not files.exists(path):
        return "missing"
    problem = manifest_problem(stage_dir)
    if problem:
        logging.warning("%s; the %s stage counts as not done and runs again (resuming its own "
                        "checkpoints).", problem, os.path.basename(stage_dir.rstrip("/")))
        return "missing"
    return "complete" if read_json(path).get("config_hash") == digest else "changed"


def config_changes(old: Any, new: Any) -> str:
    """'key: old -> new; ...' for the (first 20) keys that differ between two configs."""
    changes = _diff(to_jsonable(old), to_jsonable(new))
    return "; ".join(changes[:20]) or "an upstream stage changed"


def describe_change(stage_dir: str, config: Any) -> str:
    """The config keys that differ between an existing artifact and `config`."""
    return config_changes(read_json(os.path.join(stage_dir, MANIFEST)).get("config", {}), config)


def write_manifest(stage_dir: str, stage: str, digest: str, config: Any,
                   figures: Mapping[str, Any], wall_seconds: float) -> None:
    """Marks a stage complete: written last, so a half-written stage is never 'complete'.
    Sealed (`sealed`): its `sha256` field is the digest of the rest."""
    write_json(os.path.join(stage_dir, MANIFEST), sealed({
        "stage": stage, "config_hash": digest, "config": to_jsonable(config),
        "figures": to_jsonable(figures), "wall_seconds": wall_seconds, "versions": versions(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }))


def read_manifest(stage_dir: str) -> dict:
    """A stage's manifest, verified: ManifestError names a damaged one and the fix."""
    problem = manifest_problem(stage_dir)
    if problem:
        stage = os.path.basename(stage_dir.rstrip("/"))
        raise ManifestError(f"{problem}; rerun with the {stage!r} stage in config.stages: a "
                            "damaged manifest does not count, so the stage runs again (resuming "
                            "its own checkpoints) and writes a new one")
    return read_json(os.path.join(stage_dir, MANIFEST))
