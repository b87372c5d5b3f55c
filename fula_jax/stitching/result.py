"""What a sweep returns: `SweepResult`, every cell of every objective as arrays, with
why each NaN cell is NaN, which trained cells did not converge, and each column's
self-stitch baseline; `matrices()` turns it into `results.Matrix` objects."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping

import numpy as np

from fula_jax.stitching import measures as measures_lib
from fula_jax.stitching import plan as plan_lib

TABLE_COLUMNS = ("objective", "map", "row", "col", "measure", "value", "reason")


NOT_REQUESTED = "not among the requested cells (stitch.pairs, rows, cols)"


class ConvergenceWarning(UserWarning):
  """Some trained stitches of a sweep did not converge (see `measures.Converged`)."""


@dataclasses.dataclass
class SweepResult:
  """Every cell of every objective, as arrays; `matrices()` gives results.Matrix."""
  rows: list[str]
  cols: list[str]
  values: dict[str, dict[str, np.ndarray]]   # objective -> measure -> (rows, cols)
  reasons: dict[str, dict[str, str]]         # objective -> 'a->b' -> why it is NaN
  end_accuracy: float
  stats: dict[str, Any]
  meta: dict[str, Any]
  params: dict[tuple[str, str, str], dict[str, np.ndarray]] = dataclasses.field(
      default_factory=dict)

  def matrices(self, model_a: str = "A", model_b: str = "B") -> dict[str, Any]:
    """``{'stitch_<objective>/<measure>': results.Matrix}``."""
    from fula_jax import results
    out = {}
    unconverged = self.unconverged()
    for obj, measures in self.values.items():
      late = unconverged.get(obj, {})
      for measure, m in measures.items():
        name = f"stitch_{obj}/{measure}"
        meta = dict(self.meta, objective=obj, end_accuracy=self.end_accuracy,
                    reasons=self._reasons(obj, measure, m, late), unconverged=late,
                    baseline=self.baseline(obj))
        out[name] = results.Matrix(matrix=np.asarray(m, np.float64), rows=list(self.rows),
                                   cols=list(self.cols), measure=name, model_a=model_a,
                                   model_b=model_b, meta=meta)
    return out

  def objective_map(self, key: str) -> tuple[str, str]:
    """(objective, map) of the matrix keyed `key`: ('fula', 'lowrank:rank=4') for
    'fula@lowrank:rank=4', (key, 'affine') for a plain objective."""
    objective, form = self.meta.get("objective_maps", {}).get(key, (key, "affine"))
    return objective, form

  def table(self) -> Any:
    """Every cell of every (objective, map) and measure as one tidy pandas DataFrame,
    columns ``TABLE_COLUMNS`` (a NaN cell keeps its reason): for groupby and plots."""
    import pandas as pd
    late = self.unconverged()
    out = []
    for key, measures in self.values.items():
      objective, form = self.objective_map(key)
      for measure, m in measures.items():
        why = self._reasons(key, measure, m, late.get(key, {}))
        for (i, r), (j, c) in itertools.product(enumerate(self.rows), enumerate(self.cols)):
          out.append((objective, form, r, c, measure, float(m[i, j]),
                      why.get(plan_lib.cell_key(r, c), "") if np.isnan(m[i, j]) else ""))
    return pd.DataFrame(out, columns=list(TABLE_COLUMNS))

  def baseline(self, obj: str) -> dict[str, float]:
    """{end point: the end model's self-stitch accuracy there} for objective `obj`:
    the ceiling of each column (from its self-stitches trained in the sweep, or its own
    diagonal when the front model is the end model); {} when not computed."""
    own = self.meta.get("baseline_accuracy", {}).get(obj)
    if own is not None:
      return dict(own)
    if not self.meta.get("self_stitch"):
      return {}
    acc = self.values.get(obj, {}).get("accuracy")
    return {c: float(acc[self.rows.index(c), j]) for j, c in enumerate(self.cols)
            if acc is not None and c in self.rows
            and np.isfinite(acc[self.rows.index(c), j])}

  def unconverged(self) -> dict[str, dict[str, str]]:
    """objective -> {'a->b': why} for every trained cell that did not converge
    (`measures.Converged`)."""
    out: dict[str, dict[str, str]] = {}
    for obj, mats in self.values.items():
      if "converged" not in mats:
        continue
      trend = mats.get("loss_trend")
      for a, b in np.argwhere(np.asarray(mats["converged"]) == 0.0):
        drop = np.nan if trend is None else float(trend[a, b])
        why = (f"did not converge: the training loss still fell {drop:.1%} over the last "
               "quarter of training" if np.isfinite(drop) else
               f"did not converge: fewer than {measures_lib.MIN_STEPS} training steps")
        steps = self.meta.get("steps")
        out.setdefault(obj, {})[plan_lib.cell_key(self.rows[a], self.cols[b])] = (
            f"{why} ({steps} steps); raise the training budget (stitch.epochs, "
            "min_steps or steps)")
    return out

  def convergence_summary(self) -> str | None:
    """One line naming how many trained cells did not converge and what to raise, or
    None when every trained cell converged."""
    bad = self.unconverged()
    trained = sum(int(np.sum(np.isfinite(m["converged"]))) for m in self.values.values()
                  if "converged" in m)
    n_bad = sum(len(v) for v in bad.values())
    if not n_bad:
      return None
    per = ", ".join(f"{o} {len(v)}" for o, v in bad.items())
    cfg = self.meta.get("settings", {})
    lstsq = "" if cfg.get("init") == "lstsq" else (
        ", or start from the closed form (stitch.init='lstsq')")
    raise_ = (f"stitch.steps (now {cfg['steps']})" if cfg.get("steps") else
              f"stitch.epochs (now {cfg.get('epochs')}) or stitch.min_steps")
    return (f"{n_bad} of {trained} trained stitches did not converge ({per}; "
            f"{self.meta.get('steps')} steps each): their numbers understate what a "
            f"stitch can do. Raise {raise_}{lstsq}; matrices '<...>/converged' mark "
            "the cells.")

  def _reasons(self, obj: str, measure: str, m: np.ndarray,
               unconverged: Mapping[str, str]) -> dict[str, str]:
    """Why each NaN cell of one matrix is NaN: the cell's own reason, else the
    measure's (e.g. no training loss for a closed-form map); the converged matrix also
    says why each 0 cell did not converge."""
    cell = self.reasons.get(obj, {})
    why = dict(cell)
    if measure == "converged":
      why.update(unconverged)
    undefined = measures_lib.UNDEFINED.get(measure) or "not defined for this cell"
    for a, b in np.argwhere(np.isnan(np.asarray(m, np.float64))):
      key = plan_lib.cell_key(self.rows[a], self.cols[b])
      if key not in why:
        why[key] = f"{measure}: {undefined}"
    return why
