"""Search space: sizes, enumeration, sampling, validation, JSON and block-string round trips."""

import math

import numpy as np
import pytest

from dna_jax import costs
from dna_jax.models import zoo
from dna_jax.netspec import LayerSpec, NetworkSpec, parse_block_string, stage_to_strings
from dna_jax.space import Arch, BlockSpec, SearchSpace, get_space, PRESETS


def test_paper_space_size_matches_the_published_decomposition():
    # 6 blocks whose first layer has 6 ops, 15 further layers with 6 ops + identity.
    assert get_space("dna_paper").size() == 6**6 * 7**15
    assert f"{get_space('dna_paper').size():.2g}" == "2.2e+17"


def test_released_space_size_and_block1_candidates():
    space = get_space("dna_released")
    assert space.size() == 6**19
    candidates = space.block_candidates(1)
    assert candidates.shape == (1296, 4)
    assert len({tuple(c) for c in candidates}) == 1296
    assert candidates.min() == 0 and candidates.max() == 5


def test_enumeration_respects_skip_legality():
    space = get_space("dna_paper")
    for b in range(len(space.blocks)):
        candidates = space.block_candidates(b)
        assert len(candidates) == space.block_size(b)
        # The first layer of a block changes stride/channels: never the identity op.
        assert not np.any(candidates[:, 0] == space.skip_index)
        if space.blocks[b].num_layers > 1:
            assert np.any(candidates[:, 1:] == space.skip_index)


def test_sampling_is_uniform_and_legal():
    space = get_space("dna_paper")
    rng = np.random.default_rng(0)
    samples = space.sample_block(4, 7000, rng)
    for l in range(samples.shape[1]):
        counts = np.bincount(samples[:, l], minlength=7)
        legal = space.layer_choices(4, l)
        assert set(np.nonzero(counts)[0]) == set(legal)
        expected = len(samples) / len(legal)
        assert np.all(np.abs(counts[list(legal)] - expected) < 5 * math.sqrt(expected))
    for _ in range(20):
        space.validate(space.sample(rng))


def test_efficientnet_b0_as_a_supernet_path():
    # The original code's unit test: B0 has layer counts [2,2,3,3,4,1] and op indices
    # 0,0 | 1,1 | 0,0,0 | 1,1,1 | 1,1,1,1 | 0 (MB6 3x3 = 0, MB6 5x5 = 1).
    space = get_space("dna_paper")
    arch = space.arch_from_strings(zoo.get_network_spec("efficientnet_b0").to_strings())
    skip = space.skip_index
    assert arch.blocks == ((0, 0, skip), (1, 1, skip, skip), (0, 0, 0, skip),
                           (1, 1, 1, skip), (1, 1, 1, 1, skip), (0,))
    depths = [sum(op != skip for op in block) for block in arch.blocks]
    assert depths == [2, 2, 3, 3, 4, 1]
    assert space.to_network_spec(arch).stages == zoo.get_network_spec("efficientnet_b0").stages


def test_dna_c_is_a_path_of_the_released_space():
    space = get_space("dna_released")
    arch = space.arch_from_strings(zoo.get_network_spec("dna_c").to_strings())
    assert arch.blocks[0] == (1, 0)
    child = space.to_network_spec(arch)
    assert costs.network_costs(child).total == costs.network_costs(zoo.get_network_spec("dna_c")).total


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_and_block_string_round_trips(name):
    space = get_space(name)
    rng = np.random.default_rng(1)
    for _ in range(10):
        arch = space.sample(rng)
        assert Arch.from_json(arch.to_json(space)) == arch
        strings = space.to_network_spec(arch).to_strings()
        again = space.arch_from_strings(strings)
        # Skip ops are pushed to the end of a block by the string form; the network is the same.
        assert space.to_network_spec(again) == space.to_network_spec(arch)
        if space.skip_index not in sum(arch.blocks, ()):
            assert again == arch


def test_block_string_parse_and_format():
    layer, repeats = parse_block_string("ir_r2_k5_s2_e6_c40_se0.25")
    assert repeats == 2
    assert layer == LayerSpec("ir", 5, 2, 6, 40, 0.25)
    assert layer.to_string(2) == "ir_r2_k5_s2_e6_c40_se0.25"
    ds, _ = parse_block_string("ds_r1_k3_s1_c16")
    assert ds.kind == "ds" and ds.expansion == 1 and ds.se_ratio == 0
    assert parse_block_string("ir_r1_k3_s1_e6_c24_noskip")[0].skip is False
    spec = NetworkSpec.from_strings("x", 32, [["ir_r3_k3_s2_e6_c24", "ir_r1_k5_s1_e3_c24"]], 64)
    assert [l.stride for l in spec.stages[0]] == [2, 1, 1, 1]
    assert stage_to_strings(spec.stages[0]) == ["ir_r3_k3_s2_e6_c24", "ir_r1_k5_s1_e3_c24"]
    for bad in ["xx_r1_k3_s1_c16", "ir_r1_k3_s1_c16", "ir_r1_k3_s3_e6_c16", "ir_r1_kx_s1_e6_c16",
                "ir_k3_s1_e6_c16"]:
        with pytest.raises(ValueError, match="block string|stride"):
            parse_block_string(bad)


@pytest.mark.parametrize("blocks, message", [
    ([[0, 0]] * 5, "has 6 blocks, the architecture has 5"),
    ([[0, 0], [0, 0, 0], [0] * 4, [0] * 4, [0] * 4, [0]], r"block 1 \(block1\) has 4"),
    ([[0, 9], [0] * 4, [0] * 4, [0] * 4, [0] * 4, [0]], r"block 0 \(block0\), layer 1: op index 9"),
    ([[0, 0], [0, 6, 0, 0], [0] * 4, [0] * 4, [0] * 4, [0]], "does not allow skip"),
    ([[0, 0], [0] * 4, [0] * 4, [0] * 4, [0] * 4, [-1]], "out of range"),
])
def test_illegal_architectures_name_block_layer_and_reason(blocks, message):
    space = get_space("dna_released")
    with pytest.raises(ValueError, match=message):
        space.validate(Arch.of(blocks))


def test_skip_where_stride_or_channels_change_is_rejected():
    space = get_space("dna_paper")
    arch = [list(b) for b in space.sample(np.random.default_rng(0)).blocks]
    arch[2][0] = space.skip_index
    with pytest.raises(ValueError, match=r"block 2 \(block2\), layer 0: a skip op needs stride 1"):
        space.validate(Arch.of(arch))
    with pytest.raises(ValueError, match="not one of the space's ops"):
        space.arch_from_strings([["ds_r1_k3_s1_c16_se0.25"], ["ir_r1_k9_s2_e6_c24_se0.25"]]
                                + [["ir_r1_k3_s2_e6_c40_se0.25"]] * 5)


def test_fixed_block_has_one_candidate_and_cost_is_fixed():
    base = get_space("small")
    blocks = base.blocks[:-1] + (BlockSpec("block3", 1, 64, 96, 1, 4, fixed_ops=(0,)),)
    space = SearchSpace(name="fixed", blocks=blocks, stem_channels=16, stem_stride=1,
                        first_layer=base.first_layer, head_channels=320, resolution=32)
    assert space.block_size(3) == 1 and space.size() == 36**3
    with pytest.raises(ValueError, match="fixed to ops"):
        space.validate(Arch.of([[0, 0], [0, 0], [0, 0], [1]]))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known: dna_paper, dna_released, small"):
        get_space("nope")
    with pytest.raises(ValueError, match="efficientnet_b0.*dna_a"):
        zoo.get_network_spec("resnet50")
