"""The results format: round trip, tidy CSV, no pickles, plots, clear errors."""

import json

import numpy as np
import pandas as pd
import pytest

from fula_jax import results


def sample(name="cka_linear_debiased"):
  mat = np.array([[1.0, 0.25, np.nan], [0.5, -0.125, 0.75]])
  return results.Matrix(mat, ["conv1", "pool"], ["block1.0", "block2.0", "logits"], name,
                        "/runs/a", "gs://bucket/b", {"n": 512, "estimator": "minibatch",
                                                     "nan_reasons": {"x": "y"},
                                                     "scalar": np.float32(0.5),
                                                     "bad": float("nan")})


def test_round_trip_keeps_matrix_names_and_meta(tmp_path):
  m = sample()
  results.save(tmp_path, "cka_linear_debiased", m)
  other = sample("stitch_fula/accuracy")
  results.save(tmp_path, "stitch_fula/accuracy", other, png=False)
  loaded = results.load(tmp_path)
  assert set(loaded) == {"cka_linear_debiased", "stitch_fula/accuracy"}
  got = loaded["cka_linear_debiased"]
  np.testing.assert_array_equal(got.matrix, m.matrix)  # NaN positions included
  assert got.rows == m.rows and got.cols == m.cols
  assert (got.measure, got.model_a, got.model_b) == (m.measure, m.model_a, m.model_b)
  assert got.meta["n"] == 512 and got.meta["nan_reasons"] == {"x": "y"}
  assert got.meta["scalar"] == 0.5 and got.meta["bad"] == "nan"
  assert loaded["stitch_fula/accuracy"].measure == "stitch_fula/accuracy"
  assert (tmp_path / "results" / "stitch_fula_accuracy.npz").exists()
  assert not (tmp_path / "results" / "stitch_fula_accuracy.png").exists()
  assert (tmp_path / "results" / "cka_linear_debiased.png").read_bytes()[:4] == b"\x89PNG"
  assert not [p for p in (tmp_path / "results").iterdir() if "tmp" in p.name]


def test_csv_is_tidy_one_row_per_cell(tmp_path):
  m = sample()
  results.save(tmp_path, "m", m, png=False)
  df = pd.read_csv(tmp_path / "results" / "m.csv")
  assert list(df.columns) == ["model_a", "layer_a", "model_b", "layer_b", "measure",
                              "value"]
  assert len(df) == 6
  row = df[(df.layer_a == "pool") & (df.layer_b == "block2.0")].iloc[0]
  assert row.value == -0.125 and row.model_b == "gs://bucket/b"
  assert df[(df.layer_a == "conv1") & (df.layer_b == "logits")].value.isna().all()
  pd.testing.assert_frame_equal(m.to_dataframe().drop(columns="value"),
                                df.drop(columns="value"), check_dtype=False)


def test_npz_has_no_pickles(tmp_path):
  results.save(tmp_path, "m", sample(), png=False)
  with np.load(tmp_path / "results" / "m.npz", allow_pickle=False) as z:
    assert set(z.files) == {"matrix", "rows", "cols"}
    assert z["matrix"].dtype == np.float64
    assert z["rows"].dtype.kind == "U" and list(z["cols"]) == ["block1.0", "block2.0",
                                                                 "logits"]
  meta = json.loads((tmp_path / "results" / "m.json").read_text())
  assert meta["shape"] == [2, 3] and meta["model_a"] == "/runs/a"


def test_plot_returns_axes_with_nan_cells_marked():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ax = sample().plot()
  assert "cka_linear_debiased" in ax.get_title() and "A = a, B = b" in ax.get_title()
  texts = [t.get_text() for t in ax.texts]
  assert "NaN" in texts and "0.75" in texts and len(texts) == 6
  assert [t.get_text() for t in ax.get_yticklabels()] == ["conv1", "pool"]
  fig, ax2 = plt.subplots()
  assert sample().plot(ax=ax2, annotate=False) is ax2 and not ax2.texts
  plt.close("all")


def _figure_text(fig) -> list[str]:
  return [t for ax in fig.axes for t in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
          ] + [fig._suptitle.get_text() if fig._suptitle else ""]


def test_figures_name_models_without_paths_and_mark_distances():
  """Titles and labels carry a workdir's last component, never an absolute path; a
  distance is drawn on the reversed colour map (alike looks alike) and says so."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  m = sample()
  m.model_a = "/home/me/experiments/2026/workdirs/quickstart/models/a_cnn"
  m.model_b = "gs://bucket/runs/b_resnet20/"
  ax = m.plot()
  for text in _figure_text(ax.figure):
    assert "/home" not in text and "gs://" not in text and "/runs" not in text, text
  assert "A = a_cnn, B = b_resnet20" in ax.get_title()
  assert "lower = more alike" not in ax.get_title()
  d = sample()
  d.meta["kind"] = "distance"
  dax = d.plot()
  assert "lower = more alike" in dax.get_title()
  lo, hi = dax.images[0].cmap(0.0), dax.images[0].cmap(1.0)
  assert lo == ax.images[0].cmap(1.0) and hi == ax.images[0].cmap(0.0)
  plt.close("all")


def test_overview_wraps_beyond_three_panels_on_one_scale():
  fig = results.overview([sample()] * 5, vmin=0.0, vmax=1.0)
  shown = [ax for ax in fig.axes if ax.images]
  assert len(shown) == 5
  rows = sorted({round(ax.get_position().y0, 3) for ax in shown})
  assert len(rows) == 2  # 3 + 2
  assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in shown)
  for text in _figure_text(fig):
    assert "/runs" not in text, text


def test_shape_mismatch_is_rejected():
  with pytest.raises(ValueError, match="shape"):
    results.Matrix(np.zeros((2, 2)), ["a"], ["b", "c"], "m", "A", "B")


def test_load_missing_or_empty_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    results.load(tmp_path / "nowhere")
  (tmp_path / "results").mkdir()
  with pytest.raises(FileNotFoundError, match="no .npz"):
    results.load(tmp_path)


def test_corrupted_or_truncated_npz_names_the_file(tmp_path):
  results.save(tmp_path, "good", sample(), png=False)
  results.save(tmp_path, "bad", sample(), png=False)
  path = tmp_path / "results" / "bad.npz"
  path.write_bytes(path.read_bytes()[:40])
  with pytest.raises(results.ResultsError, match="bad.npz"):
    results.load(tmp_path)
  path.write_bytes(b"not a zip file at all")
  with pytest.raises(results.ResultsError, match="bad.npz.*corrupted"):
    results.load(tmp_path)
  path.unlink()
  (tmp_path / "results" / "good.json").unlink()
  with pytest.raises(results.ResultsError, match="good.npz.*sidecar"):
    results.load(tmp_path)


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(results.io, "is_writer", lambda: False)
  results.save(tmp_path, "m", sample())
  assert not (tmp_path / "results").exists()
