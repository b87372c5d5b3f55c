"""Linear predictivity: how well a ridge regression from X predicts Y on held-out
examples (as in neural predictivity, Yamins et al. 2014; Schrimpf et al. 2018).

The n examples are split into ``folds`` contiguous folds. For each, a ridge regression
is fitted on the others (both sides centred by the training means, penalty
``ridge x`` the mean squared norm of a centred training example of X, so the value does
not change when X is scaled) and predicts the held-out fold. The score pools the folds:

  R^2 = 1 - sum ||Y_te - Y_hat||_F^2 / sum ||Y_te - mean(Y_tr)||_F^2

Asymmetric (X predicts Y). Invariant to rotations, scaling, translation and permutation
of either side's features: ridge regression is rotation-equivariant and the pooled
residual is rotation-invariant. So each side is first rotated onto its row space
(n x min(n, d) coordinates, exact), which bounds the cost per pair at
O(folds (n r^2 + r^3 + n r r_y)) with r = min(n, d_x), r_y = min(n, d_y).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fula_jax.similarity import cka

Options = Mapping[str, Any]
_HI = jax.lax.Precision.HIGHEST


def prepare(x: jax.Array, opts: Options) -> jax.Array:
  """Row-space coordinates of the (uncentred) features, zero-padded to `width`."""
  return cka.pad_columns(cka.row_space(x), opts.get("width"))


def combine(x: jax.Array, y: jax.Array, opts: Options) -> jax.Array:
  n, r = x.shape
  folds = int(opts["folds"])
  if not 2 <= folds <= n:
    raise ValueError(f"linear_predictivity: folds = {folds} must be in [2, n = {n}].")
  fold_of = (jnp.arange(n) * folds) // n
  dot = lambda a, b: jnp.matmul(a, b, precision=_HI)

  def one(f):
    train = (fold_of != f).astype(x.dtype)[:, None]
    count = jnp.sum(train)
    mx = jnp.sum(x * train, axis=0) / count
    my = jnp.sum(y * train, axis=0) / count
    xc, yc = (x - mx) * train, (y - my) * train
    lam = opts["ridge"] * jnp.sum(xc * xc) / count
    w = jnp.linalg.solve(dot(xc.T, xc) + lam * jnp.eye(r, dtype=x.dtype), dot(xc.T, yc))
    test = 1.0 - train
    resid = (y - my - dot(x - mx, w)) * test
    total = (y - my) * test
    return jnp.sum(resid * resid), jnp.sum(total * total)

  sse, sst = jax.lax.map(one, jnp.arange(folds))
  return 1.0 - jnp.sum(sse) / jnp.sum(sst)
