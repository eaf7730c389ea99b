"""Checksums of artifacts: recorded when written, verified when read back.

A flipped byte in an Orbax checkpoint can restore without error into finite but absurd values
(issue 22 measured 6.7e25), which no finiteness check catches. So every array artifact the
pipeline reads back (training checkpoints, the teacher, the supernet) has the SHA-256 of each
of its files recorded once it is complete, and a reader verifies them first: a mismatch is
named (file, expected and found digest) and the artifact is treated as unusable (a checkpoint
is set aside and the previous one used; a teacher or supernet stops with the command that
makes it again). An artifact written before checksums existed has none and is read with a
warning (only the finiteness checks apply).

Paths go through etils.epath, so a gs:// artifact is verified the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

from etils import epath

from dna_jax import artifacts

_CHUNK = 1 << 22


class IntegrityError(ValueError):
    """An artifact's files do not match the checksums recorded when it was written."""


def file_digest(path: epath.PathLike) -> str:
    """SHA-256 of one file (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_checksums(directory: epath.PathLike) -> dict[str, str]:
    """{path relative to `directory`: SHA-256} of every file below it, sorted."""
    root = epath.Path(directory)
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(_files(root))}


def _files(directory: epath.Path) -> list[epath.Path]:
    """Every file below `directory` (epath has no recursive glob on remote filesystems)."""
    found = []
    for child in directory.iterdir():
        found += _files(child) if child.is_dir() else [child]
    return found


def problems(directory: epath.PathLike, expected: Mapping[str, str]) -> list[str]:
    """What differs between the files below `directory` and the recorded checksums: a missing
    file or a changed digest (files added later, e.g. Orbax's own metadata, are not checked)."""
    root = epath.Path(directory)
    found = []
    for name, digest in sorted(expected.items()):
        path = root / name
        if not path.exists():
            found.append(f"{name}: missing")
            continue
        actual = file_digest(path)
        if actual != digest:
            found.append(f"{name}: SHA-256 {actual[:12]}..., recorded {digest[:12]}...")
    return found


def verify(directory: epath.PathLike, expected: Mapping[str, str] | None, what: str) -> bool:
    """Raises IntegrityError naming `what` and every bad file; returns False (with a warning)
    when nothing was recorded, True when every file matches."""
    if expected is None:
        logging.warning("%s (%s) has no recorded checksums (written by an older dna_jax): "
                        "read unverified.", what, directory)
        return False
    bad = problems(directory, expected)
    if bad:
        raise IntegrityError(f"{what} {directory} is corrupt: its files differ from the "
                             f"checksums recorded when it was written ({'; '.join(bad[:5])}"
                             f"{'; ...' if len(bad) > 5 else ''})")
    return True


def sidecar(directory: epath.PathLike) -> epath.Path:
    """Where the checksums of a directory artifact are kept: `<directory>.sha256.json` beside
    it (outside the directory, so the writer of the directory never sees it)."""
    path = epath.Path(directory)
    return path.parent / f"{path.name}.sha256.json"


def record_sidecar(directory: epath.PathLike) -> dict[str, str]:
    """Computes the checksums of `directory` and writes its sidecar (artifacts.write_text:
    atomic)."""
    checksums = tree_checksums(directory)
    artifacts.write_text(os.fspath(sidecar(directory)),
                         json.dumps(checksums, indent=1, sort_keys=True) + "\n")
    return checksums


def read_sidecar(directory: epath.PathLike) -> dict[str, str] | None:
    """The recorded checksums of `directory`, or None when none were recorded."""
    path = sidecar(directory)
    if not path.exists():
        return None
    try:
        data: Any = json.loads(path.read_text())
    except ValueError as error:
        raise IntegrityError(f"{path}: the checksum file itself is unreadable ({error})") from error
    if not isinstance(data, dict):
        raise IntegrityError(f"{path}: not a checksum file")
    return data
