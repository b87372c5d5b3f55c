"""fula_jax.analysis: the tables the notebooks read, checked against hand-built matrices
whose answers are known (depth matching by nearest relative depth, differences, means
and the reasons stored in the shapes jobs write them)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fula_jax import analysis
from fula_jax.results import Matrix


def _matrix(values, measure="m", meta=None, rows=None, cols=None):
  values = np.asarray(values, np.float64)
  rows = rows or [f"a{i}" for i in range(values.shape[0])]
  cols = cols or [f"b{j}" for j in range(values.shape[1])]
  return Matrix(values, rows, cols, measure, "A", "B", dict(meta or {}))


@pytest.mark.parametrize("shape", [(4, 3), (3, 7), (5, 5), (2, 9), (1, 4)])
def test_depth_profile_takes_the_column_at_the_nearest_relative_depth(shape):
  nr, nc = shape
  m = _matrix(np.arange(nr * nc).reshape(shape))
  prof = analysis.depth_profile(m)
  for i, row in prof.iterrows():
    depth_a = i / (nr - 1) if nr > 1 else 0.0
    nearest = min(range(nc), key=lambda j: abs(j / (nc - 1) - depth_a))
    assert row["layer_b"] == f"b{nearest}"
    assert row["value"] == m.matrix[i, nearest]
    assert row["depth"] == pytest.approx(depth_a)
  assert list(prof["layer_a"]) == m.rows


def test_depth_matched_mean_skips_nan_and_is_nan_when_nothing_is_finite():
  m = _matrix([[1.0, 0.0], [0.0, np.nan], [0.0, 3.0]])  # diagonal: (0,0), (1,?), (2,1)
  # Row 1 sits at depth 0.5, between the two columns; numpy rounds 0.5 to even (0).
  assert analysis.depth_matched_mean(m) == pytest.approx((1.0 + 0.0 + 3.0) / 3)
  assert np.isnan(analysis.depth_matched_mean(_matrix([[np.nan, np.nan]])))


def test_catalogue_reports_each_matrix():
  cka = _matrix([[1.0, 0.5], [0.5, np.nan]], "cka_linear",
                {"n": 100, "nan_reasons": {"(a1, b1)": "not finite"}})
  fit = _matrix([[0.9, 0.1], [0.2, 0.8]], "stitch_fula/accuracy",
                {"n_test": 50, "objective": "fula", "settings": {"epochs": 2.0}})
  table = analysis.catalogue({"cka_linear": cka, "stitch_fula/accuracy": fit})
  assert list(table["name"]) == ["cka_linear", "stitch_fula/accuracy"]
  cka_row, fit_row = table.iloc[0], table.iloc[1]
  assert (cka_row["n"], fit_row["n"]) == (100, 50)
  assert (cka_row["nan_cells"], fit_row["nan_cells"]) == (1, 0)
  assert cka_row["mean"] == pytest.approx(2.0 / 3)
  assert fit_row["depth_matched_mean"] == pytest.approx(0.85)
  assert cka_row["shape"] == "2x2"
  assert "objective=fula" in fit_row["settings"] and "epochs=2.0" in fit_row["settings"]


def test_joint_pairs_cells_and_refuses_other_layers():
  x = _matrix([[1.0, 2.0], [3.0, 4.0]], "x")
  y = _matrix([[10.0, 20.0], [30.0, 40.0]], "y")
  cells = analysis.joint(x, y)
  for _, c in cells.iterrows():
    i, j = int(c["layer_a"][1:]), int(c["layer_b"][1:])
    assert (c["x"], c["y"]) == (x.matrix[i, j], y.matrix[i, j])
    assert (c["depth_a"], c["depth_b"]) == (i, j)
  with pytest.raises(ValueError, match="same layers"):
    analysis.joint(x, _matrix([[1.0, 2.0, 3.0]], "z"))
  with pytest.raises(ValueError, match="names="):
    analysis.joint(x, _matrix(y.matrix, "x"))


def test_nan_cells_reads_the_reasons_stitching_and_similarity_jobs_store():
  stitch = _matrix([[np.nan, 1.0], [0.5, np.nan]], "stitch_tlm/accuracy",
                   {"reasons": {"a0->b0": "cannot be stitched", "a1->b1": "diverged"}})
  sim = _matrix([[np.nan, np.nan], [0.3, np.nan]], "cka",
                {"nan_reasons": {"model A:a0": "constant layer", "(a1, b1)": "not finite"}})
  silent = _matrix([[np.nan]], "other")
  got = analysis.all_nan_cells({"s": stitch, "c": sim, "o": silent})
  reason = {(r.matrix, r.layer_a, r.layer_b): r.reason for r in got.itertuples()}
  assert reason == {("s", "a0", "b0"): "cannot be stitched", ("s", "a1", "b1"): "diverged",
                    ("c", "a0", "b0"): "model A:a0: constant layer",
                    ("c", "a0", "b1"): "model A:a0: constant layer",
                    ("c", "a1", "b1"): "not finite",
                    ("o", "a0", "b0"): analysis.NO_REASON}


def test_diff_and_difference_against_numpy():
  rng = np.random.default_rng(0)
  a = {"x": _matrix(rng.random((3, 4)), "x"), "only_a": _matrix([[1.0]], "only_a"),
       "grid": _matrix(np.ones((2, 2)), "grid")}
  b = {"x": _matrix(rng.random((3, 4)), "x"), "only_b": _matrix([[1.0]], "only_b"),
       "grid": _matrix(np.ones((2, 3)), "grid")}
  b["x"].matrix[0, 0] = np.nan
  table = analysis.diff(a, b, labels=("std", "robust")).set_index("name")
  d = b["x"].matrix - a["x"].matrix
  assert table.loc["x", "mean_difference"] == pytest.approx(np.nanmean(d))
  assert table.loc["x", "max_abs_difference"] == pytest.approx(np.nanmax(np.abs(d)))
  assert table.loc["x", "mean_std"] == pytest.approx(a["x"].matrix.mean())
  assert table.loc["only_a", "note"] == "only in std"
  assert table.loc["only_b", "note"] == "only in robust"
  assert "different layers" in table.loc["grid", "note"]
  assert np.isnan(table.loc["grid", "mean_difference"])
  delta = analysis.difference(a["x"], b["x"], labels=("std", "robust"))
  np.testing.assert_array_equal(delta.matrix, d)
  assert delta.measure == "x: robust - std"


def test_depth_profiles_stacks_every_stitching_accuracy_by_default():
  mats = {"stitch_tlm/accuracy": _matrix(np.eye(3)),
          "stitch_tlm/loss": _matrix(np.ones((3, 3))),
          "stitch_fula/accuracy": _matrix(2 * np.eye(3))}
  prof = analysis.depth_profiles(mats)
  assert set(prof["matrix"]) == {"stitch_tlm/accuracy", "stitch_fula/accuracy"}
  by = prof.groupby("matrix")["value"].apply(list)
  assert by["stitch_tlm/accuracy"] == [1.0, 1.0, 1.0]
  assert by["stitch_fula/accuracy"] == [2.0, 2.0, 2.0]
  with pytest.raises(KeyError, match="loaded"):
    analysis.depth_profiles(mats, ["cka"])
  assert isinstance(analysis.depth_profiles({}), pd.DataFrame)
