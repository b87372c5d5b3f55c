"""Tests of fula_jax.attacks: the threat-model constraints and that the attack works."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fula_jax import attacks, models, registry

EPS_TRAIN = 0.1


_pgd = jax.jit(attacks.pgd,
               static_argnames=("apply_fn", "steps", "norm", "random_start", "loss_fn"))


@pytest.fixture(scope="module")
def random_model():
  model = models.get_model("mlp", widths=(32,), num_classes=5)
  variables = models.init(model, jax.random.PRNGKey(0), (1, 8, 8, 3))
  return lambda x: models.forward(model, variables, x)


def _images(n=16, shape=(8, 8, 3), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n,) + shape).astype(np.float32)
  x[0] = 0.0  # pixels on the box boundary must stay inside it.
  x[1] = 1.0
  return x, (np.arange(n) % 5).astype(np.int32)


def _robust_vs_weak_features(rng, n):
  """Two classes: a strong cue on 4 pixels that is right 90% of the time, and a weak
  per-pixel shift of +-0.06 on all pixels (noise 0.1) that is nearly always right in sum.

  Standard training leans on the weak features, which an L-inf eps of 0.1 flips; the
  strong cue (+-0.35) survives that eps (the classic robust/non-robust feature split).
  """
  y = rng.integers(0, 2, n)
  sign = 2.0 * y - 1.0
  cue = np.where(rng.uniform(size=n) < 0.1, -sign, sign)
  x = 0.5 + 0.06 * sign[:, None] + 0.1 * rng.normal(size=(n, 64))
  x[:, :4] = 0.5 + 0.35 * cue[:, None]
  return np.clip(x, 0, 1).reshape(n, 8, 8, 1).astype(np.float32), y.astype(np.int32)


@pytest.fixture(scope="module")
def trained():
  rng = np.random.default_rng(0)
  x_train, y_train = _robust_vs_weak_features(rng, 512)
  x_test, y_test = _robust_vs_weak_features(rng, 512)
  model = models.get_model("mlp", widths=(64,), num_classes=2)
  init = models.init(model, jax.random.PRNGKey(0), (1, 8, 8, 1))["params"]
  opt = optax.adam(1e-2)

  def train(adversarial: bool, steps: int = 300):
    def body(carry, key):
      params, opt_state = carry
      x = x_train
      if adversarial:
        x = attacks.pgd(lambda z: model.apply({"params": params}, z), x, y_train, key,
                        eps=EPS_TRAIN, step_size=EPS_TRAIN / 4, steps=7)

      def loss_fn(p):
        return jnp.mean(attacks.cross_entropy(model.apply({"params": p}, x), y_train))

      grads = jax.grad(loss_fn)(params)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    run = jax.jit(lambda p, s, keys: jax.lax.scan(body, (p, s), keys)[0][0])
    params = run(init, opt.init(init), jax.random.split(jax.random.PRNGKey(1), steps))
    return lambda z: models.forward(model, {"params": params}, z)

  return dict(standard=train(False), robust=train(True), x=x_test, y=y_test)


def _eval_cfg():
  cfg = attacks.default_attack_config()
  cfg.eps, cfg.step_size, cfg.eval_steps = EPS_TRAIN, EPS_TRAIN / 4, 10
  return cfg


# ---------------------------------------------------------------------------- constraints


@pytest.mark.parametrize("random_start", [True, False])
def test_linf_constraint_and_pixel_box(random_model, random_start):
  apply_fn = random_model
  x, y = _images()
  eps = 0.03
  x_adv = np.asarray(_pgd(apply_fn, x, y, jax.random.PRNGKey(3), eps=eps,
                                 step_size=0.01, steps=5, norm="linf",
                                 random_start=random_start))
  delta = x_adv - x
  assert np.abs(delta).max() <= eps + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.abs(delta).max() > 0.9 * eps  # the attack did move.


def test_l2_constraint_per_example(random_model):
  apply_fn = random_model
  x, y = _images()
  eps = 0.5
  x_adv = np.asarray(_pgd(apply_fn, x, y, jax.random.PRNGKey(4), eps=eps,
                                 step_size=0.2, steps=5, norm="l2"))
  norms = np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)
  assert norms.max() <= eps + 1e-6
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.median(norms) > 0.9 * eps  # the ball's surface is reached.


def test_l2_random_start_inside_ball_and_projection_closed_form():
  x, _ = _images(n=64)
  d = np.asarray(attacks._random_start(jax.random.PRNGKey(0), jnp.asarray(x), 0.7, "l2"))
  norms = np.linalg.norm(d.reshape(64, -1), axis=1)
  assert norms.max() <= 0.7 + 1e-6 and norms.min() > 0
  v = np.random.default_rng(1).normal(size=(4, 3, 3)).astype(np.float32)
  v[1] *= 1e-3  # inside the ball: unchanged.
  projected = np.asarray(attacks.project(jnp.asarray(v), 0.5, "l2"))
  for a, b in zip(v, projected):
    n = np.linalg.norm(a)
    np.testing.assert_allclose(b, a if n <= 0.5 else a * 0.5 / n, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_input_exactly(random_model, norm):
  apply_fn = random_model
  x, y = _images()
  x_adv = _pgd(apply_fn, x, y, jax.random.PRNGKey(5), eps=0.0, step_size=0.1,
                      steps=5, norm=norm)
  np.testing.assert_array_equal(np.asarray(x_adv), x)


def test_unknown_norm_lists_valid_ones(random_model):
  apply_fn = random_model
  x, y = _images()
  with pytest.raises(registry.UnknownNameError, match="linf.*l2|l2.*linf"):
    attacks.pgd(apply_fn, x, y, jax.random.PRNGKey(0), eps=0.1, step_size=0.1,
                steps=1, norm="l3")
  cfg = attacks.default_attack_config()
  cfg.norm = "linfinity"
  with pytest.raises(registry.UnknownNameError):
    attacks.attack_kwargs(cfg)


def test_default_config_and_jit_with_traced_eps(random_model):
  cfg = attacks.default_attack_config()
  assert (cfg.norm, cfg.steps, cfg.eval_steps, cfg.random_start) == ("linf", 10, 20, True)
  assert cfg.eps == pytest.approx(8 / 255) and cfg.step_size == pytest.approx(2 / 255)
  assert attacks.attack_kwargs(cfg)["steps"] == 10
  assert attacks.attack_kwargs(cfg, evaluation=True)["steps"] == 20

  apply_fn = random_model
  x, y = _images()
  traces = []

  @jax.jit
  def attack(x, y, key, eps):
    traces.append(1)
    return attacks.pgd(apply_fn, x, y, key, eps=eps, step_size=eps / 4, steps=3)

  for eps in (0.01, 0.05):
    x_adv = np.asarray(attack(x, y, jax.random.PRNGKey(0), jnp.float32(eps)))
    assert np.abs(x_adv - x).max() <= eps + 1e-6
  assert len(traces) == 1  # eps is a traced value: an eps sweep compiles once.


# ---------------------------------------------------------------------------- effect


def test_pgd_lowers_accuracy_and_adversarial_training_resists(trained):
  batches = [dict(image=trained["x"], label=trained["y"])]
  key = jax.random.PRNGKey(8)
  std = attacks.robust_accuracy(trained["standard"], batches, key, _eval_cfg())
  rob = attacks.robust_accuracy(trained["robust"], batches, key, _eval_cfg())
  assert std["accuracy"] > 0.95
  assert std["robust_accuracy"] < 0.3  # substantially below clean.
  assert std["robust_loss"] > std["loss"]
  drop_std = std["accuracy"] - std["robust_accuracy"]
  drop_rob = rob["accuracy"] - rob["robust_accuracy"]
  assert rob["robust_accuracy"] > 0.75
  assert drop_rob < 0.25 * drop_std


def test_robust_accuracy_ignores_padding_and_matches_reference(trained):
  apply_fn, x, y = trained["standard"], trained["x"][:100], trained["y"][:100]
  padded_x = np.concatenate([x, np.zeros((28,) + x.shape[1:], np.float32)])
  padded_y = np.concatenate([y, np.full(28, 1 - y[0], np.int32)])
  mask = np.concatenate([np.ones(100), np.zeros(28)]).astype(np.float32)
  batches = [dict(image=padded_x[:64], label=padded_y[:64], mask=mask[:64]),
             dict(image=padded_x[64:], label=padded_y[64:], mask=mask[64:])]
  out = attacks.robust_accuracy(apply_fn, batches, jax.random.PRNGKey(9), _eval_cfg())
  assert out["num_examples"] == 100
  logits = np.asarray(apply_fn(x), np.float64)
  assert out["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == y))
  logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  ce = logz - logits[np.arange(100), y]
  assert out["loss"] == pytest.approx(ce.mean(), rel=1e-4, abs=1e-6)
  # The robust number counts the same 100 rows the attack made for them, batch by batch.
  kwargs = attacks.attack_kwargs(_eval_cfg(), evaluation=True)
  correct, adv_loss = 0, []
  for i, b in enumerate(batches):
    x_adv = _pgd(apply_fn, b["image"], b["label"],
                 jax.random.fold_in(jax.random.PRNGKey(9), i), **kwargs)
    logits_adv = np.asarray(apply_fn(x_adv))
    correct += np.sum((logits_adv.argmax(-1) == b["label"]) * b["mask"])
    adv_loss.append(np.asarray(attacks.cross_entropy(logits_adv, b["label"])))
  assert out["robust_accuracy"] == pytest.approx(correct / 100)
  # The attack raises the loss of (nearly) every real example, not just on average.
  adv_loss = np.concatenate(adv_loss)[:100]
  assert np.mean(adv_loss >= ce - 1e-5) > 0.95
  assert adv_loss.mean() > ce.mean() + 1.0


def test_a_models_weights_as_params_compile_once_and_equal_the_closure():
  """`params=` with a hashable `models.Forward`: other weights of the same model reuse
  the program (a closure over them compiled anew), and the numbers equal the closure's."""
  from fula_jax import models, sharding
  model = models.get_model("cnn", num_classes=10, widths=(4, 8))
  first, second = (models.init(model, jax.random.PRNGKey(s), (1, 8, 8, 1)) for s in (0, 1))
  rng = np.random.default_rng(0)
  batches = [dict(image=rng.uniform(size=(32, 8, 8, 1)).astype(np.float32),
                  label=rng.integers(0, 10, 32).astype(np.int32))]
  key = jax.random.PRNGKey(3)
  attacks.robust_accuracy(models.Forward(model), batches, key, _eval_cfg(), params=first)
  with sharding.count_compiles() as count:
    got = attacks.robust_accuracy(models.Forward(model), batches, key, _eval_cfg(),
                                  params=second)
  assert count.compiled == 0, count
  want = attacks.robust_accuracy(lambda x: models.forward(model, second, x), batches, key,
                                 _eval_cfg())
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
