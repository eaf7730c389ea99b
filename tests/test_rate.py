"""Rating: the prefix-shared evaluator equals the naive per-candidate loop, in every setting.

Tiny shapes: a 6-op, 2-layer block 0 (16 px images through the student stem, batch 4, 2 rating
batches; 36 candidates), compiled with XLA's cheap options because compilation dominates here.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from dna_jax import rate, search
from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.supernet import SupernetBlock, build_supernet_blocks
from dna_jax.models.zoo import get_network_spec
from dna_jax.netspec import LayerSpec
from dna_jax.space import SearchSpace, _blocks, get_space

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def setup():
    """A 2-layer x 6-op block 0, random variables, random images and targets."""
    space = SearchSpace(name="rate_test", blocks=_blocks((2,), (8,), (12,), (2,), False),
                        stem_channels=8, stem_stride=2,
                        first_layer=LayerSpec("ds", 3, 1, 1, 8, 0.25), head_channels=16,
                        resolution=16)
    block = SupernetBlock(space, 0, 3)
    variables = block.init(jax.random.key(0), jnp.zeros((4, 16, 16, 3)),
                           jnp.zeros(2, jnp.int32), False)
    # Non-trivial BN running statistics: 'batch' and 'recalibrate' must both ignore them.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])}
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(2, 4, 16, 16, 3)).astype(np.float32)
    targets = rng.normal(size=(2, 4, 4, 4, 12)).astype(np.float32)
    recal = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)
    return space, block, variables, inputs, targets, recal


def _config(**overrides):
    config = rate.get_default_config()
    config.fast_compile = True
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def full(setup):
    """Prefix-shared ratings of every candidate in both BN modes (4 devices, max 1 trace)."""
    _, block, variables, inputs, targets, recal = setup
    out = {}
    for mode in rate.BN_MODES:
        rater = rate.BlockRater(block, variables, _config(bn_mode=mode, max_traces=1))
        out[mode] = (rater.rate(inputs, targets, recal), rater)
    return out


@pytest.mark.parametrize("mode", rate.BN_MODES)
def test_prefix_shared_equals_naive_loop(setup, full, mode):
    _, block, variables, inputs, targets, recal = setup
    shared, rater = full[mode]
    assert shared.encodings.shape == (36, 2)
    np.testing.assert_array_equal(shared.encodings, block.space.block_candidates(0))
    naive = rate.rate_naive(block, variables, inputs, targets, shared.encodings, mode, recal,
                            conv_impl="xla")
    np.testing.assert_allclose(shared.batch_mse, naive.batch_mse, rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(shared.batch_mae, naive.batch_mae, rtol=TOLERANCE, atol=TOLERANCE)
    for name in rate.METRICS:
        np.testing.assert_allclose(shared.metrics[name], naive.metrics[name], rtol=TOLERANCE)
    # Sharing: 6 + 36 op applications of one row each, not 2 x 36.
    info = shared.info
    assert info["trie_nodes"] == 42 and info["naive_op_applications"] == 72
    assert info["macs_needed"] < info["naive_macs"]
    assert len(set(np.round(shared.score, 6))) > 30  # candidates really differ


def test_bn_modes_differ_and_recalibration_uses_its_batch(setup, full):
    _, block, variables, inputs, targets, recal = setup
    batch, recalibrated = full["batch"][0], full["recalibrate"][0]
    assert np.abs(batch.batch_mse - recalibrated.batch_mse).max() > 1e-3
    rater = full["recalibrate"][1]
    other = rater.rate(inputs, targets, recal[::-1] * 2.0)
    assert np.abs(other.batch_mse - recalibrated.batch_mse).max() > 1e-3


def test_compilations_are_bounded_and_reused(setup, full):
    """One trace per (walk kind, level, op, leaf) function; rating again traces nothing."""
    _, _, _, inputs, targets, recal = setup
    for mode, (first, rater) in full.items():
        counts = dict(rater.trace_counts)  # shared by raters of the same block and options
        assert max(counts.values()) == 1
        kinds = {"batch": {"train"}, "recalibrate": {"recal", "eval"}}[mode]
        mine = [key for key in counts if key[0] in kinds]
        assert len(mine) <= len(kinds) * (2 * 6 + 2)  # 2 levels x 6 ops, root, one pack
        again = rater.rate(inputs, targets, recal)  # max_traces=1: a retrace would raise
        np.testing.assert_array_equal(again.batch_mse, first.batch_mse)
        assert dict(rater.trace_counts) == counts


def test_small_memory_budget_chunks_with_identical_scores(setup, full, caplog):
    _, block, variables, inputs, targets, recal = setup
    reference = full["recalibrate"][0]
    config = _config(memory_budget_bytes=60_000, log_every_seconds=1e-6)
    rater = rate.BlockRater(block, variables, config)
    caplog.set_level("INFO")
    chunked = rater.rate(inputs, targets, recal)
    assert "candidates/s, ETA" in caplog.text  # progress
    info = chunked.info
    assert info["rating_batches_per_walk"] < 2 or max(info["app_rows"]) < 6, info
    assert info["jitted_calls"] > reference.info["jitted_calls"]
    np.testing.assert_allclose(chunked.batch_mse, reference.batch_mse, rtol=TOLERANCE,
                               atol=TOLERANCE)
    np.testing.assert_allclose(chunked.score, reference.score, rtol=TOLERANCE)


def test_one_device_equals_four(setup, full):
    _, block, variables, inputs, targets, recal = setup
    assert len(jax.devices()) == 4
    one = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    single = rate.BlockRater(block, variables, _config(bn_mode="batch"), mesh=one)
    result = single.rate(inputs, targets)
    assert result.info["devices"] == 1 and full["batch"][0].info["devices"] == 4
    np.testing.assert_allclose(result.batch_mse, full["batch"][0].batch_mse, rtol=TOLERANCE,
                               atol=TOLERANCE)


def test_subset_scores_equal_full_set_scores(setup, full):
    space, block, variables, inputs, targets, recal = setup
    subset = rate.select_candidates(space, 0, num_candidates=7, seed=3)
    assert len(np.unique(subset, axis=0)) == 7
    assert np.array_equal(subset, rate.select_candidates(space, 0, 7, seed=3))
    rater = rate.BlockRater(block, variables, _config())
    shuffled = subset[[3, 0, 6, 1, 5, 2, 4, 3]]  # order kept, duplicates allowed
    part = rater.rate(inputs, targets, recal, shuffled)
    reference = full["recalibrate"][0]
    rows = [int(np.nonzero((reference.encodings == e).all(1))[0][0]) for e in shuffled]
    np.testing.assert_array_equal(part.encodings, shuffled)
    np.testing.assert_allclose(part.batch_mse, reference.batch_mse[rows], rtol=TOLERANCE,
                               atol=TOLERANCE)


def test_trie_and_plan():
    encodings = np.asarray([[1, 0, 2], [0, 1, 1], [0, 1, 0], [1, 0, 2]])
    trie, inverse = rate.build_trie(encodings)
    assert [trie.level_size(l) for l in range(3)] == [2, 2, 3]
    np.testing.assert_array_equal(trie.encodings[inverse], encodings)
    np.testing.assert_array_equal(trie.parent[2], [0, 0, 1])
    np.testing.assert_array_equal(trie.child_start[1], [0, 1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        rate.build_trie(np.zeros((0, 3), int))


def test_bad_config_and_inputs_are_rejected(setup):
    _, block, variables, inputs, targets, recal = setup
    for field, value, match in [("bn_mode", "train", "rate.bn_mode"),
                                ("rank_metric", "acc", "rate.rank_metric"),
                                ("memory_budget_bytes", 0, "rate.memory_budget_bytes"),
                                ("num_candidates", -1, "rate.num_candidates"),
                                ("conv_impl", "fft", "rate.conv_impl")]:
        with pytest.raises(ValueError, match=match):
            rate.BlockRater(block, variables, _config(**{field: value}))
    with pytest.raises(AttributeError):
        rate.get_default_config().bn_mod = "batch"  # a misspelt key fails loudly
    rater = rate.BlockRater(block, variables, _config())
    with pytest.raises(ValueError, match="recal_inputs"):
        rater.rate(inputs, targets)
    with pytest.raises(ValueError, match=r"\[R, B, H, W, C\]"):
        rater.rate(inputs[0], targets, recal)
    with pytest.raises(ValueError, match="targets have shape"):
        rater.rate(inputs, targets[..., :5], recal)
    with pytest.raises(ValueError, match="illegal op"):
        rater.rate(inputs, targets, recal, np.asarray([[0, 9]]))


@pytest.mark.slow  # about 70 s on 2 shared cores: a teacher and two blocks compile
def test_rate_blocks_writes_loads_and_resumes(tmp_path, caplog):
    space = get_space("tiny")
    teacher_spec = get_network_spec("tiny_teacher")
    teacher = EfficientNet(teacher_spec, num_classes=0)
    images = np.random.default_rng(2).normal(size=(2, 4, 16, 16, 3)).astype(np.float32)
    teacher_variables = teacher.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
    blocks = build_supernet_blocks(space, teacher_spec)
    variables = {}
    for k, block in enumerate(blocks):
        x = jnp.zeros((1, 16, 16, 3)) if k == 0 else jnp.zeros((1, 8, 8, block.in_channels))
        variables[space.blocks[k].name] = block.init(
            jax.random.key(k), x, jnp.zeros(block.num_layers, jnp.int32), False)
    config = _config(top_k=3, bn_mode="batch")
    out = str(tmp_path / "rate")
    paths = rate.rate_blocks(space, blocks, variables, teacher, teacher_variables, images,
                             images[0], config, out)
    assert [os.path.basename(p) for p, _ in paths] == ["block0.npz", "block1.npz"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    for k, (npz, summary_path) in enumerate(paths):
        table = search.load_block_table(npz, required_costs=("params", "macs"))
        assert len(table.score) == space.block_size(k)
        np.testing.assert_array_equal(table.encodings, space.block_candidates(k))
        with open(summary_path) as f:
            summary = json.load(f)
        assert summary["candidates"] == space.block_size(k) and len(summary["top_k"]) <= 3
        assert summary["top_k"][0]["score"] == pytest.approx(float(np.min(table.score)))
        loaded = rate.load_rating(npz[:-4])
        np.testing.assert_allclose(loaded.score, table.score)
    # Block 1's scores equal a naive rating on the teacher's features.
    io = rate.teacher_block_io(teacher, teacher_variables, space, images, [1])[1]
    naive = rate.rate_naive(blocks[1], variables["block1"], io[0], io[1],
                            space.block_candidates(1), "batch")
    np.testing.assert_allclose(search.load_block_table(paths[1][0]).score, naive.score,
                               rtol=TOLERANCE)
    # Resume: same fingerprint -> skipped (files untouched); a new seed of data -> re-rated.
    stamps = [os.stat(p).st_mtime_ns for pair in paths for p in pair]
    caplog.set_level("INFO")
    rate.rate_blocks(space, blocks, variables, teacher, teacher_variables, images, images[0],
                     config, out)
    assert [os.stat(p).st_mtime_ns for pair in paths for p in pair] == stamps
    assert caplog.text.count("same fingerprint, skipped") == 2
    rate.rate_blocks(space, blocks, variables, teacher, teacher_variables, images * 0.5,
                     images[0], config, out, block_indices=[1])
    assert os.stat(paths[1][0]).st_mtime_ns != stamps[2]
