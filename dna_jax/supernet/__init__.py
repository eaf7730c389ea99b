"""The supernet-training kit shared by every supervision kind (DNA, DNA++, SPOS).

  paths     path sampling (uniform, fair), op groups, the per-block mixin `BlockPaths`
  update    the masked per-op update (params, optimizer state, EMA untouched off-path),
            learning-rate-free optimizers, schedules
  loop      phases, ahead-of-time compiles, resume, the step loop (logging, NaN stop naming
            block and step, checkpoint cadence, preemption), history, common figures
  artifact  the saved supernet (Orbax + shape manifest)

A new supervision kind provides, in its own module:
  * a frozen dataclass trainer mixing in `paths.BlockPaths` (fields `space`, `blocks`,
    `sampling`, `optimizer` and a `compiled` dict for the cached compiles) with
    `init(key, image_shape) -> state` (a `flax.struct` state with `step`, `rng` and its
    arrays; op-group optimizer state from `paths.op_groups`) and a pure
    `train_step(state, batch..., active, start_step) -> (state, metrics)` that samples its
    paths with `sample_branches`, updates with `update.masked_block_update` and returns per
    active block a 'loss' and the keys it logs;
  * its loss and config section; the loop is `loop.StepLoop.run_phase` over
    `loop.make_phases`, with `loop.resume` before and `artifact.save_supernet` after.
"""
