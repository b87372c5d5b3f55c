"""Closed-form least squares with a bias (the DM stitch), accumulated over batches.

Rows are every pixel (or token, or example for vectors) of every image: a map
(B, H, W, C) gives B*H*W rows of C features. Batches are merged with Chan et al.'s
pairwise update of the means and centred cross-product sums, in float32 on the device,
so memory is flat in the dataset size and nothing cancels catastrophically when the
features have large means. The small (C x C) system is solved on the host in float64:

  W = (Cov_xx + lambda I)^-1 Cov_xt,   b = mean_t - mean_x W,

which is exactly ``lstsq([X 1], T)`` when lambda = 0 (then solved by pseudo-inverse).
The ridge lambda is relative: ``ridge * trace(Cov_xx) / C``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


class Stats(NamedTuple):
  """Sufficient statistics of the rows seen so far."""
  n: jax.Array       # () number of rows (float32)
  mean_x: jax.Array  # (C,)
  mean_t: jax.Array  # (D,)
  cxx: jax.Array     # (C, C) sum of centred outer products
  cxt: jax.Array     # (C, D)
  ctt: jax.Array     # (D,) sum of squared centred targets (the permutation map's scale)


def rows(a: jax.Array) -> jax.Array:
  """(B, ..., C) -> (B * ..., C)."""
  return a.reshape(-1, a.shape[-1])


def empty(c: int, d: int) -> Stats:
  z = jnp.zeros
  return Stats(z((), jnp.float32), z((c,), jnp.float32), z((d,), jnp.float32),
               z((c, c), jnp.float32), z((c, d), jnp.float32), z((d,), jnp.float32))


def batch_stats(x: jax.Array, t: jax.Array, weights: jax.Array | None = None) -> Stats:
  """Stats of one batch of rows x (N, C), t (N, D); `weights` (N,) masks padded rows."""
  x = x.astype(jnp.float32)
  t = t.astype(jnp.float32)
  w = jnp.ones((x.shape[0],), jnp.float32) if weights is None else weights.astype(
      jnp.float32)
  n = jnp.sum(w)
  safe = jnp.maximum(n, 1e-30)
  mx = jnp.einsum("n,nc->c", w, x, precision=_HI) / safe
  mt = jnp.einsum("n,nd->d", w, t, precision=_HI) / safe
  xc = (x - mx) * w[:, None]
  tc = t - mt
  cxx = jnp.einsum("nc,ne->ce", xc, x - mx, precision=_HI)
  cxt = jnp.einsum("nc,nd->cd", xc, tc, precision=_HI)
  ctt = jnp.einsum("n,nd->d", w, jnp.square(tc), precision=_HI)
  return Stats(n, mx, mt, cxx, cxt, ctt)


def merge(a: Stats, b: Stats) -> Stats:
  """Stats of the union of two disjoint sets of rows (Chan, Golub, LeVeque 1979)."""
  n = a.n + b.n
  frac_b = jnp.where(n > 0, b.n / jnp.maximum(n, 1e-30), 0.0)
  scale = a.n * frac_b  # n_a n_b / n
  dx = b.mean_x - a.mean_x
  dt = b.mean_t - a.mean_t
  return Stats(
      n=n,
      mean_x=a.mean_x + dx * frac_b,
      mean_t=a.mean_t + dt * frac_b,
      cxx=a.cxx + b.cxx + scale * jnp.outer(dx, dx),
      cxt=a.cxt + b.cxt + scale * jnp.outer(dx, dt),
      ctt=a.ctt + b.ctt + scale * jnp.square(dt))


def psum_stats(b: Stats, axis_name: str) -> Stats:
  """Stats of the union of every device's rows along a mapped axis (inside shard_map)."""
  psum = functools.partial(jax.lax.psum, axis_name=axis_name)
  n = psum(b.n)
  safe = jnp.maximum(n, 1e-30)
  mx = psum(b.n * b.mean_x) / safe
  mt = psum(b.n * b.mean_t) / safe
  dx, dt = b.mean_x - mx, b.mean_t - mt
  return Stats(n, mx, mt, psum(b.cxx + b.n * jnp.outer(dx, dx)),
               psum(b.cxt + b.n * jnp.outer(dx, dt)), psum(b.ctt + b.n * jnp.square(dt)))


def update(stats: Stats, x: jax.Array, t: jax.Array,
           weights: jax.Array | None = None) -> Stats:
  """Add a batch of rows (any layout with channels last) to `stats`."""
  w = None if weights is None else weights.reshape(-1)
  return merge(stats, batch_stats(rows(x), rows(t), w))


def solve(stats: Stats, ridge: float = 1e-6) -> dict[str, np.ndarray]:
  """Host-side float64 solution ``{'kernel': (C, D), 'bias': (D,)}`` (float32 arrays).

  Raises:
    ValueError: no rows were accumulated.
  """
  n = float(np.asarray(stats.n))
  if not n > 0:
    raise ValueError("Least squares over zero rows: no data was accumulated.")
  cov = np.asarray(stats.cxx, np.float64) / n
  cov = 0.5 * (cov + cov.T)
  cxt = np.asarray(stats.cxt, np.float64) / n
  c = cov.shape[0]
  if ridge > 0:
    lam = ridge * max(np.trace(cov) / c, 1e-30)
    try:
      kernel = np.linalg.solve(cov + lam * np.eye(c), cxt)
    except np.linalg.LinAlgError:
      kernel = np.linalg.lstsq(cov + lam * np.eye(c), cxt, rcond=None)[0]
  else:
    kernel = np.linalg.lstsq(cov, cxt, rcond=None)[0]
  bias = np.asarray(stats.mean_t, np.float64) - np.asarray(stats.mean_x,
                                                           np.float64) @ kernel
  return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def fit(x: jax.Array, t: jax.Array, ridge: float = 1e-6) -> dict[str, np.ndarray]:
  """One-shot least squares from x (..., C) onto t (..., D) with the same row layout."""
  x, t = rows(jnp.asarray(x)), rows(jnp.asarray(t))
  return solve(batch_stats(x, t), ridge)
