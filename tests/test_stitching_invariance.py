"""Invariance-aware stitching (`stitch.invariance`): stitches out of f's point i train and
are scored on images inverted through f at i."""

from __future__ import annotations

import numpy as np
import pytest

from fula_jax import models, registry, stitching
from fula_jax.errors import ConfigError
from fula_jax.similarity import inversion
from fula_jax.stitching import invariance, testing

INV = dict(examples=100, test_examples=100, steps=120)
CFG = dict(objectives=["dm"], map="identity", pairs="diagonal", batch_size=100,
           eval_batch_size=100, progress=False, compilation_cache="off", invariance=INV)


@pytest.fixture(scope="module")
def donor():
  train, test = testing.digits_splits(600, 200)
  model = models.get_model("mlp", widths=(24, 12))
  return model, testing.train_donor(model, train, steps=300, lr=3e-3), train, test


def _rel(a, b):
  a, b = (np.asarray(v, np.float64).reshape(len(v), -1) for v in (a, b))
  return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def test_inverted_sets_match_the_front_representation_not_the_pixels(donor, tmp_path,
                                                                     monkeypatch):
  model, variables, train, test = donor
  opts = invariance.options(INV)
  fit, held, info = invariance.inverted_sets(model, variables, "fc2", train, test, opts,
                                             10, tmp_path)
  x, y = train.images[:100], train.labels[:100]
  np.testing.assert_array_equal(fit.labels, y)
  np.testing.assert_array_equal(held.labels, test.labels[:100])
  at = lambda images: models.forward(model, variables, images, end="fc2")
  matched = _rel(at(fit.images), at(x))
  other = _rel(at(x[::-1]), at(x))  # another example's representation
  assert np.median(matched) < 0.25 < np.median(other)
  assert np.mean(np.abs(fit.images - x)) > 0.1  # not the images themselves
  assert info["train_loss"] == pytest.approx(np.mean(matched), rel=1e-3)
  # Kept in the folder: a second call inverts nothing.
  monkeypatch.setattr(inversion, "invert", lambda *a, **k: pytest.fail("inverted again"))
  again, _, _ = invariance.inverted_sets(model, variables, "fc2", train, test, opts, 10,
                                         tmp_path)
  np.testing.assert_array_equal(again.images, fit.images)


def test_self_stitch_scores_the_end_model_on_each_rows_inverted_images(donor, tmp_path,
                                                                      monkeypatch):
  """f = g and the identity map: cell (i, i) is g itself on the images inverted at i,
  which differ per row; the rows resume on their own."""
  model, variables, train, test = donor
  res = stitching.run_sweep(model, variables, model, variables, train, test, CFG,
                            str(tmp_path))
  acc = res.values["dm@identity"]["accuracy"]
  assert acc.shape == (2, 2) and np.isnan(acc[0, 1]) and np.isnan(acc[1, 0])
  for i, point in enumerate(model.point_names):
    z = np.load(tmp_path / "invariance" / f"{point}.npz")
    own = testing.accuracy(model, variables, stitching_split(z))
    assert acc[i, i] == pytest.approx(own, abs=1e-6)
    assert res.meta["end_accuracy_by_row"][point] == pytest.approx(own, abs=1e-6)
  assert res.meta["invariance"]["examples"] == 100
  reasons = res.matrices()["stitch_dm@identity/accuracy"].meta["reasons"]
  assert reasons["fc1->fc2"] == stitching.api.NOT_REQUESTED
  monkeypatch.setattr(inversion, "invert", lambda *a, **k: pytest.fail("inverted again"))
  again = stitching.run_sweep(model, variables, model, variables, train, test, CFG,
                              str(tmp_path))
  assert again.stats["stitches_computed"] == 0
  np.testing.assert_array_equal(again.values["dm@identity"]["accuracy"], acc)


def stitching_split(z):
  from fula_jax.data import Split
  return Split(z["test_images"], z["test_labels"], 10, "inverted")


def test_bad_invariance_settings_are_clear_errors(donor):
  model, variables, train, test = donor
  with pytest.raises(registry.UnknownNameError, match="Valid choices: examples"):
    stitching.run_sweep(model, variables, model, variables, train, test,
                        dict(CFG, invariance={"exampels": 10}))
  with pytest.raises(ConfigError, match="test_examples"):
    stitching.run_sweep(model, variables, model, variables, train, test,
                        dict(CFG, invariance={"examples": 10}))
  with pytest.raises(ConfigError, match="no train_b, test_b or eval_sets"):
    stitching.run_sweep(model, variables, model, variables, train, test, CFG,
                        eval_sets={"other": test})
