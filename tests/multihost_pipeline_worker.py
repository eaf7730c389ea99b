"""One process of the multi-process pipeline test (tests/test_multihost.py): a whole tiny run.

Run as `python multihost_pipeline_worker.py PROCESS_ID NUM_PROCESSES PORT CONFIG[:ARG] WORKDIR
OUT.json [LOCAL_DEVICES [OVERRIDES_JSON]]`. Every process starts `jax.distributed` with a
localhost coordinator (LOCAL_DEVICES CPU devices each, default 1), runs `pipeline.run_pipeline`
(or DNA+'s `progressive.run_progressive`) on the SAME workdir with the config's fields
overridden by OVERRIDES_JSON ({"distill.num_steps": 12, ...}), and writes the figures it
returned. One process with 2 local devices is the 1-process run a 2-process run (1 device
each) is compared with: the same 2-device mesh and the same compiled programs.

The machine running the tests may be loaded (2 cores shared with a training job): a compile
can stall a process for minutes. So the coordination service waits 15 minutes for a missed
heartbeat (jax's default, 100 s, once declared both processes dead during a slow compile) and
XLA:CPU's in-process collectives (the 1-process, 2-device run) wait 15 minutes for a slow
device thread (default 40 s). A killed process is still noticed at once: its peer's gloo
collectives fail on the closed connection and a client whose coordinator died aborts.
"""

import json
import logging
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
LOCAL_DEVICES = int(sys.argv[7]) if len(sys.argv) > 7 else 1
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={LOCAL_DEVICES} "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=900")
PATIENCE_S = 900

import jax  # noqa: E402


def main(process_id: int, num_processes: int, port: int, config_path: str, workdir: str,
         out: str, overrides: dict) -> None:
    logging.getLogger().setLevel(logging.INFO)  # the stages' progress in the test's log
    if num_processes > 1:
        jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=PATIENCE_S,
                                   heartbeat_timeout_seconds=PATIENCE_S)
    from dna_jax import config_files, pipeline, progressive  # pylint: disable=import-outside-toplevel
    path, _, arg = config_path.partition(":")
    config = config_files.load_config(path, arg or None, **{
        "mesh.num_devices": 0, "compilation_cache": "", **overrides})
    if progressive.is_progressive(config):  # DNA+: every round in these processes
        figures = progressive.run_progressive(config, workdir)
    else:
        figures = pipeline.run_pipeline(config, workdir)
    with open(out, "w") as f:
        json.dump({"process": jax.process_index(), "processes": jax.process_count(),
                   "devices": jax.device_count(), "figures": figures}, f, default=float)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
         sys.argv[6], json.loads(sys.argv[8]) if len(sys.argv) > 8 else {})
