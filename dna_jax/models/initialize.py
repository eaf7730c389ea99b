"""Fast variable initialisation for Flax modules.

`jax.jit(model.init)` spends most of its compile time optimising the random-number code of
hundreds of initialisers (about 40 s for a 1M-parameter EfficientNet on 2 CPU cores, against
3 s for the forward pass). Initialisation runs once, so it is compiled without the expensive
backend passes: 3-4x faster to compile, same values.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from dna_jax.compile_options import compile_lowered


def init_variables(module: nn.Module, rngs: Any, *args, **kwargs) -> dict:
    """`module.init(rngs, *args, **kwargs)`, jitted with cheap compiler options."""
    init = jax.jit(functools.partial(module.init, **kwargs))
    return compile_lowered(init.lower(rngs, *args))(rngs, *args)
