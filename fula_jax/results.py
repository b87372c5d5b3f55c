"""One on-disk format for every layer-by-layer matrix, the Colab loader, and heatmaps.

``save(workdir, name, m)`` writes, under ``<workdir>/results/``:

* ``<name>.npz``  -- ``matrix`` (float64), ``rows`` and ``cols`` (unicode arrays), and
  ``low``/``high`` when the matrix carries a confidence interval per cell; no object
  arrays, so ``np.load(..., allow_pickle=False)`` reads it;
* ``<name>.json`` -- every field of the :class:`Matrix` (names, measure, models, meta);
* ``<name>.csv``  -- the tidy table, one row per cell:
  ``model_a, layer_a, model_b, layer_b, measure, value`` (and ``low, high``);
* ``<name>.png``  -- an annotated heatmap (optional).

Every file is written atomically through :mod:`fula_jax.io` and only by process 0; the
JSON sidecar is written last, so a matrix whose sidecar exists is complete. Names may
contain any characters; the file stem replaces those outside ``[A-Za-z0-9._-]`` with '_'
(so names differing only there share files) and the JSON keeps the original, which
:func:`load` uses as the key. Non-finite floats inside ``meta`` are stored as strings.

In Colab::

  from fula_jax import results
  mats = results.load("gs://bucket/run")      # {name: Matrix}
  mats["cka_linear_debiased"].plot()
  df = pd.concat([m.to_dataframe() for m in mats.values()])
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import os
import re
import shlex
from typing import Any, Sequence

import numpy as np
import pandas as pd
from etils import epath

from fula_jax import io
from fula_jax.errors import UserError

RESULTS_DIR = "results"
FORMAT = "fula_jax.results/1"
COLUMNS = ("model_a", "layer_a", "model_b", "layer_b", "measure", "value")


class ResultsError(UserError, ValueError):
  """A results folder or file that is missing, damaged or inconsistent."""


class NoResultsError(ResultsError, FileNotFoundError):
  """A workdir that holds no results (yet)."""


@dataclasses.dataclass
class Matrix:
  """A ``len(rows) x len(cols)`` matrix over layers of model A (rows) and B (cols)."""
  matrix: np.ndarray
  rows: list[str]
  cols: list[str]
  measure: str
  model_a: str
  model_b: str
  meta: dict = dataclasses.field(default_factory=dict)
  low: np.ndarray | None = None    # per-cell confidence interval (e.g. bootstrap), with
  high: np.ndarray | None = None   # its level in meta['interval']

  def __post_init__(self):
    self.matrix = np.asarray(self.matrix, dtype=np.float64)
    if (self.low is None) != (self.high is None):
      raise ValueError(f"Matrix {self.measure!r}: give both ends of the interval or "
                       "neither.")
    if self.low is not None:
      self.low = np.asarray(self.low, np.float64)
      self.high = np.asarray(self.high, np.float64)
      if self.low.shape != self.matrix.shape or self.high.shape != self.matrix.shape:
        raise ValueError(f"Matrix {self.measure!r}: interval shapes {self.low.shape}, "
                         f"{self.high.shape} differ from the values' {self.matrix.shape}.")
    self.rows = [str(r) for r in self.rows]
    self.cols = [str(c) for c in self.cols]
    self.model_a, self.model_b = str(self.model_a), str(self.model_b)
    self.meta = dict(self.meta or {})
    if self.matrix.shape != (len(self.rows), len(self.cols)):
      raise ValueError(f"Matrix {self.measure!r}: values have shape {self.matrix.shape} "
                       f"but there are {len(self.rows)} row and {len(self.cols)} column "
                       "names.")

  def to_dataframe(self) -> pd.DataFrame:
    """Tidy table: one row per cell, row-major."""
    nr, nc = self.matrix.shape
    table = {
        "model_a": [self.model_a] * (nr * nc),
        "layer_a": np.repeat(np.asarray(self.rows, dtype=object), nc),
        "model_b": [self.model_b] * (nr * nc),
        "layer_b": np.tile(np.asarray(self.cols, dtype=object), nr),
        "measure": [self.measure] * (nr * nc),
        "value": self.matrix.reshape(-1),
    }
    if self.low is not None:
      table.update(low=self.low.reshape(-1), high=self.high.reshape(-1))
    return pd.DataFrame(table, columns=list(table))

  def plot(self, ax=None, annotate: bool | None = None, *, cmap: str = "viridis",
           vmin: float | None = None, vmax: float | None = None, fmt: str = ".2f",
           title: str | None = None, colorbar: bool = True):
    """Heatmap: rows = model A layers, columns = model B layers; NaN cells hatched grey,
    trained stitches that did not converge (``meta['unconverged']``) framed in red. A
    distance (``meta['kind']``) is drawn on the reversed colour map, so that more alike
    looks the same as for a similarity, and its title says "lower = more alike".

    `annotate` None writes the values when there are at most 400 cells (with their
    interval underneath when the matrix has one, up to 100 cells). `title` None
    names the measure and both models. Returns the axes (the image is
    ``ax.images[0]``, e.g. for a colour bar shared by several panels).
    """
    import matplotlib as mpl
    if ax is None:
      import matplotlib.pyplot as plt
      nr, nc = self.matrix.shape
      _, ax = plt.subplots(figsize=(min(2 + 0.55 * nc, 20), min(1.5 + 0.45 * nr, 20)))
    data = np.ma.masked_invalid(self.matrix)
    distance = self.meta.get("kind") == "distance"
    cm = mpl.colormaps[cmap]
    cm = (cm.reversed() if distance else cm).with_extremes(bad="0.85")
    finite = self.matrix[np.isfinite(self.matrix)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
      hi = lo + 1e-12
    im = ax.imshow(data, cmap=cm, vmin=lo, vmax=hi, aspect="auto",
                   interpolation="nearest")
    nr, nc = self.matrix.shape
    for i, j in np.argwhere(~np.isfinite(self.matrix)):
      ax.add_patch(mpl.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False,
                                         hatch="///", edgecolor="0.5", linewidth=0))
    late = [key.partition("->")[::2] for key in self.meta.get("unconverged") or {}]
    late = [(self.rows.index(r), self.cols.index(c)) for r, c in late
            if r in self.rows and c in self.cols]
    for i, j in late:  # a trained stitch that did not converge: a dashed red frame
      ax.add_patch(mpl.patches.Rectangle((j - 0.42, i - 0.42), 0.84, 0.84, fill=False,
                                         edgecolor="red", linewidth=1.4, linestyle="--"))
    if annotate is None:
      annotate = nr * nc <= 400
    if annotate:
      ci = self.low is not None and nr * nc <= 100
      for i in range(nr):
        for j in range(nc):
          v = self.matrix[i, j]
          if np.isfinite(v):
            shade = (v - lo) / (hi - lo)
            text = format(v, fmt)
            if ci:
              text += f"\n[{format(self.low[i, j], fmt)}, {format(self.high[i, j], fmt)}]"
            bright = (1 - shade if distance else shade) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=6 if ci else 7,
                    color="black" if bright else "white")
          else:
            ax.text(j, i, "NaN", ha="center", va="center", fontsize=7, color="0.3")
    ax.set_xticks(range(nc), self.cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(nr), self.rows, fontsize=8)
    if self.meta.get("axes") == "models":
      ax.set_xlabel("model")
      ax.set_ylabel("model")
    else:
      ax.set_xlabel(f"model B layer ({display_name(self.model_b)})")
      ax.set_ylabel(f"model A layer ({display_name(self.model_a)})")
    text = self.title() if title is None else title
    if distance and "lower = more alike" not in text:
      text += " (lower = more alike)"
    if late:
      text += f"\n(dashed red: {len(late)} did not converge)"
    ax.set_title(text, fontsize=9)
    if colorbar:
      ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return ax

  def title(self) -> str:
    """The measure, then which model gives the rows (A) and the columns (B)."""
    if self.meta.get("axes") == "models":
      point = self.meta.get("points") or {}
      at = set(point.values()) if isinstance(point, dict) else set()
      return f"{self.measure}\nmodel x model" + (f" at {at.pop()}" if len(at) == 1 else "")
    a, b = display_name(self.model_a), display_name(self.model_b)
    models = f"A = B = {a}" if self.model_a == self.model_b else f"A = {a}, B = {b}"
    return f"{self.measure}\n{models}"


def display_name(model: str, limit: int = 32) -> str:
  """A model's name for a figure: a workdir or weights path gives its last component
  (never an absolute path), shortened to `limit` characters."""
  name = str(model).rstrip("/").rsplit("/", 1)[-1] or str(model)
  return name if len(name) <= limit else name[:limit - 3] + "..."


def file_stem(name: str) -> str:
  stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
  if not stem:
    raise ValueError(f"Result name {name!r} gives an empty file name.")
  return stem


def finish_job(workdir: str | os.PathLike, summary: dict[str, Any], *,
               report: str | os.PathLike | None = None,
               notebook: str = "notebooks/explore_results.ipynb") -> None:
  """A job's last step: `summary` to ``<workdir>/summary.json`` (process 0, atomically)
  and a closing block: where the results (and the report) are and what to open next."""
  if io.is_writer():
    io.write_json(io.path(workdir) / "summary.json", summary)
  print(f"Results: {workdir}/{RESULTS_DIR} (fula_jax.results.load({str(workdir)!r}))",
        flush=True)
  if report is not None:
    print(f"Report:  {report}", flush=True)
  print(f"Next:    open {notebook} with WORKDIR={str(workdir)!r}", flush=True)


def _results_dir(workdir: str | os.PathLike) -> epath.Path:
  return io.path(workdir) / RESULTS_DIR


def overview(matrices: Sequence[Matrix], titles: Sequence[str] | None = None, *,
             vmin: float | None = None, vmax: float | None = None,
             label: str = "value", suptitle: str | None = None, columns: int = 3):
  """Heatmaps of several matrices on ONE colour scale, with one colour bar, in rows of
  at most `columns` panels.

  Use it for measures that share a range (CKA and stitching accuracy both live in
  [0, 1]); `vmin`/`vmax` default to the joint finite range. Returns a matplotlib Figure
  (outside pyplot's state; in Colab, display it or call ``fig.savefig``).
  """
  from fula_jax import reporting
  if not matrices:
    raise ValueError("overview() needs at least one matrix.")
  finite = np.concatenate([m.matrix[np.isfinite(m.matrix)] for m in matrices])
  lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
  hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
  nr = max(m.matrix.shape[0] for m in matrices)
  nc = max(m.matrix.shape[1] for m in matrices)
  panel_w, panel_h = min(1.6 + 0.42 * nc, 8.0), min(1.8 + 0.38 * nr, 8.0)
  ncol = max(1, min(columns, len(matrices)))
  nrow = -(-len(matrices) // ncol)
  fig = reporting.figure((panel_w * ncol + 1.2, panel_h * nrow + 0.8),
                         layout="constrained")
  grid = fig.subplots(nrow, ncol, squeeze=False)
  axes = list(grid.reshape(-1)[:len(matrices)])
  for ax in grid.reshape(-1)[len(matrices):]:
    ax.set_axis_off()
  for k, (m, ax) in enumerate(zip(matrices, axes)):
    m.plot(ax=ax, vmin=lo, vmax=hi, colorbar=False,
           title=titles[k] if titles is not None else m.measure)
    if k % ncol:
      ax.set_ylabel("")
  fig.colorbar(axes[0].images[0], ax=axes, fraction=0.025, pad=0.02, label=label)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  return fig


def _png_bytes(m: Matrix) -> bytes:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  nr, nc = m.matrix.shape
  fig = Figure(figsize=(min(3 + 0.6 * nc, 24), min(2.5 + 0.5 * nr, 24)))
  FigureCanvasAgg(fig)
  m.plot(ax=fig.add_subplot())
  fig.tight_layout()
  buf = _io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  return buf.getvalue()


def save(workdir: str | os.PathLike, name: str, m: Matrix, *, png: bool = True) -> None:
  """Write `m` as ``<workdir>/results/<name>.{npz,json,csv,png}`` (process 0 only)."""
  if not io.is_writer():
    return
  d = _results_dir(workdir)
  stem = file_stem(name)
  interval = {} if m.low is None else {"low": m.low, "high": m.high}
  io.write_npz(d / f"{stem}.npz", matrix=m.matrix,
               rows=np.asarray(m.rows, dtype=np.str_).reshape(len(m.rows)),
               cols=np.asarray(m.cols, dtype=np.str_).reshape(len(m.cols)), **interval)
  csv = m.to_dataframe().to_csv(index=False, na_rep="NaN")
  io.write_text(d / f"{stem}.csv", csv)
  if png:
    io.write_bytes(d / f"{stem}.png", _png_bytes(m))
  # The sidecar goes last: a matrix is listed by load() only once all its files exist.
  io.write_json(d / f"{stem}.json", {
      "format": FORMAT, "name": name, "measure": m.measure, "model_a": m.model_a,
      "model_b": m.model_b, "rows": m.rows, "cols": m.cols,
      "shape": list(m.matrix.shape), "meta": _jsonable(m.meta)})


def _jsonable(obj: Any) -> Any:
  """JSON-safe copy; non-finite floats become strings ('nan', 'inf')."""
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    return _jsonable(obj.item())
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  if hasattr(obj, "to_dict"):
    return _jsonable(obj.to_dict())
  if obj is None or isinstance(obj, (str, int, float, bool)):
    return obj
  return str(obj)


def _load_one(npz_path: epath.Path) -> tuple[str, Matrix]:
  json_path = npz_path.with_suffix(".json")
  if not json_path.exists():
    raise ResultsError(f"{npz_path} has no metadata sidecar {json_path.name}; the "
                       "write was interrupted or the file was copied alone.")
  try:
    meta = json.loads(json_path.read_text())
  except (ValueError, OSError) as e:
    raise ResultsError(f"Could not read results metadata {json_path}: {e}") from e
  if not isinstance(meta, dict):
    raise ResultsError(f"Results metadata {json_path} is not a JSON object.")
  try:
    arrays = io.read_npz(npz_path)
  except Exception as e:  # zipfile, zlib, numpy and OS errors for damaged files.
    raise ResultsError(f"Could not read results file {npz_path} "
                       f"({type(e).__name__}: {e}); it is truncated or corrupted. "
                       "Re-run the job that wrote it.") from e
  missing = {"matrix", "rows", "cols"} - set(arrays)
  if missing:
    raise ResultsError(f"Results file {npz_path} lacks array(s) {sorted(missing)}.")
  rows = [str(r) for r in arrays["rows"].tolist()]
  cols = [str(c) for c in arrays["cols"].tolist()]
  if rows != list(meta.get("rows", rows)) or cols != list(meta.get("cols", cols)):
    raise ResultsError(f"{npz_path} and {json_path.name} disagree on the layer names.")
  try:
    m = Matrix(matrix=arrays["matrix"], rows=rows, cols=cols,
               measure=meta.get("measure", ""), model_a=meta.get("model_a", ""),
               model_b=meta.get("model_b", ""), meta=meta.get("meta", {}),
               low=arrays.get("low"), high=arrays.get("high"))
  except ValueError as e:
    raise ResultsError(f"{npz_path}: {e}") from e
  return str(meta.get("name", npz_path.stem)), m


def suggest_quickstart(workdir: str | os.PathLike) -> str:
  """The command that fills `workdir` with results (the quickstart, `:tiny`)."""
  return ("python -m fula_jax.main --config=configs/quickstart.py:tiny "
          f"--workdir={shlex.quote(str(workdir))}")


def load(workdir: str | os.PathLike) -> dict[str, Matrix]:
  """Every matrix under ``<workdir>/results``, keyed by the name it was saved with."""
  d = _results_dir(workdir)
  if not d.exists():
    raise NoResultsError(
        f"No results in {workdir}: {d} does not exist. Check the path, or make some "
        f"from the repository root (the quickstart at its tiny scale, under a minute on "
        f"a CPU): `{suggest_quickstart(workdir)}`.")
  paths = sorted(p for p in d.glob("*.npz") if not p.name.startswith("."))
  if not paths:
    raise NoResultsError(f"No results in {workdir}: {d} holds no .npz matrices.")
  out = {}
  for p in paths:
    name, m = _load_one(p)
    out[name] = m
  return out
