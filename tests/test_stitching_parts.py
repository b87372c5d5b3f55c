"""Stitch maps, least squares and the objectives against independent NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fula_jax import registry
from fula_jax.models import LOGITS
from fula_jax.stitching import lstsq, maps, objectives, plan, settings


def _rand_params(key, cin, cout):
  k1, k2 = jax.random.split(key)
  return {"kernel": jax.random.normal(k1, (cin, cout)),
          "bias": jax.random.normal(k2, (cout,))}


def _np_affine(x, p):
  return np.einsum("...c,cd->...d", np.asarray(x, np.float64),
                   np.asarray(p["kernel"], np.float64)) + np.asarray(p["bias"])


# ------------------------------------------------------------------------- maps


@pytest.mark.parametrize("src,dst", [
    ((8, 8, 3), (4, 4, 5)),    # downsample: resize first
    ((2, 2, 3), (6, 6, 5)),    # upsample: the cheaper affine-first order
    ((4, 4, 3), (4, 4, 5)),    # same size: a plain 1x1 conv
])
def test_conv_map_is_resize_then_1x1_conv(src, dst):
  spec = maps.plan("a", src, "b", dst)
  assert spec.kind == "conv"
  x = jax.random.normal(jax.random.PRNGKey(0), (2,) + src)
  p = _rand_params(jax.random.PRNGKey(1), src[-1], dst[-1])
  got = maps.apply(spec, p, x)
  resized = jax.image.resize(x, (2,) + dst[:2] + (src[-1],), "bilinear")
  want = _np_affine(resized, p)
  assert got.shape == (2,) + dst
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_token_maps_resample_the_square_grid():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 3))
  p = _rand_params(jax.random.PRNGKey(1), 3, 4)
  spec = maps.plan("a", (16, 3), "b", (4, 4))
  assert spec.kind == "tokens"
  grid = jax.image.resize(x.reshape(2, 4, 4, 3), (2, 2, 2, 3), "bilinear")
  np.testing.assert_allclose(maps.apply(spec, p, x),
                             _np_affine(grid.reshape(2, 4, 3), p), rtol=1e-4, atol=1e-4)
  same = maps.plan("a", (5, 3), "b", (5, 4))  # equal counts need no grid
  np.testing.assert_allclose(maps.apply(same, p, x[:, :5]), _np_affine(x[:, :5], p),
                             rtol=1e-5, atol=1e-5)


def test_conv_to_tokens_flattens_row_major_and_back():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  p = _rand_params(jax.random.PRNGKey(1), 3, 6)
  spec = maps.plan("conv", (4, 4, 3), "tok", (4, 6))
  assert spec.kind == "conv_to_tokens"
  grid = jax.image.resize(x, (2, 2, 2, 3), "bilinear")
  np.testing.assert_allclose(maps.apply(spec, p, x),
                             _np_affine(np.asarray(grid).reshape(2, 4, 3), p),
                             rtol=1e-4, atol=1e-4)
  back = maps.plan("tok", (16, 3), "conv", (8, 8, 6))
  assert back.kind == "tokens_to_conv"
  t = x.reshape(2, 16, 3)
  up = jax.image.resize(x, (2, 8, 8, 3), "bilinear")
  np.testing.assert_allclose(maps.apply(back, p, t), _np_affine(up, p),
                             rtol=1e-4, atol=1e-4)


def test_dense_map_and_fan_in_init():
  spec = maps.plan("pool", (300,), "fc", (200,))
  assert spec.kind == "dense"
  p = maps.init_random(spec, jax.random.PRNGKey(0))
  assert p["kernel"].shape == (300, 200) and np.all(np.asarray(p["bias"]) == 0)
  # LeCun normal: variance 1 / fan_in (truncated normal, rescaled to that variance).
  assert abs(float(np.var(p["kernel"])) * 300 - 1.0) < 0.05


@pytest.mark.parametrize("src,dst,needle", [
    ((4, 4, 8), (16,), "vector"),
    ((16,), (4, 4, 8), "vector"),
    ((12, 8), (16, 8), "square"),
    ((4, 4, 8), (12, 8), "square"),
    ((12, 8), (4, 4, 8), "square"),
])
def test_unstitchable_shapes_name_both_points_and_shapes(src, dst, needle):
  with pytest.raises(maps.UnstitchableError) as e:
    maps.plan("front_pt", src, "end_pt", dst)
  msg = str(e.value)
  assert "'front_pt'" in msg and "'end_pt'" in msg and needle in msg
  assert str((("B",) + src)).replace("'", "") in msg
  assert str((("B",) + dst)).replace("'", "") in msg


# ------------------------------------------------------------------------- least squares


def test_closed_form_equals_numpy_lstsq_with_bias_column():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 5, 6)).astype(np.float32) + 4.0  # large means
  w = rng.normal(size=(6, 4))
  t = (x @ w + rng.normal(size=4) + 0.1 * rng.normal(size=(3, 5, 5, 4))).astype(
      np.float32)
  stats = lstsq.empty(6, 4)
  for b in range(3):  # accumulated over batches, rows = every pixel
    stats = lstsq.update(stats, x[b:b + 1], t[b:b + 1])
  got = lstsq.solve(stats, ridge=0.0)
  xr, tr = x.reshape(-1, 6).astype(np.float64), t.reshape(-1, 4).astype(np.float64)
  ref = np.linalg.lstsq(np.c_[xr, np.ones(len(xr))], tr, rcond=None)[0]
  np.testing.assert_allclose(got["kernel"], ref[:6], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got["bias"], ref[6], rtol=1e-4, atol=1e-3)
  # A tiny relative ridge barely moves a well-posed solution.
  ridged = lstsq.solve(stats, ridge=1e-6)
  np.testing.assert_allclose(ridged["kernel"], ref[:6], rtol=1e-3, atol=1e-3)


def test_masked_rows_do_not_count_and_psum_merges_shards():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(16, 3)).astype(np.float32) + 2.0
  t = rng.normal(size=(16, 2)).astype(np.float32)
  mask = np.r_[np.ones(11), np.zeros(5)].astype(np.float32)
  masked = lstsq.solve(lstsq.batch_stats(x, t, mask), ridge=0.0)
  ref = np.linalg.lstsq(np.c_[x[:11], np.ones(11)], t[:11], rcond=None)[0]
  np.testing.assert_allclose(masked["kernel"], ref[:3], rtol=1e-4, atol=1e-4)

  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("b",))
  spec = jax.sharding.PartitionSpec("b")

  def local(xs, ts):
    return jax.tree_util.tree_map(lambda a: a[None], lstsq.psum_stats(
        lstsq.batch_stats(xs, ts), "b"))

  merged = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec,
                         check_vma=False)(x, t)
  merged = lstsq.Stats(*(np.asarray(a)[0] for a in merged))
  full = np.linalg.lstsq(np.c_[x, np.ones(16)], t, rcond=None)[0]
  np.testing.assert_allclose(lstsq.solve(merged, ridge=0.0)["kernel"], full[:3],
                             rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- objectives


def _np_fula(zs, ts, cs, squared, normalise):
  total = 0.0
  for z, t, c in zip(zs, ts, cs):
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    t = np.asarray(t, np.float64).reshape(len(t), -1)
    if normalise == "example":
      e = np.linalg.norm(z - t, axis=1)
      d = np.linalg.norm(t, axis=1)
      total += c * np.mean(e ** 2 / d ** 2 if squared else e / d)
    else:
      e, d = np.linalg.norm(z - t), np.linalg.norm(t)
      total += c * (e ** 2 / d ** 2 if squared else e / d)
  return total


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("normalise", ["example", "batch"])
def test_fula_matches_numpy_formula(squared, normalise):
  rng = np.random.default_rng(2)
  ts = [rng.normal(size=(5, 3, 3, 4)), rng.normal(size=(5, 6))]
  zs = [t + 0.3 * rng.normal(size=t.shape) for t in ts]
  cs = [1.0, 0.25]
  got = objectives.fula_loss([jnp.asarray(z, jnp.float32) for z in zs],
                             [jnp.asarray(t, jnp.float32) for t in ts], cs,
                             squared=squared, normalise=normalise, eps=0.0)
  np.testing.assert_allclose(got, _np_fula(zs, ts, cs, squared, normalise), rtol=1e-5)


def test_fula_objective_layers_coefficients_and_exact_map():
  points = ("conv1", "conv2", "pool")
  rng = np.random.default_rng(3)
  targets = {"conv1": rng.normal(size=(4, 2, 2, 3)), "conv2": rng.normal(size=(4, 2)),
             "pool": rng.normal(size=(4, 2))}
  targets = {k: jnp.asarray(v, jnp.float32) for k, v in targets.items()}
  where = objectives.Where("conv2", points)
  outs = {p: targets[p] + 0.5 for p in ("conv2", "pool")}
  shared = {"targets": targets}
  per_list = objectives.FuLA(C=(9.0, 2.0, 3.0), eps=0.0)
  assert per_list.layers(points, "conv2") == ["conv2", "pool"]
  want = _np_fula([outs["conv2"], outs["pool"]], [targets["conv2"], targets["pool"]],
                  [2.0, 3.0], False, "example")
  np.testing.assert_allclose(per_list.loss(outs, shared, where), want, rtol=1e-5)
  by_name = objectives.FuLA(C=(("pool", 3.0), ("conv2", 2.0)), eps=0.0)
  np.testing.assert_allclose(by_name.loss(outs, shared, where), want, rtol=1e-5)
  only_j = objectives.FuLA(k="conv2", eps=0.0)
  assert only_j.layers(points, "conv2") == ["conv2"]
  # Zero at the exact map, with finite gradients (the norm is not differentiable at 0).
  exact = {p: targets[p] for p in ("conv2", "pool")}
  fn = lambda o: objectives.FuLA().loss(o, shared, where)
  assert float(fn(exact)) == 0.0
  grads = jax.grad(fn)(exact)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  # Held-out sums over a full batch give the batch loss back.
  for normalise in ("example", "batch"):
    f = objectives.FuLA(C=(9.0, 2.0, 3.0), normalise=normalise, eps=0.0)
    terms = f.eval_terms(outs, shared, jnp.ones(4), where)
    np.testing.assert_allclose(f.eval_value(terms, 4.0, where), f.loss(outs, shared, where),
                               rtol=1e-5)


def test_task_and_soft_label_losses_match_numpy():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  teacher = rng.normal(size=(6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=6).astype(np.int32)
  shared = {"label": labels, "teacher": teacher, "targets": {}}
  where = objectives.Where("p", ("p",))
  outs = {LOGITS: jnp.asarray(logits)}

  def log_softmax(a):
    a = a.astype(np.float64)
    return a - a.max(-1, keepdims=True) - np.log(np.exp(a - a.max(-1, keepdims=True)
                                                        ).sum(-1, keepdims=True))
  ce = -np.mean(log_softmax(logits)[np.arange(6), labels])
  np.testing.assert_allclose(objectives.TLM().loss(outs, shared, where), ce, rtol=1e-5)
  tau = 2.0
  p = np.exp(log_softmax(teacher / tau))
  soft = -np.mean(np.sum(p * log_softmax(logits / tau), -1))
  np.testing.assert_allclose(objectives.SLM(tau=tau).loss(outs, shared, where), soft,
                             rtol=1e-5)
  dm_where = objectives.Where("p", ("p",))
  z, t = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
  dm = objectives.DM().loss({"p": jnp.asarray(z)}, {"targets": {"p": jnp.asarray(t)}},
                            dm_where)
  np.testing.assert_allclose(dm, np.mean(np.sum((z - t) ** 2, -1)), rtol=1e-5)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(registry.UnknownNameError, match="fula"):
    objectives.get("fulla")
  with pytest.raises(registry.UnknownNameError, match="example"):
    objectives.FuLA(normalise="layer")
  with pytest.raises(registry.UnknownNameError, match="objectives"):
    settings.resolve({"objectivs": ["tlm"]})
  with pytest.raises(registry.UnknownNameError, match="diagonal"):
    plan.parse_pairs("diagonl", ["a"], ["b"])


def test_pair_lists():
  rows, cols = ["a0", "a1", "a2"], ["b0", "b1", "b2"]
  assert plan.parse_pairs("all", rows, cols)[0] == [(r, c) for r in rows for c in cols]
  assert plan.parse_pairs("diagonal", rows, cols) == (
      [("a0", "b0"), ("a1", "b1"), ("a2", "b2")], False)
  assert sorted(plan.parse_pairs("offset:1", rows, cols)[0]) == sorted(
      [("a0", "b1"), ("a1", "b2"), ("a1", "b0"), ("a2", "b1")])
  assert plan.parse_pairs("offset:+1", rows, cols)[0] == [("a0", "b1"), ("a1", "b2")]
  assert plan.parse_pairs("a2->b0, a0->b1", rows, cols) == (
      [("a2", "b0"), ("a0", "b1")], True)
  assert objectives.parse_fula_c("1,0.5") == (1.0, 0.5)
  assert objectives.parse_fula_c("pool=2") == (("pool", 2.0),)
  assert objectives.parse_fula_c({"b": 1, "a": 0.5}) == (("a", 0.5), ("b", 1.0))
  assert objectives.parse_fula_c(2) == 2.0


def test_prefix_tokens_pass_through_and_only_grid_tokens_are_resampled():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 1 + 16, 3)).astype(np.float32)   # CLS + a 4x4 grid
  p = {"kernel": rng.normal(size=(3, 5)).astype(np.float32),
       "bias": rng.normal(size=(5,)).astype(np.float32),
       "cls": rng.normal(size=(1, 5)).astype(np.float32)}
  # tokens (CLS + 4x4) -> tokens (CLS + 2x2): CLS mapped as a token, grid resampled.
  spec = maps.plan("a", (17, 3), "b", (5, 5), src_prefix=1, dst_prefix=1)
  grid = jax.image.resize(x[:, 1:].reshape(2, 4, 4, 3), (2, 2, 2, 3), "bilinear")
  want = _np_affine(np.concatenate([x[:, :1], np.asarray(grid).reshape(2, 4, 3)], 1), p)
  np.testing.assert_allclose(maps.apply(spec, p, x), want, rtol=1e-4, atol=1e-4)
  # A map -> CLS + grid: 'pool' makes the CLS token the map's mean; 'learned' uses p.
  m = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  pooled = np.concatenate([m.mean((1, 2))[:, None], m.reshape(2, 16, 3)], 1)
  spec = maps.plan("a", (4, 4, 3), "b", (17, 5), dst_prefix=1)
  np.testing.assert_allclose(maps.apply(spec, p, m), _np_affine(pooled, p), rtol=1e-4,
                             atol=1e-4)
  spec = maps.plan("a", (4, 4, 3), "b", (17, 5), dst_prefix=1, c2t="learned")
  out = np.asarray(maps.apply(spec, p, m))
  np.testing.assert_allclose(out[:, 0], np.broadcast_to(p["cls"][0], (2, 5)))
  np.testing.assert_allclose(out[:, 1:], _np_affine(m.reshape(2, 16, 3), p), rtol=1e-4,
                             atol=1e-4)
  # CLS + grid -> a map: 'drop' keeps the grid, 'cls' spreads the CLS token over it.
  spec = maps.plan("a", (17, 3), "b", (4, 4, 5), src_prefix=1)
  np.testing.assert_allclose(maps.apply(spec, p, x),
                             _np_affine(x[:, 1:].reshape(2, 4, 4, 3), p), rtol=1e-4,
                             atol=1e-4)
  spec = maps.plan("a", (17, 3), "b", (4, 4, 5), src_prefix=1, t2c="cls")
  np.testing.assert_allclose(
      maps.apply(spec, p, x),
      np.broadcast_to(_np_affine(x[:, :1], p)[:, :, None], (2, 4, 4, 5)), rtol=1e-4,
      atol=1e-4)
  # 17 tokens without a declared prefix are no square grid.
  with pytest.raises(maps.UnstitchableError, match="prefix_tokens"):
    maps.plan("a", (17, 3), "b", (4, 4, 5))
  with pytest.raises(registry.UnknownNameError, match="pool"):
    maps.plan("a", (4, 4, 3), "b", (17, 5), dst_prefix=1, c2t="mean")


def test_measures_declare_their_passes_and_report_only_when_the_pass_runs():
  from fula_jax.stitching import measures
  names = lambda passes: {m.name for m in measures.active(passes)}
  plain = names(())
  assert {"accuracy", "converged", "dm_error"} <= plain
  assert not plain & {"pgd_accuracy", "energy_ood", "mahalanobis_ratio"}
  assert names([measures.PGD]) - plain == {"pgd_accuracy"}
  assert names([measures.OOD]) - plain == {"energy_ood", "mahalanobis_ratio"}
  assert names([measures.FIT]) - plain == {"accuracy@fit", "fit_gap"}
  assert names(measures.PASSES) == set(measures.NAMES) | {"accuracy@fit", "fit_gap"}
  assert measures.needed(measures.active([measures.PGD]), measures.PGD)
  assert not measures.needed(measures.active([measures.PGD]), measures.OOD)
  with pytest.raises(ValueError, match="passes: pgd, ood, fit"):
    measures.active(["attack"])
  # Evaluation sets the caller names: one accuracy each, read in the order given.
  given = measures.active([measures.FIT], ["shifted", "blank"])
  assert [m.name for m in given][-4:] == ["accuracy@shifted", "accuracy@blank",
                                          "accuracy@fit", "fit_gap"]
  assert measures.eval_sets(given) == ("shifted", "blank", "fit")
  assert measures.eval_sets(measures.active()) == ()
  with pytest.raises(ValueError, match="'fit' is the fitting split's"):
    measures.active([measures.FIT], ["fit"])
  # Without the fitting split's pass, 'fit' is a set name like any other.
  assert [m.name for m in measures.active([], ["fit"])][-1] == "accuracy@fit"


def test_set_measures_read_their_own_set_and_the_gap_is_the_difference():
  """accuracy@<set> counts that set's correct answers over its size; fit_gap subtracts
  the test accuracy, per stitch (NumPy by hand on made-up sums)."""
  from fula_jax.stitching import measures
  correct = lambda c: {"accuracy/correct": np.asarray(c, np.float64)}
  base = dict(end_accuracy=0.9, objective=None, where=None,
              train_loss=np.zeros(3), pgd_accuracy=None)
  fit = measures.Readout(correct([40, 50, 10]), 50.0, **base)
  shifted = measures.Readout(correct([1, 2, 3]), 4.0, **base)
  test = measures.Readout(correct([30, 45, 20]), 60.0, **base,
                          sets={"fit": fit, "shifted": shifted})
  values = measures.values(test, measures.active([measures.FIT], ["shifted"])[-3:])
  np.testing.assert_allclose(values["accuracy@shifted"], [0.25, 0.5, 0.75])
  np.testing.assert_allclose(values["accuracy@fit"], [0.8, 1.0, 0.2])
  np.testing.assert_allclose(values["fit_gap"], [0.8 - 0.5, 1.0 - 0.75, 0.2 - 1 / 3])


def test_the_sweep_context_is_frozen_and_holds_the_views_its_measures_read():
  """`context.build` makes evaluation views for exactly the sets the active measures
  read (the caller's, then the fitting split's first fit_gap_examples), and the OOD
  settings join the fingerprint only when the OOD pass runs."""
  import dataclasses
  from fula_jax import models
  from fula_jax.stitching import context, passes, testing
  model = models.get_model("mlp", widths=(8,))
  variables = models.init(model, jax.random.PRNGKey(0), (1, 8, 8, 1))
  train, test = testing.synthetic_splits(64, 32)
  extra, _ = testing.synthetic_splits(12, 4, seed=1)

  def build(cfg, eval_sets=None):
    return context.build(model, variables, model, variables, train, test,
                         dict(cfg, progress=False), None, train_b=None, test_b=None,
                         name_a="A", name_b="B", mesh=None, keep_params=False,
                         profile=None, eval_sets=eval_sets)

  sw = build(dict(fit_gap_examples=16, ood_examples=20, ood_quantile=0.9),
             {"extra": extra})
  assert list(sw.test_views) == ["", "extra", "fit"]
  assert (sw.test_views["fit"].a is train and sw.test_views["fit"].n == 16
          and sw.test_views["extra"].n == 12 and sw.test_views[""].n == 32)
  assert passes.fingerprint(sw) == {"ood": [20, 0.9, sw.execution.ood_ridge]}
  assert list(sw.identity["data"]) == ["", "extra", "fit"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    sw.steps = 1
  plain = build({})
  assert list(plain.test_views) == [""] and passes.fingerprint(plain) == {}
  # Without fit_gap_examples, a set of the caller's may be called 'fit'.
  theirs = build({}, {"fit": extra})
  assert theirs.test_views["fit"].a is extra and theirs.test_views["fit"].n == 12
  assert passes.ood_reference(plain) is None
