"""The sweep engine in one process: self-stitching, vmap vs one-by-one, sharding over
the 8 fake devices, divergence, unstitchable cells, resume from finished units."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from scipy import special

from fula_jax import models, sharding, stitching
from fula_jax.similarity import outputs
from fula_jax.stitching import maps, stacks, testing

# No test here reads the end model's self-stitch baselines (one more stitch per unit);
# test_stitching_convergence checks them.
BASE = dict(batch_size=100, eval_batch_size=100, progress=False, baselines=False)


@pytest.fixture(scope="module")
def digits():
  return testing.digits_splits(600, 200)


@pytest.fixture(scope="module")
def mlp(digits):
  """A trained MLP whose three points share one shape (so groups hold 3 fronts)."""
  model = models.get_model("mlp", widths=(16, 16, 16))
  return model, testing.train_donor(model, digits[0], steps=300, lr=3e-3)


@pytest.fixture(scope="module")
def mlp_b(digits):
  model = models.get_model("mlp", widths=(16, 16, 16))
  return model, testing.train_donor(model, digits[0], steps=300, lr=3e-3, seed=1)


def _one_device():
  return sharding.line_mesh("devices", sharding.devices(1))


def test_self_stitching_dm_recovers_identity(digits):
  """A conv net with BatchNorm (inference mode) stitched into itself, same points."""
  train, test = digits
  model = models.get_model("cnn", widths=(6, 8))
  variables = models.init(model, jax.random.PRNGKey(3), (1, 8, 8, 1))
  res = stitching.run_sweep(model, variables, model, variables, train, test,
                          dict(BASE, objectives=["dm"], pairs="diagonal"),
                          mesh=_one_device(), keep_params=True)
  acts = models.capture(model, variables, train.images)[1]
  for point in model.point_names:
    p = res.params[("dm", point, point)]
    a = np.asarray(acts[point]).reshape(-1, p["kernel"].shape[0])
    live = a.std(0) > 1e-6  # dead ReLU channels: any weight row fits, lstsq picks 0
    assert live.sum() >= 2
    np.testing.assert_allclose(p["kernel"][np.ix_(live, live)], np.eye(live.sum()),
                               atol=1e-3)
    np.testing.assert_allclose(p["bias"][live], 0.0, atol=1e-3)
  dm = res.values["dm"]
  np.testing.assert_allclose(np.diag(dm["dm_error"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.diag(dm["accuracy"]), res.end_accuracy, atol=1.5 / 200)
  np.testing.assert_allclose(np.diag(dm["relative_accuracy"]), 1.0, atol=0.02)
  np.testing.assert_allclose(np.diag(dm["disagreement"]), 0.0, atol=1.01 / 200)
  np.testing.assert_allclose(np.diag(dm["jsd"]), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.diag(dm["error_consistency"]), 1.0, atol=0.03)


def test_self_stitching_every_objective_reaches_own_accuracy(digits, mlp):
  model, variables = mlp
  train, test = digits
  own = testing.accuracy(model, variables, test)
  assert own > 0.85
  res = stitching.run_sweep(model, variables, model, variables, train, test,
                          dict(BASE, pairs="diagonal", rows=["fc2", "fc3"],
                               cols=["fc2", "fc3"], steps=1000, learning_rate=1e-2),
                          mesh=_one_device())
  assert res.end_accuracy == pytest.approx(own)
  for name in ("tlm", "slm", "dm", "fula"):
    acc = np.diag(res.values[name]["accuracy"])
    assert np.all(acc >= own - 0.03), (name, acc, own)
  fula = np.diag(res.values["fula"]["dm_error"])
  assert np.all(fula < 0.05)


def _sweep(a, b, digits, cfg, workdir=None, **kw):
  return stitching.run_sweep(a[0], a[1], b[0], b[1], *digits, dict(BASE, **cfg), workdir,
                           **kw)


def _assert_same(r1, r2, measures=("accuracy", "loss", "dm_error", "train_loss")):
  assert r1.values.keys() == r2.values.keys()
  for obj in r1.values:
    for m in measures:
      np.testing.assert_allclose(r1.values[obj][m], r2.values[obj][m], rtol=2e-4,
                                 atol=1e-5 if m != "accuracy" else 1.01 / 200,
                                 err_msg=f"{obj}/{m}")


def test_vmapped_group_equals_stitches_trained_one_by_one(digits, mlp, mlp_b):
  cfg = dict(objectives=["tlm", "fula"], steps=12, learning_rate=3e-3, cols=["fc2"])
  together = _sweep(mlp, mlp_b, digits, cfg, mesh=_one_device(),
                    keep_params=True)
  assert together.stats["units_computed"] == 2  # 3 fronts each, one unit per objective
  alone = _sweep(mlp, mlp_b, digits,
                 dict(cfg, grouping="single", max_group_size=1, max_stitches_per_wave=1),
                 mesh=_one_device(), keep_params=True)
  assert alone.stats["units_computed"] == 6
  assert alone.stats["waves"] == 6
  _assert_same(together, alone)
  for key, p in together.params.items():
    np.testing.assert_allclose(p["kernel"], alone.params[key]["kernel"], rtol=1e-4,
                               atol=1e-5)
  # A memory budget below one group's plan splits it; the numbers do not change.
  split = _sweep(mlp, mlp_b, digits, dict(cfg, memory_budget_mb=1e-3),
                 mesh=_one_device())
  assert split.stats["units_computed"] == 6
  _assert_same(together, split)
  for res in (together, alone, split):
    assert res.stats["programs_compiled_late"] == 0  # all compiled ahead, in parallel
    assert 0 <= res.stats["compile_seconds_blocking"] <= res.stats["seconds"]
  # Waves 2-6 of `alone` compiled in the background while the one before ran; compiling
  # each wave only when it starts gives the same numbers.
  serial = _sweep(mlp, mlp_b, digits,
                  dict(cfg, grouping="single", max_group_size=1, max_stitches_per_wave=1,
                       parallel_compile=False), mesh=_one_device())
  _assert_same(alone, serial)
  assert serial.stats["programs_compiled_late"] == 0
  # Output measures of each stitched model against the end model, from its own logits.
  test = digits[1]
  acts = models.capture(mlp[0], mlp[1], test.images)[1]
  teacher = models.forward(mlp_b[0], mlp_b[1], test.images)
  for i, row in enumerate(mlp[0].point_names):
    p = together.params[("tlm", row, "fc2")]
    z = np.asarray(acts[row]) @ p["kernel"] + p["bias"]
    logits = models.forward(mlp_b[0], mlp_b[1], z, start="fc2")
    for name in ("disagreement", "jsd", "error_consistency"):
      assert together.values["tlm"][name][i, 0] == pytest.approx(
          outputs.compute(name, logits, teacher, test.labels), rel=1e-4, abs=1e-6), name


def test_one_evaluation_program_scores_every_objective_and_each_reads_its_own(
    digits, mlp, mlp_b):
  """The units of all four objectives through one map and shapes share one evaluation
  program (each objective compiled its own before); each objective's numbers equal its
  sweep alone, and its held-out loss is its own, recomputed here in NumPy from the
  stitched model."""
  model, variables = mlp
  test = digits[1]
  cfg = dict(steps=8, learning_rate=3e-3, cols=["fc2"])
  profile = {}
  together = _sweep(mlp, mlp_b, digits, dict(cfg, objectives=["tlm", "slm", "dm", "fula"]),
                    mesh=_one_device(), keep_params=True, profile=profile)
  programs = [key[0] for key in profile]
  assert programs.count("evaluate") == 1 and programs.count("train_step") == 3, programs
  for obj in ("tlm", "fula"):
    alone = _sweep(mlp, mlp_b, digits, dict(cfg, objectives=[obj]), mesh=_one_device())
    _assert_same(alone, dataclasses.replace(together, values={obj: together.values[obj]}))
  acts = models.capture(model, variables, test.images)[1]
  target = models.capture(mlp_b[0], mlp_b[1], test.images)[1]
  labels = np.asarray(test.labels)
  for i, row in enumerate(model.point_names):
    p = together.params[("tlm", row, "fc2")]
    z = np.asarray(acts[row]) @ p["kernel"] + p["bias"]
    logp = special.log_softmax(
        np.asarray(models.forward(mlp_b[0], mlp_b[1], z, start="fc2"), np.float64), 1)
    assert together.values["tlm"]["loss"][i, 0] == pytest.approx(
        -logp[np.arange(len(labels)), labels].mean(), rel=1e-4)
    p = together.params[("fula", row, "fc2")]
    z2 = np.asarray(acts[row]) @ p["kernel"] + p["bias"]
    z3 = np.asarray(mlp_b[0].apply(mlp_b[1], z2, start="fc2", end="fc3"))
    fula = sum(np.mean(np.linalg.norm(z - np.asarray(target[q]), axis=1) /
                       np.linalg.norm(np.asarray(target[q]), axis=1))
               for z, q in ((z2, "fc2"), (z3, "fc3")))
    assert together.values["fula"]["loss"][i, 0] == pytest.approx(fula, rel=1e-4)


def test_sharded_over_8_devices_equals_one_device(digits, mlp, mlp_b):
  assert jax.device_count() == 8
  cfg = dict(objectives=["tlm", "dm", "fula"], steps=8, learning_rate=3e-3,
             init="lstsq", lstsq_examples=200, dm={"num_examples": 300},
             cols=["fc1", "fc3"])
  one = _sweep(mlp, mlp_b, digits, cfg, mesh=_one_device())
  eight = _sweep(mlp, mlp_b, digits, cfg)
  assert eight.stats["devices"] == 8
  _assert_same(one, eight)
  # Per-batch FuLA is not a mean over examples: its stitch axis alone is split (padded).
  cfg_b = dict(objectives=["fula"], steps=8, fula={"normalise": "batch"},
               cols=["fc3"])
  _assert_same(_sweep(mlp, mlp_b, digits, cfg_b, mesh=_one_device()),
               _sweep(mlp, mlp_b, digits, cfg_b))


def test_dm_gradient_refinement_starts_from_the_closed_form(digits, mlp, mlp_b):
  cfg = dict(objectives=["dm"], cols=["fc3"], learning_rate=1e-4)
  closed = _sweep(mlp, mlp_b, digits, cfg, mesh=_one_device())
  refined = _sweep(mlp, mlp_b, digits, dict(cfg, dm={"refine_epochs": 1.0}),
                   mesh=_one_device())
  assert np.isnan(closed.values["dm"]["train_loss"]).all()  # nothing was trained
  assert np.isfinite(refined.values["dm"]["train_loss"]).all()
  # Least squares is the optimum on the training rows: small steps stay close to it.
  np.testing.assert_allclose(refined.values["dm"]["loss"], closed.values["dm"]["loss"],
                             rtol=0.05)
  assert not np.array_equal(refined.values["dm"]["loss"], closed.values["dm"]["loss"])


def test_divergent_stitch_marks_only_its_cell(digits, mlp, mlp_b):
  cfg = dict(objectives=["tlm", "dm"], steps=5, cell_lr={"fc1->fc2": float("inf")},
             cols=["fc2"])
  res = _sweep(mlp, mlp_b, digits, cfg)
  tlm = res.values["tlm"]["accuracy"]
  assert np.isnan(tlm[0, 0])
  assert np.isfinite(tlm[1:, 0]).all()
  assert np.isfinite(res.values["tlm"]["loss"]).sum() == 2
  assert "diverged" in res.reasons["tlm"]["fc1->fc2"]
  assert "step 0" in res.reasons["tlm"]["fc1->fc2"]
  assert np.isfinite(res.values["dm"]["accuracy"]).all()  # DM is not trained


def test_pgd_hook(digits, mlp, mlp_b):
  """With eps = 0 the attack is the identity: robust accuracy equals clean accuracy."""
  cfg = dict(objectives=["dm"], pairs="fc3->fc3", eval_batch_size=200,
             pgd={"enabled": True, "eps": 0.0, "steps": 2, "num_examples": 200})
  res = _sweep(mlp, mlp_b, digits, cfg, mesh=_one_device())
  dm = res.values["dm"]
  np.testing.assert_allclose(dm["pgd_accuracy"][2, 2], dm["accuracy"][2, 2])
  strong = _sweep(mlp, mlp_b, digits, dict(cfg, pgd=dict(cfg["pgd"], eps=0.3, steps=5,
                                                         step_size=0.1)),
                  mesh=_one_device())
  assert strong.values["dm"]["pgd_accuracy"][2, 2] < dm["accuracy"][2, 2] - 0.1


def test_eval_sets_score_every_stitch_on_extra_test_sets(tmp_path, digits, mlp, mlp_b):
  """An extra set equal to the test split reproduces its accuracy; a blanked one is
  scored independently (checked against the stitched model run directly); and a
  sweep over other test data does not reuse finished cells."""
  import dataclasses
  train, test = digits
  blank = dataclasses.replace(test, images=np.where(
      np.arange(8)[None, :, None, None] < 4, 0.0, test.images).astype(np.float32),
      name="digits/test_left_half_blank")
  cfg = dict(objectives=["tlm", "dm"], pairs="fc2->fc2,fc3->fc3", steps=20)
  res = _sweep(mlp, mlp_b, digits, cfg, tmp_path, mesh=_one_device(),
               keep_params=True, eval_sets={"same": test, "blank": blank})
  for obj in ("tlm", "dm"):
    v = res.values[obj]
    np.testing.assert_array_equal(v["accuracy@same"], v["accuracy"])
    for i, point in ((1, "fc2"), (2, "fc3")):
      p = res.params[(obj, point, point)]
      z = models.forward(mlp[0], mlp[1], blank.images, end=point)
      logits = models.forward(mlp_b[0], mlp_b[1], z @ p["kernel"] + p["bias"],
                              start=point)
      direct = float(np.mean(np.argmax(logits, -1) == blank.labels))
      assert v["accuracy@blank"][i, i] == pytest.approx(direct, abs=1.01 / len(test))
  assert not np.allclose(res.values["tlm"]["accuracy@blank"][1, 1],
                         res.values["tlm"]["accuracy"][1, 1])
  own = testing.accuracy(mlp_b[0], mlp_b[1], blank)
  assert res.meta["end_accuracy_sets"]["blank"] == pytest.approx(own)
  assert res.meta["end_accuracy_sets"]["same"] == pytest.approx(res.end_accuracy)
  with pytest.raises(ValueError, match="letters, digits"):
    _sweep(mlp, mlp_b, digits, cfg, mesh=_one_device(), eval_sets={"a/b": test})
  other_test = _sweep(mlp, mlp_b, (train, blank), cfg, tmp_path, mesh=_one_device(),
                      eval_sets={"same": test, "blank": blank})
  assert other_test.stats["stitches_resumed"] == 0
  np.testing.assert_array_equal(other_test.values["tlm"]["accuracy"],
                                res.values["tlm"]["accuracy@blank"])


def test_random_init_is_fan_in_and_per_cell():
  p = stacks.random_init([300, 300, 300], 200, 300, 0, [1, 2, 1])
  assert p["kernel"].shape == (3, 300, 200) and not p["bias"].any()
  assert abs(float(np.var(p["kernel"][0])) * 300 - 1.0) < 0.05
  assert np.abs(p["kernel"]).max() <= 2.0 / 0.8796 / np.sqrt(300) + 1e-6
  np.testing.assert_array_equal(p["kernel"][0], p["kernel"][2])  # same cell, same init
  assert not np.allclose(p["kernel"][0], p["kernel"][1])


def test_unstitchable_cells(digits):
  train, test = digits
  cnn = models.get_model("cnn", widths=(4, 4))
  mlp = models.get_model("mlp", widths=(8,))
  vc = models.init(cnn, jax.random.PRNGKey(0), (1, 8, 8, 1))
  vm = models.init(mlp, jax.random.PRNGKey(1), (1, 8, 8, 1))
  with pytest.raises(maps.UnstitchableError) as e:
    stitching.run_sweep(cnn, vc, mlp, vm, train, test, dict(BASE, pairs="conv2->fc1"))
  assert "'conv2' (B, 4, 4, 4)" in str(e.value) and "'fc1' (B, 8)" in str(e.value)
  res = stitching.run_sweep(cnn, vc, mlp, vm, train, test,
                          dict(BASE, objectives=["dm"], pairs="all"), mesh=_one_device())
  m = res.values["dm"]["accuracy"]
  assert res.rows == ["conv1", "conv2", "pool"] and res.cols == ["fc1"]
  assert np.isnan(m[:2, 0]).all() and np.isfinite(m[2, 0])
  assert "cannot be stitched" in res.reasons["dm"]["conv1->fc1"]


def test_resume_recomputes_only_missing_units(tmp_path, digits, mlp, mlp_b):
  cfg = dict(objectives=["tlm", "slm"], steps=4, max_stitches_per_wave=6)
  first = _sweep(mlp, mlp_b, digits, cfg, tmp_path, mesh=_one_device())
  files = sorted((tmp_path / "stitch").glob("*/*.json"))
  assert len(files) == first.stats["units_computed"]  # one file per unit
  rec = json.loads(files[0].read_text())
  assert rec["cells"] and rec["fingerprint"]
  files[0].unlink()
  again = _sweep(mlp, mlp_b, digits, cfg, tmp_path, mesh=_one_device())
  assert again.stats["stitches_computed"] == len(rec["cells"])
  assert again.stats["stitches_resumed"] == 18 - len(rec["cells"])
  _assert_same(first, again)
  nothing = _sweep(mlp, mlp_b, digits, dict(cfg, pairs="diagonal"), tmp_path,
                   mesh=_one_device())
  assert nothing.stats["stitches_computed"] == 0
  np.testing.assert_allclose(np.diag(nothing.values["slm"]["loss"]),
                             np.diag(first.values["slm"]["loss"]), rtol=1e-6)
  changed = _sweep(mlp, mlp_b, digits, dict(cfg, learning_rate=5e-3, pairs="diagonal"),
                   tmp_path, mesh=_one_device())
  assert changed.stats["stitches_computed"] == 6  # a setting that changes the numbers


def test_sweep_returns_results_matrices(digits, mlp, mlp_b):
  from fula_jax import results
  mats = stitching.sweep(mlp[0], mlp[1], mlp_b[0], mlp_b[1], *digits,
                       dict(BASE, objectives=["dm"], pairs="offset:+1"),
                       name_a="mlp_s0", name_b="mlp_s1", mesh=_one_device())
  m = mats["stitch_dm/accuracy"]
  assert isinstance(m, results.Matrix)
  assert (m.rows, m.cols, m.model_a, m.model_b) == (["fc1", "fc2", "fc3"],
                                                    ["fc1", "fc2", "fc3"], "mlp_s0",
                                                    "mlp_s1")
  requested = np.zeros((3, 3), bool)
  requested[[0, 1], [1, 2]] = True
  assert np.isfinite(m.matrix[requested]).all() and np.isnan(m.matrix[~requested]).all()
  assert set(mats) >= {"stitch_dm/loss", "stitch_dm/dm_error", "stitch_dm/train_loss"}
