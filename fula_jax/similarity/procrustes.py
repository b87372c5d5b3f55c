"""Orthogonal Procrustes distance (Ding, Denain & Steinhardt 2021; Williams et al. 2021).

With X, Y centred and scaled to unit Frobenius norm,

  d(X, Y) = min_{Q orthogonal} ||X Q - Y||_F^2 = 2 - 2 ||X^T Y||_*

(the nuclear norm is the sum of singular values). When a side has more features than
examples it is first rotated onto its row space (X -> U S from X = U S V^T, an orthogonal
map of the features that changes no singular value of X^T Y), so the cross matrix is at
most n x n. Unequal widths are allowed (Q is then a partial isometry, as if the narrower
side were zero-padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fula_jax.similarity import cka


def prepare(x: jax.Array) -> jax.Array:
  """Centred, unit-Frobenius features with at most n columns."""
  xc = cka.center_features(x)
  xc = xc / jnp.sqrt(jnp.sum(xc * xc))
  n, d = xc.shape
  if d > n:
    u, s, _ = jnp.linalg.svd(xc, full_matrices=False)
    xc = u * s
  return xc


def combine(px: jax.Array, py: jax.Array) -> jax.Array:
  nuclear = jnp.sum(jnp.linalg.svd(cka.dot(px.T, py), compute_uv=False))
  return jnp.maximum(2.0 - 2.0 * nuclear, 0.0)


def procrustes_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Squared orthogonal Procrustes distance in [0, 2] (0 = same up to rotation/scale)."""
  return combine(prepare(x), prepare(y))
