"""Tests of representation inversion and inverted-image CKA (Jones et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fula_jax import models, registry
from fula_jax.similarity import cka, inversion

SHAPE = (8, 8, 3)


def _np_linear_cka(x, y):
  """Biased linear CKA from the HSIC formula tr(K H L H), in float64."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = x @ x.T, y @ y.T

  def hsic(a, b):
    return np.trace(a @ h @ b @ h)

  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _np_rep_loss(rep_x, rep_t):
  rep_x, rep_t = np.asarray(rep_x, np.float64), np.asarray(rep_t, np.float64)
  return np.linalg.norm(rep_x - rep_t, axis=1) / np.linalg.norm(rep_t, axis=1)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  n = 16
  images = rng.uniform(size=(n,) + SHAPE).astype(np.float32)
  labels = (np.arange(n) % 4).astype(np.int32)
  zoo = {}
  for name, kind, widths, seed in (("cnn_a", "cnn", (8, 16), 0),
                                   ("mlp_a", "mlp", (32, 16), 1),
                                   ("mlp_b", "mlp", (24, 12), 2)):
    model = models.get_model(kind, widths=widths, num_classes=4)
    zoo[name] = (model, models.init(model, jax.random.PRNGKey(seed), (1,) + SHAPE))
  pairs = inversion.make_pairs(labels, jax.random.PRNGKey(5), n)
  return dict(images=images, labels=labels, zoo=zoo, pairs=pairs)


@pytest.fixture(scope="module")
def long_run(setup):
  """A few hundred steps on the CNN for 8 pairs, with the loss history."""
  model, variables = setup["zoo"]["cnn_a"]
  seed_idx, target_idx = (p[:8] for p in setup["pairs"])
  seeds, targets = setup["images"][seed_idx], setup["images"][target_idx]
  cfg = dict(steps=200, step_size=1 / 32)
  rep = inversion.model_representation(model)
  out = inversion.invert(rep, variables, seeds, targets, cfg, return_history=True)
  return dict(out=out, seeds=seeds, targets=targets, cfg=cfg, rep=rep,
              variables=variables, model=model)


def _pool(model, variables, x):
  return np.asarray(models.forward(model, variables, jnp.asarray(x), end="pool"))


def test_representation_distance_falls_by_a_large_factor(long_run):
  out, model, v = long_run["out"], long_run["model"], long_run["variables"]
  before = _np_rep_loss(_pool(model, v, long_run["seeds"]),
                        _pool(model, v, long_run["targets"]))
  after = _np_rep_loss(_pool(model, v, out.images), _pool(model, v, long_run["targets"]))
  np.testing.assert_allclose(out.initial_loss, before, rtol=1e-4)
  np.testing.assert_allclose(out.loss, after, rtol=1e-3, atol=1e-6)
  assert np.all(before / after > 5.0)
  assert out.images.min() >= 0.0 and out.images.max() <= 1.0


def test_kept_iterate_is_best_of_a_manual_trajectory(setup):
  """Replays the documented update rule by hand and checks the kept iterate."""
  model, variables = setup["zoo"]["cnn_a"]
  seed_idx, target_idx = (p[:6] for p in setup["pairs"])
  seeds, targets = setup["images"][seed_idx], setup["images"][target_idx]
  lr, mu, steps = 0.6, 0.9, 12  # a large step, so the trajectory overshoots.
  out = inversion.invert(inversion.model_representation(model), variables, seeds,
                         targets, dict(steps=steps, step_size=lr, momentum=mu),
                         return_history=True)
  rep_t = models.forward(model, variables, jnp.asarray(targets), end="pool")

  def losses(x):
    r = models.forward(model, variables, x, end="pool")
    return jnp.linalg.norm(r - rep_t, axis=1) / jnp.linalg.norm(rep_t, axis=1)

  @jax.jit
  def step(x, v):
    loss, pullback = jax.vjp(losses, x)
    g = pullback(jnp.ones_like(loss))[0]
    g = g / jnp.linalg.norm(g.reshape(len(g), -1), axis=1)[:, None, None, None]
    v = mu * v + g
    return jnp.clip(x - lr * v, 0.0, 1.0), v, loss

  x, v = jnp.asarray(seeds), jnp.zeros_like(jnp.asarray(seeds))
  iterates, trajectory = [], []
  for _ in range(steps):
    iterates.append(np.asarray(x))
    x, v, loss = step(x, v)
    trajectory.append(np.asarray(loss))
  iterates.append(np.asarray(x))
  trajectory.append(np.asarray(losses(x)))
  trajectory, iterates = np.stack(trajectory), np.stack(iterates)

  assert out.history.shape == (steps + 1, 6)
  np.testing.assert_allclose(out.history, trajectory, rtol=2e-3, atol=1e-5)
  best = trajectory.argmin(0)
  np.testing.assert_allclose(out.loss, trajectory.min(0), rtol=2e-3, atol=1e-5)
  np.testing.assert_allclose(out.images, iterates[best, np.arange(6)], atol=2e-3)
  # The best iterate is not simply the last one for some example: keeping it matters.
  assert np.any(trajectory[-1] > trajectory.min(0) * 1.05)
  assert np.all(out.loss <= out.history[-1] + 1e-7)
  # Pixels stayed in the box, and the box was hit.
  assert iterates.min() >= 0.0 and iterates.max() <= 1.0
  assert np.any(out.images == 0.0) or np.any(out.images == 1.0)


def test_chunked_inversion_matches_one_batch(long_run):
  out = long_run["out"]
  chunked = inversion.invert(long_run["rep"], long_run["variables"], long_run["seeds"],
                             long_run["targets"], dict(long_run["cfg"], batch_size=3))
  np.testing.assert_allclose(chunked.loss, out.loss, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(chunked.images, out.images, atol=1e-3)


def test_make_pairs_different_labels_and_deterministic():
  labels = np.array([0] * 20 + [1] * 3 + [2] * 7)
  rng = np.random.default_rng(1)
  labels = labels[rng.permutation(len(labels))]
  for n in (25, 70):
    s, t = inversion.make_pairs(labels, jax.random.PRNGKey(0), n)
    assert s.shape == t.shape == (n,)
    assert np.all(labels[s] != labels[t])
    assert s.min() >= 0 and t.min() >= 0 and max(s.max(), t.max()) < len(labels)
    s2, t2 = inversion.make_pairs(labels, jax.random.PRNGKey(0), n)
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(t, t2)
    s3, t3 = inversion.make_pairs(labels, jax.random.PRNGKey(1), n)
    assert not (np.array_equal(s, s3) and np.array_equal(t, t3))
    assert len(np.unique(labels[t])) == 3
  s, _ = inversion.make_pairs(labels, jax.random.PRNGKey(0), 30)
  assert len(np.unique(s)) == 30  # without replacement while possible.
  with pytest.raises(ValueError):
    inversion.make_pairs(np.zeros(5, np.int32), jax.random.PRNGKey(0), 3)


@pytest.mark.parametrize("n,d1,d2", [(12, 40, 30), (80, 6, 9)])
def test_linear_cka_matches_numpy_reference(n, d1, d2):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d1)).astype(np.float32)
  y = (x[:, :min(d1, d2)] @ rng.normal(size=(min(d1, d2), d2))
       + 0.5 * rng.normal(size=(n, d2))).astype(np.float32)
  ours = float(cka.cka_linear(jnp.asarray(x), jnp.asarray(y)))
  assert ours == pytest.approx(_np_linear_cka(x, y), rel=1e-4)
  assert float(cka.cka_linear(x, x)) == pytest.approx(1.0, abs=1e-5)
  q, _ = np.linalg.qr(rng.normal(size=(d2, d2)))
  rotated = float(cka.cka_linear(x, 3.0 * y @ q.astype(np.float32) + 2.0))
  assert rotated == pytest.approx(ours, rel=1e-4)


def test_inverted_cka_matrix_asymmetric_unit_diagonal(setup):
  zoo, images, labels = setup["zoo"], setup["images"], setup["labels"]
  pairs = setup["pairs"]
  cfg = dict(steps=40, step_size=1 / 16, progress=False)
  s, names, invs = inversion.inverted_cka_matrix(zoo, images, labels, pairs, cfg,
                                                 return_inversions=True)
  assert names == ["cnn_a", "mlp_a", "mlp_b"] and s.shape == (3, 3)
  np.testing.assert_allclose(np.diag(s), 1.0, atol=1e-5)
  assert np.abs(s - s.T).max() > 1e-3
  points = {"cnn_a": "pool", "mlp_a": "fc2", "mlp_b": "fc2"}
  for a, name_a in enumerate(names):
    inv = invs[name_a]
    assert inv.images.shape == (len(pairs[0]),) + SHAPE
    assert inv.images.min() >= 0.0 and inv.images.max() <= 1.0
    assert np.all(inv.loss < inv.initial_loss)
    acts = {b: np.asarray(models.forward(m, v, jnp.asarray(inv.images), end=points[b]))
            for b, (m, v) in zoo.items()}
    for b, name_b in enumerate(names):
      assert s[a, b] == pytest.approx(_np_linear_cka(acts[name_a], acts[name_b]),
                                      abs=1e-4)

  nat, nat_names = inversion.natural_cka_matrix(zoo, images, cfg)
  assert nat_names == names
  np.testing.assert_allclose(nat, nat.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(nat), 1.0, atol=1e-5)
  acts = {b: np.asarray(models.forward(m, v, jnp.asarray(images), end=points[b]))
          for b, (m, v) in zoo.items()}
  assert nat[0, 2] == pytest.approx(_np_linear_cka(acts["cnn_a"], acts["mlp_b"]),
                                    abs=1e-4)

  same = (np.arange(4), np.arange(4) + 4)  # labels i % 4: every pair shares a label.
  with pytest.raises(ValueError, match="different labels"):
    inversion.inverted_cka_matrix(zoo, images, labels, same, cfg)


def test_unknown_names_list_valid_ones(setup):
  model, _ = setup["zoo"]["cnn_a"]
  with pytest.raises(registry.UnknownNameError, match="pool"):
    inversion.model_representation(model, "pol")
  assert inversion.representation_point(model) == "pool"
  with pytest.raises(registry.UnknownNameError, match="step_size"):
    inversion._resolve(dict(stepsize=0.1))
