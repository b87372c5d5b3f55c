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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_workdir():
  """Factory: a `job=train`-style workdir (config.json and one orbax checkpoint) of a
  randomly initialised zoo model on native 8x8 digits, without training it."""

  def make(path, name, kwargs, channels=1, seed=0):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from fula_jax import defaults, io, models
    from fula_jax.train import checkpoint
    cfg = defaults.load_config(pathlib.Path(_REPO) / "configs" / "train.py",
                               f"model={name},runlocal,seed={seed}")
    cfg.model.kwargs = kwargs
    cfg.data.image_size = None  # native 8x8 digits
    cfg.data.channels = channels
    io.write_json(path / checkpoint.CONFIG_FILE, cfg.to_dict())
    model = models.get_model(name, num_classes=10, **kwargs)
    variables = jax.jit(lambda k: models.init(model, k, (1, 8, 8, channels)))(
        jax.random.PRNGKey(seed))
    tree = {"step": np.int32(1), **jax.tree_util.tree_map(np.asarray, variables)}
    mngr = checkpoint.manager(path)
    mngr.save(1, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
    return str(path)

  return make
