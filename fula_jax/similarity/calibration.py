"""Null-calibrated scores: a measure's value against its own permutation null.

Raw similarity values are not comparable across measures, layer widths or sample sizes:
biased CKA of two independent wide layers is far above 0, a kNN overlap has a chance
level of k / (n - 1). Gröger, Wen & Brbić (2026) show that once scores are calibrated
against a permutation null, much apparent global similarity between models vanishes
while local-neighbourhood agreement survives. `calibrate` gives, for one pair,

* ``null_mean``, ``null_sd``: the measure over random re-pairings of the examples
  (see :mod:`fula_jax.similarity.null`);
* ``z``: standard deviations above the null, signed so that positive = more alike than
  chance for similarities and distances alike;
* ``p_value``: the permutation p-value, (1 + #{null at least as alike}) / (R + 1);
* ``score``: (raw - null_mean) / (ideal - null_mean), 0 at chance and 1 for identical
  representations (the measure's declared ``ideal``).

`calibrated_matrix` does the same for every layer pair of a matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax.similarity import checks
from fula_jax.similarity import measures as measures_lib
from fula_jax.similarity import null


@dataclasses.dataclass(frozen=True)
class Calibrated:
  measure: str
  raw: float
  null_mean: float
  null_sd: float
  z: float
  p_value: float
  score: float
  num_permutations: int


def _key(key: jax.Array | int) -> jax.Array:
  return jax.random.PRNGKey(key) if isinstance(key, int) else key


def _calibrated(m: measures_lib.Measure, res: null.NullResult,
                num_permutations: int) -> Calibrated:
  sign = 1.0 if m.kind == "similarity" else -1.0
  with np.errstate(divide="ignore", invalid="ignore"):
    z = sign * (res.observed - res.null_mean) / res.null_std
    score = (res.observed - res.null_mean) / (m.ideal - res.null_mean)
  return Calibrated(m.name, res.observed, res.null_mean, res.null_std, float(z),
                    res.p_value, float(score), int(num_permutations))


def calibrate(name: str, x, y, num_permutations: int = 200, *,
              key: jax.Array | int = 0, chunk: int | None = 16,
              **options: Any) -> Calibrated:
  """Measure `name` of (x, y) with its permutation null, z-score, p-value and score."""
  res = null.permutation_test(name, x, y, _key(key), num_permutations=num_permutations,
                              chunk=chunk, **options)
  return _calibrated(measures_lib.get(name), res, num_permutations)


def calibrated_matrix(name: str, acts_a: Mapping[str, Any],
                      acts_b: Mapping[str, Any] | None = None,
                      num_permutations: int = 200, *, key: jax.Array | int = 0,
                      chunk: int | None = 16, **options: Any) -> dict[str, np.ndarray]:
  """{'score', 'z', 'p_value', 'null_mean', 'null_sd', 'raw'}: each an
  ``len(acts_a) x len(acts_b)`` array (NaN where a layer cannot be measured). Every
  cell uses the same permutations (one key), so cells are comparable; within one model
  a symmetric measure's lower triangle mirrors the upper one.

  A measure that declares `permute` prepares each layer once, with the options
  resolved over every layer as :func:`measures.matrix` does, and shuffles prepared
  states: one compiled null per state shape rather than one per layer pair."""
  m = measures_lib.get(name)
  key = _key(key)
  if m.permute is None:
    cells = measures_lib.map_cells(name, acts_a, acts_b, lambda x, y: calibrate(
        name, x, y, num_permutations, key=key, chunk=chunk, **options))
  else:
    flat = lambda acts: {k: jnp.asarray(v).reshape(np.shape(v)[0], -1)
                         for k, v in acts.items()}
    xs = flat(acts_a)
    ys = xs if acts_b is None else flat(acts_b)
    n = int(next(iter(xs.values())).shape[0])
    opts = m.options(n, [v.shape[1] for v in xs.values()],
                     [v.shape[1] for v in ys.values()], **options)
    frozen = tuple(sorted(opts.items()))

    def prepared(acts):
      out = {}
      for k, v in acts.items():
        problem = checks.layer_problem(v, m.needs_min_n)
        out[k] = (problem, None if problem else
                  measures_lib.prepare_layer(m.name, frozen, v))
      return out

    def cell(a, b):
      (pa, sa), (pb, sb) = a, b
      res = null.from_states(m.name, frozen, n, sa, sb, key,
                             num_permutations=num_permutations, chunk=chunk,
                             problems={"x": pa, "y": pb})
      return _calibrated(m, res, num_permutations)

    sx = prepared(xs)
    cells = measures_lib.map_cells(name, sx, None if acts_b is None else prepared(ys),
                                   cell)
  return {f: np.asarray([[getattr(c, f) for c in row] for row in cells], np.float64)
          for f in ("score", "z", "p_value", "null_mean", "null_sd", "raw")}
