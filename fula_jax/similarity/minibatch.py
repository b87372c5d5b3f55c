"""Streaming CKA over whole ``L_A x L_B`` layer matrices, memory flat in dataset size.

Two estimators, both accumulators that merge by summation (so batches may be split over
devices, hosts or runs and the partial accumulators added):

**Minibatch CKA** (Nguyen, Raghu & Kornblith 2021), :class:`MinibatchCKA`. Per batch and
per layer, the Gram matrix of the batch's real rows is centred (HSIC_1's unbiased
centring, or H K H for the biased HSIC_0) and flattened; the layers are stacked, and
the whole block of HSIC values is ONE matrix product ``G_A @ G_B^T``. The per-batch HSIC
values are summed, and at the end

    CKA_ab = sum_batches HSIC_ab / sqrt(sum HSIC_aa * sum HSIC_bb).

With the debiased estimator each batch's HSIC_1 is unbiased, so the result converges to
the population CKA as batches accumulate and does not depend on the batch size in
expectation. The biased per-batch HSIC_0 is biased upwards by an amount that shrinks with
the batch size, not with the number of batches: biased minibatch CKA is *not* the biased
CKA of the whole dataset (use :class:`ExactLinearCKA` for that). A batch with fewer real
rows than the estimator needs (4 debiased, 2 biased) is left out and counted in
``skipped_examples``. Kernel 'linear' (the raw Gram centred in Gram space, or the
features centred first where their mean dominates: :func:`_centred_gram`) or 'rbf'
(per-batch median bandwidth).

**Exact linear CKA** in feature space, :class:`ExactLinearCKA`: streams ``X^T Y`` for
every layer pair (one matrix product of the stacked features), ``X^T X`` per layer,
column sums and n (plus the few fourth-moment sums the debiased estimator needs), all on
data shifted by the first batch's mean so the final centring does not cancel
catastrophically in float32. Gives the full-dataset biased and debiased linear CKA
exactly; memory ``(sum d_a) x (sum d_b)``, so for layers of up to a few thousand features.

Masks: rows with mask 0 (padding) never enter a statistic; a padded batch gives exactly
the statistics of its real rows.

Sharding: :func:`make_update` runs the batch update under ``jax.shard_map`` with the batch
axis split over a mesh. ``mode='global'`` computes the statistics of the global batch
exactly as one device would (Gram rows are split over devices; features are all-gathered,
row sums all-gathered, HSIC partial sums psum-ed); ``mode='local'`` treats each device's
shard as its own minibatch and psums the per-shard HSIC values (no feature traffic).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fula_jax import registry, sharding
from fula_jax.similarity import checks
from fula_jax.similarity import cka

ESTIMATORS = ("debiased", "biased")
KERNELS = ("linear", "rbf")
MIN_N = {"debiased": 4, "biased": 2}

Acts = Sequence[jax.Array]


def batch_mesh(devices: Sequence[jax.Device] | None = None,
               axis: str = "batch") -> jax.sharding.Mesh:
  """A 1-D mesh over `devices` (default: all, every host) with an Auto axis."""
  return sharding.line_mesh(axis, devices)


# ----------------------------------------------------------------------------
# Collective helpers: identity when there is no mapped axis.
# ----------------------------------------------------------------------------


def _psum(x, axis):
  return x if axis is None else jax.lax.psum(x, axis)


def _gather(x, axis):
  return x if axis is None else jax.lax.all_gather(x, axis, tiled=True)


def _row_offset(b: int, axis) -> jax.Array:
  return jnp.zeros((), jnp.int32) if axis is None else jax.lax.axis_index(axis) * b


def _mask_or_ones(mask, b: int) -> jax.Array:
  if mask is None:
    return jnp.ones((b,), jnp.float32)
  return (jnp.asarray(mask) > 0).astype(jnp.float32)


# ----------------------------------------------------------------------------
# Minibatch CKA
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class MinibatchCKA:
  """Sums of per-batch HSIC values for every estimator and layer pair.

  Leading axis E indexes `estimators`. Counts are per estimator, because a batch of 3
  real rows enters the biased estimator but not the debiased one.
  """
  hsic_ab: jax.Array           # (E, L_A, L_B)
  hsic_aa: jax.Array           # (E, L_A)
  hsic_bb: jax.Array           # (E, L_B)
  num_batches: jax.Array       # (E,) int32, batches that entered
  num_examples: jax.Array      # (E,) int32, real rows in those batches
  skipped_examples: jax.Array  # (E,) int32, real rows in batches too small to enter
  nonfinite_a: jax.Array       # (L_A,) int32, real rows with NaN/Inf activations
  nonfinite_b: jax.Array       # (L_B,)
  spread_a: jax.Array          # (L_A,) sum over batches of centred sum of squares
  spread_b: jax.Array
  scale_a: jax.Array           # (L_A,) sum of raw sums of squares
  scale_b: jax.Array
  estimators: tuple[str, ...] = flax.struct.field(pytree_node=False,
                                                  default=("debiased",))
  kernel: str = flax.struct.field(pytree_node=False, default="linear")
  sigma_frac: float = flax.struct.field(pytree_node=False, default=1.0)
  within: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def settings(self) -> tuple:
    return (self.estimators, self.kernel, self.sigma_frac, self.within)

  def merge(self, other: "MinibatchCKA") -> "MinibatchCKA":
    """The accumulator of both sets of batches."""
    if self.settings != other.settings:
      raise ValueError(f"Cannot merge minibatch CKA accumulators with different "
                       f"settings: {self.settings} vs {other.settings}.")
    return jax.tree_util.tree_map(jnp.add, self, other)

  __add__ = merge

  def cka(self) -> jax.Array:
    """(E, L_A, L_B) CKA; NaN where nothing entered."""
    den = jnp.sqrt(self.hsic_aa[:, :, None] * self.hsic_bb[:, None, :])
    return self.hsic_ab / den


def init(num_a: int, num_b: int | None = None, *,
         estimators: Sequence[str] = ("debiased",), kernel: str = "linear",
         sigma_frac: float = 1.0) -> MinibatchCKA:
  """An empty accumulator for `num_a` x `num_b` layers (`num_b` None: A with itself)."""
  estimators = tuple(estimators)
  for e in estimators:
    registry.lookup("CKA estimator", e, MIN_N)
  if not estimators or len(set(estimators)) != len(estimators):
    raise ValueError(f"estimators must be distinct and non-empty, got {estimators}.")
  registry.lookup("CKA kernel", kernel, dict.fromkeys(KERNELS))
  within = num_b is None
  nb = num_a if within else num_b
  e = len(estimators)
  zf = lambda *s: jnp.zeros(s, jnp.float32)
  zi = lambda *s: jnp.zeros(s, jnp.int32)
  return MinibatchCKA(
      hsic_ab=zf(e, num_a, nb), hsic_aa=zf(e, num_a), hsic_bb=zf(e, nb),
      num_batches=zi(e), num_examples=zi(e), skipped_examples=zi(e),
      nonfinite_a=zi(num_a), nonfinite_b=zi(nb), spread_a=zf(num_a),
      spread_b=zf(nb), scale_a=zf(num_a), scale_b=zf(nb),
      estimators=estimators, kernel=kernel, sigma_frac=float(sigma_frac),
      within=within)


# Centring in Gram space (from the raw Gram) loses float32 precision as the raw
# features' energy grows against the centred features' energy. Up to this ratio the CKA
# values move by ~1e-6: 1.2e-6 at most on two random-init ResNet-18s' points (ratios
# 4.5 to 122, debiased, two batches of 256, against float64); 6e-7 on Gaussian
# features with a random offset at ratio 64, 9e-3 at ratio 1e4. Beyond it the features
# are centred first.
GRAM_CENTRING_MAX_RATIO = 100.0


def _centred_gram(x: jax.Array, real: jax.Array, m_all: jax.Array, pair: jax.Array,
                  n: jax.Array, diag: jax.Array, axis
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(centred Gram rows (b x B) over the real rows, centred and raw sums of squares).

  The raw Gram is what the work costs; centring it there (K - r 1' - 1 r' + |mean|^2,
  with r = K real / n the rows' products with the mean) saves a pass that writes a
  centred copy of the activations. Where the mean dominates (raw energy above
  :data:`GRAM_CENTRING_MAX_RATIO` times the centred energy, or anything non-finite) the
  features are centred first, as the estimate needs. `m_all` is the gathered 0/1 mask
  and `pair` its (b x B) product with the local rows'.
  """
  both = pair > 0
  n_or_1 = jnp.maximum(n, 1.0)
  k = jnp.where(both, cka.dot(x, _gather(x, axis).T), 0.0)
  scale = _psum(jnp.sum(jnp.where(diag, k, 0.0)), axis)
  r = cka.dot(k, m_all) / n_or_1
  mean_sq = _psum(jnp.sum(jnp.where(real, r, 0.0)), axis) / n_or_1
  spread = scale - n * mean_sq
  from_gram = jnp.where(both, k - r[:, None] - _gather(r, axis)[None, :] + mean_sq, 0.0)

  def feature_centred(_):
    xr = jnp.where(real[:, None], x, 0.0)
    # The column sum as a matrix-vector product: XLA's CPU column reduction of a
    # (256, 65536) activation takes 2.5x as long as the whole Gram; the product is fast.
    mean = _psum(cka.dot(real.astype(x.dtype)[None, :], xr)[0], axis) / n_or_1
    xc = jnp.where(real[:, None], xr - mean, 0.0)
    kc = cka.dot(xc, _gather(xc, axis).T)
    # Both sums of squares from what is already here: the centred one is the Gram's
    # trace, and the raw one adds n |mean|^2 (the centred rows sum to zero).
    centred = _psum(jnp.sum(jnp.where(diag, kc, 0.0)), axis)
    return kc, centred, centred + n * jnp.sum(mean * mean)

  safe = jnp.isfinite(scale) & (scale <= GRAM_CENTRING_MAX_RATIO * spread)
  return jax.lax.cond(safe, lambda _: (from_gram, spread, scale), feature_centred, None)


def _layer_grams(x: jax.Array, m: jax.Array, *, estimators: tuple[str, ...],
                 kernel: str, sigma_frac: float, axis) -> dict[str, Any]:
  """Centred Gram row-blocks (b x B) of one layer, one per estimator, plus layer stats.

  With `axis` None this is the whole (B x B) Gram; under shard_map each device holds its
  b rows of the global batch's Gram.
  """
  b = x.shape[0]
  x = x.reshape(b, -1).astype(jnp.float32)
  real = m > 0
  # A row with a non-finite value has a non-finite sum (a matrix-vector product, no
  # reduction pass of its own).
  finite = jnp.isfinite(cka.dot(x, jnp.ones((x.shape[1],), x.dtype)))
  nonfinite = _psum(jnp.sum(real & ~finite).astype(jnp.int32), axis)
  n = _psum(jnp.sum(m), axis)
  m_all = _gather(m, axis)
  big = m_all.shape[0]
  offset = _row_offset(b, axis)
  diag = (offset + jnp.arange(b))[:, None] == jnp.arange(big)[None, :]
  pair = m[:, None] * m_all[None, :]
  k, spread, scale = _centred_gram(x, real, m_all, pair, n, diag, axis)
  if kernel == "rbf":
    sq = jnp.sum(jnp.where(diag, k, 0.0), axis=1)
    d2 = jnp.maximum(sq[:, None] + _gather(sq, axis)[None, :] - 2.0 * k, 0.0)
    d2 = jnp.where(diag, 0.0, d2)
    dist = jnp.where((pair > 0) & ~diag, jnp.sqrt(d2), jnp.nan)
    sigma = sigma_frac * jnp.nanmedian(_gather(dist, axis))
    k = jnp.exp(-d2 / (2.0 * sigma * sigma)) * pair

  out = {}
  for est in estimators:
    if est == "debiased":
      w = pair * (~diag)
      kt = k * w
      rows = jnp.sum(kt, axis=1)
      shift = jnp.sum(_gather(rows, axis)) / ((n - 2.0) * 2.0 * (n - 1.0))
      means_loc = rows / (n - 2.0) - shift
      means_all = _gather(rows, axis) / (n - 2.0) - shift
      out[est] = (kt - means_loc[:, None] - means_all[None, :]) * w
    elif kernel == "linear":
      out[est] = k * pair  # centred features give an already centred Gram
    else:
      row = jnp.sum(k * m_all[None, :], axis=1) / n
      grand = _psum(jnp.sum(row * m), axis) / n
      out[est] = (k - row[:, None] - _gather(row, axis)[None, :] + grand) * pair
  return {"grams": out, "n": n, "nonfinite": nonfinite, "spread": spread,
          "scale": scale}


def batch_stats(acts_a: Acts, acts_b: Acts | None, mask: jax.Array | None,
                like: MinibatchCKA, *, axis_name: str | None = None) -> MinibatchCKA:
  """One batch's contribution (an accumulator) with `like`'s settings.

  `acts_a`/`acts_b`: per layer ``(B, ...)`` activations (`acts_b` None when `like` is a
  within-model accumulator). Jittable; under shard_map with `axis_name` the batch axis
  is split over that axis and the result is the global batch's contribution.
  """
  if (acts_b is None) != like.within:
    raise ValueError("acts_b must be None exactly for a within-model accumulator.")
  b = acts_a[0].shape[0]
  m = _mask_or_ones(mask, b)
  kw = dict(estimators=like.estimators, kernel=like.kernel, sigma_frac=like.sigma_frac,
            axis=axis_name)
  la = [_layer_grams(x, m, **kw) for x in acts_a]
  lb = la if acts_b is None else [_layer_grams(x, m, **kw) for x in acts_b]
  n = la[0]["n"]
  hab, haa, hbb, nb, ne, sk = [], [], [], [], [], []
  for est in like.estimators:
    ga = jnp.stack([layer["grams"][est].reshape(-1) for layer in la])
    gb = ga if acts_b is None else jnp.stack(
        [layer["grams"][est].reshape(-1) for layer in lb])
    norm = cka.hsic_norm(n, est == "debiased")
    valid = n >= MIN_N[est]
    block = _psum(cka.dot(ga, gb.T), axis_name) / norm
    self_a = _psum(jnp.sum(ga * ga, axis=1), axis_name) / norm
    self_b = self_a if acts_b is None else _psum(jnp.sum(gb * gb, axis=1),
                                                 axis_name) / norm
    hab.append(jnp.where(valid, block, 0.0))
    haa.append(jnp.where(valid, self_a, 0.0))
    hbb.append(jnp.where(valid, self_b, 0.0))
    n_int = n.astype(jnp.int32)
    nb.append(valid.astype(jnp.int32))
    ne.append(jnp.where(valid, n_int, 0))
    sk.append(jnp.where(valid, 0, n_int))
  stat = lambda layers, key: jnp.stack([layer[key] for layer in layers])
  return like.replace(
      hsic_ab=jnp.stack(hab), hsic_aa=jnp.stack(haa), hsic_bb=jnp.stack(hbb),
      num_batches=jnp.stack(nb), num_examples=jnp.stack(ne),
      skipped_examples=jnp.stack(sk), nonfinite_a=stat(la, "nonfinite"),
      nonfinite_b=stat(lb, "nonfinite"), spread_a=stat(la, "spread"),
      spread_b=stat(lb, "spread"), scale_a=stat(la, "scale"), scale_b=stat(lb, "scale"))


@jax.jit
def update(acc: MinibatchCKA, acts_a: Acts, acts_b: Acts | None,
           mask: jax.Array | None = None) -> MinibatchCKA:
  """`acc` plus one batch, on one device (or wherever jit places it)."""
  return acc + batch_stats(acts_a, acts_b, mask, acc)


# ----------------------------------------------------------------------------
# Exact feature-space linear CKA
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class ExactLinearCKA:
  """Streaming sums for exact full-dataset linear CKA, biased and debiased.

  Every feature is shifted by `shift` (the first batch's mean) before it enters a sum;
  z = x - shift and q = |z|^2 per row and layer.
  """
  shift_a: jax.Array     # (D_A,)
  shift_b: jax.Array     # (D_B,)
  n: jax.Array           # () float32
  sum_a: jax.Array       # (D_A,) sum z
  sum_b: jax.Array       # (D_B,)
  cross: jax.Array       # (D_A, D_B) sum z_a z_b^T
  self_a: tuple          # per layer (d, d) sum z z^T (empty when within)
  self_b: tuple
  q_a: jax.Array         # (L_A,) sum q
  q_b: jax.Array         # (L_B,)
  qq_ab: jax.Array       # (L_A, L_B) sum q_a q_b
  qq_aa: jax.Array       # (L_A,) sum q_a^2
  qq_bb: jax.Array       # (L_B,)
  qz_ab: jax.Array       # (L_A, D_B) sum q_a z_b
  zq_ab: jax.Array       # (D_A, L_B) sum z_a q_b
  qz_aa: jax.Array       # (L_A, D_A) sum q_a z_a
  qz_bb: jax.Array       # (L_B, D_B)
  nonfinite_a: jax.Array  # (L_A,) int32 real rows with NaN/Inf
  nonfinite_b: jax.Array
  scale_a: jax.Array     # (L_A,) raw sum of squares
  scale_b: jax.Array
  dims_a: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  dims_b: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  within: bool = flax.struct.field(pytree_node=False, default=False)

  def merge(self, other: "ExactLinearCKA") -> "ExactLinearCKA":
    if (self.dims_a, self.dims_b, self.within) != (other.dims_a, other.dims_b,
                                                    other.within):
      raise ValueError("Cannot merge exact CKA accumulators of different layers.")
    for mine, theirs in ((self.shift_a, other.shift_a), (self.shift_b, other.shift_b)):
      if not isinstance(mine, jax.core.Tracer) and not np.array_equal(
          np.asarray(mine), np.asarray(theirs), equal_nan=True):
        raise ValueError("Cannot merge exact CKA accumulators with different shifts; "
                         "create every partial accumulator from the same init_exact.")
    summed = jax.tree_util.tree_map(jnp.add, self, other)
    return summed.replace(shift_a=self.shift_a, shift_b=self.shift_b)

  __add__ = merge


def _flat_real(acts: Acts, m: jax.Array) -> list[jax.Array]:
  return [jnp.where(m[:, None] > 0, x.reshape(x.shape[0], -1).astype(jnp.float32), 0.0)
          for x in acts]


def _split(v: jax.Array, dims: Sequence[int], axis: int = 0) -> list[jax.Array]:
  return jnp.split(v, np.cumsum(dims)[:-1], axis=axis)


@jax.jit
def init_exact(acts_a: Acts, acts_b: Acts | None = None,
               mask: jax.Array | None = None) -> ExactLinearCKA:
  """An empty exact accumulator, shifted by the mean of this (first) batch's real rows."""
  m = _mask_or_ones(mask, acts_a[0].shape[0])

  def shift(acts):
    xs = _flat_real(acts, m)
    dims = tuple(int(x.shape[1]) for x in xs)
    s = jnp.concatenate([jnp.sum(x, axis=0) for x in xs]) / jnp.maximum(jnp.sum(m), 1.)
    return jnp.where(jnp.isfinite(s), s, 0.0), dims

  shift_a, dims_a = shift(acts_a)
  within = acts_b is None
  shift_b, dims_b = (shift_a, dims_a) if within else shift(acts_b)
  la, lb, da, db = len(dims_a), len(dims_b), sum(dims_a), sum(dims_b)
  zf = lambda *s: jnp.zeros(s, jnp.float32)
  return ExactLinearCKA(
      shift_a=shift_a, shift_b=shift_b, n=zf(), sum_a=zf(da), sum_b=zf(db),
      cross=zf(da, db), self_a=() if within else tuple(zf(d, d) for d in dims_a),
      self_b=() if within else tuple(zf(d, d) for d in dims_b),
      q_a=zf(la), q_b=zf(lb), qq_ab=zf(la, lb), qq_aa=zf(la), qq_bb=zf(lb),
      qz_ab=zf(la, db), zq_ab=zf(da, lb), qz_aa=zf(la, da), qz_bb=zf(lb, db),
      nonfinite_a=jnp.zeros((la,), jnp.int32), nonfinite_b=jnp.zeros((lb,), jnp.int32),
      scale_a=zf(la), scale_b=zf(lb), dims_a=dims_a, dims_b=dims_b, within=within)


def exact_batch_stats(acc: ExactLinearCKA, acts_a: Acts, acts_b: Acts | None,
                      mask: jax.Array | None = None, *,
                      axis_name: str | None = None) -> ExactLinearCKA:
  """One batch's contribution to `acc`'s sums (shift and layout taken from `acc`)."""
  if (acts_b is None) != acc.within:
    raise ValueError("acts_b must be None exactly for a within-model accumulator.")
  m = _mask_or_ones(mask, acts_a[0].shape[0])
  ps = lambda v: _psum(v, axis_name)

  def side(acts, shift, dims):
    xs = _flat_real(acts, m)
    got = tuple(int(x.shape[1]) for x in xs)
    if got != tuple(dims):
      raise ValueError(f"Layer widths {got} differ from the accumulator's {dims}.")
    nonfinite = jnp.stack([jnp.sum((m > 0) & ~jnp.all(jnp.isfinite(x), axis=1))
                           for x in xs]).astype(jnp.int32)
    scale = jnp.stack([jnp.sum(x * x) for x in xs])
    z = jnp.where(m[:, None] > 0, jnp.concatenate(xs, axis=1) - shift, 0.0)
    q = jnp.stack([jnp.sum(zl * zl, axis=1) for zl in _split(z, dims, axis=1)], axis=1)
    return z, q, nonfinite, scale

  za, qa, nfa, sca = side(acts_a, acc.shift_a, acc.dims_a)
  zb, qb, nfb, scb = (za, qa, nfa, sca) if acc.within else side(
      acts_b, acc.shift_b, acc.dims_b)
  self_blocks = lambda z, dims: tuple(
      ps(cka.dot(zl.T, zl)) for zl in _split(z, dims, axis=1))
  return acc.replace(
      n=ps(jnp.sum(m)), sum_a=ps(jnp.sum(za, axis=0)), sum_b=ps(jnp.sum(zb, axis=0)),
      cross=ps(cka.dot(za.T, zb)),
      self_a=() if acc.within else self_blocks(za, acc.dims_a),
      self_b=() if acc.within else self_blocks(zb, acc.dims_b),
      q_a=ps(jnp.sum(qa, axis=0)), q_b=ps(jnp.sum(qb, axis=0)),
      qq_ab=ps(cka.dot(qa.T, qb)), qq_aa=ps(jnp.sum(qa * qa, axis=0)),
      qq_bb=ps(jnp.sum(qb * qb, axis=0)), qz_ab=ps(cka.dot(qa.T, zb)),
      zq_ab=ps(cka.dot(za.T, qb)), qz_aa=ps(cka.dot(qa.T, za)),
      qz_bb=ps(cka.dot(qb.T, zb)), nonfinite_a=ps(nfa), nonfinite_b=ps(nfb),
      scale_a=ps(sca), scale_b=ps(scb))


@jax.jit
def update_exact(acc: ExactLinearCKA, acts_a: Acts, acts_b: Acts | None,
                 mask: jax.Array | None = None) -> ExactLinearCKA:
  return acc + exact_batch_stats(acc, acts_a, acts_b, mask)


def _pair_terms(n: float, cross: np.ndarray, sx: np.ndarray, sy: np.ndarray,
                qx: float, qy: float, qq: float, qzy: np.ndarray, zqx: np.ndarray
                ) -> tuple[float, float]:
  """(||X_c^T Y_c||^2, n(n-3) HSIC_1) of one layer pair from shifted sums, in float64."""
  dx, dy = sx / n, sy / n
  centred = cross - n * np.outer(dx, dy)
  biased = float(np.sum(centred * centred))
  cx, cy = float(dx @ dx), float(dy @ dy)
  sum_k, sum_l = qx - n * cx, qy - n * cy
  sum_kl = (qq - 2.0 * float(dy @ qzy) + cy * qx - 2.0 * float(dx @ zqx)
            + 4.0 * float(dx @ cross @ dy) - 2.0 * cy * float(dx @ sx)
            + cx * qy - 2.0 * cx * float(dy @ sy) + n * cx * cy)
  debiased = (biased - n / (n - 2.0) * sum_kl
              + sum_k * sum_l / ((n - 1.0) * (n - 2.0)))
  return biased, debiased


def exact_terms(acc: ExactLinearCKA) -> dict[str, np.ndarray]:
  """Per-pair and per-layer HSIC numerators, and layer stats, as float64 NumPy."""
  g = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), acc)
  n = float(g.n)
  split = lambda v, dims, ax=0: np.split(v, np.cumsum(dims)[:-1], axis=ax)
  sa, sb = split(g.sum_a, acc.dims_a), split(g.sum_b, acc.dims_b)
  rows_cross = split(g.cross, acc.dims_a, 0)
  cross = [split(r, acc.dims_b, 1) for r in rows_cross]
  qz_ab = split(g.qz_ab, acc.dims_b, 1)
  zq_ab = split(g.zq_ab, acc.dims_a, 0)
  qz_aa = split(g.qz_aa, acc.dims_a, 1)
  qz_bb = split(g.qz_bb, acc.dims_b, 1)
  la, lb = len(acc.dims_a), len(acc.dims_b)
  out = {k: np.zeros((la, lb)) for k in ("biased", "debiased")}
  for i in range(la):
    for j in range(lb):
      b, d = _pair_terms(n, cross[i][j], sa[i], sb[j], g.q_a[i], g.q_b[j],
                         g.qq_ab[i, j], qz_ab[j][i], zq_ab[i][:, j])
      out["biased"][i, j], out["debiased"][i, j] = b, d

  def self_terms(sums, blocks, q, qq, qz):
    res = np.zeros((2, len(sums)))
    for i, s in enumerate(sums):
      res[:, i] = _pair_terms(n, blocks[i], s, s, q[i], q[i], qq[i], qz[i][i], qz[i][i])
    return res

  spread = lambda sums, q: np.array([q[i] - float(s @ s) / n if n else 0.0
                                     for i, s in enumerate(sums)])

  blocks_a = [cross[i][i] for i in range(la)] if acc.within else list(g.self_a)
  blocks_b = blocks_a if acc.within else list(g.self_b)
  out["self_a"] = self_terms(sa, blocks_a, g.q_a, g.qq_aa, qz_aa)
  out["self_b"] = self_terms(sb, blocks_b, g.q_b, g.qq_bb, qz_bb)
  out["spread_a"] = spread(sa, g.q_a)
  out["spread_b"] = spread(sb, g.q_b)
  out["n"] = n
  return out


# ----------------------------------------------------------------------------
# Sharded updates
# ----------------------------------------------------------------------------


def make_update(mesh: jax.sharding.Mesh | None = None, *, exact: bool = False,
                mode: str = "global", axis: str | None = None) -> Callable:
  """A jitted ``update(acc, acts_a, acts_b, mask) -> acc``.

  Without a mesh it is :func:`update` / :func:`update_exact`. With a mesh the batch axis
  of the activations and mask is split over mesh axis `axis` (default: the mesh's first)
  and the accumulator is replicated. The global batch size must be a multiple of the
  axis size. `mode` ('global' | 'local') only matters for minibatch CKA (module doc).
  """
  registry.lookup("sharded CKA mode", mode, {"global": 0, "local": 0})
  if mesh is None:
    return update_exact if exact else update
  axis = axis or mesh.axis_names[0]
  size = mesh.shape[axis]

  def body(acc, acts_a, acts_b, mask):
    if exact:
      return acc + exact_batch_stats(acc, acts_a, acts_b, mask, axis_name=axis)
    if mode == "global":
      return acc + batch_stats(acts_a, acts_b, mask, acc, axis_name=axis)
    part = batch_stats(acts_a, acts_b, mask, acc)
    return acc + jax.tree_util.tree_map(lambda v: jax.lax.psum(v, axis), part)

  sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(axis)),
                          out_specs=P(), check_vma=False)

  @jax.jit
  def run(acc, acts_a, acts_b, mask=None):
    b = acts_a[0].shape[0]
    if b % size:
      raise ValueError(f"Batch size {b} is not a multiple of the {size} devices on mesh "
                       f"axis {axis!r}; pad the batch (with mask 0) to a multiple.")
    if mask is None:
      mask = jnp.ones((b,), jnp.float32)
    return sharded(acc, acts_a, acts_b, mask)

  return run


# ----------------------------------------------------------------------------
# Final matrices with checks (concrete values)
# ----------------------------------------------------------------------------


def _problems(names: Sequence[str], nonfinite, spread, scale, *,
              entered: int, min_n: int, n: int) -> dict[str, str | None]:
  out = {}
  for i, name in enumerate(names):
    if int(nonfinite[i]) == 0 and entered == 0:
      out[name] = (f"no batch had at least {min_n} real examples "
                   f"(the estimator needs {min_n})")
      continue
    out[name] = checks.describe(n=n, min_n=min_n, nonfinite_rows=int(nonfinite[i]),
                                centred_ss=float(spread[i]), raw_ss=float(scale[i]))
  return out


def finalize(acc: MinibatchCKA | ExactLinearCKA, rows: Sequence[str],
             cols: Sequence[str] | None = None, *, label_a: str = "model A",
             label_b: str = "model B") -> dict[str, tuple[np.ndarray, dict]]:
  """``{estimator: (matrix, info)}`` with NaN + warnings for untrustworthy layers.

  info: n (examples that entered), batches, skipped examples, NaN reasons.
  """
  cols = list(rows if cols is None else cols)
  rows = list(rows)
  if isinstance(acc, ExactLinearCKA):
    return _finalize_exact(acc, rows, cols, label_a, label_b)
  g = jax.device_get(acc)
  if (len(rows), len(cols)) != g.hsic_ab.shape[1:]:
    raise ValueError(f"{len(rows)} x {len(cols)} names for a "
                     f"{g.hsic_ab.shape[1]} x {g.hsic_ab.shape[2]} accumulator.")
  with np.errstate(invalid="ignore", divide="ignore"):
    den = np.sqrt(np.asarray(g.hsic_aa, np.float64)[:, :, None]
                  * np.asarray(g.hsic_bb, np.float64)[:, None, :])
    mats = np.asarray(g.hsic_ab, np.float64) / den
  out = {}
  for e, est in enumerate(acc.estimators):
    entered, n = int(g.num_batches[e]), int(g.num_examples[e])
    skipped = int(g.skipped_examples[e])
    kw = dict(entered=entered, min_n=MIN_N[est], n=n if entered else 0)
    pa = _problems(rows, g.nonfinite_a, g.spread_a, g.scale_a, **kw)
    pb = _problems(cols, g.nonfinite_b, g.spread_b, g.scale_b, **kw)
    name = f"cka_{acc.kernel}" + ("_debiased" if est == "debiased" else "")
    if skipped and entered:
      import warnings
      warnings.warn(f"{name}: {skipped} example(s) in batches with fewer than "
                    f"{MIN_N[est]} real rows were left out.", checks.SimilarityWarning,
                    stacklevel=2)
    mat, reasons = checks.apply(mats[e], rows, cols, measure=name, problems_a=pa,
                                problems_b=pb, label_a=label_a, label_b=label_b)
    out[est] = (mat, {"n": n, "num_batches": entered, "skipped_examples": skipped,
                      "nan_reasons": reasons})
  return out


def _finalize_exact(acc: ExactLinearCKA, rows, cols, label_a, label_b):
  if (len(rows), len(cols)) != (len(acc.dims_a), len(acc.dims_b)):
    raise ValueError(f"{len(rows)} x {len(cols)} names for a {len(acc.dims_a)} x "
                     f"{len(acc.dims_b)} accumulator.")
  t = exact_terms(acc)
  n = t["n"]
  nf_a, nf_b = np.asarray(acc.nonfinite_a), np.asarray(acc.nonfinite_b)
  sc_a, sc_b = np.asarray(acc.scale_a, np.float64), np.asarray(acc.scale_b, np.float64)
  out = {}
  for est in ESTIMATORS:
    min_n = MIN_N[est]
    kw = dict(entered=1, min_n=min_n, n=int(n))  # describe() reports n < min_n
    pa = _problems(rows, nf_a, t["spread_a"], sc_a, **kw)
    pb = _problems(cols, nf_b, t["spread_b"], sc_b, **kw)
    with np.errstate(invalid="ignore", divide="ignore"):
      k = 0 if est == "biased" else 1  # self terms are stacked (biased, debiased)
      mat = t[est] / np.sqrt(t["self_a"][k][:, None] * t["self_b"][k][None, :])
    name = "cka_linear" + ("_debiased" if est == "debiased" else "")
    mat, reasons = checks.apply(mat, rows, cols, measure=name, problems_a=pa,
                                problems_b=pb, label_a=label_a, label_b=label_b)
    out[est] = (mat, {"n": int(n), "nan_reasons": reasons})
  return out
