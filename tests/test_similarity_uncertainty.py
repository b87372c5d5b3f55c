"""Calibrated scores against permutation nulls, bootstrap intervals (coverage of a known
population value), output measures against NumPy/SciPy, and the job's options for
both."""

import jax
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from fula_jax import models, results, similarity
from fula_jax.similarity import outputs


def _pair(seed, n=80, d=5, related=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x @ rng.normal(size=(d, d)) + 0.5 * rng.normal(size=(n, d)) if related else (
      rng.normal(size=(n, d)))
  return x.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("name", ["cka_linear", "mutual_knn", "procrustes"])
def test_calibrated_scores_are_near_zero_for_independent_data_and_large_for_related(name):
  zs, scores = [], []
  for seed in range(10):
    c = similarity.calibrate(name, *_pair(seed), 100, key=seed)
    zs.append(c.z)
    scores.append(c.score)
  zs = np.asarray(zs)
  # Under the null z is roughly standard normal: most within 2, the mean near 0.
  assert np.mean(np.abs(zs) < 2) >= 0.8 and abs(np.mean(zs)) < 2 / np.sqrt(len(zs)) * 1.5
  assert abs(np.mean(scores)) < 0.05
  if name == "cka_linear":  # the raw value of independent data is far from 0
    assert similarity.calibrate(name, *_pair(0), 100).raw > 0.05
  related = similarity.calibrate(name, *_pair(99, related=True), 100, key=1)
  assert related.z > 5 and related.p_value == pytest.approx(1 / 101)
  assert 0.2 < related.score <= 1.0
  x, _ = _pair(3)
  same = similarity.calibrate(name, x, x, 50)
  assert same.score == pytest.approx(1.0, abs=1e-3)


def test_calibration_p_value_and_z_follow_from_the_null():
  x, y = _pair(5, related=True)
  c = similarity.calibrate("rsa", x, y, 64, key=7)
  res = similarity.null.permutation_test("rsa", x, y, jax.random.PRNGKey(7),
                                         num_permutations=64)
  assert c.raw == res.observed and c.null_mean == res.null_mean
  assert c.z == pytest.approx((res.observed - res.null.mean()) / res.null.std())
  assert c.p_value == pytest.approx((1 + np.sum(res.null >= res.observed)) / 65)


def test_bootstrap_interval_covers_the_population_value_about_as_often_as_its_level():
  """Debiased linear CKA of y = x A + noise, Gaussian x: the population value is
  ||S_xy||_F^2 / (||S_xx||_F ||S_yy||_F). A 90% interval covers it in about 90% of
  100 independent samples."""
  a = np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.3], [0.0, 0.4, 1.0]])
  dsc = np.diag([1.0, 0.7, 0.4])
  sxx, sxy = dsc @ dsc, dsc @ dsc @ a
  syy = a.T @ dsc @ dsc @ a + np.eye(3)
  population = np.sum(sxy ** 2) / np.linalg.norm(sxx) / np.linalg.norm(syy)
  hits = []
  for seed in range(100):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 3)) @ dsc
    y = x @ a + rng.normal(size=(200, 3))
    iv = similarity.bootstrap("cka_linear_debiased", x.astype(np.float32),
                              y.astype(np.float32), 200, level=0.9, key=seed)
    assert iv.low <= iv.value <= iv.high or abs(iv.value - iv.low) < 0.05
    hits.append(iv.low <= population <= iv.high)
  assert 0.8 <= np.mean(hits) <= 0.97, np.mean(hits)


def test_bootstrap_rejects_bad_levels():
  x, y = _pair(0)
  with pytest.raises(ValueError, match="in \\(0, 1\\)"):
    similarity.bootstrap("cka_linear", x, y, 10, level=90)


def _logits(seed, n=300, c=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  base = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[labels]
  return base, base + rng.normal(size=(n, c)), labels


def test_output_measures_match_numpy():
  a, b, labels = _logits(0)
  pa = np.exp(a) / np.exp(a).sum(1, keepdims=True)
  pb = np.exp(b) / np.exp(b).sum(1, keepdims=True)
  want = {
      "disagreement": np.mean(a.argmax(1) != b.argmax(1)),
      "jsd": np.mean(jensenshannon(pa, pb, axis=1, base=2) ** 2),
  }
  ra, rb = a.argmax(1) == labels, b.argmax(1) == labels
  c_exp = ra.mean() * rb.mean() + (1 - ra.mean()) * (1 - rb.mean())
  want["error_consistency"] = (np.mean(ra == rb) - c_exp) / (1 - c_exp)
  for name, value in want.items():
    assert outputs.compute(name, a, b, labels) == pytest.approx(value, rel=1e-5), name
  assert outputs.compute("disagreement", a, a) == 0.0
  assert outputs.compute("jsd", a, a) == pytest.approx(0.0, abs=1e-6)
  assert outputs.compute("error_consistency", a, a, labels) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="needs the labels"):
    outputs.compute("error_consistency", a, b)
  with pytest.raises(Exception, match="disagreement"):
    outputs.get("disagreemnt")


def test_the_job_writes_intervals_and_calibrated_matrices(tmp_path):
  model = models.get_model("mlp", widths=(8, 8))
  va = jax.jit(lambda k: models.init(model, k, (1, 8, 8, 1)))(jax.random.PRNGKey(0))
  vb = jax.jit(lambda k: models.init(model, k, (1, 8, 8, 1)))(jax.random.PRNGKey(1))
  images = np.random.default_rng(0).uniform(size=(96, 8, 8, 1)).astype(np.float32)
  mats = similarity.matrices(model, va, model, vb, images,
                             ("cka_linear_debiased", "mutual_knn"), batch_size=32,
                             calibrate=20, bootstrap=30, interval_level=0.8,
                             progress=False)
  assert set(mats) == {"cka_linear_debiased", "mutual_knn", "cka_linear_debiased_calibrated",
                       "mutual_knn_calibrated"}
  for name in ("cka_linear_debiased", "mutual_knn"):
    m = mats[name]
    assert m.low.shape == m.matrix.shape and np.all(m.low <= m.high)
    assert m.meta["interval"]["level"] == 0.8 and m.meta["interval"]["resamples"] == 30
    cal = mats[f"{name}_calibrated"]
    assert cal.matrix.shape == m.matrix.shape and np.all(np.isfinite(cal.matrix))
    assert np.asarray(cal.meta["z"]).shape == m.matrix.shape
    # Each calibrated cell is that cell's own calibration (a continuous measure: the
    # job's activations, computed sharded batch by batch, differ in rounding only).
    if name == "cka_linear_debiased":
      assert cal.matrix[0, 1] == pytest.approx(similarity.calibrate(
          name, *_acts(model, va, vb, images, m.rows[0], m.cols[1]), 20).score, abs=5e-4)
    results.save(tmp_path, name, m)
  back = results.load(tmp_path)["cka_linear_debiased"]
  np.testing.assert_array_equal(back.low, mats["cka_linear_debiased"].low)
  df = back.to_dataframe()
  assert {"low", "high"} <= set(df.columns)


def _acts(model, va, vb, images, row, col):
  _, a = models.capture(model, va, images)
  _, b = models.capture(model, vb, images)
  return np.asarray(a[row]), np.asarray(b[col])


def test_matrices_within_one_model_mirror_symmetric_measures_only():
  rng = np.random.default_rng(6)
  acts = {f"l{k}": rng.normal(size=(60, 4)).astype(np.float32) + k for k in range(3)}
  acts["l1"] = acts["l0"] + 0.5 * acts["l1"]
  cal = similarity.calibration.calibrated_matrix("cka_linear", acts, None, 16)
  np.testing.assert_array_equal(cal["score"], cal["score"].T)
  assert cal["score"][1, 0] == pytest.approx(
      similarity.calibrate("cka_linear", acts["l0"], acts["l1"], 16).score)
  low, high = similarity.intervals.bootstrap_matrix("cycle_knn", acts, None, 8, k=3)
  np.testing.assert_allclose(low[0, 1], similarity.bootstrap(
      "cycle_knn", acts["l0"], acts["l1"], 8, k=3).low)
  np.testing.assert_allclose(low[1, 0], similarity.bootstrap(
      "cycle_knn", acts["l1"], acts["l0"], 8, k=3).low)
  assert np.all(low <= high)
