"""Test set-up: 8 fake CPU devices (so sharding is exercised), quiet TensorFlow, and the
repository root on sys.path so tests import `experiments.*` and `configs.*` as the
study jobs do."""

import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-fula-jax-tfds")  # never download

_REPO = str(pathlib.Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)
