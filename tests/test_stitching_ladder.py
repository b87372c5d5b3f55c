"""The capacity ladder's maps and closed forms against SciPy and known answers."""

import jax
import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from fula_jax import registry
from fula_jax.stitching import ladder


def _xy(seed=0, n=400, c_in=6, c_out=6, noise=0.1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, c_in)) * np.linspace(2.0, 0.5, c_in) + rng.normal(size=c_in)
  w = rng.normal(size=(c_in, c_out))
  return x, x @ w + 0.3 + noise * rng.normal(size=(n, c_out)), w


def test_permutation_finds_a_planted_channel_permutation_exactly():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 12))
  perm = rng.permutation(12)
  y = 2.0 * x[:, perm] + 0.2 * rng.normal(size=(300, 12)) - 1.0
  k = np.asarray(ladder.fit_permutation(x, y)["kernel"])
  assert np.array_equal(np.argmax(k, axis=0), perm)   # column j reads channel perm[j]
  assert k.sum() == 12 and set(np.unique(k)) == {0.0, 1.0}
  np.testing.assert_allclose(np.asarray(ladder.apply("permutation", {"kernel": k}, x)),
                             x[:, perm], rtol=1e-6)
  assert ladder.num_params("permutation", {"kernel": k}) == 0


def test_orthogonal_equals_scipy_orthogonal_procrustes():
  x, y, _ = _xy(2)
  p = ladder.fit_orthogonal(x, y)
  xc, yc = x - x.mean(0), y - y.mean(0)
  want, _ = orthogonal_procrustes(xc, yc)
  np.testing.assert_allclose(np.asarray(p["kernel"]), want, atol=1e-5)
  np.testing.assert_allclose(np.asarray(p["bias"]), y.mean(0) - x.mean(0) @ want,
                             atol=1e-5)
  q = np.asarray(p["kernel"], np.float64)
  np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-5)


def test_lowrank_closed_form_is_reduced_rank_regression():
  """Full rank equals least squares; rank r reaches the best rank-r fit's error, which
  is that of least squares plus the discarded singular values of the fitted values."""
  x, y, _ = _xy(3, c_out=5)
  xc, yc = x - x.mean(0), y - y.mean(0)
  w = np.linalg.lstsq(xc, yc, rcond=None)[0]
  full = ladder.fit_lowrank(x, y, 5)
  np.testing.assert_allclose(np.asarray(full["u"] @ full["v"], np.float64), w, atol=1e-4)
  s = np.linalg.svd(xc @ w, compute_uv=False)
  lstsq_err = np.sum((xc @ w - yc) ** 2)
  for r in (1, 3):
    p = ladder.fit_lowrank(x, y, r)
    pred = np.asarray(ladder.apply("lowrank", p, x.astype(np.float32)), np.float64)
    assert np.sum((pred - y) ** 2) == pytest.approx(lstsq_err + np.sum(s[r:] ** 2),
                                                    rel=1e-4)
  rank1 = np.sum((np.asarray(ladder.apply("lowrank", ladder.fit_lowrank(x, y, 1),
                                          x.astype(np.float32))) - y) ** 2)
  assert rank1 > 2 * lstsq_err   # a rank-1 map scores below a full-rank one


@pytest.mark.parametrize("name", sorted(ladder.MAPS))
def test_every_map_initialises_applies_and_counts_its_parameters(name):
  c_in = c_out = 6
  p = ladder.init(name, jax.random.PRNGKey(0), c_in, c_out, {"rank": 2, "hidden": 5})
  x = np.random.default_rng(4).normal(size=(7, 3, c_in)).astype(np.float32)
  out = ladder.apply(name, p, x)
  assert out.shape == (7, 3, c_out) and np.all(np.isfinite(np.asarray(out)))
  want = {"identity": 0, "permutation": 0, "diagonal": 12, "orthogonal": 42, "lowrank": 30,
          "affine": 42, "norm_affine": 54, "mlp": 71}[name]
  assert ladder.num_params(name, p) == want


def test_maps_that_can_express_the_identity_do():
  x = np.random.default_rng(5).normal(size=(20, 4)).astype(np.float32)
  eye = np.eye(4, dtype=np.float32)
  cases = {"identity": {"kernel": eye}, "permutation": {"kernel": eye},
           "diagonal": {"scale": np.ones(4), "bias": np.zeros(4)},
           "orthogonal": {"kernel": eye, "bias": np.zeros(4)},
           "affine": {"kernel": eye, "bias": np.zeros(4)},
           "lowrank": {"u": eye, "v": eye, "bias": np.zeros(4)}}
  for name, p in cases.items():
    np.testing.assert_allclose(np.asarray(ladder.apply(name, p, x)), x, atol=1e-6)


def test_diagonal_closed_form_is_each_channels_own_least_squares_line():
  """The worked example of a new map: per channel, the slope and intercept NumPy's
  polyfit finds, whatever the other channels say about the target."""
  from fula_jax.stitching import lstsq
  rng = np.random.default_rng(6)
  x = rng.normal(size=(500, 5)) * np.linspace(0.5, 2.0, 5) + 1.0
  t = x * np.array([2.0, -1.0, 0.5, 0.0, 3.0]) + 0.4 * x[:, ::-1] + 0.7 + (
      0.1 * rng.normal(size=(500, 5)))
  stats = lstsq.batch_stats(x.astype(np.float32), t.astype(np.float32))
  p = ladder.fit_from_stats("diagonal", stats, ridge=0.0)
  want = np.array([np.polyfit(x[:, c], t[:, c], 1) for c in range(5)])  # (slope, icpt)
  np.testing.assert_allclose(p["scale"], want[:, 0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(p["bias"], want[:, 1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ladder.apply("diagonal", p, x.astype(np.float32))),
                             x * want[:, 0] + want[:, 1], atol=1e-3)
  with pytest.raises(ValueError, match="equal widths"):
    ladder.check("diagonal", 4, 6)


def test_bad_names_widths_and_options_say_what_is_allowed():
  with pytest.raises(registry.UnknownNameError, match="lowrank"):
    ladder.check("low_rank", 4, 4)
  with pytest.raises(ValueError, match="equal widths.*orthogonal"):
    ladder.check("identity", 4, 6)
  with pytest.raises(ValueError, match=r"rank = 0 must be at least 1"):
    ladder.check("lowrank", 4, 6, {"rank": 0})
  with pytest.raises(registry.UnknownNameError, match="hidden"):
    ladder.check("mlp", 4, 6, {"width": 3})
