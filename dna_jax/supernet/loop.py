"""The step loop of supernet training: phases, ahead-of-time compiles, resume, logging, the
NaN stop, checkpoint cadence and preemption. A supervision kind supplies the compiled step and
a few names; everything that decides when to log, save or stop lives here once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dna_jax import artifacts
from dna_jax import checkpoint as checkpoint_lib
from dna_jax import files
from dna_jax import metrics as metrics_lib
from dna_jax.compile_options import compile_lowered
from dna_jax.errors import NonFiniteLossError
from dna_jax.supernet.paths import SAMPLINGS, block_name

PyTree = Any
CHECKPOINT_SUBDIR = "checkpoints"
FIGURES_FILE = "figures.json"


@dataclasses.dataclass(frozen=True)
class Phase:
    """A run of global steps [start, stop) training the blocks `active` (one compiled step)."""

    active: tuple[int, ...]
    start: int
    stop: int


def make_phases(schedule: str, num_blocks: int, steps_per_block: int) -> list[Phase]:
    """'all_blocks': one phase of every block; 'sequential': block 0, then block 1, ..."""
    if schedule == "all_blocks":
        return [Phase(tuple(range(num_blocks)), 0, steps_per_block)]
    return [Phase((k,), k * steps_per_block, (k + 1) * steps_per_block)
            for k in range(num_blocks)]


def checker(config: Any, section: str) -> Callable[[bool, str, str], None]:
    """`need(ok, field, what)`: raises ValueError naming `<section>.<field>` and its value."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{section}.{field} {what}, got {config[field]!r}")
    return need


def check_loop_config(config: Any, section: str, schedules: Sequence[str]
                      ) -> Callable[[bool, str, str], None]:
    """Checks the loop's fields of a kind's section (schedule, sampling, length, learning
    rates, logging, checkpoints); returns its `need` for the kind's own fields."""
    need = checker(config, section)
    need(config.schedule in schedules, "schedule", f"must be one of {tuple(schedules)}")
    need(config.sampling in SAMPLINGS, "sampling", f"must be one of {SAMPLINGS}")
    need(config.num_steps >= 0, "num_steps", "must be >= 0 (0 = use num_epochs)")
    need(config.num_steps > 0 or config.num_epochs > 0, "num_epochs",
         f"must be > 0 when {section}.num_steps is 0")
    need(config.steps_per_epoch >= 0, "steps_per_epoch", "must be >= 0 (0 = the dataset's)")
    need(all(lr > 0 for lr in config.learning_rates), "learning_rates", "must all be > 0")
    need(config.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0")
    need(config.log_every_steps >= 1, "log_every_steps", "must be >= 1")
    need(config.max_checkpoints >= 1, "max_checkpoints", "must be >= 1")
    return need


# ---- compiles (cached on the trainer: its `compiled` dict) ---------------------------------


def memoised(cache: dict, key: Any, build: Callable[[], Any], max_size: int = 8) -> Any:
    """`cache[key]`, built on first use: equal configs give the same trainer object, so its
    compiled steps serve every run of a process (on 2 CPU cores a compile takes minutes)."""
    if key not in cache:
        if len(cache) >= max_size:
            cache.pop(next(iter(cache)))
        cache[key] = build()
    return cache[key]


def jit_sharded(fn: Callable, mesh: Mesh, layout: str, donate: bool = False) -> Callable:
    """`jax.jit(fn)` with argument i split over the batch (layout[i] == 'b', over every mesh
    axis) or replicated ('r'), outputs replicated; `donate` donates argument 0 (the state)."""
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    return jax.jit(fn, in_shardings=tuple(batch if c == "b" else replicated for c in layout),
                   out_shardings=replicated, donate_argnums=(0,) if donate else ())


def init_state(trainer: Any, seed: int, image_shape: Sequence[int], mesh: Mesh) -> Any:
    """`trainer.init(key, image_shape)` replicated on `mesh`, jitted with cheap options.

    Initialisation runs once; eager Flax init compiles every primitive separately (minutes on
    2 CPU cores), and a fully optimised compile is slower than the cheap one.
    """
    cache_key = ("init", mesh, tuple(image_shape))
    if cache_key not in trainer.compiled:
        init = jax.jit(lambda key: trainer.init(key, image_shape),
                       out_shardings=NamedSharding(mesh, P()))
        trainer.compiled[cache_key] = compile_lowered(init.lower(jax.random.key(seed)))
    return trainer.compiled[cache_key](jax.random.key(seed))


def compile_step(trainer: Any, cache_key: tuple, make_step: Callable[[], Any],
                 args: Sequence[Any], fast: bool = False) -> Callable:
    """`make_step()` (a jitted step) compiled ahead of time for `args`, once per cache key.

    Compiling ahead keeps compile time out of the timing and out of the first step.
    """
    if cache_key not in trainer.compiled:
        trainer.compiled[cache_key] = compile_lowered(make_step().lower(*args), fast)
    return trainer.compiled[cache_key]


# ---- checkpoints and history ------------------------------------------------------------


def checkpoint_tree(state: Any) -> Any:
    """The state as Orbax stores it: the typed key `rng` as its raw uint32 data."""
    return state.replace(rng=jax.random.key_data(state.rng))


def state_from_checkpoint(tree: Any) -> Any:
    return tree.replace(rng=jax.random.wrap_key_data(tree.rng))


def resume(checkpointer: checkpoint_lib.Checkpointer, state: Any, what: str) -> tuple[Any, int]:
    """(the newest usable checkpoint's state and step, or (state, 0)); a checkpoint that does
    not restore or holds NaN/inf is set aside (`Checkpointer.restore_latest_good`)."""
    if checkpointer.latest_step():
        tree, good = checkpointer.restore_latest_good(checkpoint_tree(state))
        if good:
            logging.info("Resumed %s from step %d.", what, good)
            return state_from_checkpoint(tree), good
    return state, 0


class History:
    """Per-run records kept in workdir, so a resumed run reports them all: 'train' and the
    kind's own keys; list entries newer than the resume step are dropped."""

    def __init__(self, path: str, resume_step: int, **fields: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {"train": [], **fields}
        if resume_step and files.exists(path):
            saved = artifacts.read_json(path)
            for key, value in self.data.items():
                value = saved.get(key, value)
                self.data[key] = ([r for r in value if r["step"] <= resume_step]
                                  if isinstance(value, list) else value)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def save(self) -> None:
        metrics_lib.write_json(self.path, self.data)


# ---- the loop ---------------------------------------------------------------------------


@dataclasses.dataclass
class StepLoop:
    """What the step loop carries besides the state.

    Attributes:
      checkpointer, writer, history: where checkpoints, scalars and records go.
      total_steps: the run's last global step.
      config: the kind's section (log_every_steps, checkpoint_every_steps, learning_rates).
      section: its name in messages ('distill', 'ssl').
      what: the training in messages ('distillation', 'DNA++ training').
      loss_name, nan_hint: the NaN stop's message parts.
      mean_keys / last_keys: per-block step metrics logged as window means / last values.
      record: (step, {block name: {key: value}}) -> the history record of a window.
      save_at_phase_end: also checkpoint when a phase ends (a sequential schedule that acts
        between blocks).
      after_step: (step, state) -> None, between logging and saving (e.g. validation); its
        time does not count as training time.
    """

    checkpointer: checkpoint_lib.Checkpointer
    writer: Any
    history: History
    total_steps: int
    config: Any
    section: str
    what: str
    loss_name: str
    nan_hint: str
    mean_keys: tuple[str, ...]
    last_keys: tuple[str, ...]
    record: Callable[[int, dict[str, dict[str, float]]], dict]
    save_at_phase_end: bool = False
    after_step: Callable[[int, Any], None] | None = None
    last_good: int | None = None
    pending: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    hook_seconds: float = 0.0
    progress: Any = None

    def flush(self) -> None:
        """Fetches pending step metrics, stops on NaN/inf, writes per-block window means."""
        if not self.pending:
            return
        fetched = jax.device_get([metrics for _, _, metrics in self.pending])
        for (step, active, _), metrics in zip(self.pending, fetched):
            for position, k in enumerate(active):
                value = float(metrics["loss"][position])
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"{self.loss_name} of block {k} (block{k}) is {value} at step {step}; "
                        "the last good checkpoint is "
                        f"{'none' if self.last_good is None else f'step {self.last_good}'} in "
                        f"{self.checkpointer.directory} ({self.nan_hint})")
        step, active, _ = self.pending[-1]
        scalars, per_block = {}, {}
        for position, k in enumerate(active):
            name = block_name(k)
            values = {key: float(np.mean([m[key][position] for m in fetched]))
                      for key in self.mean_keys}
            values.update({key: float(fetched[-1][key][position]) for key in self.last_keys})
            scalars.update({f"train/{name}/{key}": v for key, v in values.items()})
            per_block[name] = values
        self.writer.write_scalars(step, scalars)
        self.history["train"].append(self.record(step, per_block))
        self.pending.clear()

    def save(self, step: int, state: Any) -> None:
        """Checkpoints `state` unless it holds NaN/inf (NonFiniteLossError naming the last
        good one)."""
        try:
            self.checkpointer.save(step, checkpoint_tree(state), force=True)
        except checkpoint_lib.NonFiniteStateError as error:
            raise NonFiniteLossError(
                f"{self.what} made the supernet non-finite at step {step} (the losses were "
                f"finite): {error} Lower {self.section}.learning_rates; a rerun with the fixed "
                "config resumes from the last good checkpoint (dna-jax run: add "
                "--config.on_change=resume).") from error

    def _after(self, step: int, phase: Phase, state: Any) -> None:
        """Logging, the NaN check, the hook and checkpointing due after `step`."""
        every = self.config.checkpoint_every_steps
        save_due = (step == self.total_steps or (self.save_at_phase_end and step == phase.stop)
                    or bool(every and step % every == 0))
        if save_due or step == phase.stop or step % self.config.log_every_steps == 0:
            self.flush()
        if self.after_step is not None:
            watch = metrics_lib.Stopwatch()
            self.after_step(step, state)
            self.hook_seconds += watch.elapsed()
        if save_due:
            self.save(step, state)
            self.history.save()
            self.last_good = step
        elif self.checkpointer.reached_preemption(step):
            self.flush()
            self.save(step, state)
            self.checkpointer.wait()
            self.history.save()
            raise SystemExit(f"Preempted at step {step}; checkpoint saved, rerun to resume.")

    def run_phase(self, phase: Phase, compile_fn: Callable[[], Callable], state: Any,
                  train_data: Any, start_step: int) -> Any:
        """Runs the phase's steps after `start_step` (none if it ended before).

        `compile_fn()` gives `step_fn(state, batch) -> (state, metrics)` (metrics: per active
        block 'loss' and the logged keys); its time counts as compile time.
        """
        if phase.stop <= start_step:
            return state
        watch = metrics_lib.Stopwatch()
        step_fn = compile_fn()
        self.compile_seconds += watch.elapsed()
        if self.progress is None:
            self.progress = metrics_lib.report_progress(self.total_steps, self.writer)
        first = max(phase.start, start_step)
        batches = train_data.global_batches(first)
        watch = metrics_lib.Stopwatch()
        try:
            with checkpoint_lib.stop_on_sigterm():
                for step in range(first + 1, phase.stop + 1):
                    state, metrics = step_fn(state, next(batches))
                    self.pending.append((step, phase.active, metrics))
                    self.progress(step)
                    self._after(step, phase, state)
            jax.block_until_ready(state)
        finally:
            self.train_seconds += watch.elapsed()
            batches.close()
        return state

    def close(self) -> None:
        self.checkpointer.close()
        self.writer.flush()

    def figures(self, info: Any, mesh: Mesh, start_step: int, wall_seconds: float
                ) -> dict[str, Any]:
        """The figures every kind reports: steps, throughput, time, where checkpoints are."""
        train_seconds = max(self.train_seconds - self.hook_seconds, 1e-9)
        steps_run = self.total_steps - start_step
        return {
            "steps": self.total_steps, "steps_this_run": steps_run,
            "resumed_from_step": start_step, "global_batch_size": info.global_batch_size,
            "devices": int(mesh.devices.size),
            "images_per_s": (steps_run * info.global_batch_size / train_seconds
                             if steps_run else 0.0),
            "train_time_s": train_seconds, "compile_time_s": self.compile_seconds,
            "wall_time_s": wall_seconds, "checkpoint_dir": self.checkpointer.directory,
        }


def start_loop(workdir: str, config: Any, state: Any, total_steps: int, history_file: str,
               history_fields: dict[str, Any], **kwargs: Any) -> tuple[StepLoop, Any, int]:
    """(the loop, the state resumed from workdir/checkpoints if any, the step it resumed
    from); `kwargs` are StepLoop's naming and logging fields."""
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, CHECKPOINT_SUBDIR),
        save_every_steps=config.checkpoint_every_steps or total_steps,
        keep=config.max_checkpoints)
    state, start_step = resume(checkpointer, state, kwargs["what"])
    history = History(os.path.join(workdir, history_file), start_step, **history_fields)
    loop = StepLoop(checkpointer, metrics_lib.create_writer(workdir), history, total_steps,
                    config, last_good=start_step or None, **kwargs)
    return loop, state, start_step
