"""A whole-network single-path one-shot (SPOS) supernet of a search space, for baselines.

`SinglePathSupernet` is the space's whole child network with every searchable layer replaced
by a `ChoiceLayer` (the same machinery as the DNA supernet blocks, `models/supernet.py`):
stem -> fixed first layer -> the choice layers of every block, in order, at the CHILD
network's widths -> 1x1 head -> pooling -> classifier. It is called with a path (int
[num_layers], the op index of every searchable layer, may be traced), so one compilation
serves every architecture and `nn.switch` runs only the chosen ops.

With a fixed path it computes exactly the child network of that architecture
(`models/childnet.py`): `child_variables` extracts the path's weights in the child network's
layout, and the two agree (tests/test_ranking.py).

Variables: params['stem'], ['first'], ['layers_<i>']['ops_<j>'] (branch j of searchable layer
i, counted over all blocks), ['head'], ['classifier'] (same for batch_stats), so
`dna_jax.supernet.paths.op_groups` splits them into per-op optimizer groups.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dna_jax.models.layers import ConvBN, LayerConfig, dense_init, make_layer
from dna_jax.models.supernet import ChoiceLayer
from dna_jax.space import Arch, SearchSpace


def layer_positions(space: SearchSpace) -> list[tuple[int, int]]:
    """(block, layer) of every searchable layer, in network order (the path's order)."""
    return [(b, l) for b, block in enumerate(space.blocks) for l in range(block.num_layers)]


def arch_path(arch: Arch) -> np.ndarray:
    """The flat path of an architecture: int32 [num_layers], block after block."""
    return np.asarray([op for block in arch.blocks for op in block], np.int32)


class SinglePathSupernet(nn.Module):
    """The whole network of `space` with a ChoiceLayer per searchable layer (see module doc).

    Attributes:
      space: the search space.
      num_classes: classifier outputs.
      config: layer options (padding, BatchNorm, activation, dtype).
      drop_rate: dropout before the classifier (as in the child network).
    """

    space: SearchSpace
    num_classes: int
    config: LayerConfig = LayerConfig()
    drop_rate: float = 0.0

    def setup(self):
        space, cfg = self.space, self.config
        self.stem = ConvBN(space.stem_channels, 3, space.stem_stride, config=cfg)
        self.first = make_layer(space.first_layer, space.stem_channels, cfg)
        layers = []
        for b, l in layer_positions(space):
            in_channels, out_channels, stride = space.layer_io(b, l)
            layers.append(ChoiceLayer(space, b, l, in_channels, out_channels, stride, cfg))
        self.layers = layers
        self.head = ConvBN(space.head_channels, 1, config=cfg)
        self.classifier = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=cfg.dtype)
        self.dropout = nn.Dropout(self.drop_rate)

    @property
    def num_layers(self) -> int:
        return len(layer_positions(self.space))

    def __call__(self, x: jax.Array, path: jax.Array, train: bool = False
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits of the path `path` (int [num_layers], op indices) and {'pre_logits': ...}."""
        x = self.first(self.stem(x, train), train)
        for i, layer in enumerate(self.layers):
            x = layer(x, path[i], train)
        x = self.head(x, train)
        x = jnp.mean(x, axis=(1, 2))
        features = {"pre_logits": x}
        x = self.dropout(x, deterministic=not train)
        return self.classifier(x).astype(jnp.float32), features


def branch_table(space: SearchSpace) -> list[tuple[int, ...]]:
    """Legal op indices of every searchable layer (branch position -> op index)."""
    return [space.layer_choices(b, l) for b, l in layer_positions(space)]


def child_variables(space: SearchSpace, arch: Arch, variables: dict[str, Any]
                    ) -> dict[str, Any]:
    """The weights of `arch`'s path in the layout of `build_childnet(space, arch, ...)`.

    Child layer names: 'stem', 'blocks_0' (the fixed first layer), 'blocks_<n>' for the n-th
    non-skip searchable layer, 'head', 'classifier'. Skip ops have no weights.

    Raises:
      ValueError: if `arch` is illegal in `space`.
    """
    space.validate(arch)
    table = branch_table(space)
    out: dict[str, Any] = {}
    for collection, tree in variables.items():
        child = {name: tree[name] for name in ("stem", "head", "classifier") if name in tree}
        if "first" in tree:
            child["blocks_0"] = tree["first"]
        index = 1
        for i, op in enumerate(arch_path(arch)):
            if op == space.skip_index:
                continue
            layer = tree.get(f"layers_{i}", {})
            branch = f"ops_{table[i].index(int(op))}"
            if branch in layer:
                child[f"blocks_{index}"] = layer[branch]
            index += 1
        out[collection] = child
    return out


def paths_array(archs: Sequence[Arch]) -> np.ndarray:
    """int32 [len(archs), num_layers]: the paths of several architectures."""
    return np.stack([arch_path(a) for a in archs]).astype(np.int32)
