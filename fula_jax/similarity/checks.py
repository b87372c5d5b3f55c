"""Numerical guards: cells that cannot be trusted become NaN, with a warning naming layers.

Checks need concrete values, so they run outside jit, on the whole activation (collected
measures) or on the running statistics of a streaming accumulator.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A layer whose centred sum of squares is below this fraction of its raw sum of squares
# is constant up to float32 rounding (relative spread < 1e-5).
CONSTANT_RTOL = 1e-10


class SimilarityWarning(UserWarning):
  """A similarity cell was set to NaN, or a result is degenerate."""


@jax.jit
def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  finite_rows = jnp.all(jnp.isfinite(x), axis=1)
  x = jnp.where(finite_rows[:, None], x, 0.0)
  n = jnp.maximum(jnp.sum(finite_rows), 1)
  xc = jnp.where(finite_rows[:, None], x - jnp.sum(x, axis=0) / n, 0.0)
  return jnp.sum(~finite_rows), jnp.sum(xc * xc), jnp.sum(x * x)


def describe(*, n: int, min_n: int, nonfinite_rows: int, centred_ss: float,
             raw_ss: float) -> str | None:
  """Why a layer's statistics cannot be trusted, or None."""
  if nonfinite_rows > 0:
    return f"{nonfinite_rows} example(s) have NaN/Inf activations"
  if n < min_n:
    return f"only {n} example(s), the estimator needs at least {min_n}"
  if not np.isfinite(raw_ss):
    return "activations overflow float32"
  if raw_ss == 0.0:
    return "activations are all zero"
  if not centred_ss > CONSTANT_RTOL * raw_ss:
    return "activations are constant across examples"
  return None


def layer_problem(x: jax.Array | np.ndarray, min_n: int) -> str | None:
  """`describe` for one whole activation array ``(n, ...)``."""
  nonfinite, centred, raw = (np.asarray(v) for v in _stats(jnp.asarray(x)))
  return describe(n=int(x.shape[0]), min_n=min_n, nonfinite_rows=int(nonfinite),
                  centred_ss=float(centred), raw_ss=float(raw))


def apply(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *,
          measure: str, problems_a: Mapping[str, str | None],
          problems_b: Mapping[str, str | None], label_a: str = "model A",
          label_b: str = "model B") -> tuple[np.ndarray, dict[str, str]]:
  """Set the rows/columns of problem layers to NaN, warn, and explain every NaN cell.

  Returns the new matrix and ``{"<side>:<layer>" or "<row>|<col>": reason}`` for meta.
  """
  out = np.array(matrix, dtype=np.float64, copy=True)
  reasons: dict[str, str] = {}
  for i, r in enumerate(rows):
    if problems_a.get(r):
      out[i, :] = np.nan
      reasons[f"{label_a}:{r}"] = problems_a[r]
  for j, c in enumerate(cols):
    if problems_b.get(c):
      out[:, j] = np.nan
      reasons[f"{label_b}:{c}"] = problems_b[c]
  if reasons:
    listed = "; ".join(f"{k} ({v})" for k, v in reasons.items())
    warnings.warn(f"{measure}: NaN for layer(s) {listed}.", SimilarityWarning,
                  stacklevel=2)
  explained = np.zeros(out.shape, bool)
  for i, r in enumerate(rows):
    explained[i, :] |= bool(problems_a.get(r))
  for j, c in enumerate(cols):
    explained[:, j] |= bool(problems_b.get(c))
  other = np.argwhere(~np.isfinite(out) & ~explained)
  if len(other):
    pairs = [f"({rows[i]}, {cols[j]})" for i, j in other]
    for p in pairs:
      reasons[p] = "not finite (e.g. a non-positive debiased self-HSIC)"
    shown = ", ".join(pairs[:10]) + (f" and {len(pairs) - 10} more" if len(pairs) > 10
                                      else "")
    warnings.warn(f"{measure}: NaN for layer pair(s) {shown}: the estimate is not "
                  "finite (e.g. a non-positive debiased self-HSIC at small n).",
                  SimilarityWarning, stacklevel=2)
    out[~np.isfinite(out)] = np.nan
  return out, reasons
