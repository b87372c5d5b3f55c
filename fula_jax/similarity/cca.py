"""Canonical correlation analysis family: CCA, SVCCA (Raghu et al. 2017), PWCCA (Morcos,
Raghu & Bengio 2018).

Canonical correlations rho_1 >= rho_2 >= ... of centred X, Y are the singular values of
Q_x^T Q_y, with Q_x an orthonormal basis of X's column space (left singular vectors of X
with singular value above ``s_max * max(n, d) * eps_float32``, NumPy's rank rule). There
are min(rank X, rank Y) of them.

* cca:   mean squared canonical correlation, ||Q_x^T Q_y||_F^2 / min(r_x, r_y)
         (Kornblith et al. 2019's R^2_CCA). Invariant to any invertible linear map.
* svcca: keep the top singular directions of each side (enough for `keep` = 0.99 of the
         variance, or the top `keep` directions when an int), then the mean (not squared)
         canonical correlation.
* pwcca: sum_i alpha_i rho_i with alpha_i proportional to sum_j |<h_i, x_j>|, h_i the
         i-th canonical variate of X (a unit vector over examples) and x_j the j-th
         centred neuron of X. Asymmetric: the weights come from the first argument.

Ranks are data dependent, so bases keep a fixed shape with unused columns zeroed; this
keeps everything jittable.

The valid regime (declared in the registry, `Measure.invalid_at`): centred data span at
most n - 1 directions, so two subspaces of k_x and k_y directions share at least
k_x + k_y - (n - 1) of them whatever the data, each a canonical correlation of exactly 1.
CCA and PWCCA use every direction: a layer of d >= n - 1 features makes every
correlation 1. SVCCA keeps k directions per side: valid while 2k < n, which its
`max_dims` option (at most (n - 1) // 2 when the job sets it) guarantees.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fula_jax.similarity import cka

_EPS32 = float(jnp.finfo(jnp.float32).eps)


class Basis(NamedTuple):
  """An orthonormal basis of a centred activation's column space (masked columns)."""
  q: jax.Array      # (n, k), unused columns zero
  count: jax.Array  # () number of used columns
  proj: jax.Array   # (k, d) = q^T X_c, the neurons in basis coordinates


def basis(x: jax.Array, keep: float | int | None = None,
          width: int | None = None, max_dims: int = 0) -> Basis:
  """SVD basis of centred `x`; `keep` as in SVCCA (None = every non-null direction),
  at most `max_dims` directions when > 0.

  `width` zero-pads the basis to that many columns (so bases of different layers share
  one shape and one compiled `combine`); unused columns are zero either way.
  """
  xc = cka.center_features(x)
  n, d = xc.shape
  u, s, _ = jnp.linalg.svd(cka.row_space(xc), full_matrices=False)
  used = s > s[0] * max(n, d) * _EPS32
  if keep is not None:
    if isinstance(keep, float) and not isinstance(keep, bool):
      if not 0.0 < keep <= 1.0:
        raise ValueError(f"SVCCA keep={keep}: a variance fraction must be in (0, 1].")
      var = s * s
      before = (jnp.cumsum(var) - var) / jnp.sum(var)
      used = used & (before < keep)
    elif isinstance(keep, int) and keep > 0:
      used = used & (jnp.arange(s.shape[0]) < keep)
    else:
      raise ValueError(f"SVCCA keep={keep!r}: give a variance fraction in (0, 1] or a "
                       "positive number of directions.")
  if max_dims > 0:
    used = used & (jnp.arange(s.shape[0]) < max_dims)
  w = used.astype(jnp.float32)
  q = cka.pad_columns(u * w, width)
  proj = cka.dot(q.T, xc)
  return Basis(q=q, count=jnp.sum(w), proj=proj)


def permute(b: Basis, perm: jax.Array) -> Basis:
  """The basis of the examples reordered so that new example i is old perm[i]: its
  rows reorder, and the neurons' coordinates in it do not change."""
  return Basis(q=b.q[perm], count=b.count, proj=b.proj)


def _num_pairs(bx: Basis, by: Basis) -> jax.Array:
  return jnp.minimum(bx.count, by.count)


def canonical_correlations(bx: Basis, by: Basis) -> jax.Array:
  """All singular values of Q_x^T Q_y, descending; entries past min(r_x, r_y) are 0."""
  return jnp.clip(jnp.linalg.svd(cka.dot(bx.q.T, by.q), compute_uv=False), 0.0, 1.0)


def cca_combine(bx: Basis, by: Basis) -> jax.Array:
  return jnp.sum(jnp.square(cka.dot(bx.q.T, by.q))) / _num_pairs(bx, by)


def svcca_combine(bx: Basis, by: Basis) -> jax.Array:
  return jnp.sum(canonical_correlations(bx, by)) / _num_pairs(bx, by)


def pwcca_combine(bx: Basis, by: Basis) -> jax.Array:
  a, rho, _ = jnp.linalg.svd(cka.dot(bx.q.T, by.q), full_matrices=False)
  rho = jnp.clip(rho, 0.0, 1.0)
  used = (jnp.arange(rho.shape[0]) < _num_pairs(bx, by)).astype(jnp.float32)
  alpha = jnp.sum(jnp.abs(cka.dot(a.T, bx.proj)), axis=1) * used
  return jnp.sum(alpha * rho) / jnp.sum(alpha)


def cca(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared canonical correlation."""
  return cca_combine(basis(x), basis(y))


def svcca(x: jax.Array, y: jax.Array, keep: float | int = 0.99,
          max_dims: int = 0) -> jax.Array:
  """Mean canonical correlation after keeping each side's top singular directions."""
  return svcca_combine(basis(x, keep, max_dims=max_dims),
                       basis(y, keep, max_dims=max_dims))


def pwcca(x: jax.Array, y: jax.Array) -> jax.Array:
  """Projection-weighted mean canonical correlation, weights from `x`."""
  return pwcca_combine(basis(x), basis(y))
