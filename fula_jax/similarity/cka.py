"""Centered kernel alignment (Kornblith et al. 2019) with biased and debiased HSIC.

Activations are ``(n, ...)`` arrays; everything after the example axis is flattened into
features (conv maps and token sequences become one vector per example). All arithmetic
is float32; features are centred before any Gram matrix is formed, which keeps the
Gram entries small (ReLU activations have large means) and the cancellations mild.

HSIC estimators, for Gram matrices K, L of n examples (H = I - 11^T/n):

* biased:   HSIC_0 = tr(K H L H) / (n - 1)^2
* debiased: HSIC_1 (Song et al. 2012, used by Kornblith et al. 2019 and Nguyen, Raghu &
  Kornblith 2021), with K~, L~ the Grams with zeroed diagonals,

      HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).

  It equals <u(K), u(L)> / (n(n-3)) where u is the "unbiased centring" below, so a whole
  block of HSIC values is one matrix product of flattened u-centred Grams. HSIC_1 needs
  n >= 4 and is unbiased for the population HSIC, so debiased CKA of independent
  representations is near 0 at any dimension, where biased CKA is inflated.

CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

RBF kernel: K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)) with
``sigma = sigma_frac * median_{i<j} |x_i - x_j|`` (the median over distinct pairs of real
examples; Kornblith et al.'s reference code takes the median of squared distances over
all n^2 entries, diagonal zeros included, which gives a slightly smaller bandwidth).
`sigma_frac` defaults to 1.0.

Linear CKA has two exact forms: the Gram form (cost ~ n^2 d) and the feature-space form
(cost ~ n d^2) built on ||X^T Y||_F^2; `method='auto'` picks the cheaper one.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Method = Literal["auto", "gram", "feature"]

# float32 matmuls at full precision: accelerators otherwise default to bf16/TF32 passes,
# which would cost CKA its third significant digit.
HIGHEST = jax.lax.Precision.HIGHEST


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=HIGHEST)
Kernel = Literal["linear", "rbf"]


def flatten(x: jax.Array) -> jax.Array:
  """``(n, ...)`` -> float32 ``(n, d)``."""
  x = jnp.asarray(x)
  return x.reshape(x.shape[0], -1).astype(jnp.float32)


def pad_columns(x: jax.Array, width: int | None) -> jax.Array:
  """`x` with zero columns appended up to `width` (None or narrower: unchanged)."""
  if width is None or width <= x.shape[1]:
    return x
  return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def row_space(x: jax.Array) -> jax.Array:
  """`x` (n, d) rotated onto its row space when d > n: an (n, n) matrix X Q = R^T.

  From the QR factorisation X^T = Q R (Householder, backward stable; no squared
  condition number as with the Gram's eigendecomposition). X Q is an orthogonal map of
  the features, so it keeps every singular value and left singular vector of X and
  every quantity invariant to orthogonal maps of one side (Procrustes, CCA). Much
  cheaper than an SVD with vectors of a wide matrix.
  """
  n, d = x.shape
  if d <= n:
    return x
  return jnp.linalg.qr(x.T, mode="r").T


def _mask(n: int, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.ones((n,), jnp.float32)
  return (jnp.asarray(mask) > 0).astype(jnp.float32)


def center_features(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Flattened features minus their mean over real rows; padded rows become exact zeros."""
  x = flatten(x)
  m = _mask(x.shape[0], mask)
  real = m[:, None] > 0
  x = jnp.where(real, x, 0.0)
  mean = jnp.sum(x, axis=0) / jnp.maximum(jnp.sum(m), 1.0)
  return jnp.where(real, x - mean, 0.0)


# ----------------------------------------------------------------------------
# Gram matrices
# ----------------------------------------------------------------------------


def gram_linear(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """X_c X_c^T of centred features (so already doubly centred over the real rows)."""
  xc = center_features(x, mask)
  return dot(xc, xc.T)


def squared_distances(xc: jax.Array) -> jax.Array:
  """Pairwise squared Euclidean distances of rows, clipped at 0, zero diagonal."""
  sq = jnp.sum(xc * xc, axis=1)
  d2 = sq[:, None] + sq[None, :] - 2.0 * dot(xc, xc.T)
  d2 = jnp.maximum(d2, 0.0)
  return d2 * (1.0 - jnp.eye(xc.shape[0], dtype=d2.dtype))


def median_distance(d2: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Median Euclidean distance over distinct pairs of real rows (NaN if < 2 rows)."""
  n = d2.shape[0]
  m = _mask(n, mask)
  valid = (m[:, None] * m[None, :] * (1.0 - jnp.eye(n))) > 0
  return jnp.nanmedian(jnp.where(valid, jnp.sqrt(d2), jnp.nan))


def rbf_from_distances(d2: jax.Array, sigma: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
  m = _mask(d2.shape[0], mask)
  k = jnp.exp(-d2 / (2.0 * sigma * sigma))
  return k * (m[:, None] * m[None, :])


def gram_rbf(x: jax.Array, sigma_frac: float = 1.0,
             mask: jax.Array | None = None) -> jax.Array:
  """RBF Gram with bandwidth `sigma_frac` times the median pairwise distance."""
  xc = center_features(x, mask)
  d2 = squared_distances(xc)
  sigma = sigma_frac * median_distance(d2, mask)
  return rbf_from_distances(d2, sigma, mask)


def gram(x: jax.Array, kernel: Kernel = "linear", *, sigma_frac: float = 1.0,
         mask: jax.Array | None = None) -> jax.Array:
  if kernel == "linear":
    return gram_linear(x, mask)
  if kernel == "rbf":
    return gram_rbf(x, sigma_frac, mask)
  from fula_jax import registry
  raise registry.unknown("CKA kernel", kernel, ("linear", "rbf"))


# ----------------------------------------------------------------------------
# Centring and HSIC
# ----------------------------------------------------------------------------


def center_gram(k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """H K H over the real rows; padded rows and columns are zero."""
  m = _mask(k.shape[0], mask)
  n = jnp.maximum(jnp.sum(m), 1.0)
  k = k * (m[:, None] * m[None, :])
  row = jnp.sum(k, axis=1) / n
  grand = jnp.sum(row * m) / n
  return (k - row[:, None] - row[None, :] + grand) * (m[:, None] * m[None, :])


def unbiased_center(k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """u(K) with <u(K), u(L)> = n(n-3) HSIC_1(K, L), n = number of real rows.

  Zero the diagonal, subtract row/column means taken with the U-statistic's
  denominators, zero the diagonal again. Padded rows and columns are zero, so a padded
  batch gives exactly the statistic of its real rows.
  """
  size = k.shape[0]
  m = _mask(size, mask)
  n = jnp.sum(m)
  w = m[:, None] * m[None, :] * (1.0 - jnp.eye(size, dtype=jnp.float32))
  kt = k * w
  means = jnp.sum(kt, axis=0) / (n - 2.0)
  means = means - jnp.sum(means) / (2.0 * (n - 1.0))
  return (kt - means[:, None] - means[None, :]) * w


def hsic_norm(n: jax.Array, debiased: bool) -> jax.Array:
  """The factor turning <centred K, centred L> into HSIC."""
  n = jnp.asarray(n, jnp.float32)
  return n * (n - 3.0) if debiased else (n - 1.0) ** 2


def hsic(k: jax.Array, l: jax.Array, *, debiased: bool = False,
         mask: jax.Array | None = None) -> jax.Array:
  """HSIC_0 (biased) or HSIC_1 (debiased) of two Gram matrices."""
  m = _mask(k.shape[0], mask)
  n = jnp.sum(m)
  center = unbiased_center if debiased else center_gram
  return jnp.sum(center(k, m) * center(l, m)) / hsic_norm(n, debiased)


def cka_from_grams(k: jax.Array, l: jax.Array, *, debiased: bool = False,
                   mask: jax.Array | None = None) -> jax.Array:
  m = _mask(k.shape[0], mask)
  center = unbiased_center if debiased else center_gram
  kc, lc = center(k, m), center(l, m)
  return jnp.sum(kc * lc) / jnp.sqrt(jnp.sum(kc * kc) * jnp.sum(lc * lc))


# ----------------------------------------------------------------------------
# Linear CKA: Gram and feature-space forms
# ----------------------------------------------------------------------------


def choose_method(n: int, dx: int, dy: int) -> str:
  """'gram' when n^2 (dx + dy) flops beat n (dx dy + dx^2 + dy^2)."""
  return "gram" if n * (dx + dy) <= dx * dy + dx * dx + dy * dy else "feature"


def feature_hsic_terms(xc: jax.Array, yc: jax.Array, *, debiased: bool) -> jax.Array:
  """n(n-3) HSIC_1 (debiased) or ||X^T Y||_F^2 (biased) from centred features.

  With K = X X^T, X centred, k_i = |x_i|^2: tr(K~L~) = ||X^T Y||^2 - sum k_i l_i,
  1'K~1 = -sum k_i and 1'K~L~1 = sum k_i l_i, which gives
  ||X^T Y||^2 - n/(n-2) sum k_i l_i + sum k sum l / ((n-1)(n-2)).
  """
  cross = jnp.sum(jnp.square(dot(xc.T, yc)))
  if not debiased:
    return cross
  n = jnp.asarray(xc.shape[0], jnp.float32)
  kx = jnp.sum(xc * xc, axis=1)
  ky = jnp.sum(yc * yc, axis=1)
  return (cross - n / (n - 2.0) * jnp.dot(kx, ky)
          + jnp.sum(kx) * jnp.sum(ky) / ((n - 1.0) * (n - 2.0)))


def cka_linear(x: jax.Array, y: jax.Array, *, debiased: bool = False,
               method: Method = "auto") -> jax.Array:
  """Linear CKA of two ``(n, ...)`` activations (same examples, same order)."""
  x, y = flatten(x), flatten(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"CKA needs the same examples on both sides; got {x.shape[0]} "
                     f"and {y.shape[0]} rows.")
  if method == "auto":
    method = choose_method(x.shape[0], x.shape[1], y.shape[1])
  xc, yc = center_features(x), center_features(y)
  if method == "gram":
    return cka_from_grams(dot(xc, xc.T), dot(yc, yc.T), debiased=debiased)
  if method == "feature":
    xy = feature_hsic_terms(xc, yc, debiased=debiased)
    xx = feature_hsic_terms(xc, xc, debiased=debiased)
    yy = feature_hsic_terms(yc, yc, debiased=debiased)
    return xy / jnp.sqrt(xx * yy)
  from fula_jax import registry
  raise registry.unknown("linear CKA method", method, ("auto", "gram", "feature"))


def cka_rbf(x: jax.Array, y: jax.Array, *, debiased: bool = False,
            sigma_frac: float = 1.0) -> jax.Array:
  """RBF CKA; each side's bandwidth is `sigma_frac` x its median pairwise distance."""
  x, y = flatten(x), flatten(y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"CKA needs the same examples on both sides; got {x.shape[0]} "
                     f"and {y.shape[0]} rows.")
  return cka_from_grams(gram_rbf(x, sigma_frac), gram_rbf(y, sigma_frac),
                        debiased=debiased)
