"""`donor_bn='train'`: the donors' BatchNorms in PyTorch's train mode while stitches
train (Balogh & Jelasity), checked against a hand-written loop with Flax and Optax. The
session has 8 devices; the numbers are the whole batch's, as on one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fula_jax import models, stitching
from fula_jax.errors import ConfigError
from fula_jax.stitching import settings, testing

STEPS, LR, BATCH = 6, 1e-2, 100
CFG = dict(objectives=["tlm"], pairs="conv1->conv1", steps=STEPS, learning_rate=LR,
           batch_size=BATCH, eval_batch_size=200, init="random", progress=False,
           compilation_cache="off", baselines=False)  # checked in test_stitching_convergence


@pytest.fixture(scope="module")
def donors():
  train, test = testing.digits_splits(600, 200)
  model = models.get_model("cnn", widths=(8, 16))
  f = testing.train_donor(model, train, steps=60, lr=3e-3, seed=0)
  g = testing.train_donor(model, train, steps=60, lr=3e-3, seed=1)
  return model, f, g, train, test


def _sweep(donors, **cfg):
  model, f, g, train, test = donors
  return stitching.run_sweep(model, f, model, g, train, test, dict(CFG, **cfg),
                             keep_params=True)


def _reference(donors, start):
  """TLM through a 1x1 affine map, with f and g in train mode (batch statistics) and
  g's running averages updated by every step; evaluated in inference mode."""
  model, f, g, train, test = donors
  params = {k: jnp.asarray(start[k]) for k in ("kernel", "bias")}
  stats = g["batch_stats"]
  tx = optax.adam(LR)
  opt = tx.init(params)

  def loss_fn(p, stats, x, y):
    front = model.apply(f, x, end="conv1", train=True, mutable=["batch_stats"])[0]
    z = jnp.einsum("bhwc,cd->bhwd", front, p["kernel"]) + p["bias"]
    logits, new = model.apply({"params": g["params"], "batch_stats": stats}, z,
                              start="conv1", train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new["batch_stats"]

  grad = jax.jit(jax.grad(loss_fn, has_aux=True))
  for b in train.train_batches(BATCH, seed=0, num_steps=STEPS):
    grads, stats = grad(params, stats, b["image"], b["label"])
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  front = models.forward(model, f, test.images, end="conv1")
  z = jnp.einsum("bhwc,cd->bhwd", front, params["kernel"]) + params["bias"]
  logits = models.forward(model, {"params": g["params"], "batch_stats": stats}, z,
                          start="conv1")
  return params, float(np.mean(np.argmax(np.asarray(logits), -1) == test.labels))


def test_train_mode_matches_a_hand_written_loop(donors):
  start = _sweep(donors, steps=1, learning_rate=0.0).params[("tlm", "conv1", "conv1")]
  # PGD at eps 0 is the stitched model's clean accuracy, with the stitch's own averages.
  res = _sweep(donors, donor_bn="train",
               pgd=dict(enabled=True, eps=0.0, step_size=0.0, steps=1, num_examples=200,
                        random_start=False))
  got = res.params[("tlm", "conv1", "conv1")]
  want, accuracy = _reference(donors, start)
  assert res.values["tlm"]["pgd_accuracy"][0, 0] == pytest.approx(accuracy, abs=1.01 / 200)
  np.testing.assert_allclose(got["kernel"], want["kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["bias"], want["bias"], rtol=1e-4, atol=1e-5)
  assert res.values["tlm"]["accuracy"][0, 0] == pytest.approx(accuracy, abs=1.01 / 200)
  # The switch matters: inference-mode donors train another stitch.
  plain = _sweep(donors).params[("tlm", "conv1", "conv1")]
  assert not np.allclose(plain["kernel"], got["kernel"], rtol=1e-3, atol=1e-4)


def test_switch_is_fingerprinted_only_when_set():
  eval_fp = settings.split({"objectives": ["tlm"]})[0].fingerprint_fields("tlm")
  train_fp = settings.split({"objectives": ["tlm"], "donor_bn": "train"})[0]
  assert "donor_bn" not in eval_fp  # results stored before the switch keep theirs
  assert train_fp.fingerprint_fields("tlm")["donor_bn"] == "train"
  with pytest.raises(Exception, match="Valid choices: eval, train"):
    settings.split({"objectives": ["tlm"], "donor_bn": "batch"})


class _InferenceOnly:
  """A donor that follows the protocol but cannot run in train mode (like an adapter)."""

  def __init__(self, model):
    self.model = model
    self.point_names = model.point_names

  def apply(self, variables, x, *, train=False, **kw):
    if train:
      raise ConfigError("this donor runs with train=False only.")
    return self.model.apply(variables, x, train=False, **kw)


def test_a_donor_without_train_mode_is_a_clear_error(donors):
  model, f, g, train, test = donors
  with pytest.raises(ConfigError, match=r"donor_bn='train'.*model_a \(_InferenceOnly\)"):
    stitching.run_sweep(_InferenceOnly(model), f, model, g, train, test,
                        dict(CFG, donor_bn="train"))
