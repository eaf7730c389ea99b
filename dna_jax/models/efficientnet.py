"""EfficientNet B0..B7 (the DNA teacher) and the generic network module that runs any NetworkSpec.

`EfficientNet` runs any `NetworkSpec` (EfficientNets, DNA-a..d, child networks from an `Arch`).
It returns `(logits, features)` with every stage's output by name, and `forward_stages` runs a
contiguous range of stages only: the teacher's partial forward that block-wise distillation needs.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dna_jax.models.layers import ConvBN, LayerConfig, dense_init, make_layer
from dna_jax.netspec import LayerSpec, NetworkSpec, make_divisible, parse_block_string

# timm's efficientnet_b0 architecture definition: one list of block strings per stage.
B0_STAGES = (
    ("ds_r1_k3_s1_e1_c16_se0.25",),
    ("ir_r2_k3_s2_e6_c24_se0.25",),
    ("ir_r2_k5_s2_e6_c40_se0.25",),
    ("ir_r3_k3_s2_e6_c80_se0.25",),
    ("ir_r3_k5_s1_e6_c112_se0.25",),
    ("ir_r4_k5_s2_e6_c192_se0.25",),
    ("ir_r1_k3_s1_e6_c320_se0.25",),
)

# (width multiplier, depth multiplier, resolution, dropout) as published.
EFFICIENTNET_PARAMS = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}


def round_filters(channels: int, width_multiplier: float) -> int:
    """Channel scaling of EfficientNet (timm's `round_channels`)."""
    if not width_multiplier:
        return channels
    return make_divisible(channels * width_multiplier)


def scale_stage_depth(repeats: Sequence[int], depth_multiplier: float) -> list[int]:
    """Scales a stage's repeat counts as timm's `_scale_stage_depth` ('ceil' truncation).

    The stage's total is scaled with ceil, then distributed over its block strings in reverse
    order so that the later (usually larger) strings absorb the extra layers.
    """
    num_repeat = sum(repeats)
    num_repeat_scaled = int(math.ceil(num_repeat * depth_multiplier))
    scaled = []
    for r in repeats[::-1]:
        rs = max(1, round(r / num_repeat * num_repeat_scaled))
        scaled.append(rs)
        num_repeat -= r
        num_repeat_scaled -= rs
    return scaled[::-1]


def scaled_network_spec(name: str, stages: Sequence[Sequence[str]], width_multiplier: float,
                        depth_multiplier: float, stem_channels: int = 32,
                        head_channels: int = 1280, stem_stride: int = 2) -> NetworkSpec:
    """Builds a width/depth-scaled NetworkSpec from block strings, EfficientNet's way."""
    scaled_stages = []
    for strings in stages:
        parsed = [parse_block_string(s) for s in strings]
        repeats = scale_stage_depth([r for _, r in parsed], depth_multiplier)
        layers: list[LayerSpec] = []
        for (layer, _), r in zip(parsed, repeats):
            out = round_filters(layer.out_channels, width_multiplier)
            for _ in range(r):
                stride = layer.stride if not layers else 1
                layers.append(LayerSpec(kind=layer.kind, kernel=layer.kernel, stride=stride,
                                        expansion=layer.expansion, out_channels=out,
                                        se_ratio=layer.se_ratio, skip=layer.skip))
        scaled_stages.append(tuple(layers))
    return NetworkSpec(name=name, stem_channels=round_filters(stem_channels, width_multiplier),
                       stages=tuple(scaled_stages),
                       head_channels=round_filters(head_channels, width_multiplier),
                       stem_stride=stem_stride)


def efficientnet_spec(variant: str) -> NetworkSpec:
    """NetworkSpec of `efficientnet_b0` .. `efficientnet_b7` (also accepts the `tf_` prefix)."""
    key = variant.removeprefix("tf_")
    if key not in EFFICIENTNET_PARAMS:
        raise ValueError(f"unknown EfficientNet variant {variant!r}; known: "
                         f"{', '.join(EFFICIENTNET_PARAMS)}")
    width, depth, _, _ = EFFICIENTNET_PARAMS[key]
    return scaled_network_spec(key, B0_STAGES, width, depth)


class EfficientNet(nn.Module):
    """Stem, stages of MBConv/DS layers, 1x1 head, pooling, dropout, classifier.

    Attributes:
      spec: the network's architecture.
      num_classes: classifier outputs (0 = no classifier; logits are the pooled features).
      layer_config: padding, BatchNorm and activation options.
      drop_rate: dropout before the classifier.
      drop_path_rate: stochastic depth, rising linearly over the layers (timm's rule).
    """

    spec: NetworkSpec
    num_classes: int = 1000
    layer_config: LayerConfig = LayerConfig()
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def setup(self):
        spec, cfg = self.spec, self.layer_config
        self.stem = ConvBN(spec.stem_channels, spec.stem_kernel, spec.stem_stride, config=cfg)
        total = sum(spec.stage_depths)
        blocks = []
        for index, (_, _, in_channels, layer) in enumerate(spec.layers_with_inputs()):
            blocks.append(make_layer(layer, in_channels, cfg, self.drop_path_rate * index / total))
        self.blocks = blocks
        self.head = ConvBN(spec.head_channels, 1, config=cfg)
        if self.num_classes:
            self.classifier = nn.Dense(self.num_classes, kernel_init=dense_init,
                                       dtype=cfg.dtype)
        self.dropout = nn.Dropout(self.drop_rate)

    def _stage_slices(self) -> list[range]:
        slices, start = [], 0
        for depth in self.spec.stage_depths:
            slices.append(range(start, start + depth))
            start += depth
        return slices

    def forward_stages(self, x: jax.Array, start: int = 0, stop: int | None = None,
                       train: bool = False) -> dict[str, jax.Array]:
        """Runs stages `start` .. `stop - 1` only.

        Args:
          x: the image when `start == 0` (the stem runs first), else the output of stage
            `start - 1` (NHWC).
          start: first stage to run.
          stop: one past the last stage to run (default: all stages).
          train: BatchNorm in training mode, drop-path active.

        Returns:
          {'stage<i>': output of stage i} for every stage run (and 'stem' when start == 0).
        """
        num_stages = len(self.spec.stages)
        stop = num_stages if stop is None else stop
        if not 0 <= start < stop <= num_stages:
            raise ValueError(f"need 0 <= start < stop <= {num_stages}, got start={start}, "
                             f"stop={stop}")
        features = {}
        if start == 0:
            x = self.stem(x, train)
            features["stem"] = x
        for stage in range(start, stop):
            for index in self._stage_slices()[stage]:
                x = self.blocks[index](x, train)
            features[f"stage{stage}"] = x
        return features

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        features = self.forward_stages(x, train=train)
        x = features[f"stage{len(self.spec.stages) - 1}"]
        x = self.head(x, train)
        x = jnp.mean(x, axis=(1, 2))
        features["pre_logits"] = x
        if self.num_classes:
            x = self.dropout(x, deterministic=not train)
            x = self.classifier(x)
        return x.astype(jnp.float32), features
