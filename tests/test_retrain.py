"""The classifier trainer: CPU convolutions, 4-device parity, exact resume, NaN stop, end to end.

Tolerances: the 4-device step differs from the 1-device step only in the order of the
batch-statistic and gradient reductions, so parameters agree to 1e-5 (SGD, two steps). A
resumed run is compared bitwise with an uninterrupted one: same program, same inputs, on CPU.
"""

import functools
import glob
import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from dna_jax import checkpoint as checkpoint_lib, config_files
from dna_jax import data as data_lib
from dna_jax import retrain, sharding
from dna_jax.models import cpu_conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_CONFIG = os.path.join(REPO, "configs", "fashion_mnist_teacher.py")
needs_fmnist = pytest.mark.skipif(
    not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
    reason="Fashion-MNIST idx files missing (make data installs them)")


def _tiny_config(**overrides) -> ml_collections.ConfigDict:
    """configs/fashion_mnist_teacher.py:tiny, unlocked, with overrides (dotted keys)."""
    return config_files.load_config(TEACHER_CONFIG, "tiny", unlocked=True, **overrides)


# ----------------------------------------------------------------------------------------------
# CPU convolutions.


@pytest.mark.parametrize("kernel, stride, groups, padding", [
    (1, 1, 1, "SAME"), (3, 2, 1, "SAME"), (5, 2, 6, ((2, 2), (2, 2))), (3, 1, 6, "VALID")])
def test_tap_conv_matches_xla_conv_and_its_gradients(kernel, stride, groups, padding):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 9, 9, 6))
    features = 6 if groups > 1 else 4
    w = jax.random.normal(keys[1], (kernel, kernel, 6 // groups, features))

    def xla(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)

    def taps(x, w):
        return cpu_conv.tap_conv(x, w, (stride, stride), padding, groups)

    cotangent = jax.random.normal(keys[2], jax.eval_shape(xla, x, w).shape)

    @jax.jit
    def outputs_and_grads(x, w):
        return [(f(x, w), jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * cotangent),
                                   argnums=(0, 1))(x, w)) for f in (taps, xla)]

    (y_taps, g_taps), (y_xla, g_xla) = outputs_and_grads(x, w)
    np.testing.assert_allclose(y_taps, y_xla, rtol=1e-5, atol=1e-5)
    for got, want in zip(g_taps, g_xla):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tap_convs_leave_a_network_unchanged():
    config = _tiny_config()
    model = retrain.build_model(config.model, 10)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    assert cpu_conv.resolve("auto") == "taps" and cpu_conv.resolve("xla") == "xla"
    with pytest.raises(ValueError, match="conv_impl"):
        cpu_conv.resolve("fast")
    plain, _ = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    tapped, _ = jax.jit(functools.partial(cpu_conv.with_tap_convs(model.apply, "taps"),
                                          train=False))(variables, x)
    np.testing.assert_allclose(tapped, plain, rtol=1e-4, atol=1e-5)
    assert cpu_conv.with_tap_convs(model.apply, "xla") == model.apply


# ----------------------------------------------------------------------------------------------
# One step on 4 devices equals one step on 1 device.


def _steps_on(mesh, config, batches):
    model = retrain.build_model(config.model, 10)
    schedule = retrain.make_schedule(config, 10, 10)
    tx = retrain.make_optimizer(config.optimizer, schedule)
    state = retrain.create_train_state(model, tx, (16, 16, 3), mesh, seed=0)
    step = retrain.jit_train_step(
        retrain.make_train_step(model, tx, schedule, label_smoothing=0.1, ema_decay=0.0,
                                ema_warmup=True), state, mesh)
    metrics = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, m = step(state, sharding.host_to_global(batch, mesh), jax.random.key(3))
            metrics.append(jax.device_get(m))
    return state, metrics


def test_train_step_on_4_devices_matches_1_device():
    config = _tiny_config(**{"optimizer.name": "sgd", "optimizer.learning_rate": 0.1,
                             "optimizer.weight_decay": 1e-4, "model.drop_rate": 0.0})
    data = data_lib.make_dataset(_tiny_config(**{
        "data.source": "synthetic", "data.num_examples": 64, "data.train_split": "train",
        "data.eval_split": "test"}).data, "train", seed=0)
    batches = list(zip(range(2), data.host_batches()))
    batches = [b for _, b in batches]
    mesh4 = sharding.make_mesh()
    mesh1 = sharding.make_mesh(devices=jax.devices()[:1])
    assert mesh4.devices.size == 4 and mesh1.devices.size == 1
    state4, metrics4 = _steps_on(mesh4, config, batches)
    state1, metrics1 = _steps_on(mesh1, config, batches)
    leaf = jax.tree.leaves(state4.params)[0]
    assert len(leaf.sharding.device_set) == 4 and leaf.sharding.is_fully_replicated
    for m4, m1 in zip(metrics4, metrics1):
        np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
        np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    assert not np.allclose(metrics1[0]["loss"], metrics1[1]["loss"])  # It trained.
    for tree4, tree1 in [(state4.params, state1.params),
                         (state4.batch_stats, state1.batch_stats)]:
        for a, b in zip(jax.tree.leaves(jax.device_get(tree4)),
                        jax.tree.leaves(jax.device_get(tree1))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Kill and resume, NaN stop, end to end.


class _Killed(RuntimeError):
    pass


def _dataset_that_fails(dataset: data_lib.Dataset, fail_at: int, error: str
                        ) -> data_lib.Dataset:
    """The same batches, but step index fail_at raises (kill), carries NaN images (nan) or
    sends this process SIGTERM (sigterm: the batch itself is unchanged)."""

    def host_fn(start_step):
        for step, batch in enumerate(dataset.host_batches(start_step), start=start_step):
            if step == fail_at and error == "sigterm":  # a preemption notice, once
                os.kill(os.getpid(), signal.SIGTERM)
            elif step >= fail_at and error != "sigterm":
                if error == "kill":
                    raise _Killed(f"killed at step index {step}")
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    return data_lib.Dataset(dataset.info, host_fn, dataset.mesh, dataset.prefetch)


def _train_data(config, mesh):
    return data_lib.make_dataset(config.data, config.data.train_split, training=True,
                                 mesh=mesh, seed=config.seed)


@needs_fmnist
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    config = _tiny_config(**{"checkpoint_every_steps": 2, "log_every_steps": 2})
    mesh = sharding.mesh_from_config(config.mesh)
    whole, whole_vars = retrain.train_and_evaluate(config, str(tmp_path / "whole"), mesh=mesh,
                                                   return_variables=True)
    # The tiny teacher end to end: figures, figures.json, TensorBoard events.
    assert 0.0 <= whole["test_accuracy"] <= 1.0 and whole["test_examples"] == 400
    assert whole["steps"] == 8 and whole["resumed_from_step"] == 0
    assert np.isfinite(whole["train_loss"]) and whole["num_params"] > 0
    with open(tmp_path / "whole" / retrain.FIGURES_FILE) as f:
        assert json.load(f)["test_accuracy"] == whole["test_accuracy"]
    assert glob.glob(str(tmp_path / "whole" / "events.out.tfevents.*"))

    killed_dir = str(tmp_path / "killed")
    with pytest.raises(_Killed):
        retrain.train_and_evaluate(config, killed_dir, mesh=mesh, train_data=_dataset_that_fails(
            _train_data(config, mesh), 5, "kill"))
    assert checkpoint_lib.Checkpointer(os.path.join(killed_dir, "checkpoints")).latest_step() == 4
    resumed, resumed_vars = retrain.train_and_evaluate(config, killed_dir, mesh=mesh,
                                                       return_variables=True)
    assert resumed["resumed_from_step"] == 4 and resumed["steps_this_run"] == 4
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed_vars)),
                    jax.tree.leaves(jax.device_get(whole_vars))):
        np.testing.assert_array_equal(a, b)
    for key in ("test_accuracy", "test_loss", "train_loss"):
        assert resumed[key] == whole[key], key


@needs_fmnist
def test_sigterm_saves_a_checkpoint_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
    """A single-process run stops at the step after a SIGTERM with a checkpoint of it (the
    preemption notice of a spot VM; multi-process runs use JAX's sync manager instead)."""
    config = _tiny_config(**{"checkpoint_every_steps": 100, "log_every_steps": 2})
    mesh = sharding.mesh_from_config(config.mesh)
    whole, whole_vars = retrain.train_and_evaluate(config, str(tmp_path / "whole"), mesh=mesh,
                                                   return_variables=True)
    before = signal.getsignal(signal.SIGTERM)
    workdir = str(tmp_path / "preempted")
    with pytest.raises(SystemExit, match=r"Preempted at step (\d+)") as stopped:
        retrain.train_and_evaluate(config, workdir, mesh=mesh, train_data=_dataset_that_fails(
            _train_data(config, mesh), 3, "sigterm"))
    step = int(re.search(r"step (\d+)", str(stopped.value)).group(1))
    assert 1 <= step < 8  # stopped early (the batch of step index 3 may be prefetched)
    assert signal.getsignal(signal.SIGTERM) is before  # outside the loop SIGTERM is as it was
    assert checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == step
    resumed, resumed_vars = retrain.train_and_evaluate(config, workdir, mesh=mesh,
                                                       return_variables=True)
    assert resumed["resumed_from_step"] == step
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed_vars)),
                    jax.tree.leaves(jax.device_get(whole_vars))):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_accuracy"] == whole["test_accuracy"]


@needs_fmnist
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _tiny_config(**{"checkpoint_every_steps": 2, "log_every_steps": 4})
    mesh = sharding.mesh_from_config(config.mesh)
    workdir = str(tmp_path / "nan")
    nan_data = _dataset_that_fails(_train_data(config, mesh), 4, "nan")  # Step 5 sees NaN.
    with pytest.raises(retrain.NonFiniteLossError, match="at step 5") as error:
        retrain.train_and_evaluate(config, workdir, mesh=mesh, train_data=nan_data)
    assert "last good checkpoint is step 4" in str(error.value)
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.all_steps() == [2, 4]
    model = retrain.build_model(config.model, 10)
    tx = retrain.make_optimizer(config.optimizer, retrain.make_schedule(config, 8, 16))
    target = retrain.create_train_state(model, tx, (16, 16, 3), mesh, seed=0)
    restored = checkpointer.restore(target, 4)
    assert int(restored.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(restored.params)))


@pytest.mark.slow  # Three short trainings: 26 s (warm compilation cache) to 77 s (loaded) here.
@needs_fmnist
def test_nonfinite_parameters_are_never_checkpointed_and_a_fixed_rerun_resumes(tmp_path):
    # A NaN learning rate leaves step 3's loss finite (it is computed before the update) but
    # makes its parameters NaN: that state must not become the "last good" checkpoint.
    config = _tiny_config(**{"total_steps": 4, "checkpoint_every_steps": 1,
                             "log_every_steps": 1})
    mesh = sharding.mesh_from_config(config.mesh)
    workdir = str(tmp_path / "run")
    with pytest.raises(_Killed):
        retrain.train_and_evaluate(config, workdir, mesh=mesh, train_data=_dataset_that_fails(
            _train_data(config, mesh), 2, "kill"))  # Steps 1 and 2 checkpointed.
    bad = _tiny_config(**{"total_steps": 4, "checkpoint_every_steps": 1, "log_every_steps": 1,
                          "optimizer.learning_rate": float("nan")})
    with pytest.raises(retrain.NonFiniteLossError, match="non-finite at step 3") as error:
        retrain.train_and_evaluate(bad, workdir, mesh=mesh)
    assert "The last good checkpoint is step 2" in str(error.value)
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.latest_step() == 2
    model = retrain.build_model(config.model, 10)
    tx = retrain.make_optimizer(config.optimizer, retrain.make_schedule(config, 4, 16))
    target = retrain.create_train_state(model, tx, (16, 16, 3), mesh, seed=0)
    restored = checkpointer.restore(target, 2)
    checkpointer.close()
    assert checkpoint_lib.nonfinite_leaves(restored)[0] == []  # every leaf, not just params
    fixed = retrain.train_and_evaluate(config, workdir, mesh=mesh)  # the config fixed
    assert fixed["resumed_from_step"] == 2 and fixed["steps_this_run"] == 2
    assert np.isfinite(fixed["train_loss"]) and np.isfinite(fixed["test_loss"])


@pytest.mark.slow  # A fresh interpreter: importing jax + TensorFlow alone takes a minute here.
@needs_fmnist
def test_cli_prints_the_figures_as_its_last_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "dna_jax.retrain", "--config", f"{TEACHER_CONFIG}:tiny",
         "--workdir", str(tmp_path), "--config.total_steps=2"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["steps"] == 2 and 0.0 <= figures["test_accuracy"] <= 1.0
    assert os.path.exists(tmp_path / retrain.FIGURES_FILE)
