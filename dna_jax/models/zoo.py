"""Named architectures: EfficientNet-B0..B7, the published DNA-a..d, and small CPU teachers.

A small registry (name -> NetworkSpec factory) with a loud error for unknown names, so tests can
iterate over every entry.
"""

from __future__ import annotations

import functools
from typing import Callable

from dna_jax.models.efficientnet import EFFICIENTNET_PARAMS, EfficientNet, efficientnet_spec
from dna_jax.models.layers import TF_CONFIG, TORCH_CONFIG, LayerConfig
from dna_jax.netspec import NetworkSpec


def _with_se(stages: list[list[str]]) -> list[list[str]]:
    return [[f"{s}_se0.25" for s in stage] for stage in stages]


# Published DNA architectures (REFERENCE.md section 4), all with SE 0.25, stem 32, head 1280.
DNA_STAGES = {
    "dna_a": [
        ["ds_r1_k3_s1_c16"],
        ["ir_r1_k5_s2_e3_c24", "ir_r1_k3_s1_e3_c24", "ir_r1_k3_s1_e6_c24"],
        ["ir_r2_k3_s2_e3_c40", "ir_r1_k5_s1_e3_c40", "ir_r1_k3_s1_e6_c40"],
        ["ir_r1_k7_s2_e6_c80", "ir_r1_k3_s1_e3_c80", "ir_r1_k5_s1_e3_c80", "ir_r1_k3_s1_e6_c80"],
        ["ir_r1_k5_s1_e6_c96", "ir_r2_k5_s1_e3_c96", "ir_r1_k5_s1_e6_c96"],
        ["ir_r1_k5_s2_e6_c160", "ir_r3_k5_s1_e3_c160", "ir_r1_k5_s1_e6_c160"],
        ["ir_r1_k3_s1_e6_c320"],
    ],
    "dna_b": [
        ["ds_r1_k3_s1_c16"],
        ["ir_r1_k3_s2_e3_c24", "ir_r1_k5_s1_e3_c24", "ir_r1_k7_s1_e6_c24"],
        ["ir_r1_k7_s2_e6_c40", "ir_r1_k5_s1_e3_c40", "ir_r1_k7_s1_e6_c40"],
        ["ir_r1_k5_s2_e6_c80", "ir_r2_k5_s1_e3_c80", "ir_r1_k3_s1_e6_c80"],
        ["ir_r1_k5_s1_e6_c96", "ir_r2_k5_s1_e3_c96", "ir_r1_k5_s1_e6_c96"],
        ["ir_r1_k7_s2_e6_c192", "ir_r3_k5_s1_e3_c192", "ir_r1_k7_s1_e6_c192"],
        ["ir_r1_k3_s1_e6_c320"],
    ],
    "dna_c": [
        ["ds_r1_k3_s1_c16"],
        ["ir_r1_k5_s2_e6_c24", "ir_r1_k3_s1_e6_c24"],
        ["ir_r2_k5_s2_e6_c40", "ir_r1_k3_s1_e6_c40", "ir_r1_k5_s1_e6_c40"],
        ["ir_r1_k5_s2_e6_c80", "ir_r1_k3_s1_e6_c80", "ir_r2_k5_s1_e6_c80"],
        ["ir_r1_k3_s1_e6_c112", "ir_r2_k5_s1_e6_c112", "ir_r1_k5_s1_e3_c112"],
        ["ir_r1_k5_s2_e6_c192", "ir_r1_k5_s1_e3_c192", "ir_r2_k5_s1_e6_c192"],
        ["ir_r1_k3_s1_e6_c320"],
    ],
    "dna_d": [
        ["ds_r1_k3_s1_c16"],
        ["ir_r1_k7_s2_e6_c24", "ir_r1_k5_s1_e6_c24", "ir_r1_k7_s1_e6_c24"],
        ["ir_r4_k7_s2_e6_c40"],
        ["ir_r1_k7_s2_e6_c80", "ir_r2_k5_s1_e6_c80", "ir_r1_k7_s1_e6_c80"],
        ["ir_r1_k7_s1_e6_c112", "ir_r1_k5_s1_e6_c112", "ir_r1_k7_s1_e6_c112",
         "ir_r1_k5_s1_e6_c112"],
        ["ir_r1_k7_s2_e6_c192", "ir_r3_k5_s1_e6_c192", "ir_r1_k7_s1_e6_c192"],
        ["ir_r1_k3_s1_e6_c320"],
    ],
}

# A small EfficientNet-style teacher for 28-32 px images (Fashion-MNIST, CIFAR): stride-2 stem,
# three stride-2 stages (28 px: 14, 14, 7, 4, 2, 2; about 3M multiply-adds, cheap on a CPU). Its stage widths 24/40/80/96 are the `small` search space's targets.
SMALL_TEACHER_STAGES = [
    ["ds_r1_k3_s1_c16"],
    ["ir_r2_k3_s2_e6_c24"],
    ["ir_r2_k5_s2_e6_c40"],
    ["ir_r2_k3_s2_e6_c80"],
    ["ir_r1_k3_s1_e6_c96"],
]

# The `fmnist28` search space's teacher, for native 28 px images: stride-2 stem (14 px), stage 1
# stride 2 (7 px), stages 2-3 at 7 px; stage widths 24/32/48 are the space's block targets
# (5.5M multiply-adds; 0.9009 test accuracy after 3 epochs, configs/fmnist28_dna.py).
FMNIST28_TEACHER_STAGES = [
    ["ds_r1_k3_s1_c16"],
    ["ir_r2_k3_s2_e6_c24"],
    ["ir_r2_k5_s1_e6_c32"],
    ["ir_r2_k3_s1_e6_c48"],
]

# The `tiny` search space's teacher (tests): stage widths 8/16/24.
TINY_TEACHER_STAGES = [
    ["ds_r1_k3_s1_c8"],
    ["ir_r1_k3_s2_e6_c16"],
    ["ir_r2_k3_s2_e6_c24"],
]


def _dna_spec(name: str) -> NetworkSpec:
    return NetworkSpec.from_strings(name, 32, _with_se(DNA_STAGES[name]), 1280)


def _small_teacher_spec() -> NetworkSpec:
    return NetworkSpec.from_strings("fmnist_teacher", 32, _with_se(SMALL_TEACHER_STAGES), 640,
                                    stem_stride=2)


_REGISTRY: dict[str, Callable[[], NetworkSpec]] = {}
for _name in EFFICIENTNET_PARAMS:
    _REGISTRY[_name] = functools.partial(efficientnet_spec, _name)
for _name in DNA_STAGES:
    _REGISTRY[_name] = functools.partial(_dna_spec, _name)
_REGISTRY["fmnist_teacher"] = _small_teacher_spec
_REGISTRY["fmnist28_teacher"] = lambda: NetworkSpec.from_strings(
    "fmnist28_teacher", 16, _with_se(FMNIST28_TEACHER_STAGES), 320, stem_stride=2)
_REGISTRY["tiny_teacher"] = lambda: NetworkSpec.from_strings(
    "tiny_teacher", 8, _with_se(TINY_TEACHER_STAGES), 64, stem_stride=1)


def names() -> list[str]:
    """Every registered architecture name."""
    return list(_REGISTRY)


def get_network_spec(name: str) -> NetworkSpec:
    """The NetworkSpec registered under `name` (a `tf_` prefix selects the same EfficientNet).

    Raises:
      ValueError: for an unknown name, listing the known ones.
    """
    key = name.removeprefix("tf_") if name.startswith("tf_efficientnet") else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(names())} "
                         "(EfficientNets also as tf_efficientnet_b*)")
    return _REGISTRY[key]()


def default_layer_config(name: str) -> LayerConfig:
    """timm's conventions: `tf_*` ports use TF padding/eps, `efficientnet_*` PyTorch's."""
    if name.startswith("tf_"):
        return TF_CONFIG
    if name.startswith("efficientnet_"):
        return TORCH_CONFIG
    return LayerConfig()


def get_model(name: str, num_classes: int = 1000, layer_config: LayerConfig | None = None,
              drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> EfficientNet:
    """A Flax module for a named architecture."""
    return EfficientNet(spec=get_network_spec(name), num_classes=num_classes,
                        layer_config=layer_config or default_layer_config(name),
                        drop_rate=drop_rate, drop_path_rate=drop_path_rate)
