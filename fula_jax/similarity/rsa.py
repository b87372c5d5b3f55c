"""Representational similarity analysis (Kriegeskorte et al. 2008).

Each layer gives a representational dissimilarity matrix over the n examples, and two
layers are compared by a correlation of the RDMs' upper triangles (m = n(n-1)/2
entries). Options:

* ``rdm``: 'correlation' (1 - Pearson correlation of two examples' feature vectors, the
  classic RSA choice) or 'euclidean' (distance between the feature vectors);
* ``compare``: 'spearman' (Pearson correlation of the ranks, ties averaged), 'pearson',
  or 'kendall' (Kendall's tau-b, ties handled as in SciPy's ``kendalltau``).

Cost per layer: O(n^2 d) for the RDM and O(m log m) for ranks. Per pair O(m) for
Spearman and Pearson; Kendall counts discordant pairs by a bottom-up merge sort in
O(m log^2 m) (log m sorts of m entries), with m up to ~2 million at n = 2,000 (seconds
per pair on a CPU).
The invariances registered are those of the default ('correlation', 'spearman'); the
'euclidean' RDM adds translation and orthogonal invariance.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

RDMS = {"correlation": "1 - Pearson correlation between two examples' features",
        "euclidean": "Euclidean distance between two examples' features"}
COMPARES = {"spearman": "Spearman rank correlation (ties averaged)",
            "pearson": "Pearson correlation",
            "kendall": "Kendall's tau-b"}

Options = Mapping[str, Any]
_HI = jax.lax.Precision.HIGHEST


def rdm(x: jax.Array, kind: str) -> jax.Array:
  """The (n, n) dissimilarity matrix of the rows of `x`."""
  if kind == "correlation":
    xc = x - jnp.mean(x, axis=1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(xc * xc, axis=1, keepdims=True))
    xn = xc / jnp.where(norm > 0, norm, 1.0)
    return 1.0 - jnp.matmul(xn, xn.T, precision=_HI)
  sq = jnp.sum(x * x, axis=1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(x, x.T, precision=_HI)
  return jnp.sqrt(jnp.maximum(d2, 0.0))


def upper(m: jax.Array) -> jax.Array:
  """The strict upper triangle, row by row (SciPy's condensed order)."""
  i, j = np.triu_indices(m.shape[0], 1)
  return m[i, j]


def permute(v: jax.Array, perm: jax.Array, opts: Options) -> jax.Array:
  """`prepare` of the examples reordered so that new example i is old perm[i], from
  the prepared state: each upper-triangle entry (i, j) is old entry (perm i, perm j)
  (ranks and standardisation follow the entries)."""
  n = perm.shape[0]
  i, j = np.triu_indices(n, 1)
  a = jnp.minimum(perm[i], perm[j])
  b = jnp.maximum(perm[i], perm[j])
  return v[a * n - a * (a + 1) // 2 + (b - a - 1)]


def rankdata(v: jax.Array) -> jax.Array:
  """Ranks 1..m of a vector, ties given their average rank."""
  s = jnp.sort(v)
  lo = jnp.searchsorted(s, v, side="left")
  hi = jnp.searchsorted(s, v, side="right")
  return (lo + hi + 1) / 2.0


def _standardise(v: jax.Array) -> jax.Array:
  v = v - jnp.mean(v)
  return v / jnp.sqrt(jnp.sum(v * v))


def prepare(x: jax.Array, opts: Options) -> jax.Array:
  v = upper(rdm(x, opts["rdm"]))
  if opts["compare"] == "spearman":
    return _standardise(rankdata(v))
  if opts["compare"] == "pearson":
    return _standardise(v)
  return v


def _tied_pairs(v: jax.Array) -> jax.Array:
  """Number of pairs with equal values."""
  s = jnp.sort(v)
  first = jnp.searchsorted(s, s, side="left")
  return jnp.sum((jnp.arange(s.shape[0]) - first).astype(jnp.float32))


def _inversions(y: jax.Array) -> jax.Array:
  """#{i < j : y_i > y_j}, by a bottom-up merge sort with fixed shapes: at level l the
  array is sorted within blocks of r = 2^l, and one sort by (block of 2r, value, half)
  merges neighbours (left first on ties). A right-half element at offset q of its half
  that lands at offset pos of the merged block has pos - q left elements <= it, so
  r - (pos - q) greater. One compiled loop body for every level."""
  m = y.shape[0]
  size = 1 << max(1, (m - 1).bit_length())
  vals = jnp.concatenate([y, jnp.full((size - m,), jnp.inf, y.dtype)])
  idx = jnp.arange(size)

  def level(lvl, carry):
    vals, total = carry
    r = jnp.left_shift(1, lvl)
    block, half, q = idx // (2 * r), (idx // r) % 2, idx % r
    order = jnp.lexsort((half, vals, block))
    pos = jnp.zeros_like(idx).at[order].set(idx) - block * 2 * r
    greater = jnp.where(half == 1, r - (pos - q), 0)
    return vals[order], total + jnp.sum(greater.astype(jnp.float32))

  levels = size.bit_length() - 1
  return jax.lax.fori_loop(0, levels, level, (vals, jnp.zeros((), jnp.float32)))[1]


def kendall_tau_b(x: jax.Array, y: jax.Array) -> jax.Array:
  """Kendall's tau-b of two vectors (SciPy's ``kendalltau`` default)."""
  m = x.shape[0]
  order = jnp.lexsort((y, x))                  # by x, ties by y: tied x never invert
  pairs = m * (m - 1) / 2.0
  tx, ty = _tied_pairs(x), _tied_pairs(y)
  xs, ys = x[order], y[order]
  joint = _tied_pairs_joint(xs, ys)
  discordant = _inversions(ys)
  concordant_minus = pairs - tx - ty + joint - 2.0 * discordant
  return concordant_minus / jnp.sqrt((pairs - tx) * (pairs - ty))


def _tied_pairs_joint(xs: jax.Array, ys: jax.Array) -> jax.Array:
  """Pairs tied in both x and y, from the pairs sorted by x then y."""
  same = (xs[1:] == xs[:-1]) & (ys[1:] == ys[:-1])
  # Run lengths of consecutive equal (x, y): pairs = sum over runs of t(t-1)/2.
  start = jnp.concatenate([jnp.ones((1,), bool), ~same])
  run_id = jnp.cumsum(start) - 1
  idx = jnp.arange(xs.shape[0])
  first = jax.ops.segment_min(idx, run_id, num_segments=xs.shape[0])
  return jnp.sum((idx - first[run_id]).astype(jnp.float32))


def combine(a: jax.Array, b: jax.Array, opts: Options) -> jax.Array:
  if opts["compare"] == "kendall":
    return kendall_tau_b(a, b)
  return jnp.dot(a, b, precision=_HI)
