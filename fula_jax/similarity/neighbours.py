"""Local-neighbourhood measures: do two representations put the same examples next to
each other?

Neighbours are by cosine similarity (rows L2-normalised), an example never being its own
neighbour; k is the option ``k``. With N_X(i) the k nearest neighbours of example i in X,
ordered nearest first:

* ``mutual_knn`` (Huh et al. 2024, platonic-rep): mean_i |N_X(i) & N_Y(i)| / k.
* ``cycle_knn`` (platonic-rep): the fraction of examples i found among the X-neighbours
  of at least one of their Y-neighbours (X -> Y -> X); asymmetric.
* ``cknna`` (platonic-rep): CKA restricted to mutual neighbours. With K, L the cosine
  Grams and M = M_X * M_Y the product of the row-wise kNN indicator matrices,
  HSIC_u(M o K, M o L) / sqrt(HSIC_u(M_X o K, M_X o K) HSIC_u(M_Y o L, M_Y o L)),
  HSIC_u Song et al.'s unbiased estimator written for the (non-symmetric) masked Grams.
  Its 1^T (M o K)(M o L) 1 term is not symmetric in K and L, so neither is CKNNA
  (platonic-rep's definition, kept): matrices compute both orders.
* ``jaccard_knn`` (ReSi; Klabunde et al. 2025): mean_i |N_X & N_Y| / |N_X | N_Y|.
* ``rank_similarity`` (ReSi; Wang et al. 2020): for the common neighbours j of i with
  ranks r_X, r_Y (1 = nearest), sum_j 2 / ((1 + |r_X - r_Y|)(r_X + r_Y)), divided by
  its largest possible value sum_{t<=K} 1/t (K = number of common neighbours), 0 when
  none; averaged over i.
* ``second_order_cosine`` (ReSi; Hamilton et al. 2016): for each i, the cosine between
  the vectors (cos_X(i, j))_j and (cos_Y(i, j))_j over j in N_X(i) | N_Y(i); averaged.
  (ReSi's implementation indexes its condensed distance vector by neighbour index; this
  follows the published definition.)

Cost per layer: the n x n Gram, O(n^2 d) time and O(n^2) memory, and a top-k; per
pair O(n k^2) (cknna: O(n^2), second_order_cosine: O(n k)).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

Options = Mapping[str, Any]


class Neighbours(NamedTuple):
  """One layer's k nearest neighbours and cosine Gram."""
  idx: jax.Array    # (n, k) neighbour indices, nearest first
  gram: jax.Array   # (n, n) cosine similarities


def cosine_gram(x: jax.Array) -> jax.Array:
  """(n, n) cosine similarities of the rows of `x` (zero rows have similarity 0)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
  xn = x / jnp.where(norm > 0, norm, 1.0)
  return jnp.matmul(xn, xn.T, precision=jax.lax.Precision.HIGHEST)


def prepare(x: jax.Array, opts: Options) -> Neighbours:
  """The k nearest neighbours of every example by cosine similarity, self excluded."""
  k = int(opts["k"])
  g = cosine_gram(x)
  n = g.shape[0]
  if not 1 <= k < n:
    raise ValueError(f"k = {k} neighbours needs 1 <= k < n = {n} examples.")
  masked = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, g)
  _, idx = jax.lax.top_k(masked, k)
  return Neighbours(idx, g)


def inverse(perm: jax.Array) -> jax.Array:
  """The permutation that undoes `perm` (old example -> its new position)."""
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def permute(nb: Neighbours, perm: jax.Array, opts: Options) -> Neighbours:
  """`prepare` of the examples reordered so that new example i is old perm[i], from
  the prepared state: the same neighbours, relabelled (no new top-k)."""
  return Neighbours(inverse(perm)[nb.idx[perm]], nb.gram[perm][:, perm])


def _matches(a: Neighbours, b: Neighbours) -> jax.Array:
  """(n, k, k): a.idx[i, s] == b.idx[i, t]."""
  return a.idx[:, :, None] == b.idx[:, None, :]


def mutual_knn(a: Neighbours, b: Neighbours, opts: Options) -> jax.Array:
  k = a.idx.shape[1]
  return jnp.mean(jnp.sum(_matches(a, b), axis=(1, 2)) / k)


def jaccard_knn(a: Neighbours, b: Neighbours, opts: Options) -> jax.Array:
  k = a.idx.shape[1]
  inter = jnp.sum(_matches(a, b), axis=(1, 2))
  return jnp.mean(inter / (2 * k - inter))


def cycle_knn(a: Neighbours, b: Neighbours, opts: Options) -> jax.Array:
  n = a.idx.shape[0]
  back = a.idx[b.idx]                       # (n, k, k): X-neighbours of Y-neighbours
  return jnp.mean(jnp.any(back == jnp.arange(n)[:, None, None], axis=(1, 2)))


def rank_similarity(a: Neighbours, b: Neighbours, opts: Options) -> jax.Array:
  k = a.idx.shape[1]
  match = _matches(a, b)
  r = jnp.arange(1, k + 1, dtype=jnp.float32)
  weight = 2.0 / ((1.0 + jnp.abs(r[:, None] - r[None, :])) * (r[:, None] + r[None, :]))
  score = jnp.sum(match * weight, axis=(1, 2))
  common = jnp.sum(match, axis=(1, 2))
  harmonic = jnp.concatenate([jnp.ones((1,)), jnp.cumsum(1.0 / r)])  # H_0 := 1
  return jnp.mean(jnp.where(common > 0, score / harmonic[common], 0.0))


def second_order_cosine(a: Neighbours, b: Neighbours, opts: Options) -> jax.Array:
  n, k = a.idx.shape
  cand = jnp.concatenate([a.idx, b.idx], axis=1)            # (n, 2k)
  # A Y-neighbour that is also an X-neighbour appears once in the union.
  dup = jnp.any(_matches(a, b), axis=1)                     # (n, k) over b's entries
  keep = jnp.concatenate([jnp.ones((n, k), bool), ~dup], axis=1)
  rows = jnp.arange(n)[:, None]
  sa = jnp.where(keep, a.gram[rows, cand], 0.0)
  sb = jnp.where(keep, b.gram[rows, cand], 0.0)
  num = jnp.sum(sa * sb, axis=1)
  den = jnp.sqrt(jnp.sum(sa * sa, axis=1) * jnp.sum(sb * sb, axis=1))
  return jnp.mean(num / den)


def _hsic_unbiased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Song et al. (2012) unbiased HSIC, written for general (masked) square matrices."""
  m = k.shape[0]
  off = 1.0 - jnp.eye(m, dtype=k.dtype)
  kt, lt = k * off, l * off
  dot = lambda u, v: jnp.matmul(u, v, precision=jax.lax.Precision.HIGHEST)
  value = (jnp.sum(kt * lt.T) + jnp.sum(kt) * jnp.sum(lt) / ((m - 1) * (m - 2))
           - 2.0 * jnp.sum(dot(kt, lt)) / (m - 2))
  return value / (m * (m - 3))


def _mask(nb: Neighbours) -> jax.Array:
  n = nb.idx.shape[0]
  return jnp.zeros((n, n), nb.gram.dtype).at[jnp.arange(n)[:, None], nb.idx].set(1.0)


def cknna_prepare(x: jax.Array, opts: Options):
  nb = prepare(x, opts)
  mask = _mask(nb)
  masked = mask * nb.gram
  return nb, mask, _hsic_unbiased(masked, masked)


def cknna_permute(state, perm: jax.Array, opts: Options):
  nb, mask, self_hsic = state
  return permute(nb, perm, opts), mask[perm][:, perm], self_hsic


def cknna(a, b, opts: Options) -> jax.Array:
  (na, ma, aa), (nb, mb, bb) = a, b
  mask = ma * mb
  return _hsic_unbiased(mask * na.gram, mask * nb.gram) / jnp.sqrt(aa * bb)
