"""Permutation null: how large would the measure be if the examples were unpaired?

The examples of one side (Y) are shuffled with an explicit PRNG key, breaking the
example-to-example correspondence while keeping each representation's own geometry; the
measure is recomputed for R shuffles (vmapped in chunks). For a similarity

  p = (1 + #{null >= observed}) / (R + 1)

(the reverse inequality for a distance), which is a valid p-value for the hypothesis that
the pairing carries no information; ``corrected = observed - null_mean`` is a score on a
scale where unrelated representations sit at 0 (Williams et al. style calibration).
Biased CKA in particular has a large positive null mean at n ~ d.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax.similarity import checks
from fula_jax.similarity import cka
from fula_jax.similarity import measures as measures_lib


@dataclasses.dataclass(frozen=True)
class NullResult:
  observed: float
  null_mean: float
  null_std: float
  p_value: float
  corrected: float        # observed - null_mean
  null: np.ndarray        # (R,) the measure on permuted pairings
  measure: str
  kind: str


def padded_keys(key: jax.Array, num_permutations: int, chunk: int | None):
  """One key per shuffle (or resample), padded to whole chunks (one compiled body
  instead of a body plus a remainder); the padding repeats the first key and is cut
  off afterwards."""
  keys = jax.random.split(key, num_permutations)
  if chunk is not None and num_permutations % chunk:
    extra = chunk - num_permutations % chunk
    keys = jnp.concatenate([keys, jnp.repeat(keys[:1], extra, axis=0)])
  return keys


def _chunk(chunk: int | None, num_permutations: int) -> int | None:
  return None if chunk is None else max(1, min(int(chunk), num_permutations))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _run(name: str, opts: tuple, num_permutations: int, chunk: int | None,
         x: jax.Array, y: jax.Array, key: jax.Array):
  prepare = functools.partial(measures_lib.prepare_layer, name, opts)
  combine = functools.partial(measures_lib.combine_pair, name, opts)
  sx = prepare(x)
  observed = combine(sx, prepare(y))
  keys = padded_keys(key, num_permutations, chunk)

  def one(k):
    perm = jax.random.permutation(k, y.shape[0])
    return combine(sx, prepare(y[perm]))

  return observed, jax.lax.map(one, keys, batch_size=chunk)[:num_permutations]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _run_prepared(name: str, opts: tuple, n: int, num_permutations: int,
                  chunk: int | None, sx, sy, key: jax.Array):
  """The measure on `num_permutations` shuffles of Y's examples, from the prepared
  states (the measure's `permute`): one compiled program per state shape, shared by
  every cell of a matrix whose states share a shape."""
  m, o = measures_lib.MEASURES[name], dict(opts)
  keys = padded_keys(key, num_permutations, chunk)

  def one(k):
    return m.combine(sx, m.permute(sy, jax.random.permutation(k, n), o), o)

  return jax.lax.map(one, keys, batch_size=chunk)[:num_permutations]


def from_states(measure: str, frozen: tuple, n: int, sx, sy, key: jax.Array, *,
                num_permutations: int, chunk: int | None = 16,
                problems: dict[str, str] | None = None) -> NullResult:
  """`permutation_test` from two prepared states (``measures.prepare_layer`` with the
  frozen options `frozen`) of a measure that declares `permute`; `problems` names the
  sides that cannot be measured (checks.layer_problem), which gives NaN."""
  m = measures_lib.get(measure)
  chunk = _chunk(chunk, num_permutations)
  if problems and any(problems.values()):
    return _result(m, float("nan"), np.full(num_permutations, np.nan), problems)
  observed = float(measures_lib.combine_pair(m.name, frozen, sx, sy))
  null = _run_prepared(m.name, frozen, int(n), int(num_permutations), chunk, sx, sy, key)
  return _result(m, observed, np.asarray(null, np.float64), problems or {})


def permutation_test(measure: str, x: jax.Array, y: jax.Array, key: jax.Array, *,
                     num_permutations: int = 200, chunk: int | None = 16,
                     **options: Any) -> NullResult:
  """Observed value of `measure`, its permutation null, p-value and corrected score.

  `chunk` permutations are vmapped at a time (memory ~ chunk x one evaluation). A
  measure that declares `permute` reorders Y's prepared state for each shuffle instead
  of preparing the shuffled examples again.
  """
  m = measures_lib.get(measure)
  if num_permutations < 1:
    raise ValueError(f"num_permutations must be >= 1, got {num_permutations}.")
  x, y = cka.flatten(x), cka.flatten(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"{measure}: both sides need the same examples; got {x.shape[0]} "
                     f"and {y.shape[0]} rows.")
  opts = m.options(x.shape[0], (x.shape[1],), (y.shape[1],), **options)
  problems = {side: checks.layer_problem(v, m.needs_min_n)
              for side, v in (("x", x), ("y", y))}
  frozen = tuple(sorted(opts.items()))
  if m.permute is not None:
    sx, sy = (None, None) if any(problems.values()) else (
        measures_lib.prepare_layer(m.name, frozen, x),
        measures_lib.prepare_layer(m.name, frozen, y))
    return from_states(m.name, frozen, x.shape[0], sx, sy, key,
                       num_permutations=num_permutations, chunk=chunk,
                       problems=problems)
  chunk = _chunk(chunk, num_permutations)
  observed, null = _run(m.name, frozen, int(num_permutations), chunk, x, y, key)
  return _result(m, float(observed), np.asarray(null, np.float64), problems)


def _result(m: measures_lib.Measure, observed: float, null: np.ndarray,
            problems: dict[str, str]) -> NullResult:
  if any(problems.values()) or not np.isfinite(observed) or not np.all(np.isfinite(null)):
    reasons = "; ".join(f"{k}: {v}" for k, v in problems.items() if v) or (
        "the measure is not finite on these activations")
    warnings.warn(f"{m.name} permutation test: NaN ({reasons}).",
                  checks.SimilarityWarning, stacklevel=3)
    nan = float("nan")
    return NullResult(observed=nan, null_mean=nan, null_std=nan, p_value=nan,
                      corrected=nan, null=np.full_like(null, np.nan), measure=m.name,
                      kind=m.kind)
  if m.kind == "similarity":
    extreme = int(np.sum(null >= observed))
  else:
    extreme = int(np.sum(null <= observed))
  mean = float(np.mean(null))
  return NullResult(observed=observed, null_mean=mean, null_std=float(np.std(null)),
                    p_value=(1.0 + extreme) / (len(null) + 1.0),
                    corrected=observed - mean, null=null, measure=m.name, kind=m.kind)
