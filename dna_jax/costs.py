"""Analytic parameter and operation counts for layers, candidates and whole networks.

Two counting conventions (REFERENCE.md, "Counting conventions"):
  * `macs`: multiply-adds of convolutions and dense layers only (timm / fvcore).
  * `dna_flops`: the counter of the original DNA code, used by the paper's tables and budgets:
    conv multiply-adds, + one add per output element of convs with a bias (the SE convs),
    + 2 x the input elements of every BatchNorm, + the input elements of the head's global
    average pool, + dense multiply-adds. Activations and SE pooling/scaling are not counted.
Parameters count trainable weights only (no BatchNorm running statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from dna_jax.netspec import LayerSpec, NetworkSpec, conv_output_size

COST_NAMES = ("params", "macs", "dna_flops")


@dataclasses.dataclass(frozen=True)
class Costs:
    """Parameter count and the two operation counts of a piece of network."""

    params: int = 0
    macs: int = 0
    dna_flops: int = 0

    def __add__(self, other: "Costs") -> "Costs":
        return Costs(self.params + other.params, self.macs + other.macs,
                     self.dna_flops + other.dna_flops)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def as_array(self) -> np.ndarray:
        return np.array([self.params, self.macs, self.dna_flops], dtype=np.int64)


def total(items: Iterable[Costs]) -> Costs:
    out = Costs()
    for item in items:
        out = out + item
    return out


def conv_costs(in_channels: int, out_channels: int, kernel: int, out_size: int,
               groups: int = 1, bias: bool = False) -> Costs:
    """A square conv on a square map; `out_size` is the output side length."""
    weights = kernel * kernel * (in_channels // groups) * out_channels
    elements = out_channels * out_size * out_size
    macs = weights * out_size * out_size
    return Costs(params=weights + (out_channels if bias else 0), macs=macs,
                 dna_flops=macs + (elements if bias else 0))


def bn_costs(channels: int, size: int) -> Costs:
    return Costs(params=2 * channels, macs=0, dna_flops=2 * channels * size * size)


def conv_bn_costs(in_channels: int, out_channels: int, kernel: int, out_size: int,
                  groups: int = 1) -> Costs:
    return (conv_costs(in_channels, out_channels, kernel, out_size, groups)
            + bn_costs(out_channels, out_size))


def se_costs(channels: int, reduced: int) -> Costs:
    """Two 1x1 convs with bias on the pooled (1x1) map."""
    return conv_costs(channels, reduced, 1, 1, bias=True) + conv_costs(reduced, channels, 1, 1,
                                                                       bias=True)


def layer_costs(layer: LayerSpec, in_channels: int, in_size: int) -> tuple[Costs, int]:
    """Costs of one MBConv / DS layer and its output side length."""
    out_size = conv_output_size(in_size, layer.stride)
    mid = layer.mid_channels(in_channels)
    parts = []
    if layer.kind == "ir":
        parts.append(conv_bn_costs(in_channels, mid, 1, in_size))
    parts.append(conv_bn_costs(mid, mid, layer.kernel, out_size, groups=mid))
    if layer.se_ratio:
        parts.append(se_costs(mid, layer.se_channels(in_channels)))
    parts.append(conv_bn_costs(mid, layer.out_channels, 1, out_size))
    return total(parts), out_size


def stem_costs(spec: NetworkSpec, resolution: int, in_channels: int = 3) -> tuple[Costs, int]:
    size = conv_output_size(resolution, spec.stem_stride)
    return conv_bn_costs(in_channels, spec.stem_channels, spec.stem_kernel, size), size


def head_costs(in_channels: int, head_channels: int, size: int, num_classes: int) -> Costs:
    """1x1 conv + BN, global average pool, dense classifier (with bias)."""
    head = conv_bn_costs(in_channels, head_channels, 1, size)
    pool = Costs(dna_flops=head_channels * size * size)
    dense = Costs(params=head_channels * num_classes + num_classes,
                  macs=head_channels * num_classes, dna_flops=head_channels * num_classes)
    return head + pool + (dense if num_classes else Costs())


@dataclasses.dataclass(frozen=True)
class NetworkCosts:
    """Whole-network costs with a per-part breakdown ('stem', 'stage<i>', 'head')."""

    total: Costs
    parts: dict[str, Costs]


def network_costs(spec: NetworkSpec, resolution: int = 224, num_classes: int = 1000,
                  in_channels: int = 3) -> NetworkCosts:
    """Params, multiply-adds and dna_flops of a whole network at a square input resolution."""
    parts: dict[str, Costs] = {}
    parts["stem"], size = stem_costs(spec, resolution, in_channels)
    channels = spec.stem_channels
    for s, stage in enumerate(spec.stages):
        stage_total = Costs()
        for layer in stage:
            costs, size = layer_costs(layer, channels, size)
            stage_total = stage_total + costs
            channels = layer.out_channels
        parts[f"stage{s}"] = stage_total
    parts["head"] = head_costs(channels, spec.head_channels, size, num_classes)
    return NetworkCosts(total=total(parts.values()), parts=parts)


# ---- search-space cost tables -----------------------------------------------------------------

def block_input_size(space, block_index: int, resolution: int) -> int:
    """Side length of the feature map entering a block of the child network."""
    size = conv_output_size(resolution, space.stem_stride)
    size = conv_output_size(size, space.first_layer.stride)
    for block in space.blocks[:block_index]:
        size = conv_output_size(size, block.stride)
    return size


def block_op_cost_table(space, block_index: int, resolution: int | None = None) -> np.ndarray:
    """Costs of every (layer, op) of a block in the child network: int64 [L, K + 1, 3].

    The last axis is (params, macs, dna_flops); op index K (the skip op) costs nothing. Layer
    costs do not depend on the other layers' choices (widths are fixed by the block), so a
    candidate's cost is the sum over its layers.
    """
    resolution = resolution or space.resolution
    block = space.blocks[block_index]
    size = block_input_size(space, block_index, resolution)
    table = np.zeros((block.num_layers, len(space.ops) + 1, len(COST_NAMES)), np.int64)
    for l in range(block.num_layers):
        in_channels, out_channels, stride = space.layer_io(block_index, l)
        for o, op in enumerate(space.ops):
            costs, _ = layer_costs(op.layer(stride, out_channels), in_channels, size)
            table[l, o] = costs.as_array()
        size = conv_output_size(size, stride)
    return table


def candidate_costs(space, block_index: int, encodings: np.ndarray,
                    resolution: int | None = None) -> dict[str, np.ndarray]:
    """Vectorised costs of block candidates `encodings` int [N, L] -> {cost name: int64 [N]}."""
    table = block_op_cost_table(space, block_index, resolution)
    encodings = np.asarray(encodings)
    layers = np.arange(encodings.shape[1])[None, :]
    summed = table[layers, encodings].sum(axis=1)  # [N, 3]
    return {name: summed[:, i] for i, name in enumerate(COST_NAMES)}


def fixed_costs(space, resolution: int | None = None, num_classes: int = 1000) -> Costs:
    """Costs of the parts no search changes: stem, first layer and head (plus fixed blocks).

    A network's total = fixed_costs + sum over searched blocks of its candidate's costs.
    """
    resolution = resolution or space.resolution
    dummy = NetworkSpec(name="stem", stem_channels=space.stem_channels,
                        stages=((space.first_layer,),), head_channels=space.head_channels,
                        stem_stride=space.stem_stride)
    stem, size = stem_costs(dummy, resolution)
    first, size = layer_costs(space.first_layer, space.stem_channels, size)
    last_size = block_input_size(space, len(space.blocks), resolution)
    head = head_costs(space.blocks[-1].hidden_channels, space.head_channels, last_size,
                      num_classes)
    out = stem + first + head
    for b, block in enumerate(space.blocks):
        if block.fixed_ops is not None:
            costs = candidate_costs(space, b, np.asarray([block.fixed_ops]), resolution)
            out = out + Costs(*(int(costs[n][0]) for n in COST_NAMES))
    return out


# ---- effective multiply-adds (padding excluded) -----------------------------------------------


def _inside_taps(in_size: int, kernel: int, stride: int) -> int:
    """Over one axis: the (output position, kernel tap) pairs that read a real input pixel
    under 'SAME' padding (TF's split: the extra pixel after)."""
    out_size = conv_output_size(in_size, stride)
    before = max((out_size - 1) * stride + kernel - in_size, 0) // 2
    positions = np.arange(out_size)[:, None] * stride - before + np.arange(kernel)[None, :]
    return int(np.count_nonzero((positions >= 0) & (positions < in_size)))


def effective_macs(spec: NetworkSpec, resolution: int, num_classes: int = 1000,
                   in_channels: int = 3) -> int:
    """Multiply-adds that touch at least one real (non-padding) input value.

    As `macs`, but a k x k convolution counts only the kernel taps that land inside the
    image: on small maps (a 7x7 kernel on a 7x7 map) a large share of the counted
    multiply-adds multiply zeros, and `macs` overstates how much a bigger kernel computes.
    """
    def conv(cin: int, cout: int, kernel: int, in_size: int, stride: int, groups: int = 1
             ) -> int:
        return (cin // groups) * cout * _inside_taps(in_size, kernel, stride) ** 2

    size = resolution
    total_macs = conv(in_channels, spec.stem_channels, spec.stem_kernel, size, spec.stem_stride)
    size = conv_output_size(size, spec.stem_stride)
    channels = spec.stem_channels
    for stage in spec.stages:
        for layer in stage:
            mid = layer.mid_channels(channels)
            out_size = conv_output_size(size, layer.stride)
            if layer.kind == "ir":
                total_macs += channels * mid * size * size
            total_macs += conv(mid, mid, layer.kernel, size, layer.stride, groups=mid)
            if layer.se_ratio:
                reduced = layer.se_channels(channels)
                total_macs += 2 * mid * reduced
            total_macs += mid * layer.out_channels * out_size * out_size
            channels, size = layer.out_channels, out_size
    total_macs += channels * spec.head_channels * size * size
    return int(total_macs + (spec.head_channels * num_classes if num_classes else 0))
