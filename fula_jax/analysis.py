"""Reading finished matrices as tables: what a workdir holds, depth profiles, two
measures cell by cell, why cells are NaN, and what changed between two workdirs.

Everything takes :class:`fula_jax.results.Matrix` values (``results.load(workdir)``) and
returns pandas DataFrames, so a notebook reads the API and never a file::

  mats = results.load("workdirs/quickstart")
  analysis.catalogue(mats)                              # one row per matrix
  analysis.depth_profile(mats["stitch_fula/accuracy"])  # the depth-matched diagonal
  analysis.joint(mats["cka_linear_debiased"], mats["stitch_fula/accuracy"])
  analysis.nan_cells(mats["stitch_fula/accuracy"])      # every NaN cell and its reason
  analysis.relative_to_baseline(mats["stitch_fula/accuracy"])  # over g's self-stitch
  analysis.diff(mats, results.load("workdirs/other"))   # per shared matrix
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from fula_jax.results import Matrix

_CELL = re.compile(r"^\((?P<row>.+), (?P<col>.+)\)$")
NO_REASON = "no reason recorded"


def depth_index(num_rows: int, num_cols: int) -> np.ndarray:
  """For each row i, the column at the same relative depth: round(i (L_B-1)/(L_A-1))."""
  return np.round(np.linspace(0, num_cols - 1, num_rows)).astype(int)


def depth_profile(m: Matrix) -> pd.DataFrame:
  """The depth-matched diagonal: one row per layer of A with the layer of B at the same
  relative depth; columns ``depth`` (0 = first point, 1 = last), layer_a, layer_b, value."""
  nr, nc = m.matrix.shape
  cols = depth_index(nr, nc)
  depth = np.arange(nr) / (nr - 1) if nr > 1 else np.zeros(1)
  return pd.DataFrame({"depth": depth, "layer_a": list(m.rows),
                       "layer_b": [m.cols[j] for j in cols],
                       "value": m.matrix[np.arange(nr), cols]})


def depth_matched_mean(m: Matrix) -> float:
  """Mean of :func:`depth_profile` over its finite cells (NaN when there are none)."""
  v = depth_profile(m)["value"].to_numpy()
  return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")


def depth_profiles(mats: Mapping[str, Matrix], names: Sequence[str] | None = None
                   ) -> pd.DataFrame:
  """:func:`depth_profile` of several matrices stacked, with a ``matrix`` column
  (``names`` None: every stitching accuracy matrix, ``stitch_<objective>/accuracy``)."""
  if names is None:
    names = sorted(k for k in mats if k.startswith("stitch_") and k.endswith("/accuracy"))
  _check_names(mats, names)
  frames = [depth_profile(mats[k]).assign(matrix=k) for k in names]
  if not frames:
    return pd.DataFrame(columns=["matrix", "depth", "layer_a", "layer_b", "value"])
  out = pd.concat(frames, ignore_index=True)
  return out[["matrix", "depth", "layer_a", "layer_b", "value"]]


def _settings_text(meta: Mapping[str, Any]) -> str:
  """The few settings that tell two runs of a measure apart, as 'key=value' text."""
  keys = ("objective", "estimator", "epochs", "init", "learning_rate", "batch_size",
          "options", "calibrated", "interval")
  s = dict(meta.get("settings") or {})
  parts = []
  for k in keys:
    v = meta.get(k, s.get(k))
    if v not in (None, "", {}, []):
      parts.append(f"{k}={v}")
  return ", ".join(parts)


def catalogue(mats: Mapping[str, Matrix]) -> pd.DataFrame:
  """One row per matrix: name, measure, models, shape, examples, NaN cells, mean,
  depth-matched mean, interval and the settings that produced it."""
  rows = []
  for name, m in sorted(mats.items()):
    n = m.meta.get("n", m.meta.get("n_test"))
    rows.append({
        "name": name, "measure": m.measure, "model_a": m.model_a, "model_b": m.model_b,
        "shape": "x".join(map(str, m.matrix.shape)),
        "n": int(n) if n is not None else None,
        "nan_cells": int(np.isnan(m.matrix).sum()),
        "mean": float(np.nanmean(m.matrix)) if np.isfinite(m.matrix).any() else np.nan,
        "depth_matched_mean": depth_matched_mean(m),
        "interval": m.meta.get("interval") if m.low is not None else None,
        "settings": _settings_text(m.meta)})
  return pd.DataFrame(rows, columns=["name", "measure", "model_a", "model_b", "shape", "n",
                                     "nan_cells", "mean", "depth_matched_mean",
                                     "interval", "settings"])


def _check_names(mats: Mapping[str, Matrix], names: Sequence[str]) -> None:
  missing = [k for k in names if k not in mats]
  if missing:
    raise KeyError(f"No matrix named {missing}; these are loaded: {sorted(mats)}.")


def _check_same_grid(x: Matrix, y: Matrix) -> None:
  if list(x.rows) != list(y.rows) or list(x.cols) != list(y.cols):
    raise ValueError(f"{x.measure!r} ({len(x.rows)}x{len(x.cols)}: {x.rows} x {x.cols}) "
                     f"and {y.measure!r} ({len(y.rows)}x{len(y.cols)}: {y.rows} x {y.cols}) "
                     "are not over the same layers, so they cannot be compared cell by "
                     "cell.")


def joint(x: Matrix, y: Matrix, names: tuple[str, str] | None = None) -> pd.DataFrame:
  """Two matrices over the same layers, cell by cell: layer_a, layer_b, depth_a,
  depth_b and one column per matrix (named by its measure unless `names` says)."""
  _check_same_grid(x, y)
  nx, ny = names or (x.measure, y.measure)
  if nx == ny:
    raise ValueError(f"Both columns would be named {nx!r}; pass names=(..., ...).")
  nr, nc = x.matrix.shape
  ii, jj = np.meshgrid(np.arange(nr), np.arange(nc), indexing="ij")
  return pd.DataFrame({
      "layer_a": np.asarray(x.rows, object)[ii.ravel()],
      "layer_b": np.asarray(x.cols, object)[jj.ravel()],
      "depth_a": ii.ravel() / max(nr - 1, 1), "depth_b": jj.ravel() / max(nc - 1, 1),
      nx: x.matrix.ravel(), ny: y.matrix.ravel()})


def _reason(meta: Mapping[str, Any], row: str, col: str) -> str:
  """Why cell (row, col) is NaN, from what the job stored: a stitching sweep keys its
  reasons 'row->col'; a similarity job keys a whole layer 'model A:row' / 'model B:col'
  and single cells '(row, col)'."""
  stitch = meta.get("reasons") or {}
  if f"{row}->{col}" in stitch:
    return str(stitch[f"{row}->{col}"])
  layer = meta.get("nan_reasons") or {}
  for key, why in layer.items():
    side, _, name = key.partition(":")
    if (side.endswith(" A") and name == row) or (side.endswith(" B") and name == col):
      return f"{key}: {why}"
    cell = _CELL.match(key)
    if cell and cell["row"] == row and cell["col"] == col:
      return str(why)
  return NO_REASON


def nan_cells(m: Matrix) -> pd.DataFrame:
  """Every NaN cell of `m` with the reason the job recorded for it."""
  out = [{"layer_a": m.rows[i], "layer_b": m.cols[j],
          "reason": _reason(m.meta, m.rows[i], m.cols[j])}
         for i, j in np.argwhere(np.isnan(m.matrix))]
  return pd.DataFrame(out, columns=["layer_a", "layer_b", "reason"])


def all_nan_cells(mats: Mapping[str, Matrix]) -> pd.DataFrame:
  """:func:`nan_cells` of every matrix, with a ``matrix`` column."""
  frames = [nan_cells(m).assign(matrix=k) for k, m in sorted(mats.items())]
  frames = [f for f in frames if len(f)]
  if not frames:
    return pd.DataFrame(columns=["matrix", "layer_a", "layer_b", "reason"])
  return pd.concat(frames, ignore_index=True)[["matrix", "layer_a", "layer_b", "reason"]]


def relative_to_baseline(m: Matrix) -> Matrix:
  """A stitching accuracy matrix read against its baselines: each cell over the end
  model's own self-stitch accuracy at that column (`meta['baseline']`, the ceiling a
  stitch into that point can reach), so 1 = as good as g stitched into itself; the
  end model's accuracy and chance travel in the meta."""
  base = m.meta.get("baseline") or {}
  missing = [c for c in m.cols if c not in base]
  if missing:
    raise ValueError(f"{m.measure}: no baseline for columns {missing}; run the sweep "
                     "with stitch.baselines=True (the default).")
  ceiling = np.asarray([base[c] for c in m.cols], np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    rel = np.where(ceiling > 0, m.matrix / ceiling, np.nan)
  return Matrix(matrix=rel, rows=list(m.rows), cols=list(m.cols),
                measure=f"{m.measure} / self-stitch baseline", model_a=m.model_a,
                model_b=m.model_b, meta={"relative_to": "baseline", "baseline": base,
                                         "end_accuracy": m.meta.get("end_accuracy"),
                                         "chance": m.meta.get("chance")})


def difference(a: Matrix, b: Matrix, labels: tuple[str, str] = ("A", "B")) -> Matrix:
  """``b - a`` cell by cell, as a Matrix (plot it like any other)."""
  _check_same_grid(a, b)
  return Matrix(matrix=b.matrix - a.matrix, rows=list(a.rows), cols=list(a.cols),
                measure=f"{a.measure}: {labels[1]} - {labels[0]}", model_a=a.model_a,
                model_b=a.model_b, meta={"difference_of": list(labels)})


def diff(mats_a: Mapping[str, Matrix], mats_b: Mapping[str, Matrix],
         labels: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
  """Per matrix name in either run: its mean and depth-matched mean in each, the mean
  and largest absolute cell difference (b - a), and a note where it cannot be compared
  (held by one run only, or over other layers)."""
  la, lb = labels
  rows = []
  for name in sorted(set(mats_a) | set(mats_b)):
    a, b = mats_a.get(name), mats_b.get(name)
    row: dict[str, Any] = {"name": name}
    for label, m in ((la, a), (lb, b)):
      finite = m is not None and np.isfinite(m.matrix).any()
      row[f"mean_{label}"] = float(np.nanmean(m.matrix)) if finite else np.nan
      row[f"depth_matched_{label}"] = depth_matched_mean(m) if finite else np.nan
    row["mean_difference"] = row["max_abs_difference"] = np.nan
    if a is None or b is None:
      row["note"] = f"only in {la if b is None else lb}"
    elif list(a.rows) != list(b.rows) or list(a.cols) != list(b.cols):
      row["note"] = (f"different layers ({len(a.rows)}x{len(a.cols)} vs "
                     f"{len(b.rows)}x{len(b.cols)})")
    else:
      d = b.matrix - a.matrix
      both = np.isfinite(d)
      if both.any():
        row["mean_difference"] = float(d[both].mean())
        row["max_abs_difference"] = float(np.abs(d[both]).max())
      row["note"] = ""
    rows.append(row)
  return pd.DataFrame(rows, columns=[
      "name", f"mean_{la}", f"mean_{lb}", "mean_difference", "max_abs_difference",
      f"depth_matched_{la}", f"depth_matched_{lb}", "note"])
