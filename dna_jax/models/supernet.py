"""Student supernet blocks: one `ChoiceLayer` (the weights of every candidate op) per layer.

A `SupernetBlock` runs one path, given as a traced int array of op indices, so a single
compilation serves every path (`nn.switch` executes the chosen branch only). It also exposes
`apply_op` (one op of one layer, static indices), the unit the prefix-sharing evaluator vmaps.
With `select_branches` every op of a layer runs and `lax.select_n` keeps the chosen one's
output: no conditional, so no collective nested in one (what a training step on a multi-device
XLA:CPU mesh needs, see `dna_jax.sharding.flat_collectives`).

Alignment with the teacher (REFERENCE.md section 2): block 0 starts from the image through the
student's stem and first layer; block k > 0 takes the teacher's output of stage
`teacher_stage - 1`. The first layer maps to the hidden width with the block's stride, middle
layers keep it, the last layer maps to the teacher's width (`out_channels`) so the block output
can be compared with the teacher stage output. A skip op is the identity where shapes allow;
where the supernet must change width (the last layer), it is a 1x1 conv + BN projection.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dna_jax.models.layers import ConvBN, LayerConfig, make_layer
from dna_jax.netspec import NetworkSpec
from dna_jax.space import SearchSpace


class SkipOp(nn.Module):
    """The identity op; a 1x1 conv + BN projection when channels or stride change."""

    in_channels: int
    out_channels: int
    stride: int
    config: LayerConfig = LayerConfig()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.in_channels == self.out_channels and self.stride == 1:
            return x
        return ConvBN(self.out_channels, 1, self.stride, act=False, config=self.config,
                      name="proj")(x, train)


class ChoiceLayer(nn.Module):
    """Every legal op of one searchable layer; `__call__` runs the op chosen by a traced index.

    Attributes:
      space, block_index, layer_index: which layer of which block.
      in_channels, out_channels, stride: the layer's shapes in the supernet.
      config: layer options.
      select_branches: run every op and select the chosen one's output instead of
        `nn.switch` (same output and gradients; every op's BatchNorm then sees the batch in
        training mode, so the caller keeps the statistics of the ops off the path:
        `dna_jax.supernet.update.keep_off_path_stats`).
    """

    space: SearchSpace
    block_index: int
    layer_index: int
    in_channels: int
    out_channels: int
    stride: int
    config: LayerConfig = LayerConfig()
    select_branches: bool = False

    @property
    def choices(self) -> tuple[int, ...]:
        return self.space.layer_choices(self.block_index, self.layer_index)

    def setup(self):
        branches = []
        for op in self.choices:
            if op == self.space.skip_index:
                branches.append(SkipOp(self.in_channels, self.out_channels, self.stride,
                                       self.config))
            else:
                spec = self.space.ops[op].layer(self.stride, self.out_channels)
                branches.append(make_layer(spec, self.in_channels, self.config))
        self.ops = branches

    def branch_of(self, op: int) -> int:
        """Position in `self.ops` of op index `op` (static)."""
        if op not in self.choices:
            raise ValueError(f"block {self.block_index}, layer {self.layer_index}: op {op} is "
                             f"not a legal choice {self.choices}")
        return self.choices.index(op)

    def apply_op(self, x: jax.Array, op: int, train: bool) -> jax.Array:
        return self.ops[self.branch_of(op)](x, train)

    def __call__(self, x: jax.Array, op: jax.Array, train: bool) -> jax.Array:
        if len(self.choices) == 1:
            return self.ops[0](x, train)
        # op index -> branch position (illegal indices map to branch 0; validate paths upstream).
        lookup = np.zeros(self.space.skip_index + 1, np.int32)
        for position, choice in enumerate(self.choices):
            lookup[choice] = position
        branch = jnp.asarray(lookup)[op]
        if self.is_initializing():
            # Create every branch's variables; the switch below only traces the one chosen.
            outputs = [module(x, train) for module in self.ops]
            return outputs[0]
        if self.select_branches:
            # The op's output is computed by every branch and picked by `select_n`, whose
            # gradient is zero for the branches not picked.
            return jax.lax.select_n(branch, *[module(x, train) for module in self.ops])
        # Each branch is rematerialised: under jax.grad a switch hands the residuals of every
        # branch to the backward pass, so without remat the taken branch also fills buffers for
        # the activations of all the others (profile of the B7 all-blocks step: 5,758 copies,
        # 230 ms). With remat the backward pass recomputes the taken branch's forward instead:
        # the demo's distillation step went from 206 to 132 ms (20 timed steps), same losses.
        branches = [nn.remat(lambda mdl, y, i=i: mdl.ops[i](y, train))
                    for i in range(len(self.ops))]
        return nn.switch(branch, branches, self, x)


class SupernetBlock(nn.Module):
    """The supernet version of one search-space block (see the module docstring).

    Attributes:
      space: the search space.
      block_index: which block.
      in_channels: channels of the block input (the teacher's previous stage); ignored for
        block 0, which starts from the image.
      config: layer options.
      select_branches: every ChoiceLayer runs all its ops and selects (see ChoiceLayer).
    """

    space: SearchSpace
    block_index: int
    in_channels: int
    config: LayerConfig = LayerConfig()
    select_branches: bool = False

    def setup(self):
        space, b = self.space, self.block_index
        block = space.blocks[b]
        if b == 0:
            self.stem = ConvBN(space.stem_channels, 3, space.stem_stride, config=self.config)
            self.first = make_layer(space.first_layer, space.stem_channels, self.config)
            channels = space.first_layer.out_channels
        else:
            channels = self.in_channels
        layers = []
        for l in range(block.num_layers):
            out = block.out_channels if l == block.num_layers - 1 else block.hidden_channels
            layers.append(ChoiceLayer(space, b, l, channels, out, block.stride if l == 0 else 1,
                                      self.config, self.select_branches))
            channels = out
        self.layers = layers

    @property
    def num_layers(self) -> int:
        return self.space.blocks[self.block_index].num_layers

    def prepare_input(self, x: jax.Array, train: bool) -> jax.Array:
        """Block 0: image -> student stem and first layer. Other blocks: unchanged."""
        if self.block_index == 0:
            return self.first(self.stem(x, train), train)
        return x

    def apply_op(self, x: jax.Array, layer: int, op: int, train: bool) -> jax.Array:
        """Runs op `op` of layer `layer` only (static ints): the evaluator's unit of work."""
        return self.layers[layer].apply_op(x, op, train)

    def __call__(self, x: jax.Array, choices: jax.Array, train: bool) -> jax.Array:
        """Runs the path `choices` (int [num_layers], may be traced)."""
        x = self.prepare_input(x, train)
        for l, layer in enumerate(self.layers):
            x = layer(x, choices[l], train)
        return x


def block_input_channels(space: SearchSpace, teacher: NetworkSpec) -> list[int]:
    """Channels entering each supernet block, checking the alignment with the teacher.

    Block k is supervised by teacher stage `teacher_stage` (whose width must equal the block's
    `out_channels`) and, for k > 0, fed by teacher stage `teacher_stage - 1`.

    Raises:
      ValueError: naming the block and the mismatching teacher stage.
    """
    widths = teacher.stage_channels
    inputs = []
    for k, block in enumerate(space.blocks):
        stage = block.teacher_stage
        if not 0 < stage < len(widths):
            raise ValueError(f"block {k} ({block.name}) is aligned with teacher stage {stage}, "
                             f"but teacher {teacher.name!r} has stages 0..{len(widths) - 1}")
        if widths[stage] != block.out_channels:
            raise ValueError(f"block {k} ({block.name}) outputs {block.out_channels} channels "
                             f"but teacher {teacher.name!r} stage {stage} has {widths[stage]}")
        inputs.append(3 if k == 0 else widths[stage - 1])
    return inputs


def build_supernet_blocks(space: SearchSpace, teacher: NetworkSpec,
                          config: LayerConfig | None = None) -> list[SupernetBlock]:
    """One SupernetBlock per search-space block, aligned with `teacher`'s stages."""
    config = config or LayerConfig()
    return [SupernetBlock(space, k, channels, config)
            for k, channels in enumerate(block_input_channels(space, teacher))]


def path_array(choices: Sequence[int]) -> jax.Array:
    return jnp.asarray(np.asarray(choices, np.int32))
