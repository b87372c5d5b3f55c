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


PERMUTABLE = [name for name, m in similarity.measures.MEASURES.items() if m.permute]


def test_permuting_a_prepared_state_equals_preparing_the_permuted_examples():
  """The null reorders Y's prepared state instead of preparing each shuffle: for every
  measure that declares it, the value against X equals the value of X against the
  shuffled examples prepared afresh (random data: no ties for neighbours or ranks).
  Every measure at 6 features (linear CKA's feature-space path), and those whose state
  depends on the width at 60 > n = 40 (Gram path, row-space rotation)."""
  assert len(PERMUTABLE) >= 14  # all but linear_predictivity
  rng = np.random.default_rng(0)
  n = 40
  wide = ("cka_linear", "cka_rbf", "procrustes", "shape_metric", "svcca")
  for d, names in ((6, PERMUTABLE), (60, wide)):
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, d)) + rng.normal(size=(n, d))).astype(np.float32)
    perm = rng.permutation(n)
    for name in names:
      m = similarity.measures.get(name)
      opts = m.options(n, (d,), (d,))

      @jax.jit
      def both(x, y, perm):
        sx, sy = m.prepare(x, opts), m.prepare(y, opts)
        return (m.combine(sx, m.permute(sy, perm, opts), opts),
                m.combine(sx, m.prepare(y[perm], opts), opts))

      reordered, afresh = both(x, y, perm)
      np.testing.assert_allclose(reordered, afresh, rtol=2e-4, atol=2e-5,
                                 err_msg=f"{name} at d = {d}")


@pytest.mark.parametrize("name", ["cka_linear_debiased", "mutual_knn", "rsa", "svcca"])
def test_the_null_of_prepared_states_equals_the_null_prepared_per_shuffle(name):
  """Same key, same shuffles: the null from reordered states equals the null from
  re-preparing every shuffled Y (the path of a measure without `permute`)."""
  from fula_jax.similarity import null
  x, y = _pair(11, n=48, related=True)
  m = similarity.measures.get(name)
  opts = m.options(48, (5,), (5,))
  fast = null.permutation_test(name, x, y, jax.random.PRNGKey(3), num_permutations=40)
  _, slow = null._run(m.name, tuple(sorted(opts.items())), 40, 16, jax.numpy.asarray(x),
                      jax.numpy.asarray(y), jax.random.PRNGKey(3))
  np.testing.assert_allclose(fast.null, np.asarray(slow), rtol=1e-4, atol=1e-5)


def test_a_calibrated_matrix_compiles_one_null_for_layers_of_every_width():
  """Layers of 3, 5 and 9 features: one compiled null program for the whole matrix
  (prepared states share a shape), and every cell equals calibrating that pair alone."""
  from fula_jax.similarity import null
  rng = np.random.default_rng(0)
  acts = {f"l{d}": rng.normal(size=(40, d)).astype(np.float32) for d in (3, 5, 9)}
  other = {k: v + 0.3 * rng.normal(size=v.shape).astype(np.float32)
           for k, v in acts.items()}
  before = null._run_prepared._cache_size()
  cal = similarity.calibration.calibrated_matrix("cka_linear_debiased", acts, other, 32,
                                                key=4)
  assert null._run_prepared._cache_size() - before == 1
  for i, x in enumerate(acts.values()):
    for j, y in enumerate(other.values()):
      alone = similarity.calibrate("cka_linear_debiased", x, y, 32, key=4)
      assert cal["raw"][i, j] == pytest.approx(alone.raw, abs=1e-5)
      assert cal["p_value"][i, j] == pytest.approx(alone.p_value)
      assert cal["null_mean"][i, j] == pytest.approx(alone.null_mean, abs=1e-5)


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



def test_a_bootstrap_matrix_equals_bootstrapping_each_cell_alone():
  """Layers of 4 and 7 features against 9: every cell's interval is the one
  `bootstrap` gives that pair (same key, same resamples), though each layer is
  prepared once per resample and the resamples run in chunks of 6 with a padded last
  chunk; for a Gram state (one shape for every layer) and a feature state (one per
  width)."""
  from fula_jax.similarity import intervals
  rng = np.random.default_rng(0)
  a = {f"a{d}": rng.normal(size=(40, d)).astype(np.float32) for d in (4, 7)}
  b = {"b9": (rng.normal(size=(40, 9)) + 0.1).astype(np.float32)}
  b["b9"][:, :4] += a["a4"]
  for name in ("cka_linear_debiased", "procrustes"):
    low, high = intervals.bootstrap_matrix(name, a, b, 20, key=3, chunk=6)
    for i, x in enumerate(a.values()):
      alone = similarity.bootstrap(name, x, b["b9"], 20, key=3)
      np.testing.assert_allclose([low[i, 0], high[i, 0]], [alone.low, alone.high],
                                 rtol=1e-4, atol=1e-5, err_msg=f"{name} row {i}")
      assert alone.high - alone.low > 1e-3  # a real interval, not a constant


def test_a_bootstrap_matrix_compiles_one_combine_for_layers_of_every_width():
  """A Gram-based measure's states share one shape: one compiled combine program for
  every cell of a 3 x 3 matrix of layers of different widths."""
  from fula_jax.similarity import intervals
  rng = np.random.default_rng(1)
  acts = {f"l{d}": rng.normal(size=(30, d)).astype(np.float32) for d in (3, 6, 11)}
  before = intervals._combine_resampled._cache_size()
  low, high = intervals.bootstrap_matrix("cka_linear", acts, {k: v + 1.0 for k, v in
                                                              acts.items()}, 10)
  assert intervals._combine_resampled._cache_size() - before == 1
  assert np.all(low <= high) and np.isfinite(low).all()

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
  va = models.init(model, jax.random.PRNGKey(0), (1, 8, 8, 1))
  vb = models.init(model, jax.random.PRNGKey(1), (1, 8, 8, 1))
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
