"""The library's one owner of file IO: every path goes through `etils.epath`, so a workdir,
rating table or teacher checkpoint at `gs://bucket/...` is a path like any local one.

Paths stay plain strings (`os.path.join` joins URLs correctly on POSIX); what must not be
applied to a URL is `os.path.abspath` / `normpath` (`gs://b/w` -> `<cwd>/gs:/b/w`): use
`absolute` and `normpath` here. Which backend serves a URL is epath's choice: `tf.io.gfile`
when TensorFlow is installed (unless `EPATH_USE_TF=false`), else fsspec (`gcsfs` for gs://).

Writes: `write_bytes` is the one atomic write of small files. Locally it writes a temporary
file in the same folder, fsyncs it and renames it over the target (a reader sees the old file
or the new one); an object store replaces an object whole in one request, so a remote path is
written directly. Array trees are Orbax's (it writes gs:// through tensorstore's own driver).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from typing import IO, Iterator

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """True for a URL (gs://, s3://, ...), False for a local path."""
    return "://" in os.fspath(path)


def scheme(path: PathLike) -> str:
    """'gs' for gs://..., '' for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if "://" in text else ""


# The URL schemes a workdir or checkpoint may have: small files go through epath (any scheme
# it knows), but Orbax writes arrays through tensorstore, whose driver this library uses for
# local folders and gs:// only.
SUPPORTED_SCHEMES = ("", "gs")


def unsupported(p: PathLike) -> str:
    """'' when the pipeline can keep artifacts at `p`, else why not (for the error at start)."""
    if scheme(p) in SUPPORTED_SCHEMES:
        return ""
    return (f"{scheme(p)}:// is not supported: use a local folder or a gs:// URL (files go "
            "through etils.epath, array checkpoints through Orbax/tensorstore, which dna_jax "
            "uses for local and gs:// paths only)")


def path(p: PathLike) -> epath.Path:
    """The epath.Path of `p` (local or URL)."""
    return epath.Path(p)


def absolute(p: PathLike) -> str:
    """os.path.abspath for a local path; a URL is returned as it is (normalised), never made
    relative to the working directory."""
    return normpath(p) if is_remote(p) else os.path.abspath(os.fspath(p))


def normpath(p: PathLike) -> str:
    """os.path.normpath that keeps a URL's 'scheme://' (normpath alone makes it 'scheme:/')."""
    text = os.fspath(p)
    if not is_remote(text):
        return os.path.normpath(text)
    prefix, rest = text.split("://", 1)
    rest = posixpath.normpath(rest) if rest else rest
    return f"{prefix}://{'' if rest == '.' else rest}"


def exists(p: PathLike) -> bool:
    return epath.Path(p).exists()


def isdir(p: PathLike) -> bool:
    return epath.Path(p).is_dir()


def isfile(p: PathLike) -> bool:
    return epath.Path(p).is_file()


def makedirs(p: PathLike) -> None:
    """mkdir -p (a no-op on object stores, whose folders are name prefixes)."""
    epath.Path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
    """The names in folder `p` (os.listdir's order locally)."""
    return [child.name for child in epath.Path(p).iterdir()]


def walk(p: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk (top-down; prune by editing `dirs` in place) for local and remote folders."""
    if not is_remote(p):
        yield from os.walk(os.fspath(p))
        return
    top = normpath(p)
    if not isdir(top):
        return
    dirs, files = [], []
    for name in sorted(listdir(top)):
        (dirs if isdir(posixpath.join(top, name)) else files).append(name)
    yield top, dirs, files
    for name in dirs:
        yield from walk(posixpath.join(top, name))


def remove(p: PathLike, missing_ok: bool = False) -> None:
    epath.Path(p).unlink(missing_ok=missing_ok)


def rmtree(p: PathLike, missing_ok: bool = False) -> None:
    """Removes a folder and everything under it."""
    epath.Path(p).rmtree(missing_ok=missing_ok)


def move(src: PathLike, dst: PathLike) -> None:
    """Renames `src` (file or folder) to `dst`, replacing a file there: os.replace locally
    (atomic); on an object store a copy of every object then a delete (not atomic)."""
    epath.Path(src).replace(dst)


def staging_dir(directory: PathLike) -> str:
    """A new, unique folder next to `directory` (named `<name>.tmp-<random>`, which the
    workdir's start-up cleanup removes) to assemble an artifact in before `move`-ing it into
    place. Remote: only the name (object stores have no empty folders)."""
    directory = absolute(directory)
    if is_remote(directory):
        return f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)


def copyfile(src: PathLike, dst: PathLike) -> None:
    """Copies one file (overwrites `dst`), written through `write_bytes`."""
    write_bytes(dst, read_bytes(src))


def open_file(p: PathLike, mode: str = "rb") -> IO:
    """A file object for streaming reads (np.load, tarfiles); write through write_bytes."""
    return epath.Path(p).open(mode)


def read_bytes(p: PathLike) -> bytes:
    return epath.Path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return epath.Path(p).read_text(encoding="utf-8")


def write_bytes(p: PathLike, data: bytes) -> None:
    """The one atomic write of the library's small files (see the module docstring)."""
    if is_remote(p):
        target = epath.Path(p)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    p = os.fspath(p)
    directory = os.path.dirname(os.path.abspath(p))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(p)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode())
