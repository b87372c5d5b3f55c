"""The capacity ladder inside the sweep engine: `stitch.map` as a name or a list, one
matrix per (objective, map), closed forms from the engine's accumulated statistics,
constraints kept while training, and independent resume."""

from __future__ import annotations

import numpy as np
import pytest

from fula_jax import models, stitching
from fula_jax.stitching import ladder, lstsq, testing

# No test here reads the end model's self-stitch baselines (one more stitch per unit);
# test_stitching_convergence checks them.
BASE = dict(pairs="diagonal", batch_size=100, eval_batch_size=200, progress=False,
            compilation_cache="off", learning_rate=1e-2, baselines=False)


@pytest.fixture(scope="module")
def donor():
  train, test = testing.digits_splits(600, 200)
  model = models.get_model("mlp", widths=(12, 12))
  variables = testing.train_donor(model, train, steps=300, lr=3e-3)
  return model, variables, train, test, testing.accuracy(model, variables, test)


def _sweep(donor, workdir=None, **cfg):
  model, variables, train, test, _ = donor
  return stitching.run_sweep(model, variables, model, variables, train, test,
                             dict(BASE, **cfg), workdir, keep_params=True)


def test_fit_from_stats_equals_the_fits_on_rows():
  """The engine solves each map from merged batch statistics; the answers are those of
  the row-based closed forms (SciPy's Procrustes is checked against those)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(500, 6)) * np.linspace(2.0, 0.5, 6) + 1.0
  perm = rng.permutation(6)
  y = 1.5 * x[:, perm] + 0.1 * rng.normal(size=(500, 6)) - 0.5
  half = lstsq.batch_stats(x[:250].astype(np.float32), y[:250].astype(np.float32))
  stats = lstsq.merge(half, lstsq.batch_stats(x[250:].astype(np.float32),
                                              y[250:].astype(np.float32)))
  stats = lstsq.Stats(*(np.asarray(a, np.float64) for a in stats))
  rows = {"permutation": ladder.fit_permutation(x, y), "orthogonal": ladder.fit_orthogonal(x, y),
          "lowrank": ladder.fit_lowrank(x, y, 2)}
  for name, want in rows.items():
    got = ladder.fit_from_stats(name, stats, ridge=0.0, options={"rank": 2})
    if name == "lowrank":  # singular vectors have a sign; the map does not
      got = {"kernel": got["u"] @ got["v"], "bias": got["bias"]}
      want = {"kernel": np.asarray(want["u"]) @ np.asarray(want["v"]), "bias": want["bias"]}
    for k in want:
      np.testing.assert_allclose(got[k], np.asarray(want[k]), atol=2e-3,
                                 err_msg=f"{name} {k}")
  assert np.array_equal(np.argmax(ladder.fit_from_stats("permutation", stats)["kernel"], 0),
                        perm)
  affine = ladder.fit_from_stats("affine", stats, ridge=0.0)
  xs = np.c_[x, np.ones(len(x))]
  want = np.linalg.lstsq(xs, y, rcond=None)[0]
  np.testing.assert_allclose(affine["kernel"], want[:-1], atol=1e-3)
  with pytest.raises(ValueError, match="no closed form.*affine"):
    ladder.fit_from_stats("mlp", stats)
  # norm_affine with a batch norm: the channels' own statistics, then least squares on
  # the standardised features -- the same function as the affine fit.
  normed = ladder.fit_from_stats("norm_affine", stats, ridge=0.0, options={"norm": "batch"})
  np.testing.assert_allclose(normed["mean"], x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(normed["var"], x.var(0), rtol=1e-4)
  got = np.asarray(ladder.apply("norm_affine", normed, x.astype(np.float32)))
  np.testing.assert_allclose(got, xs @ want, atol=2e-3)
  standardised = (x - x.mean(0)) / np.sqrt(x.var(0) + ladder.EPS)
  np.testing.assert_allclose(  # the statistics are fixed: not this batch's
      np.asarray(ladder.apply("norm_affine", dict(normed, kernel=np.eye(6, dtype=np.float32),
                                                   bias=np.zeros(6, np.float32)),
                              x[:3].astype(np.float32))), standardised[:3], atol=1e-4)
  with pytest.raises(ValueError, match="no closed form"):
    ladder.fit_from_stats("norm_affine", stats)  # LayerNorm: none


def test_self_stitch_recovers_accuracy_with_every_map_that_expresses_the_identity(donor):
  """Closed forms exactly; the maps without one (norm_affine, mlp: the points are
  post-ReLU, so a ReLU layer can pass them through) trained by FuLA from random starts."""
  *_, own = donor
  res = _sweep(donor, objectives=["dm"],
               map="identity,permutation,diagonal,orthogonal,affine", steps=0,
               pairs="fc2->fc2")
  for name in ("dm", "dm@identity", "dm@permutation", "dm@diagonal", "dm@orthogonal"):
    np.testing.assert_allclose(res.values[name]["accuracy"][1, 1], own, atol=1e-9,
                               err_msg=name)
  trained = _sweep(donor, objectives=["fula"], map=["norm_affine", "mlp"], steps=300,
                   pairs="fc1->fc1")
  for name in ("fula@norm_affine", "fula@mlp"):
    assert trained.values[name]["accuracy"][0, 0] >= own - 0.03, (
        name, trained.values[name]["accuracy"], own)


def test_rank_one_scores_below_full_rank_and_maps_keep_their_form(donor):
  res = _sweep(donor, objectives=["dm", "tlm"], map=["affine", "lowrank", "orthogonal"],
               map_options={"rank": 1}, steps=60, init="random", pairs="fc2->fc2")
  assert (res.values["dm@lowrank"]["accuracy"][1, 1] <
          res.values["dm"]["accuracy"][1, 1] - 0.2)
  for (obj, row, col), p in res.params.items():
    if obj == "tlm@lowrank":
      assert p["u"].shape == (12, 1) and p["v"].shape == (1, 12)
    if obj == "tlm@orthogonal":  # trained by projected steps: still an isometry
      np.testing.assert_allclose(p["kernel"].T @ p["kernel"], np.eye(12), atol=1e-4)


def test_dm_without_a_closed_form_and_identity_across_widths_are_nan_with_reasons(donor):
  import jax
  model, variables, train, test, _ = donor
  wide = models.get_model("mlp", widths=(16, 16))  # an end model of other widths
  wide_vars = models.init(wide, jax.random.PRNGKey(1), (1,) + train.images.shape[1:])
  res = stitching.run_sweep(model, variables, wide, wide_vars, train, test,
                            dict(BASE, objectives=["dm"], map=["mlp", "identity"], steps=0,
                                 pairs="fc1->fc1"))
  assert np.isnan(res.values["dm@mlp"]["accuracy"][0, 0])
  assert "no closed form" in res.reasons["dm@mlp"]["fc1->fc1"]
  assert np.isnan(res.values["dm@identity"]["accuracy"][0, 0])
  assert "equal widths" in res.reasons["dm@identity"]["fc1->fc1"]
  refined = _sweep(donor, objectives=["dm"], map="mlp", dm={"refine_epochs": 1.0},
                   pairs="fc1->fc1")
  assert np.isfinite(refined.values["dm@mlp"]["accuracy"][0, 0])


def test_norm_affine_batch_norm_holds_the_fitting_sets_statistics(donor):
  """norm='batch': DM solves it in closed form (the affine map's function), and a TLM
  stitch from a random start gets the channel statistics of f's activations over the
  fitting examples (here the whole training split), which training leaves fixed."""
  model, variables, train, *_ = donor
  res = _sweep(donor, objectives=["dm", "tlm"], map=["affine", "norm_affine"],
               map_options={"norm": "batch"}, steps=30, init="random",
               lstsq_examples=len(train), pairs="fc1->fc1")
  np.testing.assert_allclose(res.values["dm@norm_affine"]["accuracy"][0, 0],
                             res.values["dm"]["accuracy"][0, 0], atol=1.01 / 200)
  acts = np.asarray(models.forward(model, variables, train.images, end="fc1"), np.float64)
  p = res.params[("tlm@norm_affine", "fc1", "fc1")]
  np.testing.assert_allclose(p["mean"], acts.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p["var"], acts.var(0), rtol=1e-3, atol=1e-5)
  assert np.isfinite(res.values["tlm@norm_affine"]["accuracy"][0, 0])
  with pytest.raises(Exception, match="Valid choices: layer, batch"):
    _sweep(donor, objectives=["tlm"], map="norm_affine", map_options={"norm": "group"})


def test_mlp_hidden_width_follows_each_front_in_a_shared_unit(donor):
  """hidden=0 means max(C_in, C_out) per stitch; fronts of 6 and 16 channels share one
  unit (padded to 16 hidden units) and train exactly as each would alone."""
  import jax
  model, variables, train, test, _ = donor
  front = models.get_model("mlp", widths=(6, 16))
  front_vars = models.init(front, jax.random.PRNGKey(2), (1,) + train.images.shape[1:])
  cfg = dict(BASE, objectives=["tlm"], map="mlp", steps=20, pairs="fc1->fc1,fc2->fc1")
  together = stitching.run_sweep(front, front_vars, model, variables, train, test, cfg,
                                 keep_params=True)
  alone = stitching.run_sweep(front, front_vars, model, variables, train, test,
                              dict(cfg, grouping="single"), keep_params=True)
  assert together.stats["units_computed"] == 1 and alone.stats["units_computed"] == 2
  np.testing.assert_allclose(together.values["tlm@mlp"]["accuracy"],
                             alone.values["tlm@mlp"]["accuracy"], atol=1e-9)
  w1 = together.params[("tlm@mlp", "fc1", "fc1")]["w1"]
  assert w1.shape == (6, 16) and not w1[:, 12:].any()  # its own 12 hidden units only


def test_map_entries_with_their_own_options_give_a_capacity_curve_in_one_run(donor):
  """'lowrank:rank=1,lowrank:rank=4': one matrix per rank, each equal to a run with that
  rank as the shared map_options."""
  res = _sweep(donor, objectives=["dm"], map="lowrank:rank=1,lowrank:rank=4,affine",
               steps=0, pairs="fc2->fc2")
  assert sorted(res.values) == ["dm", "dm@lowrank:rank=1", "dm@lowrank:rank=4"]
  for rank in (1, 4):
    alone = _sweep(donor, objectives=["dm"], map="lowrank", map_options={"rank": rank},
                   steps=0, pairs="fc2->fc2")
    np.testing.assert_allclose(res.values[f"dm@lowrank:rank={rank}"]["accuracy"],
                               alone.values["dm@lowrank"]["accuracy"], atol=1e-9)
  u = {k[0]: p["u"].shape for k, p in res.params.items() if "u" in p}
  assert u == {"dm@lowrank:rank=1": (12, 1), "dm@lowrank:rank=4": (12, 4)}
  # The tidy table keys each result by objective and map, as two columns.
  table = res.table()
  assert set(zip(table["objective"], table["map"])) == {
      ("dm", "affine"), ("dm", "lowrank:rank=1"), ("dm", "lowrank:rank=4")}
  for key, form in (("dm", "affine"), ("dm@lowrank:rank=4", "lowrank:rank=4")):
    i, j = res.rows.index("fc2"), res.cols.index("fc2")
    cell = table[(table["map"] == form) & (table["measure"] == "accuracy")
                 & (table["row"] == "fc2") & (table["col"] == "fc2")]
    assert cell["value"].tolist() == [res.values[key]["accuracy"][i, j]]
  skipped = table[(table["row"] == "fc1") & (table["col"] == "fc2")]
  assert skipped["value"].isna().all()
  assert (skipped["reason"] == stitching.api.NOT_REQUESTED).all()
  with pytest.raises(Exception, match="Did you mean 'rank'"):
    _sweep(donor, objectives=["dm"], map="lowrank:rnak=4", steps=0)


def test_affine_l1_penalty_shrinks_the_kernel(donor):
  plain = _sweep(donor, objectives=["tlm"], steps=60, init="random", pairs="fc2->fc2")
  sparse = _sweep(donor, objectives=["tlm"], map_options={"l1": 0.5}, steps=60,
                  init="random", pairs="fc2->fc2")
  assert "tlm@affine" in sparse.values
  l1 = lambda res, obj: sum(np.abs(p["kernel"]).sum() for k, p in res.params.items()
                            if k[0] == obj)
  assert l1(sparse, "tlm@affine") < 0.5 * l1(plain, "tlm")


def test_a_list_of_maps_writes_one_matrix_each_and_resumes_each_on_its_own(donor, tmp_path):
  first = _sweep(donor, str(tmp_path), objectives=["dm"], map=["affine", "lowrank"],
                 map_options={"rank": 2}, steps=0)
  assert first.stats["stitches_computed"] == 4  # 2 maps x 2 diagonal cells
  names = set(first.matrices())
  assert {"stitch_dm/accuracy", "stitch_dm@lowrank/accuracy"} <= names
  again = _sweep(donor, str(tmp_path), objectives=["dm"],
                 map=["affine", "lowrank", "orthogonal"], map_options={"rank": 2}, steps=0)
  assert again.stats["stitches_computed"] == 2 and again.stats["stitches_resumed"] == 4
  for name in ("dm", "dm@lowrank"):
    np.testing.assert_array_equal(again.values[name]["accuracy"],
                                  first.values[name]["accuracy"])
  other_rank = _sweep(donor, str(tmp_path), objectives=["dm"], map=["lowrank"],
                      map_options={"rank": 3}, steps=0)
  assert other_rank.stats["stitches_computed"] == 2  # the rank is in the fingerprint
  with pytest.raises(Exception, match="lowrank"):
    _sweep(donor, objectives=["dm"], map=["low_rank"])


def test_fit_gap_scores_each_stitch_where_it_was_fitted_and_reports_the_gap(donor):
  """Cross-validated stitching: the identity map (exactly the end model) scores the end
  model's own accuracy on the first examples of the fitting split, and the gap is the
  difference to the held-out accuracy."""
  model, variables, train, test, own = donor
  res = _sweep(donor, objectives=["dm"], map="identity", steps=0, pairs="fc2->fc2",
               fit_gap_examples=250)
  fitted = testing.accuracy(model, variables, train.take(250))
  vals = res.values["dm@identity"]
  assert vals["accuracy@fit"][1, 1] == pytest.approx(fitted)
  assert vals["fit_gap"][1, 1] == pytest.approx(fitted - own)
  assert "stitch_dm@identity/fit_gap" in res.matrices()
  with pytest.raises(Exception, match="'fit'"):
    stitching.run_sweep(model, variables, model, variables, train, test,
                        dict(BASE, objectives=["dm"], fit_gap_examples=10),
                        eval_sets={"fit": test})


def test_ood_scores_per_cell_are_in_distribution_for_a_self_stitch_and_not_from_noise(
    donor):
  """energy_ood and mahalanobis_ratio against the end model's own reference: the exact
  identity stitch matches g's own numbers (recomputed here with NumPy from g's energies
  and activations), a random map from a random front is far out of distribution."""
  import jax
  model, variables, train, test, _ = donor
  res = _sweep(donor, objectives=["dm"], map="identity", steps=0, pairs="fc2->fc2",
               ood_examples=400)
  energy = lambda x: -np.log(np.exp(np.asarray(
      models.forward(model, variables, x), np.float64)).sum(-1))
  threshold = np.quantile(energy(train.take(400).images), 0.95)
  own_rate = np.mean(energy(test.images) > threshold)
  vals = res.values["dm@identity"]
  assert vals["energy_ood"][1, 1] == pytest.approx(own_rate, abs=1e-6)
  assert vals["mahalanobis_ratio"][1, 1] == pytest.approx(1.0, rel=1e-4)
  noise = models.get_model("mlp", widths=(12, 12))
  noise_vars = models.init(noise, jax.random.PRNGKey(7), (1,) + train.images.shape[1:])
  far = stitching.run_sweep(noise, noise_vars, model, variables, train, test,
                            dict(BASE, objectives=["tlm"], steps=0, init="random",
                                 pairs="fc2->fc2", ood_examples=400))
  assert far.values["tlm"]["mahalanobis_ratio"][1, 1] > 5.0
  assert "stitch_tlm/energy_ood" in far.matrices()
  # The reference enters evaluation as the warm-up compiled it (replicated over the
  # mesh), so no evaluation program compiles a second time.
  assert far.stats["programs_compiled_late"] == 0


def test_units_hold_objective_and_map_as_two_axes_and_pgd_is_shared_by_objectives(donor):
  """Every (objective, map) trains with that objective's loss through that map, and a
  stitched model under attack does not depend on what trained it: one PGD program per
  (end point, map), whatever the objectives."""
  model, variables, train, test, _ = donor
  profile = {}
  res = stitching.run_sweep(
      model, variables, model, variables, train, test,
      dict(BASE, objectives=["tlm", "fula"], map=["affine", "lowrank"], steps=2,
           pgd=dict(enabled=True, eps=0.1, step_size=0.03, steps=1, num_examples=100)),
      profile=profile)
  assert sorted(res.values) == ["fula", "fula@lowrank", "tlm", "tlm@lowrank"]
  trained = {(ctx.objective.name, ctx.fmap.key) for name, ctx, _ in profile
             if name == "train_step"}
  assert trained == {(o, m) for o in ("tlm", "fula") for m in ("affine", "lowrank")}
  attacked = [ctx for name, ctx, _ in profile if name == "pgd_correct"]
  assert {ctx.unit.objective for ctx in attacked} == {None}
  assert sorted((ctx.unit.end, ctx.unit.fmap.key) for ctx in attacked) == sorted(
      (c, m) for c in res.cols for m in ("affine", "lowrank"))
  for key in res.values:  # the diagonal cells, each attacked
    assert np.isfinite(np.diag(res.values[key]["pgd_accuracy"])).all(), key
