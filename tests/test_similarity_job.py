"""Permutation null, the in-memory matrix path, and the job end to end on tiny models."""

import functools
import warnings

import jax
import ml_collections
import numpy as np
import pytest

from fula_jax import defaults, models, registry, results
from fula_jax.data import Split
from fula_jax.similarity import SimilarityWarning, job, layers, measures, minibatch, null

import test_similarity_measures as refs  # NumPy references from the published formulas


def related(seed, n=60, noise=0.3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8))
  y = x @ rng.normal(size=(8, 6)) + noise * rng.normal(size=(n, 6))
  return x.astype(np.float32), y.astype(np.float32)


R = 48  # one compiled null per measure across the tests


def test_permutation_null_p_values():
  x, y = related(0)
  key = jax.random.PRNGKey(0)
  r = null.permutation_test("cka_linear_debiased", x, y, key, num_permutations=R)
  assert r.p_value == pytest.approx(1 / (R + 1))       # no shuffle reaches the truth
  assert r.observed == pytest.approx(float(measures.get("cka_linear_debiased")(x, y)),
                                     rel=1e-6)
  assert abs(r.null_mean) < 0.05                       # debiased null is centred on 0
  assert r.corrected == pytest.approx(r.observed - np.mean(r.null))
  assert r.null_std == pytest.approx(np.std(r.null))
  assert r.null.shape == (R,)
  # Unrelated data: the observed value is a typical draw from the null.
  rng = np.random.default_rng(1)
  u = rng.normal(size=(60, 6)).astype(np.float32)
  r = null.permutation_test("cka_linear_debiased", x, u, key, num_permutations=R)
  assert r.p_value > 0.05
  # A distance counts null values at or *below* the observed one.
  d = null.permutation_test("procrustes", x, y, key, num_permutations=R)
  assert d.kind == "distance" and d.p_value == pytest.approx(1 / (R + 1))
  assert d.observed < d.null_mean
  # Biased CKA's null sits well above 0 at n ~ d; the corrected score removes it.
  b = null.permutation_test("cka_linear", x, u, key, num_permutations=R)
  assert b.null_mean > 0.05 and abs(b.corrected) < b.observed
  # Same key, same null.
  again = null.permutation_test("cka_linear", x, u, key, num_permutations=R)
  np.testing.assert_array_equal(again.null, b.null)


def test_permutation_null_of_bad_input_is_nan_with_warning():
  x, y = related(2)
  x = x.copy()
  x[0, 0] = np.nan
  with pytest.warns(SimilarityWarning, match="NaN"):
    r = null.permutation_test("cka_linear", x, y, jax.random.PRNGKey(0),
                              num_permutations=R)
  assert np.isnan(r.p_value) and np.isnan(r.observed)


def test_matrix_within_model_is_symmetric_and_matches_pairs():
  x, y = related(3)
  acts = {"x": x, "y": y, "z": np.tanh(y)}
  mat, info = measures.matrix("cka_rbf_debiased", acts)
  np.testing.assert_allclose(mat, mat.T, rtol=1e-6)
  np.testing.assert_allclose(np.diag(mat), 1.0, rtol=1e-5)
  assert mat[0, 1] == pytest.approx(refs.REFS["cka_rbf_debiased"](x, y), rel=2e-5)
  assert info["n"] == 60
  mat, _ = measures.matrix("pwcca", acts)  # asymmetric: both triangles computed
  assert mat[0, 1] == pytest.approx(refs.ref_pwcca(x, y), rel=2e-5)
  assert mat[1, 0] == pytest.approx(refs.ref_pwcca(y, x), rel=2e-5)
  assert abs(mat[0, 1] - mat[1, 0]) > 1e-3


# ----------------------------------------------------------------------------
# The engine (layers.matrices) and run() on tiny models
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny_models():
  model_a = models.get_model("mlp", widths=(12, 6), num_classes=3)
  model_b = models.get_model("mlp", widths=(10,), num_classes=3)
  shape = (1, 4, 4, 1)
  vars_a = models.init(model_a, jax.random.PRNGKey(0), shape)
  vars_b = models.init(model_b, jax.random.PRNGKey(1), shape)
  return model_a, vars_a, model_b, vars_b


def image_batches(n=52, batch=16, seed=0):
  images = np.random.default_rng(seed).uniform(size=(n, 4, 4, 1)).astype(np.float32)
  out = []
  for s in range(0, n, batch):
    real = images[s:s + batch]
    pad = batch - len(real)
    out.append({"image": np.concatenate([real, np.zeros((pad, 4, 4, 1), np.float32)]),
                "mask": (np.arange(batch) < len(real)).astype(np.float32)})
  return images, out


def capture_all(model, variables, images, points):
  _, acts = jax.jit(lambda v, x: models.capture(model, v, x))(variables, images)
  return {p: np.asarray(acts[p]) for p in points}


def test_layer_matrices_match_direct_computation():
  model_a, vars_a, model_b, vars_b = tiny_models()
  images, batches = image_batches()
  mats = layers.matrices(
      model_a, vars_a, model_b, vars_b, batches=batches,
      measures=["cka_linear", "cka_linear_debiased", "svcca"], estimator="exact",
      max_examples=40, model_a_name="A", model_b_name="B", progress=False)
  assert [m.measure for m in mats] == ["cka_linear", "cka_linear_debiased", "svcca"]
  acts_a = capture_all(model_a, vars_a, images, ["fc1", "fc2"])
  acts_b = capture_all(model_b, vars_b, images, ["fc1"])
  for m in mats[:2]:
    assert (m.rows, m.cols, m.model_a, m.model_b) == (["fc1", "fc2"], ["fc1"], "A", "B")
    assert m.meta["estimator"] == "exact" and m.meta["n"] == 52
    want = [[refs.REFS[m.measure](a, b) for b in acts_b.values()]
            for a in acts_a.values()]
    np.testing.assert_allclose(m.matrix, want, rtol=1e-4, atol=1e-5)
  want = [[refs.ref_svcca(a[:40], b[:40]) for b in acts_b.values()]
          for a in acts_a.values()]
  np.testing.assert_allclose(mats[2].matrix, want, rtol=1e-4)
  assert mats[2].meta["n"] == 40


def test_layer_matrices_sharded_within_model_minibatch():
  model_a, vars_a, _, _ = tiny_models()
  _, batches = image_batches(n=48, batch=16)
  kw = dict(batches=batches, measures=["cka_linear_debiased"], points_a=["fc1", "logits"],
            progress=False)
  single = layers.matrices(model_a, vars_a, **kw)[0]
  sharded = layers.matrices(model_a, vars_a, mesh=minibatch.batch_mesh(), **kw)[0]
  assert single.rows == single.cols == ["fc1", "logits"]
  assert single.meta["within_model"] and sharded.meta["num_devices"] == 8
  np.testing.assert_allclose(sharded.matrix, single.matrix, rtol=1e-5)
  np.testing.assert_allclose(np.diag(single.matrix), 1.0, rtol=1e-5)
  with pytest.raises(registry.UnknownNameError, match="fc2"):
    layers.matrices(model_a, vars_a, batches=batches, points_a=["fc3"])
  with pytest.raises(registry.UnknownNameError, match="svcca"):
    layers.matrices(model_a, vars_a, batches=batches, measures=["svca"])


def test_typed_options_equal_their_flat_keywords_and_one_model_equals_two_copies():
  """`Points`/`Estimator`/`Uncertainty` and the flat keywords they group give the same
  matrices; one model compared with itself (one forward pass per batch) equals the
  two-model path fed the same model twice; a misspelt keyword names the valid ones."""
  model_a, vars_a, _, _ = tiny_models()
  _, batches = image_batches(n=48, batch=16)
  measures_ = ["cka_linear_debiased", "procrustes"]
  typed = layers.matrices(
      model_a, vars_a, None, None, batches, measures_,
      points=layers.Points(a=["fc1", "fc2"]),
      estimator=layers.Estimator(max_examples=32),
      uncertainty=layers.Uncertainty(permutations=8, seed=3), progress=False)
  flat = layers.matrices(model_a, vars_a, None, None, batches, measures_,
                         points_a=["fc1", "fc2"], max_examples=32, calibrate=8, seed=3,
                         progress=False)
  twice = layers.matrices(model_a, vars_a, model_a, vars_a, batches, measures_,
                          points_a=["fc1", "fc2"], points_b=["fc1", "fc2"],
                          max_examples=32, calibrate=8, seed=3, progress=False)
  assert [m.measure for m in typed] == [m.measure for m in flat] == [
      m.measure for m in twice] == ["cka_linear_debiased", "cka_linear_debiased_calibrated",
                                    "procrustes", "procrustes_calibrated"]
  assert typed[0].meta["within_model"] and not twice[0].meta["within_model"]
  upper = np.triu(np.ones((2, 2), bool))
  for t, f, w in zip(typed, flat, twice):
    np.testing.assert_array_equal(t.matrix, f.matrix)
    # A calibrated cell's null shuffles the column's examples: within one model the
    # lower triangle mirrors the upper one, two copies draw it from the other side.
    same = upper if t.measure.endswith("_calibrated") else np.ones((2, 2), bool)
    np.testing.assert_allclose(t.matrix[same], w.matrix[same], rtol=1e-5, atol=1e-6)
  assert typed[2].meta["max_examples"] == 32 and typed[3].meta["permutations"] == 8
  with pytest.raises(registry.UnknownNameError, match="max_examples"):
    layers.matrices(model_a, vars_a, None, None, batches, measures_, max_example=32)
  with pytest.raises(registry.UnknownNameError, match="minibatch"):
    layers.Estimator(linear_cka="streaming")


def test_run_writes_every_matrix(tmp_path, monkeypatch):
  model_a, vars_a, model_b, vars_b = tiny_models()
  images, _ = image_batches(n=40)

  from fula_jax import donors
  trained = {"a": donors.Donor(model_a, vars_a, "wa", ml_collections.ConfigDict({})),
             "b": donors.Donor(model_b, vars_b, "wb", None)}
  monkeypatch.setattr(donors, "load", lambda config, which, required=True: trained[which])
  monkeypatch.setattr(job, "_load_split",
                      lambda cfg, split: Split(images, np.zeros(40, np.int32), 10, "fake"))

  def batches(split, batch_size):
    return image_batches(n=len(split.images), batch=batch_size)[1]

  monkeypatch.setattr(job, "_eval_batches", batches)
  import pathlib
  config = defaults.load_config(
      pathlib.Path(__file__).parent.parent / "configs" / "similarity.py", "runlocal")
  config.model_a_workdir, config.model_b_workdir = "wa", "wb"
  config.batch_size, config.num_examples = 16, 36
  config.measures = ("cka_linear_debiased", "procrustes")
  with warnings.catch_warnings():
    warnings.simplefilter("error", SimilarityWarning)  # healthy data: no warnings
    summary = job.run(config, str(tmp_path))
  assert set(summary) == {"cka_linear_debiased", "procrustes"}
  assert summary["procrustes"]["n"] == 36 and summary["procrustes"]["nan_cells"] == 0
  loaded = results.load(tmp_path)
  assert set(loaded) == set(summary)
  import json
  assert json.loads((tmp_path / "summary.json").read_text()) == summary
  m = loaded["cka_linear_debiased"]
  assert (m.rows, m.cols, m.model_a, m.model_b) == (["fc1", "fc2"], ["fc1"], "wa", "wb")
  assert m.meta["estimator"] == "minibatch" and m.meta["n"] == 36
  for ext in ("npz", "json", "csv", "png"):
    assert (tmp_path / "results" / f"procrustes.{ext}").exists()
  # The report: both models, the overview (CKA; the distance is left out of its [0, 1]
  # scale) and one row per matrix with its mean.
  report = (tmp_path / "report.md").read_text()
  assert "A (rows): **wa**" in report and "B (columns): **wb**" in report
  assert (tmp_path / "results" / "overview.png").stat().st_size > 1000
  for name, mat in loaded.items():
    row = next(l for l in report.splitlines() if l.startswith(f"| `{name}`"))
    assert f"| {np.nanmean(mat.matrix):.3f} |" in row, row


def test_exact_estimator_refuses_statistics_that_do_not_fit():
  model_a, vars_a, model_b, vars_b = tiny_models()
  _, batches = image_batches(n=16, batch=16)
  with pytest.raises(ValueError, match="minibatch"):
    layers.matrices(model_a, vars_a, model_b, vars_b, batches,
                            ["cka_linear"], estimator="exact", exact_max_bytes=1000,
                            progress=False)


def test_measures_outside_their_valid_regime_are_left_out_or_reduced():
  """Layers wider than the examples: CCA and PWCCA are left out (with the reason), and
  SVCCA keeps at most (n - 1) // 2 directions, which equals a direct call with that
  max_dims and differs from the degenerate default. The registry's own metadata
  decides, for every measure."""
  model_a = models.get_model("mlp", widths=(30, 6), num_classes=3)  # fc1: 30 >= n - 1
  model_b = models.get_model("mlp", widths=(10,), num_classes=3)
  vars_a = models.init(model_a, jax.random.PRNGKey(0), (1, 4, 4, 1))
  vars_b = models.init(model_b, jax.random.PRNGKey(1), (1, 4, 4, 1))
  _, batches = image_batches(n=24, batch=24)
  left = {}
  with pytest.warns(SimilarityWarning, match="cca left out"):
    mats = layers.matrices(model_a, vars_a, model_b, vars_b, batches,
                                   ["cca", "svcca", "pwcca", "cka_linear"],
                                   max_examples=24, progress=False, left_out=left)
  assert set(left) == {"cca", "pwcca"} and "trivially 1" in left["cca"]
  got = {m.measure: m for m in mats}
  assert set(got) == {"svcca", "cka_linear"}
  sv = got["svcca"]
  assert sv.meta["options"]["max_dims"] == 11 and "reduced" in sv.meta["regime"]
  _, batches = image_batches(n=24, batch=24)
  images = np.concatenate([b["image"] for b in batches])
  acts_a = models.capture(model_a, vars_a, images)[1]
  acts_b = models.capture(model_b, vars_b, images)[1]
  a, b = acts_a[sv.rows[0]], acts_b[sv.cols[0]]
  assert sv.matrix[0, 0] == pytest.approx(float(measures.get("svcca")(a, b, max_dims=11)),
                                          abs=1e-5)
  for name in measures.names():  # what the registry declares is what the job applies
    m = measures.get(name)
    assert (m.invalid_at is not None) == (name in ("cca", "svcca", "pwcca")), name
