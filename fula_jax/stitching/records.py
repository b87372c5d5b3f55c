"""A finished unit's results as records: one JSON-able dict per stitch with its status
('ok', 'failed' or 'diverged'), the reason, and every active measure's value. These
records are what the store writes, what a resumed sweep reads back, and what the
result matrices are filled from.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fula_jax.stitching import measures as measures_lib, plan as plan_lib
from fula_jax.stitching import programs as P, store as store_lib
from fula_jax.stitching.context import SweepContext
from fula_jax.stitching.objectives import Where


def unit_records(sw: SweepContext, u: plan_lib.Unit, state: P.StitchState,
                 sums: Mapping[str, Mapping[str, np.ndarray]],
                 end_accuracy: Mapping[str, float], failed: Mapping[int, str],
                 pgd: np.ndarray | None) -> list[dict[str, Any]]:
  """One record per stitch of unit `u`, from its final state and evaluation sums (on the
  host) per evaluation set; `failed`: stitch -> why it could not be fitted; `pgd`: its
  stitches' PGD accuracies when the attack ran."""
  obj = sw.science.arm(u.arm).objective
  where = Where(u.end, sw.b.points)
  train_loss = np.where(state.loss_weight > 0,
                        state.loss_sum / np.maximum(state.loss_weight, 1e-30), np.nan)

  def readout(name, sets):
    return measures_lib.Readout(sums[name], sw.test_views[name].n, end_accuracy[name],
                                obj, where, train_loss, pgd, np.asarray(state.trend), sets)

  values = measures_lib.values(
      readout("", {name: readout(name, {}) for name in sw.test_views if name}),
      sw.measures)
  out = []
  for s, row in enumerate(u.fronts):
    metrics = {k: float(v[s]) for k, v in values.items()}
    status, reason = "ok", ""
    if s in failed:
      status, reason = "failed", failed[s]
    elif bool(state.diverged[s]):
      status, reason = "diverged", (
          f"non-finite loss or parameters at training step "
          f"{int(state.diverged_step[s])} (learning rate {float(state.lr[s]):g})")
    elif not all(np.isfinite(metrics[m]) for m in measures_lib.REQUIRED_FINITE):
      status, reason = "diverged", "non-finite value on the test split"
    if status != "ok":
      metrics = {k: float("nan") for k in metrics}
    out.append({"row": row, "col": u.end, "status": status, "reason": reason,
                "metrics": {k: store_lib.to_json_value(v) for k, v in metrics.items()}})
  return out
