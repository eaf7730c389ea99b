"""A tiny pipeline run that dies by SIGKILL (as by `kill -9`) at an injected point; used by
tests/test_reliability_suite.py.

    python tests/reliability_worker.py CONFIG_FILE:VARIANT WORKDIR KILL_POINT

KILL_POINT:
  npz:N               just before the N-th .npz of the run is renamed into place (its
                      temporary file written and fsynced: inside the npz write)
  checkpoint:STAGE:S  right after Orbax started writing step S of a checkpoint under
                      WORKDIR/STAGE (inside the checkpoint write: its files half on disk)
  manifest:STAGE      when STAGE's manifest is about to be written (after its last checkpoint
                      and its artifacts: between the two)
  manifest-write:STAGE  inside the manifest write (its temporary file written, not renamed)
  none                not killed: prints 'finished' at the end

The suite's XLA flags (4 fake CPU devices) and compilation cache come from tests/conftest.py.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conftest  # noqa: E402,F401  (the suite's XLA flags and compilation cache)


def die(where: str) -> None:
    print(f"killed: {where}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, workdir: str) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    from dna_jax import artifacts  # pylint: disable=import-outside-toplevel
    kind, _, arg = point.partition(":")
    if kind == "npz":
        count = {"n": 0}
        replace = os.replace

        def dying_replace(src, dst, *args, **kwargs):
            if os.fspath(dst).endswith(".npz"):
                count["n"] += 1
                if count["n"] == int(arg):
                    die(f"inside the write of {dst} ({src} written, not renamed)")
            return replace(src, dst, *args, **kwargs)

        os.replace = dying_replace
    elif kind == "checkpoint":
        stage, step = arg.split(":")
        save = ocp.CheckpointManager.save

        def dying_save(self, at_step, *args, **kwargs):
            saved = save(self, at_step, *args, **kwargs)
            if at_step == int(step) and f"/{stage}/" in os.fspath(self.directory) + "/":
                die(f"inside the Orbax write of step {at_step} in {self.directory}")
            return saved

        ocp.CheckpointManager.save = dying_save
    elif kind == "manifest":
        write_manifest = artifacts.write_manifest

        def dying_write_manifest(stage_dir, stage, *args, **kwargs):
            if stage == arg:
                die(f"before the manifest of {stage}")
            return write_manifest(stage_dir, stage, *args, **kwargs)

        artifacts.write_manifest = dying_write_manifest
    elif kind == "manifest-write":
        target = os.path.join(os.path.abspath(workdir), arg, artifacts.MANIFEST)
        replace = os.replace

        def dying_replace(src, dst, *args, **kwargs):
            if os.path.abspath(os.fspath(dst)) == target:
                die(f"inside the write of {dst} ({src} written, not renamed)")
            return replace(src, dst, *args, **kwargs)

        os.replace = dying_replace
    elif kind != "none":
        raise SystemExit(f"unknown kill point {point!r}")


def main(config_arg: str, workdir: str, point: str) -> None:
    from dna_jax import config_files, pipeline  # pylint: disable=import-outside-toplevel
    path, _, variant = config_arg.partition(":")
    install(point, workdir)
    pipeline.run_pipeline(config_files.load_config(path, variant or None), workdir)
    print("finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
