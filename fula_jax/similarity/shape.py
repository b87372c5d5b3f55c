"""Generalised shape metrics (Williams, Kunz, Kornblith & Linderman 2021; netrep's
``LinearMetric`` with the angular score).

Each side is centred and partially whitened with alpha in [0, 1]: with X^T X = V diag(l)
V^T, X -> X V diag(alpha + (1 - alpha) l^(-1/2)) V^T. alpha = 1 leaves X as it is
(the metric is then the angular Procrustes distance), alpha = 0 whitens fully (the
metric is then the arccos of the mean canonical correlation). The distance is the angle
between the two after the best rotation,

  d(X, Y) = arccos( ||X~^T Y~||_* / (||X~||_F ||Y~||_F) ),

a true metric on shapes (symmetric; triangle inequality; zero iff the same up to rotation
and translation, and also scaling at alpha = 1, or any invertible linear map at alpha = 0:
for 0 < alpha < 1 the partial whitening does not commute with a scaling, so d(X, 3X) > 0). Directions below float32's rank tolerance
are dropped, as netrep's eigenvalue floor does in float64.

Cost: an SVD per layer, O(n d min(n, d)); per pair the nuclear norm of an
r x r matrix, O(r^3), r = min(n, d).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fula_jax.similarity import cka

Options = Mapping[str, Any]
_EPS32 = float(jnp.finfo(jnp.float32).eps)


def whiten_scale(s: jax.Array, alpha: float, shape: tuple[int, int]) -> jax.Array:
  """Singular values of the partially whitened X from those of X (0 where dropped)."""
  used = s > s[0] * max(shape) * _EPS32
  safe = jnp.where(used, s, 1.0)
  return jnp.where(used, safe * (alpha + (1.0 - alpha) / safe), 0.0)


def prepare(x: jax.Array, opts: Options) -> jax.Array:
  """U diag(whitened singular values), zero-padded to `width` columns."""
  alpha = float(opts["alpha"])
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"shape_metric: alpha = {alpha} must be in [0, 1].")
  xc = cka.center_features(x)
  u, s, _ = jnp.linalg.svd(cka.row_space(xc), full_matrices=False)
  return cka.pad_columns(u * whiten_scale(s, alpha, xc.shape)[None, :], opts.get("width"))


def combine(px: jax.Array, py: jax.Array, opts: Options) -> jax.Array:
  nuclear = jnp.sum(jnp.linalg.svd(cka.dot(px.T, py), compute_uv=False))
  cos = nuclear / jnp.sqrt(jnp.sum(px * px) * jnp.sum(py * py))
  return jnp.arccos(jnp.clip(cos, -1.0, 1.0))
