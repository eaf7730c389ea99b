r"""Train-step throughput of a trainer config, split into input time and compute time.

    .venv/bin/python benchmarks/train_throughput.py --config configs/fashion_mnist_teacher.py \
        --steps 30 --warmup 3

Each measured step first builds the batch (host pipeline + `host_to_global`, waited on), then
runs the jitted train step and waits for it (`block_until_ready`), so the two parts are timed
separately. A run with a large `input_fraction` is input-bound: the training loop (which
overlaps input and compute with a prefetch thread) cannot go faster than the input. Any config
field can be overridden (`--config.data.batch_size=64`). The last output line is one JSON object
with the figures.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dna_jax import data as data_lib  # noqa: E402
from dna_jax import metrics as metrics_lib  # noqa: E402
from dna_jax import retrain  # noqa: E402
from dna_jax import sharding  # noqa: E402
from dna_jax.models import cpu_conv  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Trainer config (file.py[:arg]).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 30, "Measured train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Unmeasured steps after compilation.")


def _build(config):
    """Mesh, train dataset, compiled step and initial state for a trainer config."""
    mesh = sharding.mesh_from_config(config.mesh)
    dataset = data_lib.make_dataset(config.data, config.data.train_split, training=True,
                                    mesh=mesh, seed=config.seed)
    info = dataset.info
    total_steps = retrain.total_steps_for(config, info)
    model = retrain.build_model(config.model, info.num_classes)
    schedule = retrain.make_schedule(config, total_steps, info.num_batches)
    tx = retrain.make_optimizer(config.optimizer, schedule)
    state = retrain.create_train_state(model, tx, info.image_shape, mesh, config.seed)
    step_fn = retrain.jit_train_step(
        retrain.make_train_step(model, tx, schedule, label_smoothing=config.label_smoothing,
                                ema_decay=config.ema_decay, ema_warmup=config.ema_warmup,
                                conv_impl=config.model.conv_impl),
        state, mesh)
    return mesh, dataset, step_fn, state


def _timed_steps(mesh, host_batches, step_fn, state, rng, count):
    """Runs `count` steps; returns the state and per-step (input, compute) seconds."""
    input_s, compute_s = [], []
    for _ in range(count):
        start = time.perf_counter()
        batch = jax.block_until_ready(sharding.host_to_global(next(host_batches), mesh))
        ready = time.perf_counter()
        state, step_metrics = step_fn(state, batch, rng)
        jax.block_until_ready((state, step_metrics))
        input_s.append(ready - start)
        compute_s.append(time.perf_counter() - ready)
    return state, np.asarray(input_s), np.asarray(compute_s), step_metrics


def main(argv):
    del argv
    config = _CONFIG.value
    if _STEPS.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("--steps must be >= 1 and --warmup >= 0.")
    mesh, dataset, step_fn, state = _build(config)
    info = dataset.info
    rng = jax.random.key(config.seed + 1)
    host_batches = dataset.host_batches(0)
    first = sharding.host_to_global(next(host_batches), mesh)

    start = time.perf_counter()
    compiled = step_fn.lower(state, first, rng).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops_per_step = float((cost or {}).get("flops", 0.0))

    with jax.set_mesh(mesh):
        state, _, _, _ = _timed_steps(mesh, host_batches, compiled, state, rng, _WARMUP.value)
        state, input_s, compute_s, last = _timed_steps(mesh, host_batches, compiled, state,
                                                       rng, _STEPS.value)
    per_step = input_s + compute_s
    batch = info.global_batch_size
    figures = {
        "config_model": config.model.name,
        "conv_impl": cpu_conv.resolve(config.model.conv_impl),
        "global_batch_size": batch,
        "image_shape": list(info.image_shape),
        "devices": mesh.devices.size,
        "steps": _STEPS.value,
        "warmup": _WARMUP.value,
        "compile_s": compile_s,
        "input_seconds_per_step": float(np.mean(input_s)),
        "compute_seconds_per_step": float(np.mean(compute_s)),
        "compute_seconds_per_step_median": float(np.median(compute_s)),
        "input_fraction": float(np.sum(input_s) / np.sum(per_step)),
        "images_per_s": float(batch * len(per_step) / np.sum(per_step)),
        "compute_images_per_s": float(batch * len(compute_s) / np.sum(compute_s)),
        "input_images_per_s": float(batch * len(input_s) / max(np.sum(input_s), 1e-9)),
        "flops_per_step": flops_per_step,
        "gflops_per_s": flops_per_step * len(compute_s) / np.sum(compute_s) / 1e9,
        "final_loss": float(jax.device_get(last["loss"])),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
    }
    print(f"{figures['images_per_s']:.1f} images/s end to end; "
          f"input {figures['input_seconds_per_step'] * 1e3:.1f} ms/step, "
          f"compute {figures['compute_seconds_per_step'] * 1e3:.1f} ms/step "
          f"(input fraction {figures['input_fraction']:.2f}).")
    print(metrics_lib.final_line(figures), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
