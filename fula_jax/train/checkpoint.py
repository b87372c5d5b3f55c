"""Orbax checkpoints of a training run, and loading a trained model by workdir path.

A trained-model workdir holds ``config.json`` (the resolved config) and
``checkpoints/<step>/`` (orbax). ``load_trained(workdir)`` rebuilds the model from the
config and restores its variables, so every later job (similarity, stitching, studies)
refers to a model by its workdir alone.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fula_jax import io
from fula_jax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that is missing or cannot be read."""


def manager(workdir: str | epath.Path, *, save_every_steps: int = 1,
            max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=max(1, save_every_steps),
      enable_async_checkpointing=False, create=True)
  return ocp.CheckpointManager(io.path(workdir) / CHECKPOINT_DIR, options=options)


def state_to_tree(state: Any) -> dict:
  return {"step": state.step, "params": state.params,
          "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def _unreadable(step: int, directory: Any, e: Exception) -> CheckpointError:
  return CheckpointError(
      f"Checkpoint at step {step} in {directory} could not be read "
      f"({type(e).__name__}: {e}). Delete that step's folder to fall back to an "
      f"earlier checkpoint, or start a fresh workdir.")


def restore_latest(mngr: ocp.CheckpointManager, abstract_tree: Any = None
                   ) -> tuple[int, Any] | None:
  """(step, tree) of the newest checkpoint, or None when there is none.

  Without `abstract_tree` the tree is read as stored (nested dicts of arrays).
  """
  step = mngr.latest_step()
  if step is None:
    return None
  try:
    tree = mngr.restore(step, args=ocp.args.StandardRestore(abstract_tree))
  except Exception as e:  # orbax raises many types for damaged files.
    raise _unreadable(step, mngr.directory, e) from e
  return step, tree


def read_config(workdir: str | epath.Path) -> ml_collections.ConfigDict:
  path = io.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(
        f"No trained model in {workdir}: {path} is missing. Train one on the embedded "
        f"digits (about a minute on a CPU) with `python -m fula_jax.main "
        f"--config=configs/train.py:model=cnn,runlocal --workdir={workdir}`.")
  try:
    config = ml_collections.ConfigDict(io.read_json(path))
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}).") from e
  job = config.get("job", "train")
  if job != "train" or "model" not in config:
    raise CheckpointError(
        f"{workdir} is not a trained model: it holds the results of a job={job!r} run "
        f"(its config.json). Pass the workdir of a configs/train.py run, e.g. "
        f"workdirs/quickstart/models/a_cnn after the quickstart.")
  return config


def _read_variables(ckpt_dir: epath.Path) -> tuple[int, dict]:
  """(step, {'params', 'batch_stats'}) of the newest checkpoint, as host arrays.

  Read as NumPy, so a model trained on one topology loads on any other (another device
  count, several processes); the optimiser state is never read.
  """
  mngr = ocp.CheckpointManager(
      ckpt_dir, item_handlers=ocp.PyTreeCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(create=False,
                                           enable_async_checkpointing=False))
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"No checkpoints in {ckpt_dir}: the folder holds no step.")
  try:
    stored = mngr.item_metadata(step)
    stored = getattr(stored, "tree", stored)
    item = {k: stored[k] for k in ("params", "batch_stats") if stored.get(k)}
    as_numpy = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    tree = mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=as_numpy, partial_restore=True))
  except Exception as e:  # orbax raises many types for damaged files.
    raise _unreadable(step, ckpt_dir, e) from e
  return step, {k: tree[k] for k in item}


def load_trained(workdir: str | epath.Path):
  """(model, variables, config) of the newest checkpoint of a `job=train` workdir.

  The variables are the frozen inference variables ('params' and 'batch_stats'); the
  optimiser state in the checkpoint is not read into memory.
  """
  from fula_jax import models
  from fula_jax.train import build

  config = read_config(workdir)
  ckpt_dir = io.path(workdir) / CHECKPOINT_DIR
  if not ckpt_dir.exists():  # before the config is trusted: a train job that failed
    raise CheckpointError(
        f"No trained model in {workdir}: {ckpt_dir} does not exist (a train job that "
        "stopped before its first checkpoint?). Rerun its training command.")
  model = build.build_model(config)
  step, variables = _read_variables(ckpt_dir)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  expected = jax.eval_shape(
      lambda: models.init(model, jax.random.PRNGKey(0), build.input_shape(config)))
  got_shapes = jax.tree_util.tree_map(lambda a: a.shape, variables)
  want_shapes = jax.tree_util.tree_map(lambda a: a.shape, expected)
  if got_shapes != want_shapes:
    raise CheckpointError(
        f"Checkpoint at step {step} in {ckpt_dir} does not match the model its "
        f"config describes ({config.model.name}); was config.json edited?")
  return model, variables, config
