"""Bootstrap confidence intervals over examples for any measure (Efron's percentile
interval).

The n examples are resampled with replacement, jointly on both sides, B times (one
explicit PRNG key); the measure is recomputed on each resample, vmapped `chunk` at a
time; the interval is the (1 - level)/2 and (1 + level)/2 quantiles of the B values.
It describes how much a value would move with another sample of examples from the same
distribution, not how two models would differ with other seeds.

Resampling duplicates examples. Measures built on nearest neighbours see a duplicate as
a neighbour at distance 0, so their intervals sit above the full-sample value; prefer
calibrated scores (:mod:`calibration`) for those.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax.similarity import cka
from fula_jax.similarity import measures as measures_lib


@dataclasses.dataclass(frozen=True)
class Interval:
  measure: str
  value: float            # on the full sample
  low: float
  high: float
  level: float
  samples: np.ndarray     # (B,) the measure on each resample


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _resampled(name: str, opts: tuple, num_resamples: int, chunk: int | None,
               x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
  prepare = functools.partial(measures_lib.prepare_layer, name, opts)
  n = x.shape[0]

  def one(k):
    idx = jax.random.randint(k, (n,), 0, n)
    return measures_lib.combine_pair(name, opts, prepare(x[idx]), prepare(y[idx]))

  return jax.lax.map(one, jax.random.split(key, num_resamples), batch_size=chunk)


def bootstrap(name: str, x, y, num_resamples: int = 1000, *, level: float = 0.9,
              key: jax.Array | int = 0, chunk: int | None = 16,
              **options: Any) -> Interval:
  """Measure `name` of (x, y) and its percentile bootstrap interval at `level`."""
  m = measures_lib.get(name)
  if not 0.0 < level < 1.0:
    raise ValueError(f"level = {level}: a confidence level is in (0, 1), e.g. 0.9.")
  if num_resamples < 2:
    raise ValueError(f"num_resamples = {num_resamples}: need at least 2.")
  x, y = cka.flatten(jnp.asarray(x)), cka.flatten(jnp.asarray(y))
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"{name}: both sides need the same examples; got {x.shape[0]} "
                     f"and {y.shape[0]} rows.")
  key = jax.random.PRNGKey(key) if isinstance(key, int) else key
  opts = m.options(x.shape[0], (x.shape[1],), (y.shape[1],), **options)
  chunk = None if chunk is None else max(1, min(int(chunk), num_resamples))
  samples = np.asarray(_resampled(m.name, tuple(sorted(opts.items())), int(num_resamples),
                                  chunk, x, y, key), np.float64)
  value = float(m(x, y, **options))
  finite = samples[np.isfinite(samples)]
  if finite.size < 2:
    return Interval(m.name, value, float("nan"), float("nan"), level, samples)
  lo, hi = np.quantile(finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return Interval(m.name, value, float(lo), float(hi), level, samples)


def bootstrap_matrix(name: str, acts_a: Mapping[str, Any],
                     acts_b: Mapping[str, Any] | None = None, num_resamples: int = 1000,
                     *, level: float = 0.9, key: jax.Array | int = 0,
                     **options: Any) -> tuple[np.ndarray, np.ndarray]:
  """(low, high): ``len(acts_a) x len(acts_b)`` interval ends. Every cell uses the same
  resamples (one key), so the intervals of two cells are jointly drawn; within one
  model a symmetric measure's lower triangle mirrors the upper one."""
  cells = measures_lib.map_cells(name, acts_a, acts_b, lambda x, y: bootstrap(
      name, x, y, num_resamples, level=level, key=key, **options))
  return (np.asarray([[c.low for c in row] for row in cells], np.float64),
          np.asarray([[c.high for c in row] for row in cells], np.float64))
