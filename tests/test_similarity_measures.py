"""Each measure against NumPy/SciPy written here from the published formulas; invariances
driven by the registry's own claims; numerics guards.

Tolerances. The references are float64; the measures run in float32 (unit roundoff
u = 6e-8). Continuous measures: rel 1e-5 (about 170 u) covers the rounding of their
Grams and reductions over n <= 120 examples of d <= 40 features, whose error grows like
sqrt(n d) u for the sums XLA evaluates pairwise; the first generation's measures (CKA,
Procrustes, CCA family) keep 2e-5 for the square roots and inverses of their spectra.
Rank- and neighbour-based measures (kNN family, Spearman and Kendall RSA) jump when two
values within float32 rounding of a tie swap, so they are only compared on data whose
deciding ties are separated by more than twice the float32 bound, checked in float64 by
`float32_ties.assert_separated`; there they equal the float64 value to rounding.
"""

import dataclasses
import warnings

import numpy as np
import pytest
from scipy import linalg as sla
from scipy import stats
from scipy.spatial.distance import pdist, squareform

import float32_ties as ties
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


def cosine_sim(x):
  x = _f(x)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  return x @ x.T


def knn(x, k=10):
  """platonic-rep / ReSi: the k most cosine-similar other examples, nearest first."""
  s = cosine_sim(x)
  np.fill_diagonal(s, -np.inf)
  return np.argsort(-s, axis=1, kind="stable")[:, :k]


def ref_mutual_knn(x, y, k=10):
  a, b = knn(x, k), knn(y, k)
  return np.mean([len(set(p) & set(q)) / k for p, q in zip(a, b)])


def ref_jaccard_knn(x, y, k=10):
  a, b = knn(x, k), knn(y, k)
  return np.mean([len(set(p) & set(q)) / len(set(p) | set(q)) for p, q in zip(a, b)])


def ref_cycle_knn(x, y, k=10):
  a, b = knn(x, k), knn(y, k)
  return np.mean([any(i in a[j] for j in b[i]) for i in range(len(a))])


def ref_rank_similarity(x, y, k=10):
  """Wang et al. 2020 as in ReSi: 2 / ((1 + |r1 - r2|)(r1 + r2)) over common
  neighbours, normalised by the harmonic number of their count."""
  a, b = knn(x, k), knn(y, k)
  out = []
  for p, q in zip(a, b):
    common = set(p) & set(q)
    if not common:
      out.append(0.0)
      continue
    score = 0.0
    for j in common:
      r1, r2 = list(p).index(j) + 1, list(q).index(j) + 1
      score += 2.0 / ((1 + abs(r1 - r2)) * (r1 + r2))
    out.append(score / sum(1.0 / t for t in range(1, len(common) + 1)))
  return np.mean(out)


def ref_second_order_cosine(x, y, k=10):
  """Hamilton et al. 2016: cosine of the similarity vectors over N_X(i) | N_Y(i)."""
  a, b = knn(x, k), knn(y, k)
  sx, sy = cosine_sim(x), cosine_sim(y)
  out = []
  for i, (p, q) in enumerate(zip(a, b)):
    u = sorted(set(p) | set(q))
    va, vb = sx[i, u], sy[i, u]
    out.append(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
  return np.mean(out)


def ref_cknna(x, y, k=10):
  """platonic-rep's CKNNA: unbiased HSIC of the Grams masked to mutual neighbours."""
  kx, ky = cosine_sim(x), cosine_sim(y)
  def mask(nn):
    m = np.zeros((len(nn), len(nn)))
    m[np.arange(len(nn))[:, None], nn] = 1.0
    return m
  mx, my = mask(knn(x, k)), mask(knn(y, k))
  both = mx * my
  return hsic_song(both * kx, both * ky) / np.sqrt(
      hsic_song(mx * kx, mx * kx) * hsic_song(my * ky, my * ky))


def ref_rsa(x, y, rdm="correlation", compare="spearman"):
  a, b = pdist(_f(x), rdm), pdist(_f(y), rdm)
  fn = {"spearman": stats.spearmanr, "pearson": stats.pearsonr,
        "kendall": stats.kendalltau}[compare]
  return fn(a, b)[0]


def ref_linear_predictivity(x, y, folds=5, ridge=1.0):
  """Ridge from X to Y on contiguous folds, pooled held-out R^2."""
  x, y = _f(x), _f(y)
  n = len(x)
  fold = np.arange(n) * folds // n
  sse = sst = 0.0
  for f in range(folds):
    tr, te = fold != f, fold == f
    mx, my = x[tr].mean(0), y[tr].mean(0)
    xc, yc = x[tr] - mx, y[tr] - my
    lam = ridge * np.sum(xc ** 2) / tr.sum()
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
    sse += np.sum((y[te] - my - (x[te] - mx) @ w) ** 2)
    sst += np.sum((y[te] - my) ** 2)
  return 1.0 - sse / sst


def ref_shape_metric(x, y, alpha=1.0):
  """netrep's LinearMetric (angular score): centre, partially whiten with the
  eigendecomposition of X^T X, align by orthogonal Procrustes, take the angle."""
  def whiten(a):
    a = _f(a)
    a = a - a.mean(0)
    lam, v = np.linalg.eigh(a.T @ a)
    keep = lam > lam.max() * 1e-10
    d = np.where(keep, alpha + (1 - alpha) / np.sqrt(np.where(keep, lam, 1.0)), 0.0)
    return a @ (v * d) @ v.T
  a, b = whiten(x), whiten(y)
  width = max(a.shape[1], b.shape[1])
  a = np.pad(a, ((0, 0), (0, width - a.shape[1])))
  b = np.pad(b, ((0, 0), (0, width - b.shape[1])))
  r, _ = sla.orthogonal_procrustes(a, b)
  cos = np.sum((a @ r) * b) / np.linalg.norm(a) / np.linalg.norm(b)
  return np.arccos(np.clip(cos, -1, 1))


# The first generation's measures keep the tolerance they were written with.
FIRST = ("cka_linear", "cka_linear_debiased", "cka_rbf", "cka_rbf_debiased", "procrustes",
         "cca", "svcca", "pwcca")

REFS = {
    "cka_angular": lambda x, y: np.arccos(ref_cka(lin(x), lin(y), False)),
    "mutual_knn": ref_mutual_knn,
    "cknna": ref_cknna,
    "cycle_knn": ref_cycle_knn,
    "jaccard_knn": ref_jaccard_knn,
    "rank_similarity": ref_rank_similarity,
    "second_order_cosine": ref_second_order_cosine,
    "rsa": ref_rsa,
    "linear_predictivity": ref_linear_predictivity,
    "shape_metric": ref_shape_metric,
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


RANKED = (*ties.KNN, "rsa")


def separated_data(name, opts=None, seed=0, n=N, **kw):
  """`data(...)` for a rank- or neighbour-based measure: centred (a large common offset
  crowds every cosine similarity near 1), at the first seed from `seed` on (in steps of
  1000) whose deciding ties float32 cannot swap, asserted. Spearman and Kendall RSA rank
  all n (n - 1) / 2 RDM entries, so they need a small n for that."""
  for s in range(seed, seed + 20_000, 1000):
    x, y = data(s, n=n, **kw)
    x, y = x - x.mean(0), y - y.mean(0)
    if ties.separated(x, name, opts) and ties.separated(y, name, opts):
      ties.assert_separated(name, opts, x, y)
      return x, y
  raise AssertionError(f"no seed gives {name} {opts} data with separated ties at n={n}")


def cases_for(name, opts=None, base=((0, {}), (1, {"noise": 3.0}))):
  """The reference cases of measure `name`: `data(seed, **kw)` for a continuous measure,
  `separated_data` for a rank- or neighbour-based one (RSA at n = 20)."""
  if name not in RANKED:
    return [data(seed, **kw) for seed, kw in base]
  small = {"n": 20} if name == "rsa" else {}
  return [separated_data(name, opts, seed, **{**kw, **small}) for seed, kw in base]


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
  cases = cases_for(name)
  rng = np.random.default_rng(5)
  n3 = 20 if name == "rsa" else N
  cases.append((rng.normal(size=(n3, 6, 2)).astype(np.float32),  # independent, 3-D
                rng.normal(size=(n3, DY)).astype(np.float32)))
  for x, y in cases:
    ties.assert_separated(name, None, x, y)
    got = float(m(x, y))
    want = REFS[name](x, y)
    assert got == pytest.approx(want, rel=2e-5 if name in FIRST else 1e-5, abs=2e-6), (
        name, got, want)


OPTION_CASES = [
    ("rsa", dict(rdm="euclidean", compare="spearman")),
    ("rsa", dict(rdm="correlation", compare="pearson")),
    ("rsa", dict(rdm="euclidean", compare="kendall")),
    ("shape_metric", dict(alpha=0.0)),
    ("shape_metric", dict(alpha=0.5)),
    ("linear_predictivity", dict(folds=3, ridge=0.01)),
    ("mutual_knn", dict(k=3)),
    ("cknna", dict(k=25)),
    ("cycle_knn", dict(k=2)),
    ("rank_similarity", dict(k=4)),
]


@pytest.mark.parametrize("name,opts", OPTION_CASES)
def test_options_match_numpy_reference(name, opts):
  m = measures.get(name)
  for x, y in cases_for(name, opts, ((20, {"n": 90, "noise": 2.0}),
                                     (21, {"n": 90, "dx": 40, "dy": 5}))):
    got = float(m(x, y, **opts))
    want = REFS[name](x, y, **opts)
    assert got == pytest.approx(want, rel=1e-5, abs=2e-6), (name, opts, got, want)


def test_kendall_tau_b_with_ties_matches_scipy():
  from fula_jax.similarity import rsa
  rng = np.random.default_rng(22)
  for m in (7, 64, 1000):
    a = rng.integers(0, 5, m).astype(np.float32)   # many ties on both sides
    b = (a + rng.integers(0, 3, m)).astype(np.float32)
    assert float(rsa.kendall_tau_b(a, b)) == pytest.approx(
        stats.kendalltau(a, b)[0], rel=1e-5, abs=1e-6)


def test_asymmetric_measures_are_asymmetric():
  x, y = data(23, noise=2.0)
  for name in ("cycle_knn", "linear_predictivity", "pwcca"):
    m = measures.get(name)
    opts = {"k": 3} if name == "cycle_knn" else {}
    assert not m.symmetric
    assert abs(float(m(x, y, **opts)) - float(m(y, x, **opts))) > 1e-3, name


def test_rank_based_measures_score_a_monotone_relationship_high():
  """y = sinh(x) feature by feature: a strong monotone, non-linear relationship. The
  rank-based measures see it; independent data score at chance."""
  rng = np.random.default_rng(24)
  x = rng.normal(size=(150, 3)).astype(np.float32)
  y = np.sinh(x).astype(np.float32)
  z = rng.normal(size=(150, 3)).astype(np.float32)
  rsa = measures.get("rsa")
  for compare, high in (("spearman", 0.95), ("kendall", 0.85)):
    assert float(rsa(x, y, compare=compare)) > high, compare
    assert abs(float(rsa(x, z, compare=compare))) < 0.1, compare
  chance = 10 / 149
  for name, high in (("mutual_knn", 0.75), ("jaccard_knn", 0.6), ("rank_similarity", 0.5)):
    assert float(measures.get(name)(x, y)) > high, name
    assert float(measures.get(name)(x, z)) < 2.5 * chance, name


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
    got = float(measures.get("cka_rbf")(x, y, sigma_frac=frac))
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


# Every option value a measure documents, so that each claim is checked where it is made.
DOCUMENTED_OPTIONS = {
    "shape_metric": [dict(alpha=a) for a in (0.0, 0.5, 1.0)],
    "rsa": [dict(rdm=r, compare=c) for r in ("correlation", "euclidean")
            for c in ("spearman", "pearson", "kendall")],
    "cka_linear": [dict(method="gram"), dict(method="feature")],
    "cka_rbf": [dict(sigma_frac=0.5), dict(sigma_frac=2.0)],
    "svcca": [dict(keep=0.99), dict(keep=4)],
    **{name: [dict(k=3), dict(k=10)] for name in ties.KNN},
}
CLAIM_CASES = [(name, opts) for name in sorted(REFS)
               for opts in DOCUMENTED_OPTIONS.get(name, [{}])]


def claim_violations(m, opts, pairs, tol=5e-5, change=1e-3):
  """Every claim of measure `m` at options `opts` that `pairs` contradict: a declared
  invariance whose transform moves the value by more than `tol`, an undeclared one
  that moves it by at most `change` on every pair, a symmetric measure whose orders
  differ by more than `tol`, an asymmetric one whose orders never differ by more than
  `tol` (CKNNA's orders differ by ~1e-4 at n = 120: small, but far beyond rounding)."""
  out = []
  claimed = m.invariant_to(**opts)
  moved = {inv: 0.0 for inv in measures.INVARIANCES}
  asymmetry = 0.0
  for x, y in pairs:
    base = float(m(x, y, **opts))
    asymmetry = max(asymmetry, abs(float(m(y, x, **opts)) - base))
    rng = np.random.default_rng(7)
    tx, ty = _transforms(x.shape[1], rng), _transforms(y.shape[1], rng)
    for inv in measures.INVARIANCES:
      on_x = float(m(tx[inv](x).astype(np.float32), y, **opts))
      on_y = float(m(x, ty[inv](y).astype(np.float32), **opts))
      moved[inv] = max(moved[inv], abs(on_x - base), abs(on_y - base))
  for inv, by in moved.items():
    if inv in claimed and not by <= tol:
      out.append(f"claims {inv} invariance, but it moves the value by {by:.2e}")
    if inv not in claimed and not by > change:
      out.append(f"does not claim {inv} invariance, but it moves the value by {by:.2e}")
  if m.symmetric and not asymmetry <= tol:
    out.append(f"claims symmetry, but the two orders differ by {asymmetry:.2e}")
  if not m.symmetric and not asymmetry > tol:
    out.append(f"claims asymmetry, but the two orders differ by only {asymmetry:.2e}")
  return out


def claim_pairs(name, opts):
  """Two datasets, one with a large common offset and one centred; for a rank- or
  neighbour-based measure two centred ones whose ties float32 cannot swap (a claimed
  transform leaves their float64 order unchanged)."""
  if name in RANKED:
    return cases_for(name, opts, ((6, {}), (16, {"noise": 2.0})))
  x, y = data(6)
  return [(x, y), (x - x.mean(0), y - y.mean(0))]


@pytest.mark.parametrize("name,opts", CLAIM_CASES)
def test_every_claim_of_every_measure_holds(name, opts):
  """Symmetry and each invariance, declared or not, at every documented option value.
  Tolerance 5e-5: a transform rounds the inputs to float32 once more, and the measure
  of the transformed data goes through other roundings (a few hundred u at n = 120)."""
  assert claim_violations(measures.get(name), opts, claim_pairs(name, opts)) == []


@pytest.mark.parametrize("name,opts", CLAIM_CASES)
def test_values_stay_in_the_declared_range_and_identical_inputs_are_ideal(name, opts):
  """On related, noisy, independent and identical inputs (and one negatively related,
  where a similarity can go below 0) every value lies in `value_range`; identical
  inputs give `ideal` (cycle kNN and ridge predictivity excepted, see
  test_self_similarity)."""
  m = measures.get(name)
  x, y = claim_pairs(name, opts)[1]
  rng = np.random.default_rng(40)
  cases = [(x, y), (x, rng.normal(size=y.shape).astype(np.float32)), (x, -x), (x, x)]
  lo, hi = m.value_range or (-np.inf, np.inf)
  for a, b in cases:
    v = float(m(a, b, **opts))
    assert lo - 1e-5 <= v <= hi + 1e-5, (name, opts, v, m.value_range)
  if name not in ("cycle_knn", "linear_predictivity"):
    tol = 2e-3 if name in ("shape_metric", "cka_angular") else 1e-4
    assert float(m(x, x, **opts)) == pytest.approx(m.ideal, abs=tol), (name, opts)


def test_the_claim_check_catches_false_claims():
  """The property test can fail: the same functions registered with a false claim."""
  shape_metric, cknna = measures.get("shape_metric"), measures.get("cknna")
  lie = dataclasses.replace(shape_metric, invariances_at=None)  # scaling at all alpha
  found = claim_violations(lie, dict(alpha=0.5), claim_pairs("shape_metric", {}))
  assert any("claims isotropic_scaling" in v for v in found), found
  lie = dataclasses.replace(cknna, symmetric=True)
  found = claim_violations(lie, dict(k=3), claim_pairs("cknna", dict(k=3)))
  assert any("claims symmetry" in v for v in found), found
  x = np.diag([2.0, 1.0]).astype(np.float32)[np.arange(12) % 2] * np.arange(
      1, 13)[:, None].astype(np.float32)  # singular values of X (2, 1) after centring
  assert float(shape_metric(x, 3 * x, alpha=0.5)) > 1e-3  # d(X, 3X) > 0 at alpha = 0.5


@pytest.mark.parametrize("name", sorted(REFS))
def test_self_similarity(name):
  """Identical inputs reach the measure's ideal. Two by definition do not: a kNN
  graph is not symmetric, so cycle kNN of X with itself is below 1 (it still equals
  its reference), and ridge shrinks a self-prediction (R^2 -> 1 as ridge -> 0)."""
  m = measures.get(name)
  x, _ = data(8)
  opts = {"ridge": 1e-6} if name == "linear_predictivity" else {}
  got = float(m(x, x, **opts))
  if name == "cycle_knn":
    assert 0.9 < got < 1.0 and got == pytest.approx(REFS[name](x, x), rel=1e-6)
    return
  # arccos turns float32 rounding of a cosine near 1 into ~1e-3 of angle
  tol = 2e-3 if name in ("shape_metric", "cka_angular") else 1e-5
  assert got == pytest.approx(m.ideal, abs=tol)


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


@pytest.mark.parametrize("name", ["mutual_knn", "rsa", "linear_predictivity", "procrustes",
                                  "svcca"])
def test_matrix_vmapped_over_pairs_equals_one_pair_at_a_time(name):
  """All pairs of a matrix in one program, in memory-planned chunks, give each cell's
  own value (svcca's states differ in shape by layer: the one-pair path)."""
  rng = np.random.default_rng(30)
  acts_a = {f"a{d}": rng.normal(size=(50, d)).astype(np.float32) for d in (3, 8, 20)}
  acts_b = {f"b{d}": (acts_a["a8"][:, :min(d, 8)] @ rng.normal(size=(min(d, 8), d))
                      + rng.normal(size=(50, d))).astype(np.float32) for d in (4, 12)}
  for b in (acts_b, None):
    cols = acts_b if b is not None else acts_a
    one_by_one = np.array([[float(measures.matrix(name, {r: x}, {c: y})[0][0, 0])
                            for c, y in cols.items()] for r, x in acts_a.items()])
    for max_bytes in (1, 1 << 30):  # one pair per step / every pair in one step
      got, _ = measures.matrix(name, acts_a, b, max_bytes=max_bytes)
      np.testing.assert_allclose(got, one_by_one, rtol=2e-5, atol=2e-6)
  big = measures.pair_chunk(np.zeros((50, 50), np.float32), np.zeros((50, 50), np.float32),
                            1 << 20)
  assert big == (1 << 20) // (8 * 2 * 50 * 50 * 4)


def test_neighbours_and_predictivity_agree_with_scikit_learn():
  """The reference libraries' own building blocks: ReSi finds neighbours with
  scikit-learn's NearestNeighbors (cosine, k + 1 then drops the point itself); ridge
  regression on contiguous KFold splits."""
  from sklearn.linear_model import Ridge
  from sklearn.model_selection import KFold
  from sklearn.neighbors import NearestNeighbors
  from fula_jax.similarity import neighbours
  x, y = separated_data("mutual_knn", {"k": 10}, 31, n=90, noise=1.0)
  nn = NearestNeighbors(n_neighbors=11, metric="cosine").fit(x.astype(np.float64))
  want = nn.kneighbors(x.astype(np.float64), return_distance=False)[:, 1:]
  got = np.asarray(neighbours.prepare(x, {"k": 10}).idx)
  assert np.mean([set(a) == set(b) for a, b in zip(got, want)]) == 1.0
  sse = sst = 0.0
  for tr, te in KFold(5).split(x):
    xc = x[tr] - x[tr].mean(0)
    lam = 0.3 * np.sum(xc.astype(np.float64) ** 2) / len(tr)
    pred = Ridge(alpha=lam).fit(x[tr], y[tr]).predict(x[te])
    sse += np.sum((y[te] - pred) ** 2)
    sst += np.sum((y[te] - y[tr].mean(0)) ** 2)
  got = float(measures.get("linear_predictivity")(x, y, folds=5, ridge=0.3))
  assert got == pytest.approx(1.0 - sse / sst, rel=1e-4)


def test_pure_function_equals_the_jitted_call():
  """`Measure.fn` (what user code traces), `Measure.__call__` (the per-layer and
  per-pair programs), a user's own jit of `fn`, the permutation null's observed value
  and the bootstrap's point value run the same compiled programs, so they are equal,
  not merely close: an eager op-by-op path once rounded differently and swapped two
  near-tied RSA ranks (0.690438 against 0.690450). Each also equals the float64
  reference within its tolerance (the data are tie-separated for the ranked ones)."""
  import jax
  from fula_jax.similarity import intervals, null
  for name in ("cka_linear_debiased", "mutual_knn", "shape_metric", "rsa"):
    x, y = data(32, n=40) if name not in RANKED else cases_for(name, None, ((32, {}),))[0]
    m = measures.get(name)
    value = float(m(x, y))
    assert float(m.fn(x, y)) == value, name
    assert float(jax.jit(m.fn)(x, y)) == value, name
    assert null.permutation_test(name, x, y, jax.random.PRNGKey(0),
                                 num_permutations=2).observed == value, name
    assert intervals.bootstrap(name, x, y, 2).value == value, name
    assert value == pytest.approx(REFS[name](x, y), rel=2e-5, abs=2e-6), name
  # The data that failed: 780 correlation distances, some closer than float32 rounding.
  x, y = data(32, n=40)
  gap, bound = ties.rdm_gap(x, "correlation")
  assert gap < 2 * bound  # so only the derived tolerance can hold machine-independently
  tol = ties.rsa_tolerance(x, y)
  assert 1e-5 < tol < 0.01
  assert float(measures.get("rsa")(x, y)) == pytest.approx(REFS["rsa"](x, y), abs=tol)
