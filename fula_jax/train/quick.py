"""A plain Adam loop for any model that follows the model protocol (or a bare Linen
module): for examples, notebooks and tests that need a trained model in seconds
without a config or a workdir. Jobs train through `fula_jax.train.loop`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fula_jax import models


def fit(model: models.StagedModel, split, *, steps: int = 200, batch_size: int = 128,
        lr: float = 3e-3, seed: int = 0) -> dict[str, Any]:
  """Variables of `model` after `steps` Adam steps on random batches of `split` (a
  `fula_jax.data.Split`), BatchNorm statistics updated; `seed` fixes init and batches."""
  variables = models.init(model, jax.random.PRNGKey(seed),
                          (1,) + split.images.shape[1:])
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, batch_stats, opt, x, y):
    def loss_fn(p):
      v = {"params": p, **({"batch_stats": batch_stats} if batch_stats else {})}
      if batch_stats:
        logits, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        new_stats = upd["batch_stats"]
      else:
        logits, new_stats = model.apply(v, x, train=True), batch_stats
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new_stats
    (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), new_stats, opt

  rng = np.random.default_rng(seed)
  n = len(split.labels)
  for _ in range(steps):
    idx = rng.choice(n, size=min(batch_size, n), replace=False)
    params, batch_stats, opt = step(params, batch_stats, opt, split.images[idx],
                                    split.labels[idx])
  out = {"params": params}
  if batch_stats:
    out["batch_stats"] = batch_stats
  return jax.tree_util.tree_map(np.asarray, out)


def accuracy(model: models.StagedModel, variables: Any, split) -> float:
  """Top-1 accuracy of `model` on a whole in-memory `split`."""
  logits = models.forward(model, variables, jnp.asarray(split.images))
  return float(np.mean(np.argmax(np.asarray(logits), -1) == split.labels))
