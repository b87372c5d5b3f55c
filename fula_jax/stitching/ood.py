"""How far a stitched activation lies from the end model's own activations; the sweep
reports both scores per cell with ``stitch.ood_examples`` > 0 (measures `energy_ood` and
`mahalanobis_ratio`, the reference taken from the fitting split).

stitching-ood's argument: a stitch can reach high task accuracy while feeding g
activations it never produces itself. Two scores, each near its in-distribution value
for a faithful stitch:

* **Energy** of the logits, E(x) = -T logsumexp(logits / T) (Liu et al. 2020; lower =
  more in-distribution). `energy_ood_rate` is the fraction of stitched examples whose
  energy is above the `quantile` (0.95) of g's own energies on the same examples: about
  1 - quantile in distribution.
* **Mahalanobis distance at j** under one Gaussian fitted to g's own activations at j
  (channel vectors: spatial positions and tokens pooled, so the covariance is C x C),
  with a ridge of `ridge` x the mean variance. `mahalanobis_ratio` is the mean squared
  distance of the stitched activations over that of g's own held-out ones: about 1 in
  distribution.

The Gaussian's statistics are sums (count, sum, sum of outer products), so they
accumulate batch by batch like the engine's other evaluation terms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def energy(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """(B,) free energy of each example's logits."""
  return -temperature * jax.nn.logsumexp(logits.astype(jnp.float32) / temperature, -1)


def energy_ood_rate(stitched: jax.Array, own: jax.Array, quantile: float = 0.95,
                    temperature: float = 1.0) -> jax.Array:
  """Fraction of stitched examples above the `quantile` of g's own energies."""
  threshold = jnp.quantile(energy(own, temperature), quantile)
  return jnp.mean(energy(stitched, temperature) > threshold)


def channels(acts: jax.Array) -> jax.Array:
  """(B, C) channel vectors: (B, C) as is, tokens and maps averaged over positions."""
  acts = acts.astype(jnp.float32)
  return acts if acts.ndim == 2 else jnp.mean(acts.reshape(acts.shape[0], -1,
                                                           acts.shape[-1]), axis=1)


class Gaussian(NamedTuple):
  count: jax.Array   # ()
  total: jax.Array   # (C,)
  outer: jax.Array   # (C, C)


def gaussian_zeros(c: int) -> Gaussian:
  return Gaussian(jnp.zeros(()), jnp.zeros((c,)), jnp.zeros((c, c)))


def gaussian_update(g: Gaussian, acts: jax.Array, mask: jax.Array | None = None
                    ) -> Gaussian:
  """`g` plus one batch of g's own activations (`mask` 0 on padding rows)."""
  v = channels(acts)
  w = jnp.ones((v.shape[0],)) if mask is None else mask.astype(jnp.float32)
  vw = v * w[:, None]
  return Gaussian(g.count + jnp.sum(w), g.total + jnp.sum(vw, 0),
                  g.outer + jnp.matmul(vw.T, v, precision=_HI))


def precision_matrix(g: Gaussian, ridge: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """(mean, inverse covariance) with `ridge` x the mean variance added to the diagonal."""
  mean = g.total / g.count
  cov = g.outer / g.count - jnp.outer(mean, mean)
  c = cov.shape[0]
  reg = ridge * jnp.trace(cov) / c
  return mean, jnp.linalg.inv(cov + reg * jnp.eye(c))


def mahalanobis(mean: jax.Array, prec: jax.Array, acts: jax.Array) -> jax.Array:
  """(B,) squared Mahalanobis distance of each example's channel vector."""
  d = channels(acts) - mean
  return jnp.sum(jnp.matmul(d, prec, precision=_HI) * d, -1)


def mahalanobis_ratio(g: Gaussian, stitched: jax.Array, own_heldout: jax.Array,
                      ridge: float = 1e-3) -> jax.Array:
  """Mean squared distance of stitched activations over that of g's own held-out ones."""
  mean, prec = precision_matrix(g, ridge)
  return jnp.mean(mahalanobis(mean, prec, stitched)) / jnp.mean(
      mahalanobis(mean, prec, own_heldout))
