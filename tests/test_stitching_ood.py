"""Out-of-distribution scores of stitched activations: near their in-distribution value
for g's own activations, large for a random front; the streamed Gaussian equals NumPy's."""

import numpy as np
import pytest

from fula_jax.stitching import ood


def test_streamed_gaussian_and_distance_equal_numpy():
  rng = np.random.default_rng(0)
  acts = rng.normal(size=(90, 4, 4, 5)).astype(np.float32) + np.arange(5)
  g = ood.gaussian_zeros(5)
  mask = np.ones(30, np.float32)
  mask[-3:] = 0.0
  for k in range(3):
    g = ood.gaussian_update(g, acts[30 * k:30 * (k + 1)], mask)
  kept = np.concatenate([acts[30 * k:30 * k + 27] for k in range(3)]).mean((1, 2))
  mean, prec = ood.precision_matrix(g, ridge=0.0)
  np.testing.assert_allclose(np.asarray(mean), kept.mean(0), rtol=1e-5)
  cov = np.cov(kept.T.astype(np.float64), bias=True)
  np.testing.assert_allclose(np.asarray(prec), np.linalg.inv(cov), rtol=2e-3, atol=1e-3)
  d = kept[:4] - kept.mean(0)
  want = np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d)
  np.testing.assert_allclose(np.asarray(ood.mahalanobis(mean, prec, acts[:4])), want,
                             rtol=2e-3)


def test_own_activations_score_in_distribution_and_a_random_front_does_not():
  rng = np.random.default_rng(1)
  basis = rng.normal(size=(8, 8))
  own = (rng.normal(size=(2000, 8)) * np.linspace(3, 0.1, 8)) @ basis
  fit, heldout = own[:1000], own[1000:]
  g = ood.gaussian_update(ood.gaussian_zeros(8), fit.astype(np.float32))
  same = ood.mahalanobis_ratio(g, heldout.astype(np.float32), heldout.astype(np.float32))
  assert float(same) == pytest.approx(1.0)
  faithful = own[1000:1500] + 0.05 * rng.normal(size=(500, 8))   # a near-exact stitch
  assert float(ood.mahalanobis_ratio(g, faithful.astype(np.float32),
                                     heldout.astype(np.float32))) < 1.2
  random_front = rng.normal(size=(1000, 8)) @ rng.normal(size=(8, 8))
  assert float(ood.mahalanobis_ratio(g, random_front.astype(np.float32),
                                     heldout.astype(np.float32))) > 5.0


def test_energy_rate_is_near_its_level_in_distribution_and_high_out_of_it():
  rng = np.random.default_rng(2)
  own = rng.normal(size=(4000, 10)) * 3 + 6 * np.eye(10)[rng.integers(0, 10, 4000)]
  rate = ood.energy_ood_rate(own[2000:], own[:2000])
  assert float(rate) == pytest.approx(0.05, abs=0.02)
  flat = rng.normal(size=(2000, 10)) * 0.1            # unconfident stitched logits
  assert float(ood.energy_ood_rate(flat, own[:2000])) > 0.9
  np.testing.assert_allclose(np.asarray(ood.energy(own[:3], 2.0)),
                             -2.0 * np.log(np.exp(own[:3] / 2.0).sum(1)), rtol=1e-5)
