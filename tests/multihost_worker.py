"""One process of the multi-host test (tests/test_multihost.py): two distillation steps.

Run as `python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json`. Every process
builds the same tiny teacher and supernet, feeds ITS part of a fixed global batch through
`host_to_global`, runs the real jitted all-blocks step on the mesh over every process's
devices (gloo CPU collectives), and writes the per-block losses it sees.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dna_jax import distill, sharding  # noqa: E402
from dna_jax.supernet import loop as loop_lib  # noqa: E402
from dna_jax.models import zoo  # noqa: E402
from dna_jax.models.initialize import init_variables  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 2


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    if num_processes > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=120)
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    teacher = zoo.get_model("tiny_teacher", num_classes=10)
    image = np.zeros((1, 16, 16, 3), np.float32)
    teacher_variables = jax.device_put(
        jax.device_get(init_variables(teacher, jax.random.key(1), image)), replicated)
    config = distill.get_default_config()
    config.space = "tiny"
    config.learning_rates = (0.005,)
    distiller = distill.make_distiller(config, teacher, steps_per_epoch=10)
    state = loop_lib.init_state(distiller, 0, (16, 16, 3), mesh)
    step = distiller.jit_train_step(mesh)
    images = np.random.default_rng(0).standard_normal(
        (STEPS, GLOBAL_BATCH, 16, 16, 3)).astype(np.float32)
    local = GLOBAL_BATCH // jax.process_count()
    part = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    losses = []
    with jax.set_mesh(mesh):
        for s in range(STEPS):
            batch = sharding.host_to_global(images[s, part], mesh)
            state, metrics = step(state, teacher_variables, batch)
            losses.append(np.asarray(metrics["loss"].addressable_data(0)).tolist())
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "processes": jax.process_count(),
                   "devices": jax.device_count(), "losses": losses}, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
