"""DNA++ (dna_jax.ssl): ensemble targets, EMA, collapse guards, masked updates, a short run that
learns, the teacher-free rating against a naive computation, and the two-view augmentations.

The step tests share one trainer (`make_trainer` memoises it, with its compiled steps) on a
2-block, 3-op space at 16 px with real Fashion-MNIST views, compiled with XLA's cheap options.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dna_jax import config_files, data as data_lib
from dna_jax import pipeline, rate, search, sharding, ssl, ssl_rating, ssl_train, supervision
from dna_jax.data import views
from dna_jax.netspec import LayerSpec
from dna_jax.space import BlockSpec, OpSpec, SearchSpace, get_space
from dna_jax.supernet import loop, paths as paths_lib, update
from hlo_checks import collectives, nested_collectives  # tests/ is on sys.path

SIZE, BATCH, PATHS, RUN_STEPS = 16, 16, 2, 40
SPACE = SearchSpace(
    name="ssl_test",
    blocks=(BlockSpec("block0", 1, 12, 12, 2, 1), BlockSpec("block1", 2, 16, 16, 2, 2)),
    ops=(OpSpec("mb2_k3", 3, 2), OpSpec("mb2_k5", 5, 2), OpSpec("mb1_k3", 3, 1)),
    stem_channels=8, stem_stride=1, first_layer=LayerSpec("ds", 3, 1, 1, 8, 0.25),
    head_channels=32, resolution=SIZE)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config() -> ml_collections.ConfigDict:
    cfg = data_lib.get_default_config()
    cfg.update(source="fashion_mnist", image_size=SIZE, channels=3, batch_size=BATCH,
               prefetch=0)
    return cfg


def ssl_config(**overrides) -> ml_collections.ConfigDict:
    config = ssl.get_default_config()
    config.update(space="tiny", schedule="all_blocks", num_steps=RUN_STEPS, num_paths=PATHS,
                  optimizer="adamw", learning_rates=(3e-3,), weight_decay=1e-4,
                  warmup_epochs=0.0, projector_hidden=32, projector_dim=16,
                  predictor_hidden=32, log_every_steps=5, checkpoint_every_steps=0,
                  fast_compile=True)
    config.optimizer_kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8))
    config.augment.blur_sigma = (0.1, 1.0)
    config.update(**overrides)
    return config


@pytest.fixture(scope="module")
def tiny():
    mesh = sharding.make_mesh()
    config = ssl_config()
    train = views.make_view_dataset(data_config(), "train[:1024]", config.augment, 2 * PATHS,
                                    mesh=mesh)
    trainer = ssl.make_trainer(config, train.info.num_batches, SPACE)
    return dict(mesh=mesh, config=config, train=train, trainer=trainer)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- pure pieces -------------------------------------------------------------------------------


def test_ensemble_target_is_the_mean_of_normalised_projections():
    projections = np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float32)
    projections[1] *= 50.0  # scale must not matter: each path's row is normalised first
    expected = np.mean(projections / np.linalg.norm(projections, axis=-1, keepdims=True), 0)
    centre = np.asarray(ssl.ensemble_target(jnp.asarray(projections)))
    np.testing.assert_allclose(centre, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.linalg.norm(centre, axis=-1) < 1.0)  # disagreeing paths: inside the ball
    # One path: the loss is BYOL's normalised MSE against that path's projection.
    q = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    one = np.asarray(ssl.cosine_loss(jnp.asarray(q), ssl.ensemble_target(projections[:1])))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(one, np.sum((unit(q) - unit(projections[0])) ** 2, -1),
                               rtol=1e-5, atol=1e-5)


def test_momentum_schedule_and_ema_update():
    total = 100
    values = [float(update.momentum_schedule(0.99, s, total)) for s in (0, 50, 100, 150)]
    np.testing.assert_allclose(values, [0.99, 0.995, 1.0, 1.0], rtol=0, atol=1e-6)
    assert float(update.momentum_schedule(0.99, 25, total)) == pytest.approx(
        1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-6)
    target = {"w": jnp.asarray([1.0, 2.0])}
    online = {"w": jnp.asarray([3.0, 6.0])}
    np.testing.assert_allclose(update.ema(target, online, 0.9)["w"], [1.2, 2.4], rtol=1e-6)
    # Masked EMA: only the ops on some path move toward the online weights.
    block_target = {"stem": {"k": jnp.ones(2)},
                    "layers_0": {"ops_0": {"k": jnp.ones(2)}, "ops_1": {"k": jnp.ones(2)},
                                 "ops_2": {"k": jnp.ones(2)}}}
    block_online = jax.tree.map(lambda x: x + 1.0, block_target)
    table = [np.asarray([0, 1, 2])]
    paths = jnp.asarray([[0], [2]])  # two paths: ops 0 and 2 of layer 0
    new = update.masked_ema(table, block_target, block_online, paths, jnp.float32(0.5))
    np.testing.assert_array_equal(new["layers_0"]["ops_1"]["k"], [1.0, 1.0])
    for moved in (new["stem"], new["layers_0"]["ops_0"], new["layers_0"]["ops_2"]):
        np.testing.assert_allclose(moved["k"], [1.5, 1.5])


def test_collapse_guards_zero_when_whitened_positive_when_collapsed():
    dim = 8
    basis = np.concatenate([np.eye(dim), -np.eye(dim)]) * 3.0  # signed basis: cov = I on
    whitened = np.tile(basis, (4, 1)).astype(np.float32)     # the sphere, mean 0
    variance, covariance, std = ssl.collapse_guards(jnp.asarray(whitened))
    assert float(variance) == 0.0 and float(covariance) < 1e-10
    assert float(std) == pytest.approx(math.sqrt(len(whitened) / (len(whitened) - 1)), 1e-4)
    constant = np.tile(np.random.default_rng(0).normal(size=(1, dim)), (64, 1))
    variance, covariance, std = ssl.collapse_guards(jnp.asarray(constant, jnp.float32))
    assert float(variance) > 0.95 and float(std) < 1e-3  # complete collapse
    rng = np.random.default_rng(1)  # dimensional collapse: a 2-D subspace of 8 dimensions
    low_rank = rng.normal(size=(256, 2)) @ rng.normal(size=(2, dim))
    variance, covariance, std = ssl.collapse_guards(jnp.asarray(low_rank, jnp.float32))
    assert float(covariance) > 0.5 and float(variance) > 0.0
    random = rng.normal(size=(4096, dim)).astype(np.float32)  # nearly whitened: nearly 0
    variance, covariance, _ = ssl.collapse_guards(jnp.asarray(random))
    assert float(variance) < 0.02 and float(covariance) < 0.02


@pytest.mark.parametrize("name", ["lars", "adamw", "adam"])
def test_optimizers_keep_weight_decay_off_batchnorm_and_biases(name):
    params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3), "scale": jnp.ones(3)}
    kwargs = {"lars": dict(momentum=0.9), "adamw": {}, "adam": {}}[name]
    optimizer = ssl.make_ssl_optimizer(name, 0.1, kwargs, exclude_bn_and_bias=True)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert float(jnp.abs(updates["kernel"]).max()) > 0  # decayed
    assert float(jnp.abs(updates["bias"]).max()) == 0 and float(jnp.abs(updates["scale"]).max()) == 0
    everything = ssl.make_ssl_optimizer(name, 0.1, kwargs, exclude_bn_and_bias=False)
    updates, _ = everything.update(grads, everything.init(params), params)
    assert float(jnp.abs(updates["bias"]).max()) > 0


# ---- two-view augmentations --------------------------------------------------------------------


def test_two_view_batches_shapes_ranges_and_determinism():
    cfg, augment = data_config(), views.get_default_config()
    make = lambda seed: views.make_view_dataset(cfg, "train[:64]", augment, 4, seed=seed)  # noqa: E731
    first = [b["views"] for _, b in zip(range(2), make(0).host_batches(0))]
    assert first[0].shape == (BATCH, 4, SIZE, SIZE, 3) and first[0].dtype == np.float32
    low, high = (0 - 72.94) / 90.02, (255 - 72.94) / 90.02
    assert first[0].min() >= low - 1e-4 and first[0].max() <= high + 1e-4
    assert np.isfinite(first[0]).all()
    np.testing.assert_array_equal(first[0][..., 0], first[0][..., 2])  # grayscale tiled
    again = [b["views"] for _, b in zip(range(2), make(0).host_batches(0))]
    np.testing.assert_array_equal(first[0], again[0])  # same seed: same views
    np.testing.assert_array_equal(next(iter(make(0).host_batches(1)))["views"], first[1])
    other = next(iter(make(1).host_batches(0)))["views"]
    assert np.abs(other - first[0]).max() > 0.5  # another seed: other views
    assert np.abs(first[0][:, 0] - first[0][:, 1]).mean() > 0.05  # the views differ
    fixed = views.fixed_views(cfg, "test[:40]", augment, 2, 8, seed=3)
    assert fixed.shape == (2, 2, 8, SIZE, SIZE, 3)
    np.testing.assert_array_equal(fixed, views.fixed_views(cfg, "test[:40]", augment, 2, 8, 3))


def test_colour_augmentations_on_rgb_stay_in_range():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 12, 12, 3)).astype(np.uint8)
    cfg = views.get_default_config()
    cfg.update(jitter_prob=1.0, grayscale_prob=0.0, solarize_prob=(1.0, 1.0))
    out = views.augment_views(images, np.random.default_rng(1), 2, 10, cfg)
    assert out.shape == (6, 2, 10, 10, 3) and out.min() >= 0 and out.max() <= 255
    assert np.abs(out[..., 0] - out[..., 1]).max() > 1  # colour kept (no grayscale)
    cfg.update(jitter_prob=0.0, grayscale_prob=1.0, blur_prob=(0.0, 0.0),
               solarize_prob=(0.0, 0.0))
    gray = views.augment_views(images, np.random.default_rng(1), 1, 10, cfg)
    np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-4)


def test_two_view_batches_from_tfds_mock_cifar10():
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    cfg = data_lib.get_default_config()
    cfg.update(source="tfds", name="cifar10", image_size=16, download=True, batch_size=8,
               shuffle_buffer=64, prefetch=1, num_parallel_calls=1)
    augment = views.get_default_config()
    augment.update(jitter_prob=1.0, blur_prob=(1.0, 1.0), solarize_prob=(0.0, 1.0))
    with tfds.testing.mock_data(num_examples=24):
        make = lambda: views.make_view_dataset(cfg, "train", augment, 4, seed=0)  # noqa: E731
        batch = next(make().host_batches(0))["views"]
        again = next(make().host_batches(0))["views"]
    assert batch.shape == (8, 4, 16, 16, 3) and batch.dtype == np.float32
    mean = np.asarray(views.tfds_source.IMAGENET_MEAN, np.float32)
    pixels = batch * np.asarray(views.tfds_source.IMAGENET_STD, np.float32) + mean
    assert pixels.min() >= -1e-2 and pixels.max() <= 255 + 1e-2
    np.testing.assert_allclose(batch, again, atol=1e-5)  # stateless: same seed, same views
    assert np.abs(batch[:, 0] - batch[:, 1]).mean() > 0.05


def test_pipeline_checks_dna_pp_configs(tmp_path):
    config = config_files.load_config(
        os.path.join(REPO, "configs", "fashion_mnist_dna_pp.py"), "tiny")
    assert pipeline.parse_stages(config.stages) == list(supervision.get("ssl").stages)
    digests = pipeline.stage_digests(config)
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.ssl.num_paths = 3  # the ssl config reaches every later stage's hash
    assert all(pipeline.stage_digests(changed)[s] != digests[s] for s in supervision.get("ssl").stages)
    for field, value, match in [("stages", "teacher,ssl,rate", "supervision"),
                                ("supervision", "self", "config.supervision"),
                                ("ssl.schedule", "parallel", "ssl.schedule")]:
        bad = ml_collections.ConfigDict(config.to_dict())
        section, _, key = field.rpartition(".")
        (bad[section] if section else bad)[key] = value
        with pytest.raises(ValueError, match=match):
            pipeline.run_pipeline(bad, str(tmp_path))
    assert os.listdir(tmp_path) == []


# ---- the step: masked updates, a short run -----------------------------------------------------


def test_masked_steps_leave_unsampled_ops_bitwise_unchanged(tiny):
    """Online and target weights, optimizer state and the BatchNorm statistics of both sides
    stay bitwise for the ops no path sampled. On the 4-device CPU mesh every op runs and the
    path loop is unrolled (`SelfSupervised.for_mesh`), and no collective of the step is nested
    in control flow (see `sharding.flat_collectives`)."""
    trainer, mesh = tiny["trainer"], tiny["mesh"]
    assert sharding.flat_collectives(mesh)
    state = loop.init_state(trainer, 0, (SIZE, SIZE, 3), mesh)
    phase = trainer.phases()[0]
    step = ssl_train.compile_train_step(trainer, mesh, phase, state,
                                        (BATCH, 2 * PATHS, SIZE, SIZE, 3))
    text = step.as_text()
    assert collectives(text) and not nested_collectives(text), nested_collectives(text)
    stats = lambda s: (s.batch_stats, s.target_batch_stats)  # noqa: E731
    before = jax.device_get((state.params, state.opt_state, state.target_params, stats(state)))
    sampled = {name: set() for name in trainer.names}
    batches = tiny["train"].global_batches(0)
    for _ in range(2):
        state, metrics = step(state, next(batches)["views"], ())
        for name, paths in jax.device_get(metrics["branches"]).items():
            assert paths.shape == (PATHS, SPACE.blocks[int(name[-1])].num_layers)
            sampled[name] |= {(l, int(b)) for path in paths for l, b in enumerate(path)}
    batches.close()
    after = jax.device_get((state.params, state.opt_state, state.target_params, stats(state)))
    unchanged = changed = 0
    for name in trainer.names:
        for group in paths_lib.op_groups(before[0][name]["block"]):
            where = paths_lib.group_branch(group)
            trees = [(paths_lib.op_groups(p[name]["block"])[group], o[name][group],
                      paths_lib.op_groups(t[name]["block"])[group],
                      paths_lib.op_groups(b[0][name]).get(group, {}),
                      paths_lib.op_groups(b[1][name]).get(group, {}))
                     for p, o, t, b in (before, after)]
            same = [_leaves_equal(a, b) for a, b in zip(*trees)]
            has_stats = bool(jax.tree.leaves(trees[0][3]))
            if where is not None and where not in sampled[name]:
                assert same == [True] * 5, f"{name} {group} moved without being sampled"
                unchanged += 1
            else:
                assert same == [False] * 3 + [not has_stats] * 2, \
                    f"{name} {group} was sampled but did not move"
                changed += 1
        for head in ssl.HEAD_GROUPS:  # heads are always trained
            assert not _leaves_equal(before[0][name][head], after[0][name][head])
    assert unchanged >= 1 and changed >= 4, (unchanged, changed)
    assert sum(len(s) for s in sampled.values()) > PATHS * 3 - 2  # several distinct ops


@pytest.mark.slow  # ~2 min on 2 shared cores: 40 steps of two blocks, 2 paths x 2 views each
def test_tiny_ssl_run_lowers_loss_without_collapse(tiny, tmp_path):
    state, chosen, figures = ssl_train.train_ssl_supernet(tiny["config"], tiny["train"],
                                                          str(tmp_path), tiny["mesh"], SPACE)
    assert chosen == [] and figures["steps"] == RUN_STEPS
    for name, block in figures["blocks"].items():
        curve = [loss for _, loss in block["loss_curve"]]
        assert len(curve) == RUN_STEPS // 5
        assert np.mean(curve[-2:]) < 0.9 * np.mean(curve[:2]), (name, curve)
        assert block["output_std_final"] > 0.2, (name, block)  # not collapsed
    with open(tmp_path / loop.FIGURES_FILE) as f:
        assert json.load(f)["loss_final"] == figures["loss_final"]
    assert int(state.step) == RUN_STEPS


# ---- teacher-free rating -----------------------------------------------------------------------


def _naive_ssl_scores(trainer, state, views_, recal, prefix, k):
    """Whole-path forwards per candidate: centre of the target projections, online loss."""
    block = trainer.blocks[k]
    recal_block = block.clone(config=dataclasses.replace(block.config, bn_momentum=0.0))
    target = state.target_variables()
    heads = state.ssl_variables()

    def feed(x):
        for j, ops in enumerate(prefix):
            x = trainer.blocks[j].apply(target[f"block{j}"], x, jnp.asarray(ops), True,
                                        mutable=["batch_stats"])[0]
        return x

    @jax.jit
    def outputs(variables, choices, x, recal_x):
        _, updates = recal_block.apply(variables, recal_x, choices, True, mutable=["batch_stats"])
        stats = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
        return jax.vmap(lambda b: block.apply(stats, b, choices, False))(x)

    x = jnp.stack([feed(jnp.concatenate([views_[0, r], views_[1, r]])) for r in
                   range(views_.shape[1])])
    recal_x = feed(jnp.concatenate([recal[0], recal[1]]))
    name = f"block{k}"
    candidates = SPACE.block_candidates(k)
    pooled = lambda y: jnp.mean(y, axis=(-3, -2))  # noqa: E731
    centre = np.mean([np.asarray(ssl.normalize(trainer.projector.apply(
        {"params": heads["target_heads"][name]["projector"]},
        pooled(outputs(target[name], jnp.asarray(c), x, recal_x))))) for c in candidates], 0)
    online = state.supernet_variables()[name]
    half = centre.shape[1] // 2
    swapped = np.concatenate([centre[:, half:], centre[:, :half]], axis=1)
    losses = []
    for c in candidates:
        z = trainer.projector.apply({"params": heads["online_heads"][name]["projector"]},
                                    pooled(outputs(online, jnp.asarray(c), x, recal_x)))
        q = trainer.predictor.apply({"params": heads["online_heads"][name]["predictor"]}, z)
        losses.append(2.0 * np.mean(np.asarray(ssl.cosine_loss(q, swapped)), axis=-1))
    return candidates, np.asarray(losses)  # [N, R]


def test_ssl_rating_equals_naive_per_candidate_computation(tiny):
    trainer, mesh = tiny["trainer"], tiny["mesh"]
    state = loop.init_state(trainer, 0, (SIZE, SIZE, 3), mesh)
    phase = trainer.phases()[0]
    step = ssl_train.compile_train_step(trainer, mesh, phase, state,
                                        (BATCH, 2 * PATHS, SIZE, SIZE, 3))
    batches = tiny["train"].global_batches(0)
    for _ in range(2):  # the target and online sides differ, BN statistics are non-trivial
        state, _ = step(state, next(batches)["views"], ())
    batches.close()
    rng = np.random.default_rng(0)
    rating_views = rng.normal(size=(2, 2, 4, SIZE, SIZE, 3)).astype(np.float32)
    recal = rng.normal(size=(2, 6, SIZE, SIZE, 3)).astype(np.float32)
    config = rate.get_default_config()
    config.fast_compile = True
    rating = ssl_rating.rate_ssl_block(trainer, 1, state.supernet_variables(),
                                       state.ssl_variables(), rating_views, recal, config, [[1]],
                                       mesh=mesh)
    encodings, naive = _naive_ssl_scores(trainer, state, rating_views, recal, [[1]], 1)
    np.testing.assert_array_equal(rating.encodings, encodings)
    np.testing.assert_allclose(rating.batch_mse, naive, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rating.score, naive.mean(1), rtol=1e-4, atol=1e-4)
    assert rating.rank_metric == ssl_rating.SCORE_METRIC and len(set(np.round(rating.score, 5))) > 5
    assert np.all(rating.metrics["output_std"] > 0)
    # Sharing: 3 + 9 op applications per walk for 9 candidates of 2 layers.
    assert rating.info["trie_nodes"] == 12 and rating.info["naive_op_applications"] == 18


@pytest.mark.slow  # ~4 min on 2 shared cores: every stage of the DNA++ pipeline compiles
def test_dna_pp_pipeline_end_to_end(tmp_path):
    config = config_files.load_config(
        os.path.join(REPO, "configs", "fashion_mnist_dna_pp.py"), "tiny")
    figures = pipeline.run_pipeline(config, str(tmp_path))
    assert figures["stages"] == {s: "ran" for s in supervision.get("ssl").stages}
    assert not os.path.exists(tmp_path / "teacher") and not os.path.exists(tmp_path / "distill")
    assert 0.0 <= figures["winner_accuracy"] <= 1.0 and figures["winner_macs"] > 0
    assert figures["supervision"] == "ssl" and len(figures["ssl_loss_final"]) == 2
    tables = search.load_space_tables(str(tmp_path / "rate"), get_space(config.ssl.space),
                                      resolution=16)
    assert [len(t.score) for t in tables] == [2, 4]
    again = pipeline.run_pipeline(config, str(tmp_path))
    assert again["stages"] == {s: "skipped" for s in supervision.get("ssl").stages}
