"""Streaming CKA engines against per-pair NumPy references; masks; sharding; merging."""

import warnings

import jax
import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform

from fula_jax.similarity import SimilarityWarning, minibatch as mb

from test_similarity_measures import hsic_biased, hsic_song  # NumPy references

ROWS, COLS = ["a0", "a1", "a2"], ["b0", "b1"]


def gram(x, kernel):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  if kernel == "linear":
    return x @ x.T
  d = pdist(x)
  return np.exp(-squareform(d) ** 2 / (2 * np.median(d) ** 2))


def ref_minibatch(acts_a, acts_b, batches, kernel, debiased):
  """Nguyen et al. 2021: sum per-batch HSIC, then normalise; one pair at a time."""
  h = hsic_song if debiased else hsic_biased
  out = np.zeros((len(acts_a), len(acts_b)))
  for i, a in enumerate(acts_a):
    for j, b in enumerate(acts_b):
      ab = aa = bb = 0.0
      for s in batches:
        k, l = gram(a[s], kernel), gram(b[s], kernel)
        ab, aa, bb = ab + h(k, l), aa + h(k, k), bb + h(l, l)
      out[i, j] = ab / np.sqrt(aa * bb)
  return out


def ref_full_linear(a, b, debiased):
  k, l = gram(a, "linear"), gram(b, "linear")
  h = hsic_song if debiased else hsic_biased
  return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def make_acts(n=48, seed=0, offset=0.0):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(n, 6))
  a = [base[:, :4].reshape(n, 2, 2) + offset,                      # a "conv map"
       np.tanh(base @ rng.normal(size=(6, 9))) + offset,
       rng.normal(size=(n, 5))]                                    # unrelated
  b = [base @ rng.normal(size=(6, 7)) + 0.5 * rng.normal(size=(n, 7)) + offset,
       np.maximum(base[:, :3], 0) + offset]
  f = lambda xs: [x.astype(np.float32) for x in xs]
  return f(a), f(b)


def run(acc, acts_a, acts_b, batches, update=mb.update):
  for s in batches:
    acc = update(acc, [x[s] for x in acts_a],
                 None if acts_b is None else [x[s] for x in acts_b], None)
  return acc


BATCHES = [slice(0, 16), slice(16, 32), slice(32, 48)]


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_matrix_equals_per_pair_reference(kernel):
  acts_a, acts_b = make_acts()
  acc = mb.init(3, 2, estimators=("debiased", "biased"), kernel=kernel)
  acc = run(acc, acts_a, acts_b, BATCHES)
  got = mb.finalize(acc, ROWS, COLS)
  for est in ("debiased", "biased"):
    want = ref_minibatch(acts_a, acts_b, BATCHES, kernel, est == "debiased")
    np.testing.assert_allclose(got[est][0], want, rtol=2e-5, atol=2e-6)
    assert got[est][1]["n"] == 48 and got[est][1]["num_batches"] == 3


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_gram_space_and_feature_centring_both_equal_the_reference(offset, monkeypatch):
  """The Gram is centred in Gram space unless the mean dominates (then the features are
  centred first): forced either way, or chosen, the matrix equals the float64 reference;
  a mean 1e3 times the spread, centred in Gram space anyway, would not."""
  acts_a, acts_b = make_acts(offset=offset)
  # HSIC_1 is unchanged by a shift of the features; the float64 reference is centred
  # first, or its own sums would cancel at offset 1e3.
  centred = lambda acts: [x.astype(np.float64) - x.astype(np.float64).mean(0) for x in acts]
  want = ref_minibatch(centred(acts_a), centred(acts_b), BATCHES, "linear", True)

  def matrix(max_ratio):
    monkeypatch.setattr(mb, "GRAM_CENTRING_MAX_RATIO", max_ratio)
    step = jax.jit(lambda acc, a, b: acc + mb.batch_stats(a, b, None, acc))  # retraced
    acc = mb.init(3, 2)
    for s in BATCHES:
      acc = step(acc, [x[s] for x in acts_a], [x[s] for x in acts_b])
    return mb.finalize(acc, ROWS, COLS)["debiased"][0]

  chosen, features = matrix(mb.GRAM_CENTRING_MAX_RATIO), matrix(0.0)
  np.testing.assert_allclose(chosen, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(features, want, rtol=2e-5, atol=2e-6)
  from_gram = matrix(np.inf)
  if offset:
    assert np.max(np.abs(from_gram - want)) > 1e-3  # 100x the tolerance above
  else:
    np.testing.assert_allclose(from_gram, want, rtol=2e-5, atol=2e-6)


def test_padded_batches_equal_unpadded_even_with_garbage_in_padding():
  acts_a, acts_b = make_acts(n=40)
  batches = [slice(0, 16), slice(16, 32), slice(32, 40)]
  plain = mb.init(3, 2, estimators=("debiased", "biased"))
  for s in batches:
    plain = mb.update(plain, [x[s] for x in acts_a], [x[s] for x in acts_b])
  padded = mb.init(3, 2, estimators=("debiased", "biased"))
  rng = np.random.default_rng(1)
  for s in batches:
    def pad(x):
      x = x[s]
      junk = rng.normal(size=(16 - len(x),) + x.shape[1:]).astype(np.float32) * 100
      if junk.size:
        junk.flat[0] = np.nan  # padding may hold anything
      return np.concatenate([x, junk]) if len(junk) else x
    mask = (np.arange(16) < (s.stop - s.start)).astype(np.float32)
    padded = mb.update(padded, [pad(x) for x in acts_a], [pad(x) for x in acts_b], mask)
  for field in ("hsic_ab", "hsic_aa", "hsic_bb"):
    np.testing.assert_allclose(getattr(padded, field), getattr(plain, field), rtol=1e-5)
  np.testing.assert_array_equal(padded.num_examples, [40, 40])
  np.testing.assert_array_equal(padded.nonfinite_a, 0)
  want = ref_minibatch(acts_a, acts_b, batches, "linear", True)
  np.testing.assert_allclose(mb.finalize(padded, ROWS, COLS)["debiased"][0], want,
                             rtol=2e-5, atol=2e-6)


def test_within_model_accumulator_is_symmetric_with_unit_diagonal():
  acts_a, _ = make_acts()
  acc = run(mb.init(3), acts_a, None, BATCHES)
  mat = mb.finalize(acc, ROWS)["debiased"][0]
  np.testing.assert_allclose(mat, mat.T, rtol=1e-6)
  np.testing.assert_allclose(np.diag(mat), 1.0, rtol=1e-5)
  np.testing.assert_allclose(mat, ref_minibatch(acts_a, acts_a, BATCHES, "linear", True),
                             rtol=2e-5, atol=2e-6)


def test_accumulators_merge_by_summation():
  acts_a, acts_b = make_acts()
  whole = run(mb.init(3, 2), acts_a, acts_b, BATCHES)
  first = run(mb.init(3, 2), acts_a, acts_b, BATCHES[:1])
  rest = run(mb.init(3, 2), acts_a, acts_b, BATCHES[1:])
  merged = first + rest
  # The same three batch terms, summed in another association: each HSIC sum moves by
  # at most 2 u of its terms' magnitude (u = 6e-8), about 3e-7 after CKA's quotient.
  np.testing.assert_allclose(merged.cka(), whole.cka(), rtol=1e-6)
  with pytest.raises(ValueError, match="different settings"):
    first.merge(mb.init(3, 2, estimators=("biased",)))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_sharded_global_equals_single_device_and_local_equals_subbatches(kernel):
  assert jax.device_count() == 8
  acts_a, acts_b = make_acts(n=64)
  acts_a, acts_b = acts_a[:2], acts_b[:1]  # small programs: 8-device compiles are slow
  big = [slice(0, 32), slice(32, 64)]
  ests = ("debiased", "biased") if kernel == "rbf" else ("debiased",)
  kw = dict(estimators=ests, kernel=kernel)
  mesh = mb.batch_mesh()
  single = run(mb.init(2, 1, **kw), acts_a, acts_b, big)
  glob = run(mb.init(2, 1, **kw), acts_a, acts_b, big, mb.make_update(mesh))
  for field in ("hsic_ab", "hsic_aa", "hsic_bb", "num_examples", "spread_a"):
    np.testing.assert_allclose(getattr(glob, field), getattr(single, field), rtol=2e-5)
  # 'local': each device's 4 rows are a minibatch of their own.
  local = run(mb.init(2, 1, **kw), acts_a, acts_b, big, mb.make_update(mesh, mode="local"))
  small = [slice(i, i + 4) for i in range(0, 64, 4)]
  for est in ests:
    np.testing.assert_allclose(
        mb.finalize(local, ROWS[:2], COLS[:1])[est][0],
        ref_minibatch(acts_a, acts_b, small, kernel, est == "debiased"),
        rtol=5e-5, atol=5e-6)


def test_sharded_batch_must_divide_devices():
  acts_a, acts_b = make_acts(n=12)
  with pytest.raises(ValueError, match="multiple"):
    mb.make_update(mb.batch_mesh())(mb.init(3, 2), acts_a, acts_b, None)


def test_exact_streaming_equals_full_data_linear_cka():
  # Large offsets: the shifted sums must not cancel catastrophically in float32.
  acts_a, acts_b = make_acts(n=60, offset=30.0)
  batches = [slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 60)]
  acc = mb.init_exact([x[:16] for x in acts_a], [x[:16] for x in acts_b])
  for s in batches:
    pad = 16 - (s.stop - s.start)
    acc = mb.update_exact(
        acc, [np.concatenate([x[s], np.full((pad,) + x.shape[1:], 7.0, np.float32)])
              for x in acts_a],
        [np.concatenate([x[s], np.zeros((pad,) + x.shape[1:], np.float32)])
         for x in acts_b], (np.arange(16) < 16 - pad).astype(np.float32))
  got = mb.finalize(acc, ROWS, COLS)
  for est in ("biased", "debiased"):
    want = np.array([[ref_full_linear(a, b, est == "debiased") for b in acts_b]
                     for a in acts_a])
    np.testing.assert_allclose(got[est][0], want, rtol=1e-4, atol=1e-5)
    assert got[est][1]["n"] == 60


def test_exact_within_model_and_sharded_equal_single():
  acts_a, _ = make_acts(n=64, offset=5.0)
  big = [slice(0, 32), slice(32, 64)]
  single = mb.init_exact([x[:32] for x in acts_a])
  single = run(single, acts_a, None, big, mb.update_exact)
  sharded = mb.init_exact([x[:32] for x in acts_a])
  sharded = run(sharded, acts_a, None, big, mb.make_update(mb.batch_mesh(), exact=True))
  a, b = mb.finalize(single, ROWS), mb.finalize(sharded, ROWS)
  for est in ("biased", "debiased"):
    np.testing.assert_allclose(b[est][0], a[est][0], rtol=1e-5)
    want = np.array([[ref_full_linear(x, y, est == "debiased") for y in acts_a]
                     for x in acts_a])
    np.testing.assert_allclose(a[est][0], want, rtol=1e-4, atol=1e-5)


def test_streaming_bad_layers_and_small_batches_give_nan_with_named_warning():
  acts_a, acts_b = make_acts(n=48)
  acts_a[1] = acts_a[1].copy()
  acts_a[1][20, 3] = np.nan
  acts_b[1] = np.full_like(acts_b[1], 3.0)  # constant
  acc = run(mb.init(3, 2, estimators=("debiased", "biased")), acts_a, acts_b, BATCHES)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    out = mb.finalize(acc, ROWS, COLS, label_a="A", label_b="B")
  msgs = " ".join(str(w.message) for w in rec if w.category is SimilarityWarning)
  assert "A:a1" in msgs and "NaN/Inf" in msgs and "B:b1" in msgs and "constant" in msgs
  for est in ("debiased", "biased"):
    mat = out[est][0]
    assert np.all(np.isnan(mat[1, :])) and np.all(np.isnan(mat[:, 1]))
    assert np.isfinite(mat[0, 0]) and np.isfinite(mat[2, 0])

  # Batches of 3 real rows: the debiased estimator (n >= 4) has nothing; biased does.
  tiny = [slice(i, i + 3) for i in range(0, 12, 3)]
  good_a, good_b = make_acts(n=12)
  acc = run(mb.init(3, 2, estimators=("debiased", "biased")), good_a, good_b, tiny)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    out = mb.finalize(acc, ROWS, COLS)
  assert np.all(np.isnan(out["debiased"][0]))
  assert np.all(np.isfinite(out["biased"][0]))
  assert out["debiased"][1]["skipped_examples"] == 12
  assert any("a0" in str(w.message) and "at least 4" in str(w.message) for w in rec)


def test_update_compiles_once_for_a_stream_of_batches():
  acts_a, acts_b = make_acts(n=40)
  acc = mb.init(2, 1, estimators=("biased",))
  before = mb.update._cache_size()
  for s in [slice(0, 8), slice(8, 16), slice(16, 24), slice(24, 32)]:
    acc = mb.update(acc, [x[s] for x in acts_a[1:]], [x[s] for x in acts_b[1:]],
                    np.ones(8, np.float32))
  assert mb.update._cache_size() - before == 1
  assert int(acc.num_batches[0]) == 4


def test_exact_with_too_few_examples_is_nan_for_debiased_only():
  acts_a, acts_b = make_acts(n=3)
  acc = mb.update_exact(mb.init_exact(acts_a[:1], acts_b[:1]), acts_a[:1], acts_b[:1])
  with pytest.warns(SimilarityWarning, match="a0.*at least 4"):
    out = mb.finalize(acc, ROWS[:1], COLS[:1])
  assert np.isnan(out["debiased"][0][0, 0])
  assert out["biased"][0][0, 0] == pytest.approx(ref_full_linear(acts_a[0], acts_b[0],
                                                                  False), rel=1e-4)
