"""DNA++'s run: the supernet kit's step loop around `ssl.SelfSupervised`'s step.

'sequential' training chooses, when block k's training ends, the path of block k that feeds
block k + 1 (`rate_block`, e.g. `ssl_rating.make_block_rater`); the choice is kept in the run's
history, so a resumed run does not rate again.

Artifacts: `supernet/` the online blocks in DNA's format ({'block<k>': {'params',
'batch_stats'}}, what retraining can inherit) and `ssl_variables/` the target blocks and the
heads ({'online_heads', 'target'}), both through the kit's `artifact.save_supernet`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import metrics as metrics_lib
from dna_jax import sharding as sharding_lib
from dna_jax.space import SearchSpace
from dna_jax.ssl import LOGGED, SelfSupervised, SSLState, make_trainer
from dna_jax.supernet import artifact as artifact_lib
from dna_jax.supernet import loop as loop_lib

HISTORY_FILE = "ssl_history.json"


def compile_train_step(trainer: SelfSupervised, mesh: Mesh, phase: loop_lib.Phase,
                       state: SSLState, views_shape: Sequence[int]) -> Callable:
    """The phase's step compiled ahead (once per trainer, mesh, phase and shape)."""
    num_prefix = phase.active[0] if trainer.schedule == "sequential" else 0
    views = jax.ShapeDtypeStruct(tuple(views_shape), jnp.float32,
                                 sharding=sharding_lib.batch_sharding(mesh))
    prefix = tuple(jax.ShapeDtypeStruct((trainer.blocks[j].num_layers,), jnp.int32,
                                        sharding=NamedSharding(mesh, P()))
                   for j in range(num_prefix))
    return loop_lib.compile_step(trainer, ("train", mesh, phase, tuple(views_shape)),
                                 lambda: trainer.jit_train_step(mesh, phase),
                                 (state, views, prefix), fast=trainer.fast_compile)


# ---- the loop ----------------------------------------------------------------------------------


def train_ssl_supernet(config: Any, train_data: Any, workdir: str, mesh: Mesh | None = None,
                       space: SearchSpace | None = None,
                       rate_block: Callable[[SelfSupervised, int, SSLState, list], list[int]]
                       | None = None) -> tuple[SSLState, list[list[int]], dict]:
    """Trains the supernet blocks by self-supervision; resumes from workdir/checkpoints.

    Args:
      config: the `ssl` section (see `ssl.get_default_config`).
      train_data: a multi-view Dataset (`dna_jax.data.views.make_view_dataset`) with
        2 * num_paths views per image.
      workdir: checkpoints, TensorBoard events, ssl_history.json, figures.json.
      mesh: the device mesh (default: every device on one 'data' axis).
      space: the search space (default: `get_space(config.space)`).
      rate_block: 'sequential' only: `(trainer, k, state, chosen paths of blocks < k) ->
        best path of block k`, called when block k's training ends (see
        `ssl_rating.make_block_rater`); required for 'sequential' with more than one block.

    Returns:
      (final state, the chosen path of each block trained sequentially (op indices),
       figures: steps, per-block first/final loss, byol_loss, output_std, variance,
       covariance, wall and train time, images per second; also in workdir/figures.json).

    Raises:
      NonFiniteLossError: a loss became NaN/inf (the last good checkpoint is named).
    """
    watch = metrics_lib.Stopwatch()
    mesh = mesh or sharding_lib.make_mesh()
    info = train_data.info
    trainer = make_trainer(config, info.num_batches, space)
    views_shape = (info.global_batch_size, 2 * trainer.num_paths, *info.image_shape)
    loop, state, start_step = loop_lib.start_loop(
        workdir, config, loop_lib.init_state(trainer, config.seed, info.image_shape, mesh),
        trainer.total_steps, HISTORY_FILE, {"chosen_paths": {}}, section="ssl",
        what="DNA++ training", loss_name="SSL loss", nan_hint="lower ssl.learning_rates",
        mean_keys=LOGGED, last_keys=("lr", "momentum"),
        record=lambda step, means: {"step": step, **means}, save_at_phase_end=True)
    chosen: list[list[int]] = []
    try:
        with jax.set_mesh(mesh):
            for phase in trainer.phases():
                prefix = list(chosen) if trainer.schedule == "sequential" else []
                state = loop.run_phase(
                    phase, lambda phase=phase, prefix=prefix: _step_fn(
                        compile_train_step(trainer, mesh, phase, state, views_shape),
                        prefix, mesh), state, train_data, start_step)
                k = phase.active[0]
                if trainer.schedule == "sequential" and k < trainer.num_blocks - 1:
                    chosen.append(_chosen_path(loop, trainer, k, state, chosen, rate_block))
            loop.history.save()
    finally:
        loop.close()
    figures = _figures(loop, trainer, mesh, info, start_step, watch.elapsed())
    figures["chosen_paths"] = chosen
    metrics_lib.write_json(os.path.join(workdir, loop_lib.FIGURES_FILE), figures)
    return state, chosen, figures


def _step_fn(compiled: Callable, prefix: Sequence[Sequence[int]], mesh: Mesh) -> Callable:
    """`compiled(state, views, prefix paths)` as the loop's `step_fn(state, batch)`."""
    paths = tuple(jax.device_put(np.asarray(p, np.int32), NamedSharding(mesh, P()))
                  for p in prefix)
    return lambda state, batch: compiled(state, batch["views"], paths)


def _chosen_path(loop: loop_lib.StepLoop, trainer: SelfSupervised, k: int, state: SSLState,
                 chosen: list[list[int]], rate_block: Callable | None) -> list[int]:
    """Block k's path that feeds block k + 1: rated once, then read from the history."""
    saved = loop.history["chosen_paths"].get(str(k))
    if saved is None:
        if rate_block is None:
            raise ValueError("ssl.schedule='sequential' needs rate_block to choose each "
                             "block's path for the next block")
        saved = [int(o) for o in rate_block(trainer, k, state, list(chosen))]
        loop.history["chosen_paths"][str(k)] = saved
        loop.history.save()
    return saved


def _figures(loop: loop_lib.StepLoop, trainer: SelfSupervised, mesh: Mesh, info: Any,
             start_step: int, wall: float) -> dict[str, Any]:
    """Headline figures: per block the first and last logged window means."""
    names = trainer.names
    per_block: dict[str, dict[str, Any]] = {}
    for name in names:
        records = [r[name] for r in loop.history["train"] if name in r]
        if not records:
            continue
        per_block[name] = {f"{key}_{when}": records[index][key]
                           for key in LOGGED if key != "grad_norm"
                           for when, index in (("first", 0), ("final", -1))}
        per_block[name]["loss_ratio"] = (records[-1]["loss"] / records[0]["loss"]
                                         if records[0]["loss"] else None)
        per_block[name]["loss_curve"] = [[r["step"], r[name]["loss"]]
                                         for r in loop.history["train"] if name in r]
    return {
        **loop.figures(info, mesh, start_step, wall),
        "schedule": trainer.schedule, "space": trainer.space.name,
        "num_paths": trainer.num_paths, "blocks": per_block,
        "output_std_final": [per_block.get(n, {}).get("output_std_final") for n in names],
        "loss_final": [per_block.get(n, {}).get("loss_final") for n in names],
    }



# ---- the artifact ------------------------------------------------------------------------------

SUPERNET_DIR = "supernet"
SSL_VARIABLES_DIR = "ssl_variables"


def save_ssl_artifact(directory: str, state: SSLState) -> None:
    """`directory/supernet` (online blocks, DNA's format) and `directory/ssl_variables`."""
    artifact_lib.save_supernet(os.path.join(directory, SUPERNET_DIR), state.supernet_variables())
    artifact_lib.save_supernet(os.path.join(directory, SSL_VARIABLES_DIR), state.ssl_variables())


def abstract_state(trainer: SelfSupervised, image_shape: Sequence[int] = (64, 64, 3)) -> SSLState:
    return jax.eval_shape(lambda key: trainer.init(key, image_shape), jax.random.key(0))


def load_ssl_artifact(directory: str, trainer: SelfSupervised, mesh: Mesh | None = None
                      ) -> tuple[dict, dict]:
    """(supernet variables, ssl variables) written by `save_ssl_artifact`."""
    abstract = abstract_state(trainer)
    supernet = artifact_lib.load_supernet(os.path.join(directory, SUPERNET_DIR),
                                     abstract.supernet_variables(), mesh)
    extra = artifact_lib.load_supernet(os.path.join(directory, SSL_VARIABLES_DIR),
                                  abstract.ssl_variables(), mesh)
    return supernet, extra
