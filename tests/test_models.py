"""Layers, EfficientNet/zoo networks and child networks: shapes, parameters, partial forwards."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import costs
from dna_jax.models import zoo
from dna_jax.models.childnet import build_childnet
from dna_jax.models.initialize import init_variables
from dna_jax.models.efficientnet import EfficientNet, round_filters, scale_stage_depth
from dna_jax.models.layers import TORCH_CONFIG, ConvBN, DropPath, LayerConfig, MBConv
from dna_jax.netspec import LayerSpec
from dna_jax.space import DNA_OPS, Arch, get_space


@pytest.fixture(scope="module")
def teacher_variables():
    """fmnist_teacher variables (10 classes), shared: they do not depend on the resolution."""
    model = zoo.get_model("fmnist_teacher", num_classes=10)
    return init_variables(model, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def param_count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", zoo.names())
def test_analytic_param_count_equals_flax_parameters(name):
    model = zoo.get_model(name, num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    assert param_count(shapes["params"]) == costs.network_costs(model.spec).total.params


@pytest.mark.parametrize("resolution", [32, 64, 97, 224])
def test_stage_shapes_follow_the_spec(resolution):
    model = zoo.get_model("efficientnet_b0", num_classes=7)
    x = jnp.zeros((2, resolution, resolution, 3))
    (logits, features), _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), x))
    assert logits.shape == (2, 7)
    size = resolution
    size = -(-size // 2)  # stem
    for s, stage in enumerate(model.spec.stages):
        size = -(-size // stage[0].stride)
        assert features[f"stage{s}"].shape == (2, size, size, stage[-1].out_channels)
    assert features["pre_logits"].shape == (2, 1280)


@pytest.mark.parametrize("op", DNA_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("stride, resolution", [(1, 8), (2, 8), (2, 7)])
def test_every_op_shape(op, stride, resolution):
    layer = op.layer(stride, 24)
    module = MBConv(layer, in_channels=16)
    x = jnp.ones((2, resolution, resolution, 16))
    y, variables = module.init_with_output(jax.random.key(0), x, train=False)
    out = -(-resolution // stride)
    assert y.shape == (2, out, out, 24)
    layer_costs, out_size = costs.layer_costs(layer, 16, resolution)
    assert out_size == out
    assert param_count(variables["params"]) == layer_costs.params


def test_residual_only_where_shapes_match():
    assert LayerSpec("ir", 3, 1, 6, 16).has_residual(16)
    assert not LayerSpec("ir", 3, 2, 6, 16).has_residual(16)
    assert not LayerSpec("ir", 3, 1, 6, 24).has_residual(16)
    assert not LayerSpec("ir", 3, 1, 6, 16, skip=False).has_residual(16)


def test_padding_modes_differ_only_where_they_should(teacher_variables):
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
    same = zoo.get_model("fmnist_teacher", 10, LayerConfig(padding="same"))
    sym = zoo.get_model("fmnist_teacher", 10, LayerConfig(padding="symmetric"))
    variables = teacher_variables
    a, fa = jax.jit(same.apply)(variables, x)
    b, fb = jax.jit(sym.apply)(variables, x)
    assert a.shape == b.shape
    # The stride-2 stem on an even input: TF 'same' pads (0, 1), symmetric (1, 1).
    assert not np.allclose(fa["stem"], fb["stem"], atol=1e-3)
    # A stride-1 conv pads identically in both modes.
    conv_same = ConvBN(8, 3, 1, config=LayerConfig(padding="same"))
    conv_sym = ConvBN(8, 3, 1, config=LayerConfig(padding="symmetric"))
    conv_vars = conv_same.init(jax.random.key(2), x, False)
    np.testing.assert_allclose(conv_same.apply(conv_vars, x, False),
                               conv_sym.apply(conv_vars, x, False), atol=1e-6)


def test_forward_stages_composes_to_the_full_forward(teacher_variables):
    model = zoo.get_model("fmnist_teacher", num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = teacher_variables
    _, full = jax.jit(model.apply)(variables, x)
    first = model.apply(variables, x, 0, 2, method=model.forward_stages)
    rest = model.apply(variables, first["stage1"], 2, None, method=model.forward_stages)
    assert set(first) == {"stem", "stage0", "stage1"}
    assert set(rest) == {"stage2", "stage3", "stage4"}
    for name in ("stage1", "stage4"):
        got = first.get(name, rest.get(name))
        np.testing.assert_allclose(got, full[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start < stop"):
        model.apply(variables, x, 3, 3, method=model.forward_stages)


def test_train_mode_updates_batch_stats_and_drop_path_needs_rng(teacher_variables):
    model = zoo.get_model("fmnist_teacher", num_classes=10, drop_rate=0.2, drop_path_rate=0.2)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = teacher_variables
    train_apply = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                        rngs={"dropout": rng}))
    (logits, _), state = train_apply(variables, x, jax.random.key(2))
    assert logits.shape == (4, 10)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                           state["batch_stats"])
    assert all(jax.tree.leaves(changed))


def test_drop_path_keeps_expectation_and_drops_whole_samples():
    x = jnp.ones((4000, 2, 2, 3))
    y = DropPath(0.25).apply({}, x, True, rngs={"dropout": jax.random.key(0)})
    per_sample = y.reshape(4000, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
    assert abs(float(y.mean()) - 1.0) < 0.05
    assert np.array_equal(DropPath(0.25).apply({}, x, False), x)


def test_efficientnet_scaling_rules():
    assert round_filters(32, 2.0) == 64 and round_filters(40, 1.1) == 48
    assert round_filters(1280, 1.4) == 1792
    assert scale_stage_depth([1], 3.1) == [4] and scale_stage_depth([3], 1.4) == [5]
    assert zoo.get_network_spec("efficientnet_b7").stage_channels == (32, 48, 80, 160, 224, 384, 640)
    assert zoo.get_network_spec("efficientnet_b7").stage_depths == (4, 7, 7, 10, 10, 13, 4)
    assert zoo.get_network_spec("efficientnet_b3").stage_depths == (2, 3, 3, 5, 5, 6, 2)


def test_childnet_from_arch_runs_and_matches_costs():
    space = get_space("small")
    arch = space.sample(np.random.default_rng(3))
    model = build_childnet(space, arch, num_classes=10)
    x = jnp.zeros((2, 28, 28, 3))
    variables = init_variables(model, jax.random.key(0), x)
    logits, features = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 10)
    assert features["stage4"].shape == (2, 2, 2, 64)  # stride-2 stem: 14, 14, 7, 4, 2, 2
    assert param_count(variables["params"]) == costs.network_costs(model.spec, 28, 10).total.params
    with pytest.raises(ValueError, match=r"block 0 \(block0\), layer 1"):
        build_childnet(space, Arch.of([[0, 6], [0, 0], [0, 0], [0]]), 10)


def test_torch_config_and_bf16_compute(teacher_variables):
    model = zoo.get_model("efficientnet_b0")
    assert model.layer_config == TORCH_CONFIG
    assert zoo.get_model("tf_efficientnet_b0").layer_config.bn_eps == 1e-3
    bf16 = EfficientNet(spec=zoo.get_network_spec("fmnist_teacher"), num_classes=10,
                        layer_config=LayerConfig(dtype=jnp.bfloat16))
    x = jnp.ones((1, 16, 16, 3))
    variables = teacher_variables
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))
    logits, features = jax.jit(bf16.apply)(variables, x)
    assert logits.dtype == jnp.float32 and features["stage2"].dtype == jnp.bfloat16


def test_unknown_layer_options_are_rejected():
    with pytest.raises(ValueError, match="padding"):
        LayerConfig(padding="valid")
    with pytest.raises(ValueError, match="act"):
        LayerConfig(act="mish")
