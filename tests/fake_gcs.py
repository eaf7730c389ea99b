"""An in-memory `gs://` for tests: an fsspec filesystem registered for the `gs`/`gcs` protocol,
served to the library by etils.epath's fsspec backend, i.e. through exactly the code a real
gs:// path takes in dna_jax (epath.Path('gs://...')), only the bottom layer (gcsfs or
tf.io.gfile talking to GCS) is replaced by memory.

Object-store semantics, like GCS: folders are only name prefixes (`mkdir` creates nothing, an
empty folder does not exist), there are no partial writes (a file appears when closed).
Orbax's arrays go through tensorstore's own GCS driver, which this does not reach: stages that
save or restore an Orbax checkpoint cannot run on it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import importlib

import fsspec
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem


class _NoFolders(list):
    """MemoryFileSystem records folders here; an object store has none to record."""

    def append(self, item):
        del item


class FakeGCS(MemoryFileSystem):
    """gs://bucket/key in memory."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = _NoFolders([""])
    cachable = False

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's argument
        del finalize_on_close
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        path = path.lstrip("/").rstrip("/")
        return "/" + path if path else ""

    def unstrip_protocol(self, name):
        return "gs://" + name.lstrip("/")

    def mkdir(self, path, create_parents=True, **kwargs):
        """Object stores have no folders: nothing to create."""

    def makedirs(self, path, exist_ok=False):
        """Object stores have no folders: nothing to create."""

    def rmdir(self, path):
        """An empty prefix is nothing to remove."""


@contextlib.contextmanager
def fake_gcs(monkeypatch) -> Iterator[dict]:
    """Routes every gs:// path of epath to a fresh in-memory store (yielded: key -> file)."""
    FakeGCS.store = {}
    saved = {name: fsspec.registry.get(name) for name in ("gs", "gcs")}
    monkeypatch.setenv("EPATH_USE_TF", "false")  # epath's fsspec backend, as without TF
    epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access  # cached
    for name in ("gs", "gcs"):
        fsspec.register_implementation(name, FakeGCS, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        yield FakeGCS.store
    finally:
        for name, cls in saved.items():
            if cls is None:
                registry = importlib.import_module("fsspec.registry")
                registry._registry.pop(name, None)  # pylint: disable=protected-access
            else:
                fsspec.register_implementation(name, cls, clobber=True)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
        monkeypatch.delenv("EPATH_USE_TF", raising=False)
        epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
        FakeGCS.store = {}
