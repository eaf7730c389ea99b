"""Throughput of DNA distillation: the all-blocks step against the original sequential schedule.

Both schedules use the same step function (`dna_jax.distill`) on the same random-weight teacher
and supernet. The all-blocks step runs the teacher once and trains every block; the sequential
schedule (the original's) trains one block per step, each with its own teacher forward up to
the stage that block needs. One image through every block costs one all-blocks step, or one
step of each block in turn, so

    all_blocks_images_per_s = B / t_all,  sequential_images_per_s = B / sum_k t_k.

Compilation (once per schedule phase) is excluded from the timing. FLOPs per step come from
XLA's cost analysis of the compiled steps; it counts every branch of the path switches and of
the masked-update conds, not only the branch taken, so it overstates the work the student
blocks do (6x for the searchable layers): read the FLOP figures as an upper bound. The model
FLOPs (`model_flops_per_step`, what MFU is computed from) are analytic instead: 2 x batch x
(the teacher's multiply-adds up to the last stage the step needs + 3 x the mean path's
multiply-adds of every trained block: forward, and a backward of twice the forward).

`--dtype bfloat16` computes the teacher and the student blocks in bfloat16 (`distill.dtype`,
`distill.teacher_dtype`; parameters stay float32).

Run:
    .venv/bin/python benchmarks/distill_throughput.py --resolution 128 --batch-size 8

Measured on 2 idle CPU cores (README, results): all-blocks 5.10 images/s, sequential 3.37,
ratio 1.51 (2.30 in FLOPs). `--conv-impl xla` times XLA:CPU's own convolutions, with which the
teacher dominates and the ratio was 2.88 at 0.149 images/s (an earlier, loaded measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dna_jax import distill, sharding  # noqa: E402
from dna_jax.supernet import loop as loop_lib  # noqa: E402
from dna_jax.supernet.paths import DTYPES  # noqa: E402
from dna_jax.costs import block_op_cost_table, layer_costs, network_costs, stem_costs  # noqa: E402
from dna_jax.netspec import NetworkSpec  # noqa: E402
from dna_jax.models import cpu_conv, zoo  # noqa: E402
from dna_jax.models.initialize import init_variables  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per schedule phase")
    parser.add_argument("--space", default="dna_released", help="dna_released | dna_paper")
    parser.add_argument("--teacher", default="efficientnet_b7")
    parser.add_argument("--conv-impl", default="auto", choices=cpu_conv.CONV_IMPLS,
                        help="distill.conv_impl ('auto' = taps on CPU)")
    parser.add_argument("--all-blocks-only", action="store_true",
                        help="time only the all-blocks step (sequential figures null)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                        help="compute dtype of the teacher and the student blocks")
    args = parser.parse_args(argv)
    if args.resolution < 32 or args.batch_size < 1 or args.steps < 1:
        parser.error("need --resolution >= 32, --batch-size >= 1, --steps >= 1")
    return args


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled step from XLA's cost analysis (0 if unavailable)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def model_flops_per_step(distiller, active, batch_size: int, resolution: int) -> float:
    """Analytic FLOPs of one training step of the `active` blocks (see the module docstring).

    The student's mean path averages each layer's multiply-adds over its legal ops (a skip op
    costs nothing); block 0 also runs the fixed stem and first layer.
    """
    space = distiller.space
    stop = distiller.teacher_stop(active)
    parts = network_costs(distiller.teacher.spec, resolution, num_classes=0).parts
    teacher = parts["stem"].macs + sum(parts[f"stage{s}"].macs for s in range(stop))
    student = 0.0
    for k in active:
        table = block_op_cost_table(space, k, resolution)[..., 1]  # macs [L, K + 1]
        student += sum(float(np.mean(table[l, choices]))
                       for l, choices in enumerate(distiller.choice_table(k)))
        if k == 0:
            stem_spec = NetworkSpec(name="stem", stem_channels=space.stem_channels,
                                    stages=((space.first_layer,),), head_channels=1,
                                    stem_stride=space.stem_stride)
            stem, size = stem_costs(stem_spec, resolution)
            first, _ = layer_costs(space.first_layer, space.stem_channels, size)
            student += stem.macs + first.macs
    return 2.0 * batch_size * (teacher + 3.0 * student)


def time_steps(compiled, state, teacher_variables, images, steps: int):
    """(seconds per step after one warm-up step, final state)."""
    state, metrics = compiled(state, teacher_variables, images)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, teacher_variables, images)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / steps, state


def main(argv=None) -> dict:
    args = parse_args(argv)
    mesh = sharding.make_mesh()
    shape = (args.resolution, args.resolution, 3)
    teacher = zoo.get_model(args.teacher, num_classes=0)
    watch = time.perf_counter()
    teacher_variables = init_variables(teacher, jax.random.key(0), jnp.zeros((1, *shape)),
                                       train=False)
    teacher_variables = jax.device_put(teacher_variables, sharding.replicated(mesh))
    config = distill.get_default_config()
    config.space = args.space
    config.conv_impl = args.conv_impl
    config.dtype = config.teacher_dtype = args.dtype
    distiller = distill.make_distiller(config, teacher, steps_per_epoch=1000)
    state = loop_lib.init_state(distiller, 0, shape, mesh)
    print(f"init (teacher + supernet): {time.perf_counter() - watch:.1f} s", flush=True)
    images = jax.device_put(
        np.random.default_rng(0).standard_normal((args.batch_size, *shape), np.float32),
        sharding.batch_sharding(mesh))
    batch_shape = images.shape
    phases = {"all_blocks": loop_lib.Phase(tuple(range(distiller.num_blocks)), 0, 1)}
    if not args.all_blocks_only:
        phases.update({f"block{k}": loop_lib.Phase((k,), 0, 1)
                       for k in range(distiller.num_blocks)})
    seconds, flops, compile_s, model_flops = {}, {}, {}, {}
    for name, phase in phases.items():
        watch = time.perf_counter()
        compiled = distill.compile_train_step(distiller, mesh, phase, state, teacher_variables,
                                              batch_shape)
        compile_s[name] = time.perf_counter() - watch
        flops[name] = step_flops(compiled)
        model_flops[name] = model_flops_per_step(distiller, phase.active, args.batch_size,
                                                 args.resolution)
        seconds[name], state = time_steps(compiled, state, teacher_variables, images, args.steps)
        print(f"{name:>10}: compile {compile_s[name]:7.1f} s, step {seconds[name] * 1e3:9.1f} ms,"
              f" {flops[name] / 1e9:8.2f} GFLOP/step, "
              f"{flops[name] / seconds[name] / 1e9:7.2f} GFLOP/s", flush=True)
    sequential = not args.all_blocks_only
    block_names = [f"block{k}" for k in range(distiller.num_blocks)] if sequential else []
    sequential_s = sum(seconds[k] for k in block_names) or float("nan")
    sequential_flops = sum(flops[k] for k in block_names)
    sequential_model_flops = sum(model_flops[k] for k in block_names)

    def if_sequential(value):
        return value if sequential else None

    figures = {
        "space": args.space, "teacher": args.teacher, "resolution": args.resolution,
        "conv_impl": args.conv_impl, "conv_impl_resolved": cpu_conv.resolve(args.conv_impl),
        "dtype": args.dtype,
        "batch_size": args.batch_size, "timed_steps": args.steps,
        "devices": jax.device_count(), "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
        "all_blocks_images_per_s": args.batch_size / seconds["all_blocks"],
        "sequential_images_per_s": if_sequential(args.batch_size / sequential_s),
        "ratio": if_sequential(sequential_s / seconds["all_blocks"]),
        "all_blocks_step_s": seconds["all_blocks"], "sequential_block_step_s": {
            k: v for k, v in seconds.items() if k != "all_blocks"},
        "all_blocks_flops_per_step": flops["all_blocks"],
        "sequential_flops_per_image_batch": if_sequential(sequential_flops),
        "flop_ratio": if_sequential(sequential_flops / flops["all_blocks"]
                                    if flops["all_blocks"] else None),
        "all_blocks_flop_per_s": flops["all_blocks"] / seconds["all_blocks"],
        "sequential_flop_per_s": if_sequential(sequential_flops / sequential_s),
        "compile_s": compile_s,
        "all_blocks_model_flops_per_step": model_flops["all_blocks"],
        "sequential_model_flops_per_image_batch": if_sequential(sequential_model_flops),
        "all_blocks_model_flop_per_s": model_flops["all_blocks"] / seconds["all_blocks"],
        "sequential_model_flop_per_s": if_sequential(sequential_model_flops / sequential_s),
        "model_flops_note": "analytic: 2 x batch x (teacher macs to the needed stage + 3 x "
                            "mean-path macs of the trained blocks)",
        "flops_note": "XLA cost analysis, all switch branches counted (upper bound)",
    }
    print(json.dumps(figures, sort_keys=True))
    return figures


if __name__ == "__main__":
    main()
