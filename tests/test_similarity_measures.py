"""Each measure against NumPy/SciPy written here from the published formulas; invariances
driven by the registry's own claims; numerics guards."""

import warnings

import numpy as np
import pytest
from scipy import linalg as sla
from scipy.spatial.distance import pdist, squareform

from fula_jax import registry
from fula_jax.similarity import cka, measures, SimilarityWarning

N, DX, DY = 120, 10, 7


# ----------------------------------------------------------------------------
# References (float64), from the papers' formulas.
# ----------------------------------------------------------------------------


def _f(x):
  return np.asarray(x, np.float64).reshape(len(x), -1)


def hsic_biased(k, l):
  """Gretton et al. 2005: tr(K H L H) / (n-1)^2."""
  n = len(k)
  h = np.eye(n) - np.ones((n, n)) / n
  return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_song(k, l):
  """Song et al. 2012, eq. 5 (unbiased HSIC)."""
  n = len(k)
  k, l = k.copy(), l.copy()
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l, 0.0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def ref_cka(k, l, debiased):
  h = hsic_song if debiased else hsic_biased
  return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def lin(x):
  x = _f(x)
  return x @ x.T  # uncentred on purpose: HSIC centres (or is translation invariant)


def rbf(x, frac=1.0):
  d = pdist(_f(x))
  sigma = frac * np.median(d)
  return np.exp(-squareform(d) ** 2 / (2 * sigma ** 2))


def ref_procrustes(x, y):
  """min_R ||X R - Y||_F^2 over orthogonal R (SciPy), on centred unit-norm data."""
  x, y = _f(x), _f(y)
  x, y = x - x.mean(0), y - y.mean(0)
  x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
  d = max(x.shape[1], y.shape[1])
  x = np.pad(x, ((0, 0), (0, d - x.shape[1])))
  y = np.pad(y, ((0, 0), (0, d - y.shape[1])))
  r, _ = sla.orthogonal_procrustes(x, y)
  return np.sum((x @ r - y) ** 2)


def ref_cca_parts(x, y):
  """Textbook CCA: rho = svd(Sxx^-1/2 Sxy Syy^-1/2); canonical variates of X."""
  x, y = _f(x), _f(y)
  x, y = x - x.mean(0), y - y.mean(0)
  ix = sla.inv(sla.sqrtm(x.T @ x).real)
  iy = sla.inv(sla.sqrtm(y.T @ y).real)
  u, rho, _ = np.linalg.svd(ix @ x.T @ y @ iy)
  k = min(x.shape[1], y.shape[1])
  h = x @ ix @ u[:, :k]
  h /= np.linalg.norm(h, axis=0)
  return rho[:k], h, x


def ref_cca(x, y):
  rho, _, _ = ref_cca_parts(x, y)
  return np.mean(rho ** 2)


def ref_svcca(x, y, keep=0.99):
  def reduce(a):
    a = _f(a)
    a = a - a.mean(0)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    frac = np.cumsum(s ** 2) / np.sum(s ** 2)
    k = int(np.searchsorted(frac, keep) + 1)
    return u[:, :k] * s[:k]
  rho, _, _ = ref_cca_parts(reduce(x), reduce(y))
  return np.mean(rho)


def ref_pwcca(x, y):
  """Morcos et al. 2018: alpha_i ~ sum_j |<h_i, x_j>|, PWCCA = sum alpha_i rho_i."""
  rho, h, xc = ref_cca_parts(x, y)
  alpha = np.sum(np.abs(h.T @ xc), axis=1)
  return np.sum(alpha / alpha.sum() * rho)


REFS = {
    "cka_linear": lambda x, y: ref_cka(lin(x), lin(y), False),
    "cka_linear_debiased": lambda x, y: ref_cka(lin(x), lin(y), True),
    "cka_rbf": lambda x, y: ref_cka(rbf(x), rbf(y), False),
    "cka_rbf_debiased": lambda x, y: ref_cka(rbf(x), rbf(y), True),
    "procrustes": ref_procrustes,
    "cca": ref_cca,
    "svcca": ref_svcca,
    "pwcca": ref_pwcca,
}


def data(seed=0, n=N, dx=DX, dy=DY, noise=0.5):
  rng = np.random.default_rng(seed)
  decay = np.linspace(1.0, 0.05, dx)  # anisotropic, so truncations and maps matter
  x = rng.normal(size=(n, dx)) * decay + rng.normal(size=dx) * 3
  y = x @ rng.normal(size=(dx, dy)) + noise * rng.normal(size=(n, dy))
  return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------


def test_registry_covers_references_and_metadata():
  assert set(measures.names()) == set(REFS)
  for m in measures.MEASURES.values():
    assert m.kind in ("similarity", "distance")
    assert m.invariances <= set(measures.INVARIANCES)
  assert measures.get("procrustes").kind == "distance"
  assert not measures.get("pwcca").symmetric
  assert measures.get("cka_linear_debiased").needs_min_n == 4


def test_unknown_measure_and_option_list_valid_names():
  with pytest.raises(registry.UnknownNameError) as e:
    measures.get("cka_linaer")
  assert "cka_linear" in str(e.value) and "procrustes" in str(e.value)
  with pytest.raises(registry.UnknownNameError) as e:
    measures.get("cka_rbf").options(bandwidth=2.0)
  assert "sigma_frac" in str(e.value)


@pytest.mark.parametrize("name", sorted(REFS))
def test_measure_matches_numpy_reference(name):
  m = measures.get(name)
  cases = [data(0), data(1, noise=3.0)]
  rng = np.random.default_rng(5)
  cases.append((rng.normal(size=(N, 6, 2)).astype(np.float32),  # independent, 3-D
                rng.normal(size=(N, DY)).astype(np.float32)))
  for x, y in cases:
    got = float(m(x, y))
    want = REFS[name](x, y)
    assert got == pytest.approx(want, rel=2e-5, abs=2e-6), (name, got, want)


@pytest.mark.parametrize("debiased", [False, True])
def test_linear_cka_gram_and_feature_forms_agree(debiased):
  x, y = data(2)
  want = ref_cka(lin(x), lin(y), debiased)
  for method in ("gram", "feature", "auto"):
    got = float(cka.cka_linear(x, y, debiased=debiased, method=method))
    assert got == pytest.approx(want, rel=1e-5), method


def test_rbf_bandwidth_fraction():
  x, y = data(3)
  for frac in (0.5, 2.0):
    got = float(measures.get("cka_rbf").fn(x, y, sigma_frac=frac))
    assert got == pytest.approx(ref_cka(rbf(x, frac), rbf(y, frac), False), rel=1e-5)
  assert abs(float(cka.cka_rbf(x, y, sigma_frac=0.5))
             - float(cka.cka_rbf(x, y, sigma_frac=2.0))) > 1e-3


def test_procrustes_wide_layers_use_row_space():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(30, 50)).astype(np.float32)
  y = (x[:, :40] + 0.3 * rng.normal(size=(30, 40))).astype(np.float32)
  assert float(measures.get("procrustes")(x, y)) == pytest.approx(
      ref_procrustes(x, y), rel=1e-5)


def _transforms(d, rng):
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a = q @ np.diag(np.linspace(0.2, 3.0, d)) @ np.linalg.qr(rng.normal(size=(d, d)))[0]
  return {
      "orthogonal": lambda v: v @ q,
      "isotropic_scaling": lambda v: 3.7 * v,
      "translation": lambda v: v + rng.normal(size=d) * 5,
      "permutation": lambda v: v[:, rng.permutation(d)],
      "invertible_linear": lambda v: v @ a,
  }


@pytest.mark.parametrize("name", sorted(REFS))
def test_invariances_claimed_hold_and_others_do_not(name):
  m = measures.get(name)
  x, y = data(6)
  base = float(m(x, y))
  rng = np.random.default_rng(7)
  tx, ty = _transforms(x.shape[1], rng), _transforms(y.shape[1], rng)
  for inv in measures.INVARIANCES:
    on_x = float(m(tx[inv](x).astype(np.float32), y))
    on_y = float(m(x, ty[inv](y).astype(np.float32)))
    if inv in m.invariances:
      assert on_x == pytest.approx(base, abs=5e-5), (name, inv, "x")
      assert on_y == pytest.approx(base, abs=5e-5), (name, inv, "y")
    else:
      assert max(abs(on_x - base), abs(on_y - base)) > 1e-3, (name, inv)


@pytest.mark.parametrize("name", sorted(REFS))
def test_self_similarity(name):
  m = measures.get(name)
  x, _ = data(8)
  target = 1.0 if m.kind == "similarity" else 0.0
  assert float(m(x, x)) == pytest.approx(target, abs=1e-5)


def test_procrustes_zero_for_rotated_scaled_shifted_copy():
  x, _ = data(9)
  q, _ = np.linalg.qr(np.random.default_rng(9).normal(size=(DX, DX)))
  y = (2.5 * x @ q + 1.0).astype(np.float32)
  assert float(measures.get("procrustes")(x, y)) == pytest.approx(0.0, abs=1e-5)
  assert float(measures.get("cca")(x, (x @ np.random.default_rng(1).normal(
      size=(DX, DX))).astype(np.float32))) == pytest.approx(1.0, abs=1e-4)


def test_debiased_cka_near_zero_for_independent_data():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(500, 100)).astype(np.float32)
  y = rng.normal(size=(500, 100)).astype(np.float32)
  debiased = float(cka.cka_linear(x, y, debiased=True))
  biased = float(cka.cka_linear(x, y, debiased=False))
  assert abs(debiased) < 0.02
  assert biased > 0.1
  assert biased == pytest.approx(ref_cka(lin(x), lin(y), False), rel=1e-5)


# ----------------------------------------------------------------------------
# Numerics: NaN + warning naming the layer, never a crash or a silent number.
# ----------------------------------------------------------------------------


def _warned(record, *words):
  msgs = [str(w.message) for w in record if issubclass(w.category, SimilarityWarning)]
  return any(all(word in msg for word in words) for msg in msgs)


@pytest.mark.parametrize("name", ["cka_linear_debiased", "cka_rbf", "procrustes", "svcca"])
def test_bad_layers_give_nan_and_named_warning(name):
  x, y = data(11, n=40)
  bad_nan = x.copy()
  bad_nan[3, 2] = np.nan
  bad_inf = x.copy()
  bad_inf[5, 0] = np.inf
  const = np.full_like(x, 2.5)
  zeros = np.zeros_like(x)
  acts_a = {"good": x, "has_nan": bad_nan, "has_inf": bad_inf, "constant": const,
            "zeros": zeros}
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    mat, info = measures.matrix(name, acts_a, {"target": y})
  assert np.isfinite(mat[0, 0])
  assert np.all(np.isnan(mat[1:, 0]))
  for layer, word in [("has_nan", "NaN"), ("has_inf", "NaN"), ("constant", "constant"),
                      ("zeros", "zero")]:
    assert _warned(rec, layer, word), (layer, [str(w.message) for w in rec])
    assert any(layer in k for k in info["nan_reasons"])


def test_too_few_examples_for_debiased_estimator():
  x, y = data(12, n=3)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    v = measures.compute("cka_linear_debiased", x, y, layer_x="conv1", layer_y="fc")
  assert np.isnan(v)
  assert _warned(rec, "conv1", "at least 4")
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    v = measures.compute("cka_linear", x, y)  # the biased one is defined at n = 3
  assert np.isfinite(v) and not _warned(rec, "NaN")


def test_cca_warns_when_layers_are_wider_than_data():
  rng = np.random.default_rng(13)
  x = rng.normal(size=(20, 30)).astype(np.float32)
  y = rng.normal(size=(20, 5)).astype(np.float32)
  with pytest.warns(SimilarityWarning, match="trivially 1"):
    measures.compute("cca", x, y, layer_x="wide")
