"""The MBConv search space of DNA: ops, blocks, presets, the `Arch` encoding and its candidates.

A space is a fixed stem (conv + one depthwise-separable layer), a sequence of searchable
blocks, and a fixed head. Each block has `num_layers` searchable layers; each layer picks one
op index. Op indices 0..K-1 are the MBConv ops of `space.ops` (the original's order: MB6 3x3,
MB6 5x5, MB6 7x7, MB3 3x3, MB3 5x5, MB3 7x7); index K (`space.skip_index`) is the identity op,
legal only in blocks with `allow_skip` and only where stride is 1 and channels match.

Each block is supervised by one teacher stage (`teacher_stage`) and its supernet version maps
to that stage's width (`out_channels`); the retrained child network uses `hidden_channels`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Sequence

import numpy as np

from dna_jax.netspec import LayerSpec, NetworkSpec, expand_stage, parse_block_string


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """A candidate op: an MBConv with a kernel size and an expansion ratio (SE, swish)."""

    name: str
    kernel: int
    expansion: int
    se_ratio: float = 0.25

    def layer(self, stride: int, out_channels: int) -> LayerSpec:
        return LayerSpec(kind="ir", kernel=self.kernel, stride=stride, expansion=self.expansion,
                         out_channels=out_channels, se_ratio=self.se_ratio)


DNA_OPS = (
    OpSpec("mb6_k3", 3, 6), OpSpec("mb6_k5", 5, 6), OpSpec("mb6_k7", 7, 6),
    OpSpec("mb3_k3", 3, 3), OpSpec("mb3_k5", 5, 3), OpSpec("mb3_k7", 7, 3),
)
SKIP_NAME = "skip"


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One searchable block.

    Attributes:
      name: e.g. 'block1'.
      num_layers: searchable layers (the maximum depth when skips are allowed).
      hidden_channels: width of the block in the child network.
      out_channels: width of the supervising teacher stage (the supernet block's output).
      stride: stride of the block's first layer.
      teacher_stage: index of the teacher stage whose output supervises this block.
      allow_skip: layers after the first may pick the identity op (depth search).
      fixed_ops: if set, the block is not searched: one op index per layer.
    """

    name: str
    num_layers: int
    hidden_channels: int
    out_channels: int
    stride: int
    teacher_stage: int
    allow_skip: bool = False
    fixed_ops: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"{self.name}: num_layers must be >= 1")
        if self.fixed_ops is not None and len(self.fixed_ops) != self.num_layers:
            raise ValueError(f"{self.name}: fixed_ops has {len(self.fixed_ops)} entries, "
                             f"expected {self.num_layers}")


@dataclasses.dataclass(frozen=True)
class Arch:
    """One architecture of a space: an op index per searchable layer, per block."""

    blocks: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, blocks: Sequence[Sequence[int]]) -> "Arch":
        return cls(tuple(tuple(int(o) for o in b) for b in blocks))

    def to_json(self, space: "SearchSpace | None" = None) -> str:
        data = {"blocks": [list(b) for b in self.blocks]}
        if space is not None:
            data["space"] = space.name
            data["ops"] = [[space.op_name(o) for o in b] for b in self.blocks]
            data["block_strings"] = space.to_network_spec(self).to_strings()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Arch":
        data = json.loads(text)
        if "blocks" not in data:
            raise ValueError("architecture JSON needs a 'blocks' list of op-index lists")
        return cls.of(data["blocks"])


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """Stem + first depthwise-separable layer (fixed), searchable blocks, head (fixed)."""

    name: str
    blocks: tuple[BlockSpec, ...]
    ops: tuple[OpSpec, ...] = DNA_OPS
    stem_channels: int = 32
    stem_stride: int = 2
    first_layer: LayerSpec = LayerSpec("ds", 3, 1, 1, 16, 0.25)
    head_channels: int = 1280
    resolution: int = 224
    description: str = ""

    # ---- op indices ---------------------------------------------------------------------
    @property
    def skip_index(self) -> int:
        return len(self.ops)

    def op_name(self, index: int) -> str:
        return SKIP_NAME if index == self.skip_index else self.ops[index].name

    def layer_io(self, block_index: int, layer_index: int) -> tuple[int, int, int]:
        """(in_channels, out_channels, stride) of a layer in the CHILD network."""
        block = self.blocks[block_index]
        if layer_index == 0:
            in_channels = (self.first_layer.out_channels if block_index == 0
                           else self.blocks[block_index - 1].hidden_channels)
            return in_channels, block.hidden_channels, block.stride
        return block.hidden_channels, block.hidden_channels, 1

    def skip_legal(self, block_index: int, layer_index: int) -> bool:
        block = self.blocks[block_index]
        in_channels, out_channels, stride = self.layer_io(block_index, layer_index)
        return (block.allow_skip and layer_index > 0 and stride == 1
                and in_channels == out_channels)

    def layer_choices(self, block_index: int, layer_index: int) -> tuple[int, ...]:
        """Legal op indices of one layer."""
        block = self.blocks[block_index]
        if block.fixed_ops is not None:
            return (block.fixed_ops[layer_index],)
        choices = tuple(range(len(self.ops)))
        if self.skip_legal(block_index, layer_index):
            choices += (self.skip_index,)
        return choices

    # ---- sizes, enumeration, sampling ---------------------------------------------------
    def block_size(self, block_index: int) -> int:
        return math.prod(len(self.layer_choices(block_index, l))
                         for l in range(self.blocks[block_index].num_layers))

    def size(self) -> int:
        """Number of architectures (encodings) in the space, an exact Python int."""
        return math.prod(self.block_size(b) for b in range(len(self.blocks)))

    def block_candidates(self, block_index: int) -> np.ndarray:
        """Every candidate of a block as int32 [N, num_layers], in lexicographic order."""
        block = self.blocks[block_index]
        choices = [np.asarray(self.layer_choices(block_index, l), np.int32)
                   for l in range(block.num_layers)]
        grids = np.meshgrid(*choices, indexing="ij")
        return np.stack([g.reshape(-1) for g in grids], axis=1)

    def sample_block(self, block_index: int, num: int, rng: np.random.Generator) -> np.ndarray:
        """`num` candidates of a block, each layer uniform over its legal ops: int32 [num, L]."""
        block = self.blocks[block_index]
        columns = [rng.choice(np.asarray(self.layer_choices(block_index, l), np.int32), size=num)
                   for l in range(block.num_layers)]
        return np.stack(columns, axis=1).astype(np.int32)

    def sample(self, rng: np.random.Generator) -> Arch:
        """One architecture, uniform over every layer's legal ops."""
        return Arch.of(self.sample_block(b, 1, rng)[0] for b in range(len(self.blocks)))

    # ---- validation and conversion ------------------------------------------------------
    def validate(self, arch: Arch) -> None:
        """Raises ValueError naming the block, the layer and the reason if `arch` is illegal."""
        if len(arch.blocks) != len(self.blocks):
            raise ValueError(f"space {self.name!r} has {len(self.blocks)} blocks, "
                             f"the architecture has {len(arch.blocks)}")
        for b, (ops, block) in enumerate(zip(arch.blocks, self.blocks)):
            if len(ops) != block.num_layers:
                raise ValueError(f"block {b} ({block.name}) has {block.num_layers} searchable "
                                 f"layers, the architecture gives {len(ops)}")
            for l, op in enumerate(ops):
                legal = self.layer_choices(b, l)
                if op in legal:
                    continue
                if op == self.skip_index:
                    in_ch, out_ch, stride = self.layer_io(b, l)
                    reason = ("this block does not allow skip ops" if not block.allow_skip else
                              f"a skip op needs stride 1 and equal channels, but the layer has "
                              f"stride {stride} and {in_ch} -> {out_ch} channels")
                elif block.fixed_ops is not None:
                    reason = f"the block is fixed to ops {block.fixed_ops}"
                else:
                    reason = (f"op index {op} is out of range (legal: "
                              f"{', '.join(map(str, legal))})")
                raise ValueError(f"block {b} ({block.name}), layer {l}: {reason}")

    def to_network_spec(self, arch: Arch, name: str = "child") -> NetworkSpec:
        """The child network of an architecture (skip ops removed, hidden widths)."""
        self.validate(arch)
        stages = [(self.first_layer,)]
        for b, ops in enumerate(arch.blocks):
            layers = []
            for l, op in enumerate(ops):
                if op == self.skip_index:
                    continue
                _, out_channels, stride = self.layer_io(b, l)
                layers.append(self.ops[op].layer(stride, out_channels))
            stages.append(tuple(layers))
        return NetworkSpec(name=name, stem_channels=self.stem_channels, stages=tuple(stages),
                           head_channels=self.head_channels, stem_stride=self.stem_stride)

    def arch_from_strings(self, stages: Sequence[Sequence[str]]) -> Arch:
        """Inverse of `to_network_spec(...).to_strings()`: timm block strings -> Arch.

        Blocks with fewer layers than `num_layers` are padded with skip ops (if allowed).
        """
        if len(stages) != len(self.blocks) + 1:
            raise ValueError(f"space {self.name!r} expects {len(self.blocks) + 1} stages "
                             f"(the fixed first stage, then one per block), got {len(stages)}")
        first = expand_stage(stages[0])
        if first != (self.first_layer,):
            raise ValueError(f"first stage {list(stages[0])} does not match the space's fixed "
                             f"first layer {self.first_layer.to_string()}")
        blocks = []
        for b, strings in enumerate(stages[1:]):
            block = self.blocks[b]
            layers = expand_stage(strings)
            if len(layers) > block.num_layers:
                raise ValueError(f"block {b} ({block.name}): {len(layers)} layers given, at most "
                                 f"{block.num_layers}")
            ops = []
            for l, layer in enumerate(layers):
                _, out_channels, stride = self.layer_io(b, l)
                if layer.out_channels != out_channels or layer.stride != stride:
                    raise ValueError(f"block {b} ({block.name}), layer {l}: expected c"
                                     f"{out_channels} s{stride}, got {layer.to_string()}")
                matches = [i for i, op in enumerate(self.ops)
                           if op.layer(stride, out_channels) == layer]
                if not matches:
                    raise ValueError(f"block {b} ({block.name}), layer {l}: {layer.to_string()} "
                                     f"is not one of the space's ops")
                ops.append(matches[0])
            ops += [self.skip_index] * (block.num_layers - len(layers))
            blocks.append(tuple(ops))
        arch = Arch(tuple(blocks))
        self.validate(arch)
        return arch

    def describe(self) -> dict:
        return {
            "name": self.name, "size": self.size(), "resolution": self.resolution,
            "ops": [op.name for op in self.ops],
            "blocks": [{"name": b.name, "layers": b.num_layers, "hidden": b.hidden_channels,
                        "teacher_channels": b.out_channels, "stride": b.stride,
                        "teacher_stage": b.teacher_stage, "skip": b.allow_skip,
                        "candidates": self.block_size(i)} for i, b in enumerate(self.blocks)],
        }


def align_space(space: SearchSpace, teacher: NetworkSpec) -> SearchSpace:
    """`space` with its blocks re-aligned to the stages of `teacher` (DNA+ rounds).

    The rule generalises the presets' tables (e.g. `small` with `fmnist_teacher`, the paper's
    spaces with EfficientNet-B7): the B blocks are supervised by the teacher's LAST B stages,
    one block per stage (block k by stage S - B + k of S), so each block's input is the
    previous block's teacher stage and block 0 also covers the teacher's stem and earlier
    stages through the student's own stem and first layer. From the teacher's architecture
    each block takes
      out_channels:  the supervising stage's output width (the supernet's last layer maps to
                     it; the child network keeps the space's `hidden_channels`),
      stride:        the stage's change of resolution (block 0: the teacher's cumulative
                     stride at its stage over the student's stem and first layer),
      teacher_stage: the stage index,
    so the supernet's block outputs have the teacher features' width and resolution. The
    space keeps its name when the child networks are unchanged (same strides).

    Raises:
      ValueError: the teacher has too few stages, or a stage changes the resolution by a
        factor other than 1 or 2 (naming the block and the stage).
    """
    num_blocks, num_stages = len(space.blocks), len(teacher.stages)
    first = num_stages - num_blocks
    if first < 1:
        raise ValueError(f"space {space.name!r} has {num_blocks} blocks: it needs a teacher with "
                         f"at least {num_blocks + 1} stages, teacher {teacher.name!r} has "
                         f"{num_stages}")
    cumulative = teacher.stage_strides()
    widths = teacher.stage_channels
    before = space.stem_stride * space.first_layer.stride
    blocks = []
    for k, block in enumerate(space.blocks):
        stage = first + k
        previous = before if k == 0 else cumulative[stage - 1]
        stride, remainder = divmod(cumulative[stage], previous)
        if remainder or stride not in (1, 2):
            raise ValueError(
                f"block {k} ({block.name}) would be aligned with teacher {teacher.name!r} stage "
                f"{stage} (cumulative stride {cumulative[stage]}), which is "
                f"{cumulative[stage] / previous:g}x the resolution step of the block's input "
                f"(stride {previous}); a block's stride must be 1 or 2")
        blocks.append(dataclasses.replace(block, out_channels=widths[stage], stride=stride,
                                          teacher_stage=stage))
    if tuple(blocks) == space.blocks:
        return space
    same_children = all(a.stride == b.stride for a, b in zip(blocks, space.blocks))
    return dataclasses.replace(
        space, blocks=tuple(blocks),
        name=space.name if same_children else f"{space.name}@{teacher.name}",
        description=(f"{space.description}; blocks aligned with teacher {teacher.name!r} "
                     f"stages {first}..{num_stages - 1}"))


def _blocks(depths, hidden, teacher, strides, allow_skip, teacher_stage_offset=1):
    return tuple(BlockSpec(name=f"block{i}", num_layers=d, hidden_channels=h, out_channels=t,
                           stride=s, teacher_stage=i + teacher_stage_offset, allow_skip=allow_skip)
                 for i, (d, h, t, s) in enumerate(zip(depths, hidden, teacher, strides)))


_HIDDEN = (24, 40, 80, 112, 192, 320)
_B7_WIDTHS = (48, 80, 160, 224, 384, 640)
_STRIDES = (2, 2, 2, 1, 2, 1)

PRESETS = {
    # The paper's count: maxima [3,4,4,4,5,1], first layer of a block 6 ops, others 6 + skip:
    # 6^6 x 7^15 = 2.2e17 architectures (REFERENCE.md section 1).
    "dna_paper": lambda: SearchSpace(
        name="dna_paper", blocks=_blocks((3, 4, 4, 4, 5, 1), _HIDDEN, _B7_WIDTHS, _STRIDES, True),
        description="DNA paper MBConv space, depth search by skip ops (6^6 x 7^15)"),
    # The released code's default: [2,4,4,4,4,1] layers, no skip: 6^19 architectures.
    "dna_released": lambda: SearchSpace(
        name="dna_released",
        blocks=_blocks((2, 4, 4, 4, 4, 1), _HIDDEN, _B7_WIDTHS, _STRIDES, False),
        description="DNA released-code default space (6^19)"),
    # Small images (28-32 px): stride-2 stem, aligned to the zoo's `fmnist_teacher` stages.
    "small": lambda: SearchSpace(
        name="small",
        blocks=_blocks((2, 2, 2, 1), (16, 24, 48, 64), (24, 40, 80, 96), (2, 2, 2, 1), False),
        stem_channels=16, stem_stride=2, first_layer=LayerSpec("ds", 3, 1, 1, 8, 0.25),
        head_channels=320, resolution=32,
        description="small space for 28-32 px images, aligned with zoo 'fmnist_teacher'"),
    # Native 28 px Fashion-MNIST where architectures really differ (issue 19): stride-2 stem to
    # 14 px, every searched layer's input at least 7x7 (so 3/5/7 kernels are distinct
    # functions: at 7x7 a 7x7 kernel reaches the whole map from the centre, a 5x5 does not),
    # 3 layers per block with the identity op after each block's first layer (depth 1-3 per
    # block) and expansion 3 or 6: 294 candidates per block, 294^3 = 25.4M networks whose
    # multiply-adds span ~7x (0.96M-7.1M at 28 px). Block 0 takes the 14 px map to 7 px,
    # blocks 1-2 stay at 7 px (widths 16/24/40, so 2 CPU cores can train the ground truth).
    # Aligned with the zoo's `fmnist28_teacher` (stages 1..3, all at 7 px, widths 24/32/48).
    "fmnist28": lambda: SearchSpace(
        name="fmnist28",
        blocks=_blocks((3, 3, 3), (16, 24, 40), (24, 32, 48), (2, 1, 1), True),
        stem_channels=16, stem_stride=2, first_layer=LayerSpec("ds", 3, 1, 1, 8, 0.25),
        head_channels=192, resolution=28,
        description="28 px space, depth (skip) and kernel/expansion choices, every searched "
                    "layer at >= 7x7; aligned with zoo 'fmnist28_teacher'"),
    # Seconds-long end-to-end tests: two blocks of two MBConv3 ops, aligned with 'tiny_teacher'.
    "tiny": lambda: SearchSpace(
        name="tiny",
        blocks=_blocks((1, 2), (12, 16), (16, 24), (2, 2), False),
        ops=(OpSpec("mb3_k3", 3, 3), OpSpec("mb3_k5", 5, 3)),
        stem_channels=8, stem_stride=1, first_layer=LayerSpec("ds", 3, 1, 1, 8, 0.25),
        head_channels=32, resolution=16,
        description="tiny test space (2 ops, 2 + 4 candidates), aligned with 'tiny_teacher'"),
}


def get_space(name: str) -> SearchSpace:
    """A preset search space by name; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown search space {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
