"""Stand-alone child networks built from an `Arch` of a search space (retraining, export)."""

from __future__ import annotations

from dna_jax.models.efficientnet import EfficientNet
from dna_jax.models.layers import LayerConfig
from dna_jax.space import Arch, SearchSpace


def build_childnet(space: SearchSpace, arch: Arch, num_classes: int,
                   layer_config: LayerConfig | None = None, drop_rate: float = 0.0,
                   drop_path_rate: float = 0.0, name: str = "child") -> EfficientNet:
    """The Flax network of `arch` (validated; skip ops removed; the space's hidden widths).

    Raises:
      ValueError: if `arch` is illegal in `space` (names the block, layer and reason).
    """
    spec = space.to_network_spec(arch, name=name)
    return EfficientNet(spec=spec, num_classes=num_classes,
                        layer_config=layer_config or LayerConfig(), drop_rate=drop_rate,
                        drop_path_rate=drop_path_rate)
