"""Orthogonal Procrustes distance (Ding, Denain & Steinhardt 2021; Williams et al. 2021).

With X, Y centred and scaled to unit Frobenius norm,

  d(X, Y) = min_{Q orthogonal} ||X Q - Y||_F^2 = 2 - 2 ||X^T Y||_*

(the nuclear norm is the sum of singular values). When a side has more features than
examples it is first rotated onto its row space (X -> X Q = R^T from the QR factorisation
X^T = Q R, an orthogonal map of the features that changes no singular value of X^T Y),
so the cross matrix is at most n x n. Unequal widths are allowed (Q is then a partial
isometry, as if the narrower side were zero-padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fula_jax.similarity import cka


def prepare(x: jax.Array, width: int | None = None) -> jax.Array:
  """Centred, unit-Frobenius features with min(n, d) columns, zero-padded to `width`.

  Zero columns change no singular value, and a common width lets one compiled
  `combine` serve every layer pair of a matrix.
  """
  xc = cka.center_features(x)
  xc = xc / jnp.sqrt(jnp.sum(xc * xc))
  return cka.pad_columns(cka.row_space(xc), width)


def combine(px: jax.Array, py: jax.Array) -> jax.Array:
  nuclear = jnp.sum(jnp.linalg.svd(cka.dot(px.T, py), compute_uv=False))
  return jnp.maximum(2.0 - 2.0 * nuclear, 0.0)


def procrustes_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Squared orthogonal Procrustes distance in [0, 2] (0 = same up to rotation/scale)."""
  return combine(prepare(x), prepare(y))
