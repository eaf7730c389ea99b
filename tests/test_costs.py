"""Analytic cost model: reference values, XLA's own operation count, per-candidate tables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dna_jax import costs
from dna_jax.models import zoo
from dna_jax.space import get_space

# REFERENCE.md, "Counting conventions": timm's builder, 224 px, 1000 classes.
REFERENCE = {
    "efficientnet_b0": (5_288_548, 385_814_752, 399_362_204),
    "dna_a": (4_243_318, 335_141_728, 348_161_054),
    "dna_b": (4_918_180, 392_492_032, 405_784_844),
    "dna_c": (5_273_896, 450_138_976, 465_920_048),
    "dna_d": (6_409_486, 592_837_792, 611_198_918),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_zoo_reproduces_reference_values_exactly(name):
    total = costs.network_costs(zoo.get_network_spec(name), 224, 1000).total
    assert (total.params, total.macs, total.dna_flops) == REFERENCE[name]


def test_published_multiply_adds_within_one_million():
    # Paper: DNA-a 348M, DNA-c 466M, DNA-d 611M in dna_flops (DNA-b's 394M does not match).
    for name, published in [("dna_a", 348e6), ("dna_c", 466e6), ("dna_d", 611e6)]:
        flops = costs.network_costs(zoo.get_network_spec(name)).total.dna_flops
        assert abs(flops - published) < 1e6


def _conv_and_dense_flops_by_xla(model, x) -> float:
    """Sums XLA's flop count of every conv and dense layer the network really executes."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
            calls.append((context.module, args[0].shape))
        return next_fun(*args, **kwargs)

    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)
    total, cache = 0.0, {}
    for module, shape in calls:
        key = (repr(module), shape)
        if key not in cache:
            unbound = module.clone(parent=None)
            layer_vars = jax.eval_shape(unbound.init, jax.random.key(0), jnp.zeros(shape))
            layer_vars = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layer_vars)
            analysis = jax.jit(unbound.apply).lower(layer_vars, jnp.zeros(shape)).compile()
            analysis = analysis.cost_analysis()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            cache[key] = analysis["flops"]
        total += cache[key]
    return total


@pytest.mark.parametrize("name, resolution", [("efficientnet_b0", 224), ("dna_a", 160),
                                              ("fmnist_teacher", 32)])
def test_multiply_adds_agree_with_xla_cost_analysis(name, resolution):
    model = zoo.get_model(name, num_classes=1000)
    x = jnp.zeros((1, resolution, resolution, 3))
    xla_macs = _conv_and_dense_flops_by_xla(model, x) / 2  # XLA counts a multiply-add as 2
    ours = costs.network_costs(model.spec, resolution, 1000).total.macs
    assert abs(xla_macs - ours) / ours < 0.03


def test_whole_network_xla_flops_bracket_the_multiply_adds():
    # The whole graph also holds BN, activations and SE scaling: a little above 2 x macs.
    model = zoo.get_model("efficientnet_b0", num_classes=1000)
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(model.init, jax.random.key(0), x))
    analysis = jax.jit(model.apply).lower(variables, x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    ratio = analysis["flops"] / (2 * costs.network_costs(model.spec).total.macs)
    assert 1.0 <= ratio < 1.15


@pytest.mark.parametrize("space_name, resolution", [("dna_paper", 224), ("dna_released", 192),
                                                    ("small", 28)])
def test_candidate_tables_plus_fixed_parts_equal_whole_network_costs(space_name, resolution):
    space = get_space(space_name)
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(5)]
    fixed = costs.fixed_costs(space, resolution, num_classes=10).as_array()
    for arch in archs:
        per_block = [costs.candidate_costs(space, b, np.asarray([ops]), resolution)
                     for b, ops in enumerate(arch.blocks)]
        summed = fixed + sum(np.array([t[n][0] for n in costs.COST_NAMES]) for t in per_block)
        whole = costs.network_costs(space.to_network_spec(arch), resolution, 10).total.as_array()
        np.testing.assert_array_equal(summed, whole)


def test_candidate_costs_are_vectorised_over_all_candidates():
    space = get_space("dna_released")
    encodings = space.block_candidates(1)
    table = costs.candidate_costs(space, 1, encodings)
    assert all(table[n].shape == (1296,) for n in costs.COST_NAMES)
    # MB6 7x7 everywhere is the most expensive candidate, MB3 3x3 everywhere the cheapest.
    assert tuple(encodings[np.argmax(table["macs"])]) == (2, 2, 2, 2)
    assert tuple(encodings[np.argmin(table["macs"])]) == (3, 3, 3, 3)
    skip_table = costs.block_op_cost_table(get_space("dna_paper"), 1)
    assert np.all(skip_table[:, -1] == 0)


def test_costs_scale_with_resolution_and_classes():
    spec = zoo.get_network_spec("efficientnet_b0")
    small = costs.network_costs(spec, 112, 1000).total
    large = costs.network_costs(spec, 224, 1000).total
    assert small.params == large.params
    assert 3.5 < large.macs / small.macs < 4.1
    ten = costs.network_costs(spec, 224, 10).total
    assert large.params - ten.params == 1280 * 990 + 990
