"""The rating table format: keys, version, metric columns, the fingerprint check."""

import numpy as np
import pytest

from dna_jax import rating_table as rt


def _rating(n=4):
    rng = np.random.default_rng(0)
    metrics = {"mse": rng.random(n), "cl_loss": rng.random(n)}
    encodings = np.stack([np.arange(n), np.zeros(n, int)], 1).astype(np.int32)
    return rt.BlockRating(encodings, rng.random((n, 2)), rng.random((n, 2)), metrics, "cl_loss",
                          {"fit_mse_var": {"best": 0.5, "beats_constant": True}})


def _saved_rating(tmp_path):
    """(prefix, rating, space, block) of a rating of 4 candidates of the `tiny` space saved
    with fingerprint 'abc'."""
    from dna_jax.space import get_space  # pylint: disable=import-outside-toplevel
    space = get_space("tiny")
    b = next(i for i, blk in enumerate(space.blocks) if blk.fixed_ops is None)
    encodings = space.block_candidates(b)[:4]
    rating = _rating(len(encodings))
    rating = rt.BlockRating(encodings, rating.batch_mse, rating.batch_mae, rating.metrics,
                            rating.rank_metric, rating.info)
    prefix = str(tmp_path / space.blocks[b].name)
    rt.save_rating(prefix, rating, space, b, fingerprint="abc")
    return prefix, rating, space, b


def test_block_table_keys_and_version(tmp_path):
    table = rt.BlockTable(np.array([[0, 1], [1, 0]]), np.array([0.5, 0.25]),
                          {"macs": np.array([3, 4])})
    path = tmp_path / "b.npz"
    rt.save_block_table(path, table)
    with np.load(path) as data:
        assert sorted(data.files) == ["cost_macs", "encodings", "format_version", "score"]
        assert int(data["format_version"]) == rt.TABLE_FORMAT_VERSION == 1
    loaded = rt.load_block_table(path, required_costs=["macs"])
    np.testing.assert_array_equal(loaded.score, table.score)
    assert rt.load_metrics(path) == {}
    arrays = rt.table_arrays(table.encodings, table.score, table.costs)
    arrays["format_version"] = np.asarray(2)
    np.savez(tmp_path / "new.npz", **arrays)
    with pytest.raises(ValueError, match="new.npz: block table format_version 2"):
        rt.load_block_table(tmp_path / "new.npz")


def test_rating_files_fingerprint_and_fit(tmp_path):
    prefix, rating, space, b = _saved_rating(tmp_path)
    assert rt.rating_complete(prefix, "abc") and not rt.rating_complete(prefix, "other")
    assert not rt.rating_complete(str(tmp_path / "missing"), "abc")
    assert rt.block_fit(str(tmp_path), space.blocks[b].name)["best"] == 0.5
    back = rt.load_rating(prefix)
    np.testing.assert_array_equal(back.score, rating.score)
    assert set(rt.load_metrics(prefix + ".npz")) == {"mse", "cl_loss"}
    table = rt.load_block_table(prefix + ".npz")
    assert {"params", "macs", "dna_flops"} <= set(table.costs)


def test_a_changed_rating_table_is_named_and_its_block_rated_again(tmp_path):
    prefix, rating, space, b = _saved_rating(tmp_path)
    raw = bytearray(open(prefix + ".npz", "rb").read())
    raw[len(raw) // 2] ^= 0x01  # inside an array: the zip still opens, a value changed
    open(prefix + ".npz", "wb").write(bytes(raw))
    assert not rt.rating_complete(prefix, "abc")  # the rate stage rates this block again
    with pytest.raises(ValueError, match=r"\.npz is corrupt: its SHA-256 differs .* rerun the "
                                         r"rate stage"):
        rt.load_block_table(prefix + ".npz")
    with pytest.raises(ValueError, match="is corrupt"):
        rt.load_rating(prefix)
