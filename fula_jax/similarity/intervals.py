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
from fula_jax.similarity import null


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


def _resample_indices(key: jax.Array, n: int, num_resamples: int, chunk: int
                      ) -> jax.Array:
  """``(B', n)`` example indices of every resample, the draws `bootstrap` makes, padded
  with the first resample to whole chunks (cut off later)."""
  keys = null.padded_keys(key, num_resamples, chunk)
  return jax.vmap(lambda k: jax.random.randint(k, (n,), 0, n))(keys)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _prepare_resampled(name: str, opts: tuple, x: jax.Array, idx: jax.Array):
  """One layer's prepared state on each resample ``idx[r]``: one program per layer
  shape."""
  return jax.vmap(lambda i: measures_lib.prepare_layer(name, opts, x[i]))(idx)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _combine_resampled(name: str, opts: tuple, sx, sy) -> jax.Array:
  """The measure on each resample from two stacks of prepared states: one program per
  pair of state shapes (one for every cell of a Gram-based measure)."""
  return jax.vmap(functools.partial(measures_lib.combine_pair, name, opts))(sx, sy)


def _state_bytes(name: str, opts: tuple, x: jax.Array) -> int:
  shape = jax.eval_shape(functools.partial(measures_lib.prepare_layer, name, opts), x)
  return sum(int(np.prod(s.shape)) * s.dtype.itemsize
             for s in jax.tree_util.tree_leaves(shape))


def bootstrap_matrix(name: str, acts_a: Mapping[str, Any],
                     acts_b: Mapping[str, Any] | None = None, num_resamples: int = 1000,
                     *, level: float = 0.9, key: jax.Array | int = 0,
                     chunk: int = 16, max_bytes: int = 1 << 30,
                     **options: Any) -> tuple[np.ndarray, np.ndarray]:
  """(low, high): ``len(acts_a) x len(acts_b)`` interval ends. Every cell uses the same
  resamples (one key, the draws `bootstrap` makes), so the intervals of two cells are
  jointly drawn; within one model a symmetric measure's lower triangle mirrors the
  upper one.

  Each layer is prepared once per resample, with the options resolved over every layer
  as :func:`measures.matrix` does, and each cell combines two prepared stacks: one
  compiled program per layer shape and one per pair of state shapes, rather than one
  per cell. `chunk` resamples are held at a time for B's layers and one of A's, fewer
  where that would pass `max_bytes`."""
  m = measures_lib.get(name)
  if not 0.0 < level < 1.0:
    raise ValueError(f"level = {level}: a confidence level is in (0, 1), e.g. 0.9.")
  if num_resamples < 2:
    raise ValueError(f"num_resamples = {num_resamples}: need at least 2.")
  key = jax.random.PRNGKey(key) if isinstance(key, int) else key
  xs = {k: cka.flatten(jnp.asarray(v)) for k, v in acts_a.items()}
  ys = xs if acts_b is None else {k: cka.flatten(jnp.asarray(v)) for k, v in acts_b.items()}
  n = int(next(iter(xs.values())).shape[0])
  opts = m.options(n, [v.shape[1] for v in xs.values()], [v.shape[1] for v in ys.values()],
                   **options)
  frozen = tuple(sorted(opts.items()))
  # Which cells to compute: map_cells mirrors a symmetric measure within one model.
  grid = measures_lib.map_cells(name, {k: k for k in xs},
                                None if acts_b is None else {k: k for k in ys},
                                lambda a, b: (a, b))
  cells = list(dict.fromkeys(c for row in grid for c in row))
  held = max(_state_bytes(m.name, frozen, v) for v in [*xs.values(), *ys.values()])
  chunk = max(1, min(int(chunk), num_resamples,
                     int(max_bytes // max(held * (len(ys) + 1), 1))))
  idx = _resample_indices(key, n, int(num_resamples), chunk)
  samples: dict[tuple[str, str], list] = {c: [] for c in cells}
  for start in range(0, idx.shape[0], chunk):
    part = idx[start:start + chunk]
    sb = {k: _prepare_resampled(m.name, frozen, v, part) for k, v in ys.items()}
    for a in xs:
      sa = sb[a] if acts_b is None else _prepare_resampled(m.name, frozen, xs[a], part)
      for b in (b for (r, b) in cells if r == a):
        samples[(a, b)].append(_combine_resampled(m.name, frozen, sa, sb[b]))
  low, high = (np.full((len(xs), len(ys)), np.nan) for _ in range(2))
  for i, row in enumerate(grid):
    for j, cell in enumerate(row):
      values = np.concatenate([np.asarray(s, np.float64)
                               for s in samples[cell]])[:num_resamples]
      finite = values[np.isfinite(values)]
      if finite.size >= 2:
        low[i, j], high[i, j] = np.quantile(
            finite, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return low, high
