"""Test set-up: fake CPU devices must be requested before jax initialises its backends."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
# Four fake devices share two cores with an xdist neighbour: XLA:CPU's collectives give up
# when one device thread waits 40 s for the others (seen in the distillation step), and
# abort the worker. The devices are only slow, not stuck, so let them wait.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=900"
# TensorFlow (used by tf.data only) must never grab an accelerator or spam the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Many tests compile the same small programs (tiny teachers, supernet steps, trainers): a
# persistent compilation cache, shared by the xdist workers, compiles each of them once.
# $DNA_JAX_TEST_CACHE moves it; set it to '' to compile everything afresh.
_CACHE = os.environ.get("DNA_JAX_TEST_CACHE",
                        os.path.join(tempfile.gettempdir(), "dna_jax_test_jax_cache"))
if _CACHE:
    import jax  # noqa: E402  (after the XLA flags above)

    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # The xdist workers share the cache: a size limit turns on JAX's file lock, without which
    # a worker can load another's half-written executable and abort (seen: SIGABRT in the
    # tiny pipeline's distillation step while test_progressive compiled the same program).
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)


import pytest  # noqa: E402


@pytest.fixture
def fake_training(monkeypatch):
    """Replaces `ground_truth`'s stand-alone training and its datasets with stubs, for the
    runners' bookkeeping in seconds: `install(accuracy, check=None)` -> the list of
    (index, seed) calls, where accuracy(index, seed) is the run's test accuracy and
    check(config, index, seed, run_dir) sees each call's arguments."""
    from dna_jax import ground_truth  # pylint: disable=import-outside-toplevel

    def install(accuracy, check=None):
        calls = []

        def fake_train_one(config, space, arch, index, seed, run_dir, train_data, eval_data,
                           mesh):
            if check is not None:
                check(config, index, seed, run_dir)
            calls.append((index, seed))
            return {"arch": index, "seed": seed, "test_accuracy": accuracy(index, seed),
                    "test_loss": 1.0, "train_loss": 1.0, "steps": 2, "train_time_s": 0.0,
                    "wall_time_s": 0.0, "commit": "x", "machine": "stub"}

        class NoData:  # no dataset is read
            def __init__(self, *args):
                pass

            def eval(self):
                return None

            def train(self, seed):
                return None

        monkeypatch.setattr(ground_truth, "train_one", fake_train_one)
        monkeypatch.setattr(ground_truth, "RunData", NoData)
        return calls

    return install
