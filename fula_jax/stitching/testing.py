"""Tiny donors and data for stitching tests and benchmarks (seconds on a CPU).

`digits_splits` gives the embedded scikit-learn digits as in-memory splits without any
file or download; `train_donor` fits a model with a plain Adam loop of its own (so the
stitching tests do not depend on the training package).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fula_jax import models


def digits_splits(n_train: int = 1400, n_test: int = 397, *, seed: int = 0):
  """(train, test) `fula_jax.data.Split`s of 8x8x1 digits in [0, 1], shuffled once."""
  from sklearn.datasets import load_digits

  from fula_jax.data import Split
  d = load_digits()
  order = np.random.default_rng(seed).permutation(len(d.target))
  x = (d.images[order] / 16.0).astype(np.float32)[..., None]
  y = d.target[order].astype(np.int32)
  if n_train + n_test > len(y):
    raise ValueError(f"digits has {len(y)} examples, asked for {n_train + n_test}.")
  return (Split(x[:n_train], y[:n_train], 10, "digits/train"),
          Split(x[n_train:n_train + n_test], y[n_train:n_train + n_test], 10,
                "digits/test"))


def synthetic_splits(n_train: int = 256, n_test: int = 128, *,
                     shape: tuple[int, ...] = (8, 8, 1), num_classes: int = 10,
                     seed: int = 0):
  """(train, test) splits of random images in [0, 1] labelled by a random linear
  teacher: NumPy only, for workers that must start fast."""
  from fula_jax.data import Split
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n_train + n_test,) + tuple(shape)).astype(np.float32)
  w = rng.normal(size=(int(np.prod(shape)), num_classes))
  y = np.argmax(x.reshape(len(x), -1) @ w, -1).astype(np.int32)
  return (Split(x[:n_train], y[:n_train], num_classes, "synthetic/train"),
          Split(x[n_train:], y[n_train:], num_classes, "synthetic/test"))


def train_donor(model: models.StagedModel, split, *, steps: int = 200,
                batch_size: int = 128, lr: float = 3e-3, seed: int = 0) -> dict[str, Any]:
  """Variables of `model` after `steps` Adam steps on `split` (BN statistics updated)."""
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
  logits = models.forward(model, variables, jnp.asarray(split.images))
  return float(np.mean(np.argmax(np.asarray(logits), -1) == split.labels))
