"""Train state, optimiser and the jitted train / eval steps."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fula_jax import registry
from fula_jax.models import StagedModel

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    v = {"params": self.params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up, then cosine decay to zero (or constant)."""
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  registry.lookup("schedule", cfg.schedule, {s: s for s in SCHEDULES})
  if cfg.schedule == "constant":
    after = optax.constant_schedule(cfg.learning_rate)
  else:
    after = optax.cosine_decay_schedule(cfg.learning_rate, max(total_steps - warmup, 1))
  if warmup == 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
  """Weight decay on kernels and embeddings only, not on biases or norm scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  name = registry.lookup("optimizer", cfg.optimizer, {o: o for o in OPTIMIZERS})
  if name == "sgd":
    opt = optax.sgd(schedule, momentum=cfg.momentum, nesterov=True)
  else:
    opt = optax.adam(schedule)
  return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_decay_mask), opt)


def create_state(model: StagedModel, variables: dict,
                 tx: optax.GradientTransformation) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(model: StagedModel, tx: optax.GradientTransformation,
                    preprocess: Callable[[jax.Array, dict, TrainState], jax.Array]
                    ) -> Callable:
  """`step(state, batch, key) -> (state, metrics)`; `preprocess(key, batch, state)`
  returns the images to train on (augmented and, for adversarial training, attacked)."""

  def step(state: TrainState, batch: dict, key: jax.Array):
    images = preprocess(key, batch, state)

    def loss_fn(params):
      v = {"params": params}
      if state.batch_stats:
        v["batch_stats"] = state.batch_stats
      logits, updates = model.apply(v, images, train=True, mutable=["batch_stats"])
      loss = jnp.mean(cross_entropy(logits, batch["label"]))
      return loss, (logits, updates.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": acc}

  return step


def make_eval_step(apply_fn: Callable[[jax.Array], jax.Array]) -> Callable:
  """`eval(batch) -> {'correct', 'loss', 'count'}` summed over real (masked-in) rows."""

  def step(batch: dict):
    logits = apply_fn(batch["image"])
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    loss = cross_entropy(logits, batch["label"])
    return {"correct": jnp.sum(correct * mask), "loss": jnp.sum(loss * mask),
            "count": jnp.sum(mask)}

  return step
