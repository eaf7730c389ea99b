"""Convolutions as shifted slices and matmuls: the fast way to train convnets on XLA:CPU.

XLA:CPU runs the forward pass of a 2-D convolution through Eigen, but the kernel gradient
(a convolution over the batch axis) falls back to a naive loop: for a batch of 128 at 28 x 28 x
96 a 1x1 conv's kernel gradient takes ~6 s and a depthwise 3x3's ~15 s, where the same maths
as a matmul (1x1), a sum of shifted products (depthwise) or one im2col matmul (k x k) takes a
fraction of a second. `with_tap_convs` swaps every eligible `nn.Conv` of a Flax apply for
`tap_conv` through `nn.intercept_methods`, so parameters, names and results are unchanged
(equal to `lax.conv_general_dilated` up to float rounding). Other backends keep XLA's convs.
"""

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "taps", "xla")


def _explicit_padding(padding: Any, spatial: Sequence[int], kernel: Sequence[int],
                      strides: Sequence[int]) -> list[tuple[int, int]] | None:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            return None
        return [tuple(p) for p in lax.padtype_to_pads(spatial, kernel, strides,
                                                        padding.upper())]
    if isinstance(padding, int):
        return [(padding, padding)] * len(spatial)
    pads = [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]
    return pads if len(pads) == len(spatial) else None


def _taps(xp: jax.Array, kh: int, kw: int, strides: tuple[int, int], out_h: int,
          out_w: int) -> list[jax.Array]:
    """The kh * kw strided windows of the padded input, one per kernel position."""
    sh, sw = strides
    return [lax.slice(xp, (0, i, j, 0),
                      (xp.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
                       xp.shape[3]), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def tap_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Any,
             groups: int = 1) -> jax.Array:
    """NHWC x HWIO convolution without XLA's conv op (dense or depthwise, no dilation).

    Args:
        x: [N, H, W, C] input.
        kernel: [kh, kw, C / groups, features].
        strides: (sh, sw).
        padding: 'SAME', 'VALID', an int or ((top, bottom), (left, right)).
        groups: 1 (dense) or C with features == C (depthwise).

    Returns:
        [N, H', W', features], the result of lax.conv_general_dilated with the same arguments.
    """
    kh, kw, per_group, features = kernel.shape
    channels = x.shape[-1]
    if groups not in (1, channels) or per_group * groups != channels or (
            groups > 1 and features != channels):
        raise ValueError(f"tap_conv supports dense or depthwise convs, got groups={groups} for "
                         f"{channels} channels and kernel {kernel.shape}.")
    strides = tuple(int(s) for s in strides)
    pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
    if pads is None:
        raise ValueError(f"tap_conv: unsupported padding {padding!r}.")
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (xp.shape[1] - kh) // strides[0] + 1
    out_w = (xp.shape[2] - kw) // strides[1] + 1
    taps = _taps(xp, kh, kw, strides, out_h, out_w)
    if groups > 1:  # Depthwise: a sum of shifted, per-channel scaled windows.
        weights = kernel.reshape(kh * kw, channels)
        out = taps[0] * weights[0]
        for t in range(1, len(taps)):
            out = out + taps[t] * weights[t]
        return out
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)  # im2col.
    return jnp.einsum("nhwc,cf->nhwf", patches, kernel.reshape(kh * kw * channels, features))


def _eligible(module: nn.Conv, x: Any) -> bool:
    kernel_size = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else ()
    ones = (None, 1, (1, 1), [1, 1])
    return (isinstance(x, jax.Array) and x.ndim == 4 and len(kernel_size) == 2
            and module.shared_weights and module.mask is None
            and module.kernel_dilation in ones and module.input_dilation in ones
            and module.feature_group_count in (1, x.shape[-1])
            and (module.feature_group_count == 1 or module.features == x.shape[-1])
            and _explicit_padding(module.padding, x.shape[1:3], kernel_size,
                                  _pair(module.strides)) is not None)


def _pair(value: Any) -> tuple[int, int]:
    if value is None:
        return (1, 1)
    return (value, value) if isinstance(value, int) else tuple(value)


def _conv_interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """Runs eligible bound `nn.Conv` calls with tap_conv; passes everything else through."""
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.Conv)
            or module.is_initializing()):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs.get("inputs")
    if not _eligible(module, x):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    dtype = module.dtype or jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    y = tap_conv(x.astype(dtype), kernel.astype(dtype), _pair(module.strides), module.padding,
                 module.feature_group_count)
    return y if bias is None else y + bias.astype(dtype)


def resolve(impl: str) -> str:
    """'auto' -> 'taps' on the CPU backend, 'xla' elsewhere; $DNA_JAX_CONV_IMPL overrides auto."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}.")
    if impl == "auto":
        impl = os.environ.get("DNA_JAX_CONV_IMPL", "auto")
        if impl not in CONV_IMPLS:
            raise ValueError(f"$DNA_JAX_CONV_IMPL must be one of {CONV_IMPLS}, got {impl!r}.")
    if impl == "auto":
        return "taps" if jax.default_backend() == "cpu" else "xla"
    return impl


def with_tap_convs(fn: Callable, impl: str = "auto") -> Callable:
    """`fn` (e.g. model.apply) with its Flax convolutions run by tap_conv when impl says so."""
    if resolve(impl) == "xla":
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(_conv_interceptor):
            return fn(*args, **kwargs)

    return wrapped
