"""Concrete network descriptions: layers, stages and timm-style block strings.

A `NetworkSpec` is the one description shared by the Flax model (`models/efficientnet.py`),
the analytic cost model (`costs.py`) and the search space (`space.py` turns an `Arch` into one).
Block strings follow timm's EfficientNet notation, e.g. `ir_r2_k5_s2_e6_c40_se0.25`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

LAYER_KINDS = ("ir", "ds")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """Rounds `value` to a multiple of `divisor` exactly as timm/TF EfficientNet do."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer (block in timm's words) of a network.

    Attributes:
      kind: 'ir' (MBConv / inverted residual) or 'ds' (depthwise separable).
      kernel: depthwise kernel size.
      stride: depthwise stride.
      expansion: expansion ratio of 'ir' (1 for 'ds').
      out_channels: output channels.
      se_ratio: squeeze-excite ratio relative to the layer INPUT channels (0 = no SE).
      skip: whether a residual connection is used where shapes allow it ('noskip' turns it off).
    """

    kind: str
    kernel: int
    stride: int
    expansion: int
    out_channels: int
    se_ratio: float = 0.25
    skip: bool = True

    def __post_init__(self):
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; expected one of {LAYER_KINDS}")
        if self.kind == "ds" and self.expansion != 1:
            raise ValueError(f"a 'ds' layer has no expansion (got e{self.expansion})")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride}")

    def mid_channels(self, in_channels: int) -> int:
        """Hidden (expanded) channels, rounded as timm's InvertedResidual does."""
        if self.kind == "ds":
            return in_channels
        return make_divisible(in_channels * self.expansion)

    def se_channels(self, in_channels: int) -> int:
        """Reduced SE channels: a fraction of the layer input channels, as in EfficientNet."""
        if not self.se_ratio:
            return 0
        mid = self.mid_channels(in_channels)
        # timm divides the ratio by the expansion and multiplies by mid: same float path here.
        return round(mid * (self.se_ratio / (self.expansion if self.kind == "ir" else 1.0)))

    def has_residual(self, in_channels: int) -> bool:
        return self.skip and self.stride == 1 and in_channels == self.out_channels

    def to_string(self, repeats: int = 1) -> str:
        """timm-style block string, e.g. 'ir_r1_k5_s2_e3_c24_se0.25'."""
        parts = [self.kind, f"r{repeats}", f"k{self.kernel}", f"s{self.stride}"]
        if self.kind == "ir":
            parts.append(f"e{self.expansion}")
        parts.append(f"c{self.out_channels}")
        if self.se_ratio:
            parts.append(f"se{self.se_ratio:g}")
        if not self.skip:
            parts.append("noskip")
        return "_".join(parts)


_TOKEN = re.compile(r"^(r|k|s|e|c|se)(\d+(?:\.\d+)?)$")


def parse_block_string(text: str) -> tuple[LayerSpec, int]:
    """Parses one timm-style block string into (layer, repeats).

    Raises:
      ValueError: naming the string and the offending token.
    """
    tokens = text.strip().split("_")
    kind = tokens[0]
    if kind not in LAYER_KINDS:
        raise ValueError(f"block string {text!r}: unknown kind {kind!r} "
                         f"(supported: {', '.join(LAYER_KINDS)})")
    values: dict[str, float] = {}
    skip = True
    for token in tokens[1:]:
        if token == "noskip":
            skip = False
            continue
        match = _TOKEN.match(token)
        if not match:
            raise ValueError(f"block string {text!r}: cannot parse token {token!r}")
        values[match.group(1)] = float(match.group(2))
    for key in ("r", "k", "s", "c"):
        if key not in values:
            raise ValueError(f"block string {text!r}: missing '{key}<number>'")
    expansion = int(values.get("e", 1))
    if kind == "ir" and "e" not in values:
        raise ValueError(f"block string {text!r}: an 'ir' layer needs 'e<expansion>'")
    layer = LayerSpec(kind=kind, kernel=int(values["k"]), stride=int(values["s"]),
                      expansion=expansion, out_channels=int(values["c"]),
                      se_ratio=values.get("se", 0.0), skip=skip)
    return layer, int(values["r"])


def expand_stage(strings: Sequence[str]) -> tuple[LayerSpec, ...]:
    """Expands one stage's block strings into layers; only the stage's first layer strides."""
    layers = []
    for text in strings:
        layer, repeats = parse_block_string(text)
        for _ in range(repeats):
            stride = layer.stride if not layers else 1
            layers.append(dataclasses.replace(layer, stride=stride))
    return tuple(layers)


def stage_to_strings(layers: Sequence[LayerSpec]) -> list[str]:
    """Inverse of `expand_stage`: consecutive identical layers merge into one `r<n>` string."""
    strings: list[str] = []
    first, count = None, 0
    for layer in layers:
        # A repeat of the current group: same layer except that repeats never stride.
        if first is not None and layer.stride == 1 and \
                dataclasses.replace(layer, stride=first.stride) == first:
            count += 1
            continue
        if first is not None:
            strings.append(first.to_string(count))
        first, count = layer, 1
    if first is not None:
        strings.append(first.to_string(count))
    return strings


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A whole EfficientNet-style network: stem conv, stages of layers, 1x1 head, classifier.

    Stage outputs are the network's named features (`stage0`, `stage1`, ...), which is where
    a DNA teacher is tapped and where supernet blocks are aligned.
    """

    name: str
    stem_channels: int
    stages: tuple[tuple[LayerSpec, ...], ...]
    head_channels: int
    stem_stride: int = 2
    stem_kernel: int = 3

    def __post_init__(self):
        for index, stage in enumerate(self.stages):
            if not stage:
                raise ValueError(f"network {self.name!r}: stage {index} has no layers")

    @classmethod
    def from_strings(cls, name: str, stem_channels: int, stages: Sequence[Sequence[str]],
                     head_channels: int, stem_stride: int = 2) -> "NetworkSpec":
        return cls(name=name, stem_channels=stem_channels,
                   stages=tuple(expand_stage(s) for s in stages), head_channels=head_channels,
                   stem_stride=stem_stride)

    def to_strings(self) -> list[list[str]]:
        return [stage_to_strings(stage) for stage in self.stages]

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(stage[-1].out_channels for stage in self.stages)

    @property
    def stage_depths(self) -> tuple[int, ...]:
        return tuple(len(stage) for stage in self.stages)

    def stage_in_channels(self, stage_index: int) -> int:
        return self.stem_channels if stage_index == 0 else self.stage_channels[stage_index - 1]

    def stage_strides(self) -> tuple[int, ...]:
        """Cumulative stride (w.r.t. the image) at each stage output."""
        total, out = self.stem_stride, []
        for stage in self.stages:
            for layer in stage:
                total *= layer.stride
            out.append(total)
        return tuple(out)

    def layers_with_inputs(self):
        """Yields (stage_index, layer_index, in_channels, layer) in network order."""
        in_channels = self.stem_channels
        for s, stage in enumerate(self.stages):
            for i, layer in enumerate(stage):
                yield s, i, in_channels, layer
                in_channels = layer.out_channels


def conv_output_size(size: int, stride: int) -> int:
    """Spatial output size of a 'SAME' (or symmetric, odd-kernel) conv: ceil(size / stride)."""
    return math.ceil(size / stride)
