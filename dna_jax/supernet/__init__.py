"""The supernet-training kit shared by every supervision kind (DNA, DNA++, SPOS).

  paths     path sampling (uniform, fair), op groups, `BlockPaths` (a trainer's sampling)
  update    the masked per-op update (params, optimizer state, EMA untouched off-path),
            learning-rate-free optimizers, per-block values, schedules
  loop      phases, config checks, memoised trainers, ahead-of-time compiles, resume, the step
            loop (NaN stop naming block and step, checkpoint cadence, preemption), history
  artifact  the saved supernet (Orbax + shape manifest)

A new supervision kind (see distill.py, ssl.py + ssl_train.py) provides, in its own module:
  * a config section with the loop's fields (`loop.check_loop_config`) and its own;
  * a frozen dataclass trainer mixing in `paths.BlockPaths` (fields `space`, `blocks`,
    `sampling`, `optimizer` and a `compiled` dict), built through `loop.memoised`, with
    `init(key, image_shape) -> state` (a `flax.struct` state with `step` and `rng`; optimizer
    state per op from `update.init_op_states`) and a pure `train_step(..., active,
    start_step) -> (state, metrics)` that samples with `sample_branches`, updates with
    `update.masked_block_update` and returns per active block a 'loss' and the keys it logs;
  * its run: `loop.init_state`, `loop.start_loop` (resume, history), `loop.StepLoop.run_phase`
    over `loop.make_phases` with a step compiled by `loop.compile_step`, then
    `artifact.save_supernet`.
"""
