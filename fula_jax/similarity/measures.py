"""The measure registry: every similarity/distance by name, with what it promises.

Each :class:`Measure` is split into ``prepare`` (per activation, done once per layer) and
``combine`` (per pair), so an ``L_A x L_B`` matrix prepares ``L_A + L_B`` layers, not
``2 L_A L_B``. Metadata:

* ``kind``: 'similarity' (larger = more alike) or 'distance' (0 = alike);
* ``symmetric``: m(X, Y) == m(Y, X);
* ``invariances``: transforms of either side's features that leave the value unchanged
  at the default options, a subset of :data:`INVARIANCES` ('translation' = adding a
  constant vector to every example, 'permutation' = reordering features,
  'isotropic_scaling' = multiplying by a positive scalar); where they depend on an
  option (shape_metric's alpha, rsa's rdm), :meth:`Measure.invariant_to` gives them for
  any options;
* ``needs_min_n``: fewer examples give NaN with a warning;
* ``invalid_at(n, d, options)``: why the measure is degenerate for a layer of d
  features at n examples ('' where it is valid), e.g. the CCA family when features do
  not fall short of examples; `matrix` warns, and the similarity job leaves such a
  measure out or reduces it (`reduce_for`) and says which and why;
* ``ideal``: the value of identical representations (1 for a similarity, 0 for a
  distance unless declared), the top of the scale `calibration` maps to 1;
* ``value_range``: the values the measure can take, (low, high) (None: no bound
  claimed, e.g. CKNNA's masked HSIC ratio);
* ``permute(state, perm, options)``: the prepared state of the same examples reordered
  (new example i is old perm[i]), without preparing again, where the measure can say
  it (None: the permutation null prepares each shuffle anew). It makes a permutation
  null cost one ``combine`` per shuffle, and one compiled program per state shape.

Global and spectral measures live in cka, procrustes, cca and shape; local-neighbourhood
ones in neighbours; rsa and predictivity have modules of their own.

Linear CKA has exact streaming estimators in :mod:`fula_jax.similarity.minibatch`
(``streaming=True``); the others need the examples in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import registry
from fula_jax.similarity import cca as cca_lib
from fula_jax.similarity import checks
from fula_jax.similarity import cka
from fula_jax.similarity import neighbours
from fula_jax.similarity import predictivity
from fula_jax.similarity import procrustes as procrustes_lib
from fula_jax.similarity import rsa as rsa_lib
from fula_jax.similarity import shape

INVARIANCES = ("orthogonal", "isotropic_scaling", "translation", "invertible_linear",
               "permutation")

Options = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Measure:
  """A named similarity or distance between two ``(n, ...)`` activations."""
  name: str
  kind: str
  symmetric: bool
  invariances: frozenset[str]
  needs_min_n: int
  description: str
  prepare: Callable[[jax.Array, Options], Any]
  combine: Callable[[Any, Any, Options], jax.Array]
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  streaming: bool = False
  resolve: Callable[[int, Sequence[int], Sequence[int], dict], dict] | None = None
  ideal: float | None = None
  # Invariances as a function of the resolved options, where they depend on them.
  invariances_at: Callable[[Mapping[str, Any]], frozenset[str]] | None = None
  # The valid regime: why a layer of d features at n examples is out of it ('' = in).
  invalid_at: Callable[[int, int, Mapping[str, Any]], str] | None = None
  # Options that bring the measure back into its regime at n examples (None: none do).
  reduce_for: Callable[[int], dict[str, Any]] | None = None
  value_range: tuple[float, float] | None = (0.0, 1.0)
  permute: Callable[[Any, jax.Array, Options], Any] | None = None

  def __post_init__(self):
    assert self.kind in ("similarity", "distance"), self.kind
    assert self.invariances <= set(INVARIANCES), self.invariances
    if self.ideal is None:
      object.__setattr__(self, "ideal", 1.0 if self.kind == "similarity" else 0.0)

  def options(self, n: int | None = None, dims_x: Sequence[int] = (),
              dims_y: Sequence[int] = (), **overrides: Any) -> dict[str, Any]:
    """Defaults updated by `overrides` (unknown keys raise), 'auto' choices resolved."""
    opts = dict(self.defaults)
    for k, v in overrides.items():
      if k not in opts:
        raise registry.unknown(f"option of measure {self.name}", k, opts.keys())
      opts[k] = v
    if self.resolve is not None and n is not None:
      opts = self.resolve(n, dims_x, dims_y, opts)
    return opts

  def invalid_layers(self, n: int, dims: Mapping[str, int], **overrides: Any
                     ) -> dict[str, str]:
    """{layer: why} for the layers (name -> features) outside the valid regime."""
    if self.invalid_at is None:
      return {}
    opts = self.options(**overrides)
    out = {k: self.invalid_at(n, d, opts) for k, d in dims.items()}
    return {k: v for k, v in out.items() if v}

  def invariant_to(self, **overrides: Any) -> frozenset[str]:
    """The transforms that leave the value unchanged at these options."""
    if self.invariances_at is None:
      return self.invariances
    return self.invariances_at(self.options(**overrides))

  def fn(self, x: jax.Array, y: jax.Array, **overrides: Any) -> jax.Array:
    """The measure as a pure, jittable, vmappable function (no checks).

    A registered measure runs through the same jitted per-layer and per-pair programs
    as :meth:`__call__`, so on concrete arrays the two agree exactly: an eager
    op-by-op evaluation rounds differently, which moves rank- and neighbour-based
    measures wherever two values are within float32 rounding of a tie."""
    x, y = cka.flatten(x), cka.flatten(y)
    opts = self.options(x.shape[0], (x.shape[1],), (y.shape[1],), **overrides)
    if MEASURES.get(self.name) is not self:
      return self.combine(self.prepare(x, opts), self.prepare(y, opts), opts)
    frozen = _freeze(opts)
    return combine_pair(self.name, frozen, prepare_layer(self.name, frozen, x),
                        prepare_layer(self.name, frozen, y))

  def __call__(self, x: jax.Array, y: jax.Array, **overrides: Any) -> jax.Array:
    """The measure of concrete arrays, through the jitted per-layer and per-pair
    programs of a registered measure (compiled once per shape and options)."""
    if MEASURES.get(self.name) is not self:
      return self.fn(x, y, **overrides)
    return self.fn(jnp.asarray(x), jnp.asarray(y), **overrides)


# ----------------------------------------------------------------------------
# CKA
# ----------------------------------------------------------------------------


def _resolve_width(n: int, dims_x: Sequence[int], dims_y: Sequence[int],
                   opts: dict) -> dict:
  """Common state width min(n, d) over all layers, so states share one shape."""
  return {**opts, "width": max(min(n, d) for d in [*dims_x, *dims_y])}


def _resolve_linear(n: int, dims_x: Sequence[int], dims_y: Sequence[int],
                    opts: dict) -> dict:
  if opts["method"] == "auto":
    sx, sy = sum(dims_x), sum(dims_y)
    cost_gram = n * (sx + sy)
    cost_feature = sx * sy + sum(d * d for d in dims_x) + sum(d * d for d in dims_y)
    opts = {**opts, "method": "gram" if cost_gram <= cost_feature else "feature"}
  if opts["method"] == "feature":
    opts["width"] = max([*dims_x, *dims_y])
  if opts["method"] not in ("gram", "feature"):
    raise registry.unknown("linear CKA method", opts["method"], ("auto", "gram", "feature"))
  return opts


def _cka_state(debiased: bool, kernel: str):
  center = cka.unbiased_center if debiased else cka.center_gram

  def prepare(x: jax.Array, opts: Options):
    if kernel == "linear" and opts["method"] == "feature":
      xc = cka.pad_columns(cka.center_features(x), opts.get("width"))
      return xc, cka.feature_hsic_terms(xc, xc, debiased=debiased)
    k = cka.gram(x, kernel, sigma_frac=opts.get("sigma_frac", 1.0))
    kc = center(k)
    return kc, jnp.sum(kc * kc)

  def combine(sx, sy, opts: Options):
    (x, xx), (y, yy) = sx, sy
    if kernel == "linear" and opts["method"] == "feature":
      xy = cka.feature_hsic_terms(x, y, debiased=debiased)
    else:
      xy = jnp.sum(x * y)
    return xy / jnp.sqrt(xx * yy)

  def permute(state, perm, opts: Options):
    s, ss = state  # the self-term is a sum over all examples: unchanged
    if kernel == "linear" and opts["method"] == "feature":
      return s[perm], ss
    return s[perm][:, perm], ss  # centring commutes with a reordering

  return prepare, combine, permute


_CKA_INV = frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation"})


def _cka(name: str, kernel: str, debiased: bool) -> Measure:
  prepare, combine, permute = _cka_state(debiased, kernel)
  est = ("debiased (unbiased HSIC, Song et al. 2012)" if debiased
         else "biased HSIC (Kornblith et al. 2019)")
  if kernel == "linear":
    return Measure(name, "similarity", True, _CKA_INV, 4 if debiased else 2,
                   f"Linear CKA, {est}.", prepare, combine,
                   defaults={"method": "auto"}, streaming=True, resolve=_resolve_linear,
                   value_range=(-1.0, 1.0) if debiased else (0.0, 1.0), permute=permute)
  return Measure(name, "similarity", True, _CKA_INV, 4 if debiased else 2,
                 f"RBF CKA, bandwidth sigma_frac x median pairwise distance, {est}.",
                 prepare, combine, defaults={"sigma_frac": 1.0},
                 value_range=(-1.0, 1.0) if debiased else (0.0, 1.0), permute=permute)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------


def _basis_prepare(keep_key: str | None):
  def prepare(x, opts):
    return cca_lib.basis(x, opts[keep_key] if keep_key else None, opts.get("width"),
                         int(opts.get("max_dims", 0)))
  return prepare


def _cca_invalid(n: int, d: int, opts: Mapping[str, Any]) -> str:
  if d >= n - 1:
    return (f"{d} features >= n - 1 = {n - 1}: every canonical correlation is "
            "trivially 1 (use svcca, or more examples than features)")
  return ""


def _svcca_invalid(n: int, d: int, opts: Mapping[str, Any]) -> str:
  """SVCCA keeps k <= min(d, n - 1) directions (fewer by `keep` or `max_dims`); two
  sides of k directions share trivial correlations of 1 once 2k >= n."""
  k = min(d, n - 1)
  if isinstance(opts["keep"], int) and not isinstance(opts["keep"], bool):
    k = min(k, opts["keep"])
  if opts.get("max_dims", 0) > 0:
    k = min(k, opts["max_dims"])
  if 2 * k >= n:
    return (f"up to {k} kept directions of {d} features at n = {n}: two sides of k "
            "directions share trivial canonical correlations of 1 once 2k >= n (set "
            f"max_dims <= {(n - 1) // 2})")
  return ""


_ROT = frozenset({"orthogonal", "isotropic_scaling", "translation", "permutation"})


def _permute_rows(state: jax.Array, perm: jax.Array, opts: Options) -> jax.Array:
  """A state of per-example rows, known up to an orthogonal map of its columns
  (Procrustes, shape metric): reordering the examples reorders the rows."""
  return state[perm]


def _permute_basis(state, perm: jax.Array, opts: Options):
  return cca_lib.permute(state, perm)


MEASURES: dict[str, Measure] = {
    "cka_linear": _cka("cka_linear", "linear", False),
    "cka_linear_debiased": _cka("cka_linear_debiased", "linear", True),
    "cka_rbf": _cka("cka_rbf", "rbf", False),
    "cka_rbf_debiased": _cka("cka_rbf_debiased", "rbf", True),
    "procrustes": Measure(
        "procrustes", "distance", True, _ROT, 2,
        "Squared orthogonal Procrustes distance 2 - 2||X^T Y||_* of centred, "
        "unit-Frobenius activations, in [0, 2].",
        lambda x, o: procrustes_lib.prepare(x, o.get("width")),
        lambda a, b, o: procrustes_lib.combine(a, b), resolve=_resolve_width,
        value_range=(0.0, 2.0), permute=_permute_rows),
    "cca": Measure(
        "cca", "similarity", True, _ROT | {"invertible_linear"}, 2,
        "Mean squared canonical correlation (R^2_CCA).",
        _basis_prepare(None), lambda a, b, o: cca_lib.cca_combine(a, b),
        resolve=_resolve_width, invalid_at=_cca_invalid, permute=_permute_basis),
    "svcca": Measure(
        "svcca", "similarity", True, _ROT, 2,
        "SVCCA: top singular directions (keep = variance fraction or count, at most "
        "max_dims when > 0), then mean canonical correlation.",
        _basis_prepare("keep"), lambda a, b, o: cca_lib.svcca_combine(a, b),
        defaults={"keep": 0.99, "max_dims": 0}, resolve=_resolve_width,
        invalid_at=_svcca_invalid, reduce_for=lambda n: {"max_dims": (n - 1) // 2},
        permute=_permute_basis),
    "pwcca": Measure(
        "pwcca", "similarity", False,
        frozenset({"isotropic_scaling", "translation", "permutation"}), 2,
        "Projection-weighted CCA (Morcos et al. 2018); weights from model A's side.",
        _basis_prepare(None), lambda a, b, o: cca_lib.pwcca_combine(a, b),
        resolve=_resolve_width, invalid_at=_cca_invalid, permute=_permute_basis),
}


def _cka_angular() -> Measure:
  prepare, combine, permute = _cka_state(False, "linear")
  return Measure(
      "cka_angular", "distance", True, _CKA_INV, 2,
      "arccos of linear CKA (biased HSIC): the angle between the centred Grams, a "
      "metric (Williams et al. 2021).", prepare,
      lambda a, b, o: jnp.arccos(jnp.clip(combine(a, b, o), -1.0, 1.0)),
      defaults={"method": "auto"}, resolve=_resolve_linear,
      value_range=(0.0, np.pi / 2), permute=permute)


def _shape_invariances(opts: Mapping[str, Any]) -> frozenset[str]:
  """Partial whitening commutes with rotations, translations and permutations; only
  alpha = 1 (no whitening) also keeps a scaling, and alpha = 0 (full whitening) any
  invertible linear map."""
  base = frozenset({"orthogonal", "translation", "permutation"})
  alpha = float(opts["alpha"])
  if alpha == 1.0:
    return base | {"isotropic_scaling"}
  if alpha == 0.0:
    return base | {"isotropic_scaling", "invertible_linear"}
  return base


def _resolve_rsa(n: int, dims_x: Sequence[int], dims_y: Sequence[int],
                 opts: dict) -> dict:
  registry.lookup("rsa rdm", opts["rdm"], rsa_lib.RDMS)
  registry.lookup("rsa compare", opts["compare"], rsa_lib.COMPARES)
  return opts


_KNN_INV = frozenset({"orthogonal", "isotropic_scaling", "permutation"})


def _knn(name: str, combine, description: str, symmetric: bool = True,
         prepare=neighbours.prepare, permute=neighbours.permute,
         value_range: tuple[float, float] | None = (0.0, 1.0)) -> Measure:
  return Measure(name, "similarity", symmetric, _KNN_INV, 4,
                 f"{description} k nearest neighbours by cosine similarity.", prepare,
                 combine, defaults={"k": 10}, value_range=value_range, permute=permute)


MEASURES.update({
    "cka_angular": _cka_angular(),
    "mutual_knn": _knn("mutual_knn", neighbours.mutual_knn,
                       "Mutual kNN alignment (Huh et al. 2024): shared fraction of the"),
    "cknna": _knn("cknna", neighbours.cknna,
                  "CKNNA (Huh et al. 2024): CKA restricted to pairs among both sides' "
                  "(asymmetric, as platonic-rep's: the masked Grams are not symmetric)",
                  symmetric=False, prepare=neighbours.cknna_prepare,
                  permute=neighbours.cknna_permute, value_range=None),
    "cycle_knn": _knn("cycle_knn", neighbours.cycle_knn,
                      "Cycle kNN (Huh et al. 2024): an example is found again among the "
                      "X-neighbours of its Y-neighbours;", symmetric=False),
    "jaccard_knn": _knn("jaccard_knn", neighbours.jaccard_knn,
                        "Jaccard similarity (ReSi) of the two sides'"),
    "rank_similarity": _knn("rank_similarity", neighbours.rank_similarity,
                            "Rank similarity (ReSi; Wang et al. 2020) of the common"),
    "second_order_cosine": _knn(
        "second_order_cosine", neighbours.second_order_cosine,
        "Second-order cosine similarity (ReSi; Hamilton et al. 2016) over the union of "
        "the", value_range=(-1.0, 1.0)),
    "rsa": Measure(
        "rsa", "similarity", True, frozenset({"isotropic_scaling", "permutation"}), 3,
        "RSA: correlation of the representational dissimilarity matrices (options rdm: "
        "correlation | euclidean, compare: spearman | pearson | kendall).",
        rsa_lib.prepare, rsa_lib.combine,
        defaults={"rdm": "correlation", "compare": "spearman"}, resolve=_resolve_rsa,
        invariances_at=lambda o: frozenset({"isotropic_scaling", "permutation"}) | (
            {"translation", "orthogonal"} if o["rdm"] == "euclidean" else set()),
        value_range=(-1.0, 1.0), permute=rsa_lib.permute),
    "linear_predictivity": Measure(
        "linear_predictivity", "similarity", False, _ROT, 4,
        "Cross-validated ridge R^2 of Y from X (folds contiguous; ridge relative to X's "
        "scale).", predictivity.prepare, predictivity.combine,
        defaults={"folds": 5, "ridge": 1.0}, resolve=_resolve_width,
        value_range=(-np.inf, 1.0)),
    "shape_metric": Measure(
        "shape_metric", "distance", True, _ROT, 2,
        "Angular generalised shape metric (Williams et al. 2021), partial whitening "
        "alpha in [0, 1] (1: angular Procrustes; 0: CCA); a metric.",
        shape.prepare, shape.combine, defaults={"alpha": 1.0}, resolve=_resolve_width,
        invariances_at=_shape_invariances, value_range=(0.0, np.pi / 2),
        permute=_permute_rows),
})


def get(name: str) -> Measure:
  """The registered measure `name`; unknown names list the valid ones."""
  return registry.lookup("similarity measure", name, MEASURES)


def names() -> list[str]:
  return list(MEASURES)


# ----------------------------------------------------------------------------
# Checked computation of one value and of whole matrices (concrete arrays).
# ----------------------------------------------------------------------------


def _freeze(opts: Mapping[str, Any]) -> tuple:
  return tuple(sorted(opts.items()))


@functools.partial(jax.jit, static_argnums=(0, 1))
def prepare_layer(name: str, opts: tuple, x: jax.Array):
  """Registered measure `name`'s per-layer state of `x`, `opts` frozen by `_freeze`:
  one compiled program per shape and options, shared by every caller."""
  return MEASURES[name].prepare(cka.flatten(x), dict(opts))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _pairs_jit(name: str, opts: tuple, chunk: int, states_a, states_b, rows, cols):
  """combine(states_a[rows[p]], states_b[cols[p]]) for every pair p, `chunk` pairs
  vmapped at a time (one compiled program for the whole matrix)."""
  m, o = MEASURES[name], dict(opts)

  def one(ij):
    take = lambda tree, k: jax.tree_util.tree_map(lambda leaf: leaf[k], tree)
    return m.combine(take(states_a, ij[0]), take(states_b, ij[1]), o)

  return jax.lax.map(one, (rows, cols), batch_size=chunk)


def _stack(states: list) -> Any | None:
  """The states as one pytree with a leading layer axis, or None if their shapes
  differ (then pairs are combined one at a time)."""
  shapes = {jax.tree_util.tree_structure(s) for s in states}
  leaves = [tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(s)) for s in states]
  if len(shapes) != 1 or len(set(leaves)) != 1:
    return None
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def pair_chunk(state_a: Any, state_b: Any, max_bytes: int, working_copies: int = 8
               ) -> int:
  """How many layer pairs to vmap at once: the memory plan. A pair's working set is
  taken as `working_copies` times its two states (the largest intermediates of the
  registered combines, e.g. CKNNA's masked n x n Grams, are a few state-sized arrays)."""
  size = lambda tree: sum(int(np.prod(jnp.shape(x))) * 4
                          for x in jax.tree_util.tree_leaves(tree))
  per_pair = working_copies * (size(state_a) + size(state_b))
  return max(1, int(max_bytes // max(per_pair, 1)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def combine_pair(name: str, opts: tuple, sx, sy):
  """Registered measure `name` of two prepared states (see `prepare_layer`)."""
  return MEASURES[name].combine(sx, sy, dict(opts))


def _all_pairs(name: str, frozen: tuple, sa: dict, sb: dict, rows, cols, within: bool,
               symmetric: bool, max_bytes: int) -> np.ndarray:
  """Every measurable cell: layer states stacked and the pairs vmapped in planned
  chunks when every layer's state has one shape, else one jitted call per pair."""
  out = np.full((len(rows), len(cols)), np.nan)
  pairs = [(i, j) for i, r in enumerate(rows) for j, c in enumerate(cols)
           if sa[r] is not None and sb[c] is not None
           and not (within and symmetric and j < i)]
  if not pairs:
    return out
  ra = [r for r in rows if sa[r] is not None]
  cb = [c for c in cols if sb[c] is not None]
  stack_a, stack_b = _stack([sa[r] for r in ra]), _stack([sb[c] for c in cb])
  if stack_a is not None and stack_b is not None:
    pos_a = {r: k for k, r in enumerate(ra)}
    pos_b = {c: k for k, c in enumerate(cb)}
    ii = np.asarray([pos_a[rows[i]] for i, _ in pairs], np.int32)
    jj = np.asarray([pos_b[cols[j]] for _, j in pairs], np.int32)
    chunk = min(len(pairs), pair_chunk(sa[ra[0]], sb[cb[0]], max_bytes))
    values = np.asarray(_pairs_jit(name, frozen, chunk, stack_a, stack_b, ii, jj))
  else:
    values = [float(combine_pair(name, frozen, sa[rows[i]], sb[cols[j]]))
              for i, j in pairs]
  for (i, j), v in zip(pairs, values):
    out[i, j] = v
    if within and symmetric:
      out[j, i] = v
  return out


def _warn_invalid(m: Measure, n: int, dims: Mapping[str, int], opts: Mapping) -> None:
  """Warn, naming the layers, where measure `m` is outside its declared valid regime."""
  bad = m.invalid_layers(n, dims, **{k: v for k, v in opts.items() if k in m.defaults})
  if bad:
    why = next(iter(bad.values()))
    warnings.warn(f"{m.name} is degenerate for layer(s) {', '.join(bad)}: {why}.",
                  checks.SimilarityWarning, stacklevel=3)


def map_cells(name: str, acts_a: Mapping[str, Any], acts_b: Mapping[str, Any] | None,
              fn: Callable[[Any, Any], Any]) -> list[list[Any]]:
  """fn(x, y) for every cell of the ``len(acts_a) x len(acts_b)`` grid, as rows of a
  nested list. `acts_b` None is A with itself; then a symmetric measure's lower
  triangle mirrors the upper one instead of being computed again."""
  within = acts_b is None
  xs = list(acts_a.values())
  ys = xs if within else list(acts_b.values())
  mirror = within and get(name).symmetric
  out: list[list[Any]] = [[None] * len(ys) for _ in xs]
  for i, x in enumerate(xs):
    for j, y in enumerate(ys):
      out[i][j] = out[j][i] if mirror and j < i else fn(x, y)
  return out


def matrix(name: str, acts_a: Mapping[str, jax.Array],
           acts_b: Mapping[str, jax.Array] | None = None, *, label_a: str = "model A",
           label_b: str = "model B", max_bytes: int = 1 << 30, **overrides: Any
           ) -> tuple[np.ndarray, dict[str, Any]]:
  """The ``len(acts_a) x len(acts_b)`` matrix of measure `name` on in-memory activations.

  `acts_*` map layer name -> ``(n, ...)`` activation on the same n examples, in the same
  order; `acts_b` None compares A with itself. Problem layers (NaN/Inf, constant, n too
  small) give NaN rows/columns and a :class:`checks.SimilarityWarning` naming them.
  Each layer is prepared once (jitted); the pairs are then combined by one jitted
  program, vmapped over as many pairs at a time as `max_bytes` allows (`pair_chunk`).
  Returns ``(matrix, info)`` with info holding the resolved options, n and NaN reasons.
  """
  m = get(name)
  within = acts_b is None
  acts_b = acts_a if within else acts_b
  rows, cols = list(acts_a), list(acts_b)
  ns = {int(np.shape(v)[0]) for v in [*acts_a.values(), *acts_b.values()]}
  if len(ns) != 1:
    raise ValueError(f"{name}: every activation must hold the same examples; got row "
                     f"counts {sorted(ns)}.")
  n = ns.pop()
  dim = lambda v: int(np.prod(np.shape(v)[1:]))
  dims_a = [dim(v) for v in acts_a.values()]
  dims_b = [dim(v) for v in acts_b.values()]
  opts = m.options(n, dims_a, dims_b, **overrides)
  frozen = _freeze(opts)
  prob_a = {r: checks.layer_problem(v, m.needs_min_n) for r, v in acts_a.items()}
  prob_b = prob_a if within else {
      c: checks.layer_problem(v, m.needs_min_n) for c, v in acts_b.items()}
  _warn_invalid(m, n, {**{f"{r} of {label_a}": d for r, d in zip(rows, dims_a)},
                       **{f"{c} of {label_b}": d for c, d in zip(cols, dims_b)}}, opts)

  def states(acts, probs):
    return {k: None if probs[k] else prepare_layer(name, frozen, jnp.asarray(v))
            for k, v in acts.items()}

  sa = states(acts_a, prob_a)
  sb = sa if within else states(acts_b, prob_b)
  out = _all_pairs(name, frozen, sa, sb, rows, cols, within, m.symmetric, max_bytes)
  out, reasons = checks.apply(out, rows, cols, measure=name, problems_a=prob_a,
                              problems_b=prob_b, label_a=label_a, label_b=label_b)
  return out, {"options": opts, "n": n, "nan_reasons": reasons}


def compute(name: str, x: jax.Array, y: jax.Array, *, layer_x: str = "x",
            layer_y: str = "y", **overrides: Any) -> float:
  """One checked value of measure `name` (NaN plus a warning when it cannot be trusted)."""
  out, _ = matrix(name, {layer_x: x}, {layer_y: y}, **overrides)
  return float(out[0, 0])
