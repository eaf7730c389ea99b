"""EfficientNet building blocks: ConvBN, SqueezeExcite, MBConv, DepthwiseSeparable, DropPath.

Every numeric choice that differs between the TensorFlow and PyTorch EfficientNets (padding,
BatchNorm epsilon and momentum, activation) lives in `LayerConfig`, so one module family serves
ported timm teachers (`tf_efficientnet_*`: 'same' padding, eps 1e-3; `efficientnet_*`:
symmetric padding, eps 1e-5) and networks trained here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dna_jax.netspec import LayerSpec

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish,
    "silu": nn.swish,
    "relu": nn.relu,
    "relu6": nn.relu6,
    "gelu": nn.gelu,
    "hard_swish": nn.hard_swish,
}
PADDINGS = ("same", "symmetric")

# EfficientNet's initialisers: conv kernels from fan-out, dense uniform in 1/sqrt(out).
# One difference, kept on purpose: for a depthwise kernel (k, k, 1, C) Flax's fan-out is k*k*C,
# where TF EfficientNet and timm use k*k, so our depthwise weights start sqrt(C) times smaller.
# BatchNorm follows every such conv, so only the effective step size differs. Measured with the
# timm fan (Fashion-MNIST, 300 teacher steps then 300 distillation steps): teacher accuracy
# 0.8075 vs 0.8212 with ours, block loss ratios 0.54/0.39/0.27/0.08 vs 0.53/0.33/0.35/0.16:
# no gain that would justify re-measuring every figure. Pretrained (ported) weights are unaffected.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """Options shared by every layer of a network.

    Attributes:
      padding: 'same' (TensorFlow's asymmetric SAME) or 'symmetric' (PyTorch's k // 2).
      bn_eps: BatchNorm epsilon.
      bn_momentum: BatchNorm running-average momentum in Flax's convention
        (new = momentum * old + (1 - momentum) * batch), i.e. 1 - PyTorch's momentum.
      act: activation name (see `ACTIVATIONS`).
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    """

    padding: str = "same"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.99
    act: str = "swish"
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"LayerConfig.padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"LayerConfig.act must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.act!r}")

    @property
    def activation(self) -> Callable[[jax.Array], jax.Array]:
        return ACTIVATIONS[self.act]

    def conv_padding(self, kernel: int):
        if self.padding == "same":
            return "SAME"
        return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


TF_CONFIG = LayerConfig(padding="same", bn_eps=1e-3, bn_momentum=0.99)
TORCH_CONFIG = LayerConfig(padding="symmetric", bn_eps=1e-5, bn_momentum=0.9)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ConvBN(nn.Module):
    """Bias-free convolution, BatchNorm and (optionally) the activation."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: bool = True
    config: LayerConfig = LayerConfig()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        x = nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                    padding=cfg.conv_padding(self.kernel), feature_group_count=self.groups,
                    use_bias=False, kernel_init=conv_init, dtype=cfg.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=cfg.bn_momentum,
                         epsilon=cfg.bn_eps, dtype=cfg.dtype, name="bn")(x)
        return cfg.activation(x) if self.act else x


class SqueezeExcite(nn.Module):
    """Channel gating: global pool, 1x1 reduce (+bias), act, 1x1 expand (+bias), sigmoid."""

    reduced: int
    config: LayerConfig = LayerConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.Conv(self.reduced, (1, 1), kernel_init=conv_init, dtype=cfg.dtype,
                    name="conv_reduce")(s)
        s = cfg.activation(s)
        s = nn.Conv(x.shape[-1], (1, 1), kernel_init=conv_init, dtype=cfg.dtype,
                    name="conv_expand")(s)
        return x * nn.sigmoid(s)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, SE, 1x1 project (+ residual)."""

    spec: LayerSpec
    in_channels: int
    drop_path: float = 0.0
    config: LayerConfig = LayerConfig()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec, cfg = self.spec, self.config
        mid = spec.mid_channels(self.in_channels)
        shortcut = x
        x = ConvBN(mid, 1, config=cfg, name="conv_pw")(x, train)
        x = ConvBN(mid, spec.kernel, spec.stride, groups=mid, config=cfg, name="conv_dw")(x, train)
        if spec.se_ratio:
            x = SqueezeExcite(spec.se_channels(self.in_channels), cfg, name="se")(x)
        x = ConvBN(spec.out_channels, 1, act=False, config=cfg, name="conv_pwl")(x, train)
        if spec.has_residual(self.in_channels):
            x = DropPath(self.drop_path, name="drop_path")(x, train) + shortcut
        return x


class DepthwiseSeparable(nn.Module):
    """kxk depthwise, SE, 1x1 pointwise (+ residual): EfficientNet's first stage."""

    spec: LayerSpec
    in_channels: int
    drop_path: float = 0.0
    config: LayerConfig = LayerConfig()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec, cfg = self.spec, self.config
        shortcut = x
        x = ConvBN(self.in_channels, spec.kernel, spec.stride, groups=self.in_channels,
                   config=cfg, name="conv_dw")(x, train)
        if spec.se_ratio:
            x = SqueezeExcite(spec.se_channels(self.in_channels), cfg, name="se")(x)
        x = ConvBN(spec.out_channels, 1, act=False, config=cfg, name="conv_pw")(x, train)
        if spec.has_residual(self.in_channels):
            x = DropPath(self.drop_path, name="drop_path")(x, train) + shortcut
        return x


def make_layer(spec: LayerSpec, in_channels: int, config: LayerConfig, drop_path: float = 0.0,
               name: str | None = None) -> nn.Module:
    """The module for one `LayerSpec` ('ir' -> MBConv, 'ds' -> DepthwiseSeparable)."""
    cls = MBConv if spec.kind == "ir" else DepthwiseSeparable
    return cls(spec=spec, in_channels=in_channels, drop_path=drop_path, config=config, name=name)
