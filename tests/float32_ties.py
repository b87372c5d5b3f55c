"""What float32 can promise to a test of a rank- or neighbour-based measure.

A continuous measure computed in float32 differs from its float64 reference by rounding,
and a tolerance follows from the computation. A rank- or neighbour-based measure is
discontinuous: two values within rounding of a tie may swap on one machine (or in one of
two compiled programs) and not on another, and the statistic jumps by a whole rank or
neighbour. A comparison of such a measure is machine-independent only when every tie that
decides it is separated by more than twice the float32 error of either value: then every
float32 path orders the values as float64 does. `assert_separated` checks that, in
float64, before a test trusts a comparison.

The bounds (u = 2**-24, float32's unit roundoff; Higham's gamma_d ~ d u for a sum of d
terms):
* cosine similarity of two rows of d features (the kNN measures; the 'correlation' RDM is
  one minus the cosine of the row-centred rows): centring a row (a mean, d u, and a
  subtraction, u), its norm (a sum of d squares, d u, a square root and a division, 2u),
  the dot product of the normalised rows (d u), and the input's own rounding to float32
  after a transform computed in float64 (2u): at most (3d + 6) u.
* Euclidean distance: |x|^2 + |y|^2 - 2 x.y carries (d + 3) u (|x|^2 + |y|^2 + 2|x.y|)
  plus 2u of input rounding on each term; the square root turns an error e of the square
  into at most min(e / dist, sqrt(e)).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist, squareform

U = 2.0 ** -24

KNN = ("mutual_knn", "cknna", "cycle_knn", "jaccard_knn", "rank_similarity",
       "second_order_cosine")


def _f64(x):
  return np.asarray(x, np.float64).reshape(len(x), -1)


def cosine_error(d: int) -> float:
  return (3 * d + 6) * U


def knn_gap(x, k: int) -> tuple[float, float]:
  """(smallest gap between consecutive values among each row's k + 1 largest cosine
  similarities to other rows, the float32 error bound of one such value). The sets
  decide mutual/jaccard/cycle kNN, CKNNA and second-order cosine; the order inside them
  decides rank similarity; both are fixed when the gap exceeds twice the bound."""
  x = _f64(x)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  s = xn @ xn.T
  np.fill_diagonal(s, -np.inf)
  top = -np.sort(-s, axis=1)[:, :k + 1]
  return float(np.min(top[:, :-1] - top[:, 1:])), cosine_error(x.shape[1])


def rdm_gap(x, rdm: str) -> tuple[float, float]:
  """(smallest gap between two entries of the RDM's upper triangle, the float32 error
  bound of an entry): the ranks of Spearman and Kendall RSA are fixed above twice it."""
  x = _f64(x)
  if rdm == "correlation":
    v = pdist(x, "correlation")
    bound = cosine_error(x.shape[1])
  else:
    v = pdist(x, "euclidean")
    sq = np.sum(x * x, axis=1)
    i, j = np.triu_indices(len(x), 1)
    e2 = (x.shape[1] + 5) * U * (sq[i] + sq[j] + 2 * np.abs(np.sum(x[i] * x[j], 1)))
    bound = float(np.max(np.minimum(e2 / np.maximum(v, 1e-300), np.sqrt(e2))))
  v = np.sort(v)
  return float(np.min(np.diff(v))), bound


def gap(x, name: str, opts: dict | None = None) -> tuple[float, float] | None:
  """The tie gap and error bound that decide measure `name` on `x`, or None for a
  continuous measure."""
  opts = opts or {}
  if name in KNN:
    return knn_gap(x, opts.get("k", 10))
  if name == "rsa" and opts.get("compare", "spearman") in ("spearman", "kendall"):
    return rdm_gap(x, opts.get("rdm", "correlation"))
  return None


def separated(x, name: str, opts: dict | None = None) -> bool:
  g = gap(x, name, opts)
  return g is None or g[0] > 2 * g[1]


def assert_separated(name: str, opts: dict | None, *arrays) -> None:
  """Fail, on every machine alike, when the data puts a tie that decides `name` within
  float32 rounding: a comparison on such data holds or fails by the machine's rounding."""
  for i, x in enumerate(arrays):
    g = gap(x, name, opts)
    if g is not None:
      assert g[0] > 2 * g[1], (
          f"{name} {opts or ''}: input {i} has values {g[0]:.2e} apart where float32 can "
          f"move each by {g[1]:.2e}; choose data whose ties are separated (see "
          "tests/float32_ties.py)")


def _clusters(v: np.ndarray, bound: float) -> np.ndarray:
  """Sizes of the runs of sorted values whose neighbours lie within 2 x `bound`: inside
  a run float32 may order the values any way, across runs it orders them as float64."""
  v = np.sort(v)
  breaks = np.flatnonzero(np.diff(v) > 2 * bound)
  edges = np.concatenate([[0], breaks + 1, [len(v)]])
  return np.diff(edges)


def rsa_tolerance(x, y, rdm: str = "correlation", compare: str = "spearman") -> float:
  """How far float32 rounding can move Spearman or Kendall RSA from its float64 value,
  from the near-tie runs of both RDMs (each side's bounds add).

  Spearman, m entries and no exact ties: rho = sum_i (a_i - mean)(b_i - mean) / S with
  S = m (m^2 - 1) / 12. Reordering a run of c near-tied entries of a moves each of
  their ranks by at most c - 1, with the moves summing to zero, against b's centred
  ranks of at most (m - 1) / 2: |d rho| <= c (c - 1) (m - 1) / (2 S). One swapped pair
  (c = 2) gives 12 / (m (m + 1)), 2.0e-5 at n = 40 examples (m = 780).
  Kendall: only the c (c - 1) / 2 pairs inside a run can change from concordant to
  discordant, each by 2 / P of tau with P = m (m - 1) / 2."""
  total = 0.0
  for a in (x, y):
    _, bound = rdm_gap(a, rdm)
    v = pdist(_f64(a), rdm)
    m = len(v)
    c = _clusters(v, bound).astype(np.float64)
    pairs = np.sum(c * (c - 1))
    if compare == "spearman":
      total += pairs * (m - 1) / (2 * m * (m * m - 1) / 12)
    elif compare == "kendall":
      total += pairs / (m * (m - 1) / 2)
  return float(total)
