"""dna_jax.files, the one owner of file IO, on a local folder and on a non-local `gs://`
(tests/fake_gcs.py: an in-memory fsspec filesystem registered for gs, reached through
etils.epath exactly as a real bucket is; only the layer below epath differs)."""

import os

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend

from dna_jax import artifacts, files, rating_table
from fake_gcs import FakeGCS, fake_gcs


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path, monkeypatch):
    """A folder to work in: a local one, or gs://bucket/... on the in-memory GCS."""
    if request.param == "local":
        yield str(tmp_path / "root")
        return
    with fake_gcs(monkeypatch):
        yield "gs://bucket/root"


def test_fake_gcs_is_reached_through_epaths_gs_backend(monkeypatch):
    assert epath.Path("gs://bucket/x")._backend is epath_backend.tf_backend  # TF is installed
    with fake_gcs(monkeypatch) as store:
        path = epath.Path("gs://bucket/x.json")
        assert path._backend is epath_backend.fsspec_backend  # what a gs:// path uses without TF
        assert isinstance(path._backend.fs(str(path)), FakeGCS)
        files.write_text("gs://bucket/x.json", "{}")
        assert list(store) == ["/bucket/x.json"]
    assert not os.path.exists("gs:")
    assert epath.Path("gs://bucket/x")._backend is epath_backend.tf_backend


def test_urls_stay_urls():
    assert files.absolute("gs://b/w") == "gs://b/w"
    assert files.absolute("gs://b/w/") == "gs://b/w"
    assert files.normpath("gs://b/w/../x/./y") == "gs://b/x/y"
    assert files.absolute("rel") == os.path.abspath("rel")
    assert files.normpath("a/../b") == "b"
    assert files.is_remote("gs://b") and not files.is_remote("/tmp/x")
    assert files.scheme("gs://b/w") == "gs" and files.scheme("/x") == ""


def test_write_read_exists_list_move_remove(root):
    a = os.path.join(root, "a", "x.json")
    assert not files.exists(a) and not files.isdir(root)
    artifacts.write_json(a, {"b": np.float32(1.5), "a": (1, 2)})
    assert artifacts.read_json(a) == {"a": [1, 2], "b": 1.5}
    assert files.read_text(a) == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1.5\n}\n'
    assert files.exists(a) and files.isfile(a) and not files.isdir(a)
    assert (FakeGCS.store.get("/bucket/root/a/x.json") is not None) == files.is_remote(root)
    assert files.isdir(os.path.join(root, "a"))
    files.write_bytes(os.path.join(root, "a", "y.bin"), b"\x00\x01")
    assert sorted(files.listdir(os.path.join(root, "a"))) == ["x.json", "y.bin"]
    files.write_bytes(os.path.join(root, "a", "y.bin"), b"new")  # overwrite
    assert files.read_bytes(os.path.join(root, "a", "y.bin")) == b"new"
    files.copyfile(a, os.path.join(root, "c.json"))
    assert artifacts.read_json(os.path.join(root, "c.json")) == {"a": [1, 2], "b": 1.5}
    files.move(os.path.join(root, "a"), os.path.join(root, "moved"))
    assert not files.exists(a)
    assert sorted(files.listdir(os.path.join(root, "moved"))) == ["x.json", "y.bin"]
    walked = {os.path.relpath(top, root) if not files.is_remote(top)
              else top[len(root) + 1:] or ".": (sorted(d), sorted(f))
              for top, d, f in files.walk(root)}
    assert walked == {".": (["moved"], ["c.json"]), "moved": ([], ["x.json", "y.bin"])}
    files.remove(os.path.join(root, "c.json"))
    files.remove(os.path.join(root, "c.json"), missing_ok=True)
    files.rmtree(os.path.join(root, "moved"))
    files.rmtree(os.path.join(root, "moved"), missing_ok=True)
    # Locally the emptied folder stays; on an object store a folder with nothing in it is gone.
    assert files.listdir(root) == [] if not files.is_remote(root) else not files.exists(root)
    with pytest.raises(FileNotFoundError):
        files.read_text(os.path.join(root, "missing.json"))
    with pytest.raises(FileNotFoundError):
        files.remove(os.path.join(root, "missing.json"))


def test_read_json_names_a_damaged_file(root):
    path = os.path.join(root, "bad.json")
    files.write_text(path, "{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        artifacts.read_json(path)


def test_local_write_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "d" / "f.txt")
    files.write_text(path, "old")
    before = os.stat(path).st_ino

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        files.write_text(path, "new")
    monkeypatch.undo()
    assert open(path).read() == "old" and os.listdir(tmp_path / "d") == ["f.txt"]
    files.write_text(path, "new")
    assert open(path).read() == "new" and os.stat(path).st_ino != before  # renamed over


def test_staging_dir_is_next_to_the_target(root):
    target = os.path.join(root, "artifact")
    staging = files.staging_dir(target)
    assert os.path.dirname(staging) == os.path.dirname(files.absolute(target))
    assert os.path.basename(staging).startswith("artifact.tmp-")
    files.write_text(os.path.join(staging, "f"), "x")
    files.move(staging, target)
    assert files.read_text(os.path.join(target, "f")) == "x" and not files.exists(staging)


def test_rating_table_round_trip(root):
    table = rating_table.BlockTable(np.asarray([[0, 1], [1, 0]], np.int32),
                                    np.asarray([0.5, 0.25]), {"macs": np.asarray([3., 4.])})
    path = os.path.join(root, "rate", "block0.npz")
    rating_table.save_block_table(path, table)
    loaded = rating_table.load_block_table(path, required_costs=("macs",))
    np.testing.assert_array_equal(loaded.encodings, table.encodings)
    np.testing.assert_array_equal(loaded.score, table.score)
    np.testing.assert_array_equal(loaded.costs["macs"], table.costs["macs"])
    assert loaded.source == path


@pytest.mark.parametrize("url", ["s3://bucket/w", "memory://w", "file:///tmp/w"])
def test_only_local_and_gs_urls_are_supported(url):
    assert "is not supported: use a local folder or a gs:// URL" in files.unsupported(url)
    assert files.unsupported("gs://bucket/w") == "" and files.unsupported("/tmp/w") == ""
