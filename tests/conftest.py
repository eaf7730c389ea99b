"""Test set-up: fake CPU devices must be requested before jax initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
# TensorFlow (used by tf.data only) must never grab an accelerator or spam the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
