"""`job=train`: train one model from a config, resumably, and leave a loadable workdir.

Determinism across preemption: the data order at step s is a function of (seed, s) and
the augmentation key is ``fold_in(key, s)``, so a run restored from a checkpoint takes the
same steps an uninterrupted run would and ends with equal parameters.
"""

from __future__ import annotations

import functools
import shlex
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fula_jax import errors, io, models, sharding
from fula_jax.progress import Progress
from fula_jax.train import checkpoint, history
from fula_jax.train.build import build_model, input_shape, num_classes  # noqa: F401
from fula_jax.train.state import (TrainState, create_state, learning_rate_schedule,
                                  make_eval_step, make_optimizer, make_train_step)


def data_mesh() -> Mesh:
  """A 1-D mesh over every device (all hosts); the batch axis is sharded over it."""
  return sharding.line_mesh("data")


def _global_batch(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def make_preprocess(config: ml_collections.ConfigDict, model: models.StagedModel
                    ) -> Callable[[jax.Array, dict, TrainState], jax.Array]:
  """Augmentation, then (if configured) the adversarial attack on the current model."""
  from fula_jax import data
  aug = config.train.augment
  adv = config.train.get("adversarial", None)

  def preprocess(key, batch, state):
    images = batch["image"]
    k_aug, k_adv = jax.random.split(key)
    if aug.crop_padding or aug.flip:
      images = data.augment(k_aug, images, crop_padding=aug.crop_padding, flip=aug.flip)
    if adv is not None and adv.enabled and adv.eps > 0:
      from fula_jax import attacks
      apply_fn = lambda x: model.apply(state.variables, x, train=False)
      images = jax.lax.stop_gradient(attacks.pgd(
          apply_fn, images, batch["label"], k_adv, **attacks.attack_kwargs(adv)))
    return images

  return preprocess


@functools.partial(jax.jit, static_argnames=("model",))
def _eval_sums(variables: dict, batch: dict, *, model: models.StagedModel) -> dict:
  """One batch's summed correct, loss and count. One program per model and batch shape,
  with the weights as arguments: every evaluation during training and every split
  reuses it, where a closure over the weights compiled anew each time with them as
  constants."""
  return make_eval_step(lambda x: models.forward(model, variables, x))(batch)


def evaluate(model: models.StagedModel, variables: dict, split, batch_size: int,
             mesh: Mesh | None = None) -> dict[str, float]:
  """Accuracy and mean loss over a whole split (padded batches, masked rows ignored)."""
  from fula_jax import data
  mesh = mesh or data_mesh()
  batch_size = -(-batch_size // mesh.size) * mesh.size  # padded rows are masked out
  rep = sharding.replicated(mesh)
  variables = jax.tree_util.tree_map(
      lambda a: a if isinstance(a, jax.Array) and a.sharding == rep else sharding.put(a, rep),
      variables)
  totals = {"correct": 0.0, "loss": 0.0, "count": 0.0}
  for batch in data.eval_batches(split, batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    out = _eval_sums(variables, _global_batch(mesh, batch), model=model)
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / n, "loss": totals["loss"] / n,
          "n": int(totals["count"])}


def run(config: ml_collections.ConfigDict, workdir: str, *, closing: bool = True
        ) -> dict[str, Any]:
  """Train `config.model` on `config.data`; resume from the newest checkpoint if any.
  `closing` False: no closing block (a job that trains models on its way)."""
  from fula_jax import data

  workdir = io.path(workdir)
  tcfg = config.train
  model = build_model(config)  # an unknown model name fails before any data is read
  train_split = data.source(config.data, "train")
  test_split = data.source(config.data, "test")
  mesh = data_mesh()

  if tcfg.batch_size % mesh.size:
    raise errors.ConfigError(f"train.batch_size={tcfg.batch_size} must be a multiple of the "
                     f"number of devices ({mesh.size}): the batch is sharded over them.")
  steps_per_epoch = len(train_split) // tcfg.batch_size
  if steps_per_epoch == 0:
    raise errors.ConfigError(f"train.batch_size={tcfg.batch_size} is larger than the training "
                     f"split ({len(train_split)} examples).")
  total_steps = tcfg.num_steps or int(round(tcfg.num_epochs * steps_per_epoch))
  schedule = learning_rate_schedule(tcfg, total_steps, steps_per_epoch)
  tx = make_optimizer(tcfg, schedule)

  key = jax.random.PRNGKey(config.seed)
  init_key, step_key = jax.random.split(key)
  variables = models.init(model, init_key, (1, *train_split.image_shape))
  state = create_state(model, variables, tx)
  state = jax.device_put(state, NamedSharding(mesh, P()))

  mngr = checkpoint.manager(workdir, save_every_steps=tcfg.checkpoint_every_steps,
                            max_to_keep=tcfg.max_checkpoints)
  restored = checkpoint.restore_latest(mngr, checkpoint.state_to_tree(state))
  if restored is not None:
    _, tree = restored
    state = TrainState(**tree)
  start_step = int(state.step)
  if io.is_writer():
    io.write_json(workdir / checkpoint.CONFIG_FILE, config.to_dict())

  from clu import metric_writers  # loads TensorFlow (seconds): after the checks above
  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=not io.is_writer(), asynchronous=False)
  if start_step == 0:
    writer.write_hparams(_flat_hparams(config))

  train_step = jax.jit(make_train_step(model, tx, make_preprocess(config, model)),
                       donate_argnums=(0,))
  progress = Progress(f"train {config.model.name}", total_steps, unit="steps",
                      start=start_step, every_s=tcfg.get("progress_every_s", 10.0))
  batches = data.train_batches(
      train_split, tcfg.batch_size, seed=config.seed, start_step=start_step,
      num_steps=total_steps - start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  sync = sharding.needs_sync(mesh)  # CPU collectives deadlock when dispatched back to back
  metrics_sum: dict[str, float] = {}
  metrics_n = 0
  hist = history.load(workdir, start_step)
  for step, batch in zip(range(start_step, total_steps), batches):
    state, metrics = train_step(state, _global_batch(mesh, batch),
                                jax.random.fold_in(step_key, step))
    if sync:
      jax.block_until_ready(state)
    done = step + 1
    if done % tcfg.log_every_steps == 0 or done == total_steps:
      metrics = jax.device_get(metrics)
      for k, v in metrics.items():
        metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v)
      metrics_n += 1
      scalars = {f"train/{k}": v / metrics_n for k, v in metrics_sum.items()}
      scalars["train/learning_rate"] = float(schedule(done - 1))
      writer.write_scalars(done, scalars)
      hist["train"].append({"step": done, **scalars})
      metrics_sum, metrics_n = {}, 0
      progress.update(done, extra=f"loss {scalars['train/loss']:.4f}")
    if tcfg.eval_every_steps and done % tcfg.eval_every_steps == 0 and done < total_steps:
      ev = evaluate(model, state.variables, test_split, config.eval_batch_size, mesh)
      writer.write_scalars(done, {f"test/{k}": v for k, v in ev.items() if k != "n"})
      hist["test"].append({"step": done, **{f"test/{k}": float(v) for k, v in ev.items()
                                            if k != "n"}})
    if mngr.should_save(done):  # the history first: a kill mid-save loses no entry
      history.save(workdir, hist)
    mngr.save(done, args=_save_args(state))
  progress.update(total_steps, force=True)
  if mngr.latest_step() != total_steps:
    mngr.save(total_steps, args=_save_args(state), force=True)
  mngr.wait_until_finished()

  final = evaluate(model, state.variables, test_split, config.eval_batch_size, mesh)
  adv = tcfg.get("adversarial", None)
  if adv is not None and adv.enabled and adv.eps > 0:
    from fula_jax import attacks
    robust = attacks.robust_accuracy(
        models.Forward(model),
        data.eval_batches(test_split, config.eval_batch_size,
                          process_index=jax.process_index(),
                          process_count=jax.process_count()),
        jax.random.fold_in(key, 2), adv, params=state.variables)
    final["robust_accuracy"] = robust["robust_accuracy"]
  writer.write_scalars(total_steps, {f"test/{k}": v for k, v in final.items() if k != "n"})
  writer.flush()
  hist["test"] = [r for r in hist["test"] if r["step"] < total_steps] + [
      {"step": total_steps, **{f"test/{k}": float(v) for k, v in final.items()
                               if k != "n"}}]
  history.save(workdir, hist)
  summary = {"model": config.model.name, "dataset": config.data.name,
             "steps": total_steps, "resumed_from": start_step,
             "test_accuracy": final["accuracy"], "test_loss": final["loss"],
             "test_n": final["n"],
             "test_robust_accuracy": final.get("robust_accuracy"),
             "num_params": models.count_params(state.params)}
  data.note_skipped(summary, {"train": train_split, "test": test_split})
  if io.is_writer():
    io.write_json(workdir / "summary.json", summary)
  print(f"{config.model.name} on {config.data.name}: test accuracy "
        f"{final['accuracy']:.4f} (n={final['n']}) after {total_steps} steps", flush=True)
  next_step = next_command(workdir, config)
  history.write_report(workdir, summary, hist, next_step)
  if closing:
    load = f"fula_jax.train.checkpoint.load_trained({str(workdir)!r})"
    print(f"Report:  {workdir / history.REPORT_FILE} (curves: {history.CURVES_FILE})\n"
          f"Model:   {workdir} ({load}; checkpoints and summary.json there)\n"
          f"Next:    {next_step}", flush=True)
  return {**summary, "state": state, "model_obj": model}


def next_command(workdir: Any, config: ml_collections.ConfigDict) -> str:
  """The command that compares the trained model with itself layer by layer (at the
  scale of its data: `:runlocal` for the embedded digits)."""
  scale = ":runlocal" if config.data.name == "digits" else ""
  return (f"python -m fula_jax.main --config=configs/similarity.py{scale} "
          f"--workdir={shlex.quote(str(workdir) + '_similarity')} "
          f"--config.model_a_workdir={shlex.quote(str(workdir))}  "
          "(add --config.model_b_workdir=ANOTHER to compare two models)")


def _save_args(state: TrainState):
  import orbax.checkpoint as ocp
  return ocp.args.StandardSave(checkpoint.state_to_tree(state))


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat: dict[str, Any] = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(f"{prefix}{k}.", v)
      elif isinstance(v, (int, float, str, bool)):
        flat[f"{prefix}{k}"] = v
  walk("", config.to_dict())
  return flat
