"""Model x model matrices: each cell equals the measure of the two models' own
activations at their points; the job reads a zoo of workdirs and writes heatmaps."""

import json
import pathlib

import jax
import numpy as np
import pytest

from fula_jax import defaults, errors, models, results, similarity
from fula_jax.similarity import across_models, model_matrix_job

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _mlp(seed, widths=(16, 8)):
  m = models.get_model("mlp", widths=widths)
  return m, models.init(m, jax.random.PRNGKey(seed), (1, 8, 8, 1))


def test_each_cell_is_the_measure_of_the_two_models_activations():
  zoo = {"s0": _mlp(0), "s0_again": _mlp(0), "s1": _mlp(1), "wide": _mlp(2, (16, 12))}
  images = np.random.default_rng(0).uniform(size=(100, 8, 8, 1)).astype(np.float32)
  names = ("cka_linear_debiased", "mutual_knn", "rsa", "procrustes")
  mats = similarity.model_matrix(zoo, images, names, batch_size=32, max_examples=90,
                                 progress=False)
  acts = across_models.activations(zoo, dict.fromkeys(zoo, "fc2"), images, batch_size=32,
                                   max_examples=90, progress=False)
  for k, (m, v) in zoo.items():  # the first 90 examples, at the point, batch by batch
    np.testing.assert_allclose(acts[k], models.capture(m, v, images[:90])[1]["fc2"],
                               rtol=1e-5, atol=1e-6)
  for name in names:
    mat = mats[name]
    assert mat.rows == mat.cols == list(zoo) and mat.meta["points"]["wide"] == "fc2"
    assert mat.meta["n"] == 90
    np.testing.assert_allclose(mat.matrix, mat.matrix.T, atol=1e-6)
    ideal = similarity.get(name).ideal
    assert mat.matrix[0, 1] == pytest.approx(ideal, abs=1e-4)  # the same weights
    for i, a in enumerate(zoo):
      for j, b in enumerate(zoo):
        assert mat.matrix[i, j] == pytest.approx(
            similarity.compute(name, acts[a], acts[b]), rel=1e-4, abs=1e-5), (name, a, b)


def test_points_and_errors():
  zoo = {"a": _mlp(0), "b": _mlp(1)}
  images = np.random.default_rng(1).uniform(size=(40, 8, 8, 1)).astype(np.float32)
  got = similarity.model_matrix(zoo, images, ("cka_linear",), point="logits",
                                batch_size=40, progress=False)["cka_linear"]
  assert got.meta["points"] == {"a": "logits", "b": "logits"}
  with pytest.raises(errors.UserError, match="Model 'b'.*fc9"):
    similarity.model_matrix(zoo, images, point={"a": "fc1", "b": "fc9"}, progress=False)
  with pytest.raises(ValueError, match="at least 2 models"):
    similarity.model_matrix({"a": _mlp(0)}, images, progress=False)


def test_the_job_compares_a_zoo_of_workdirs(tmp_path, model_workdir, capsys):
  dirs = [model_workdir(tmp_path / f"cnn_s{s}", "cnn", {"widths": (8, 16)}, seed=s)
          for s in (0, 1)]
  dirs.append(model_workdir(tmp_path / "mlp", "mlp", {"widths": (32, 16)}))
  config = defaults.load_config(_REPO / "configs" / "model_matrix.py", "runlocal")
  config.models = tuple(dirs)
  config.measures = ("cka_linear_debiased", "mutual_knn")
  config.max_examples = 120
  out = model_matrix_job.run(config, str(tmp_path / "zoo"))
  assert set(out) == set(config.measures)
  mats = results.load(tmp_path / "zoo")
  m = mats["models_mutual_knn"]
  assert m.rows == ["cnn_s0", "cnn_s1", "mlp"] and m.meta["n"] == 120
  assert m.meta["points"] == {"cnn_s0": "pool", "cnn_s1": "pool", "mlp": "fc2"}
  assert np.all(np.isfinite(m.matrix)) and np.allclose(np.diag(m.matrix), 1.0)
  assert (tmp_path / "zoo" / "results" / "models_mutual_knn.png").stat().st_size > 1000
  summary = json.loads((tmp_path / "zoo" / "summary.json").read_text())
  assert summary["models"] == m.rows and summary["measures"]["mutual_knn"] == {
      "nan_cells": 0, "n": 120}
  printed = capsys.readouterr().out
  off = m.matrix[~np.eye(3, dtype=bool)].mean()
  line = next(l for l in printed.splitlines() if l.startswith("mutual_knn "))
  assert f"3 x 3 models, off-diagonal mean {off:.3f}" in line
  assert f"Results: {tmp_path / 'zoo'}/results" in printed and "Next:" in printed
  report = (tmp_path / "zoo" / "report.md").read_text()
  assert "**cnn_s0**" in report and "| `models_mutual_knn` | 3x3 |" in report
  config.models = (dirs[0],)
  with pytest.raises(errors.ConfigError, match="at least 2 models"):
    model_matrix_job.run(config, str(tmp_path / "zoo2"))


def test_asymmetric_cknna_fills_both_orders_of_every_matrix():
  """CKNNA(X, Y) != CKNNA(Y, X): no matrix path may mirror one order into the other."""
  zoo = {"s0": _mlp(0), "s1": _mlp(1), "wide": _mlp(2, (16, 12))}
  images = np.random.default_rng(3).uniform(size=(30, 8, 8, 1)).astype(np.float32)
  mat = similarity.model_matrix(zoo, images, ("cknna",), batch_size=30, progress=False,
                                k=3)["cknna"]
  acts = across_models.activations(zoo, dict.fromkeys(zoo, "fc2"), images, batch_size=30,
                                   max_examples=30, progress=False)
  within, _ = similarity.measures.matrix("cknna", acts, k=3)
  for i, a in enumerate(zoo):
    for j, b in enumerate(zoo):
      want = similarity.compute("cknna", acts[a], acts[b], k=3)
      assert mat.matrix[i, j] == pytest.approx(want, abs=1e-6), (a, b)
      assert within[i, j] == pytest.approx(want, abs=1e-6), (a, b)
  assert np.max(np.abs(mat.matrix - mat.matrix.T)) > 1e-3
