"""The masked per-op update and the schedules of supernet training.

Ops off the path must not move: their gradient is zero, but weight decay, Adam's moments and
an EMA target would still move them. So every op keeps its own optimizer state (one group per
op, `paths.op_groups`), and its parameter, optimizer-state and EMA updates are skipped unless
the op is on the path. Like PyTorch's Adam for a parameter without a gradient, an op's Adam
step count then advances only on the steps that train it; the optimizers are learning-rate
free and the scheduled rate (which follows the global step) multiplies their updates.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dna_jax.supernet.paths import group_branch, merge_groups, on_path, op_groups

PyTree = Any


def decay_mask(params: PyTree) -> PyTree:
    """True for the parameters weight decay applies to: kernels (rank >= 2), so BatchNorm /
    LayerNorm scales and biases are not decayed (the original's `add_weight_decay`)."""
    return jax.tree_util.tree_map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(name: str, weight_decay: float = 0.0,
                   kwargs: dict[str, Any] | None = None,
                   section: str = "distill") -> optax.GradientTransformation:
    """A learning-rate-free optax optimizer: `optax.<name>(learning_rate=1, **kwargs)`.

    `weight_decay` adds `weight_decay * param` to the gradient first (PyTorch's L2 decay), for
    kernels only (`decay_mask`).

    Raises:
      ValueError: for a name optax does not have (naming `<section>.optimizer`).
    """
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"{section}.optimizer: unknown optax optimizer {name!r} (e.g. 'adam', "
                         "'adamw', 'sgd', 'rmsprop', 'lion')")
    base = factory(learning_rate=1.0, **(kwargs or {}))
    if weight_decay:
        base = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), base)
    return base


def init_op_states(optimizer: optax.GradientTransformation, params: PyTree
                   ) -> dict[str, PyTree]:
    """{op group: optimizer state} of one block's (or network's) params."""
    return {group: optimizer.init(subtree) for group, subtree in op_groups(params).items()}


def optimizer_step(optimizer: optax.GradientTransformation, params: PyTree, grads: PyTree,
                   opt_state: PyTree, lr: jax.Array) -> tuple[PyTree, PyTree]:
    """One update of a learning-rate-free optimizer, scaled by the scheduled `lr`."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = jax.tree.map(lambda w, u: w + (lr * u).astype(w.dtype), params, updates)
    return params, opt_state


def masked_block_update(optimizer: optax.GradientTransformation,
                        choice_table: Sequence[Sequence[int]], params: PyTree, grads: PyTree,
                        opt_state: PyTree, branches: jax.Array, lr: jax.Array
                        ) -> tuple[PyTree, PyTree]:
    """Optimizer update of one supernet block in which ops off the path(s) keep their
    parameters and optimizer state bitwise (`lax.cond`: not even computed).

    Args:
      optimizer: learning-rate-free optax transformation, applied per op group.
      choice_table: legal op indices of each layer (a layer with one choice is always on).
      params, grads: the block's parameters and gradients.
      opt_state: {group name: optimizer state} (see `paths.op_groups`).
      branches: int [L] branch positions of the path, or [P, L] of P paths (an op moves
        if any path takes it).
      lr: the scheduled learning rate.
    """
    param_groups, grad_groups = op_groups(params), op_groups(grads)
    new_params, new_opt = {}, {}
    for group, group_params in param_groups.items():

        def update(operands):
            return optimizer_step(optimizer, *operands, lr)

        operands = (group_params, grad_groups[group], opt_state[group])
        where = group_branch(group)
        if where is None or len(choice_table[where[0]]) == 1:
            new_params[group], new_opt[group] = update(operands)
        else:
            new_params[group], new_opt[group] = jax.lax.cond(
                on_path(branches, *where), update, lambda o: (o[0], o[2]), operands)
    return merge_groups(new_params), new_opt


def ema(target: PyTree, online: PyTree, momentum: jax.Array) -> PyTree:
    return jax.tree.map(lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype),
                        target, online)


def masked_ema(choice_table: Sequence[np.ndarray], target: PyTree, online: PyTree,
               branches: jax.Array, momentum: jax.Array) -> PyTree:
    """EMA of one block's target weights; ops on none of the paths keep theirs bitwise."""
    target_groups, online_groups = op_groups(target), op_groups(online)
    new = {}
    for group, subtree in target_groups.items():
        updated = ema(subtree, online_groups[group], momentum)
        where = group_branch(group)
        if where is not None and len(choice_table[where[0]]) > 1:
            moved = on_path(branches, *where)
            updated = jax.tree.map(lambda u, t: jnp.where(moved, u, t), updated, subtree)
        new[group] = updated
    return merge_groups(new)


def keep_off_path_stats(choice_table: Sequence[np.ndarray], before: PyTree, after: PyTree,
                        branches: jax.Array) -> PyTree:
    """One block's BatchNorm statistics after a training forward, with those of the ops on
    none of the paths put back bitwise (`before`).

    Under `nn.switch` an op off the path does not run and its statistics do not move; with
    `select_branches` (multi-device XLA:CPU meshes, `sharding.flat_collectives`) every op runs
    on the batch, and this keeps the statistics of the ops that were not sampled, so both
    ways leave the same supernet. `branches`: int [L] or [P, L] (see `masked_block_update`).
    """
    before_groups, after_groups = op_groups(before), op_groups(after)
    kept = {}
    for group, subtree in after_groups.items():
        where = group_branch(group)
        if where is not None and len(choice_table[where[0]]) > 1:
            moved = on_path(branches, *where)
            subtree = jax.tree.map(lambda a, b: jnp.where(moved, a, b), subtree,
                                   before_groups[group])
        kept[group] = subtree
    return merge_groups(kept)


# ---- schedules ---------------------------------------------------------------------------


def per_block(values: Sequence[float], num_blocks: int, default: Sequence[float],
              field: str) -> tuple[float, ...]:
    """One value per block from a config list: `default` if empty, repeated if one.

    Raises:
      ValueError: any other length (naming `field`, e.g. 'distill.learning_rates').
    """
    values = tuple(float(v) for v in values) or tuple(default)
    if len(values) == 1:
        values = values * num_blocks
    if len(values) != num_blocks:
        raise ValueError(f"{field} has {len(values)} entries for {num_blocks} blocks "
                         "(give one per block, or one for all)")
    return values


def step_decay(base: float, decay: float, decay_steps: int, local_step: jax.Array
               ) -> jax.Array:
    """base x decay^(floor(step / decay_steps)) (DNA's schedule)."""
    periods = jnp.floor_divide(local_step, decay_steps).astype(jnp.float32)
    return base * jnp.power(jnp.float32(decay), periods)


def warmup_cosine(base: float, warmup_steps: int, total_steps: int, local_step: jax.Array
                  ) -> jax.Array:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    step = jnp.asarray(local_step, jnp.float32)
    warm = max(warmup_steps, 1)
    warmup = (step + 1.0) / warm
    decay_span = max(total_steps - warmup_steps, 1)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip((step - warmup_steps) / decay_span,
                                                    0.0, 1.0)))
    factor = jnp.where(step < warmup_steps, warmup, cosine)
    return base * factor


def momentum_schedule(base: float, step: jax.Array, total_steps: int) -> jax.Array:
    """BYOL's EMA momentum: base at step 0, rising to 1 at `total_steps` (cosine)."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
