"""The second-generation engine: one program per (end point, objective) gives the same
matrices as per-shape groups and as one stitch at a time; PGD inside the engine equals
PGD on each stitched model built by hand; the plan is pure; the package keeps its
architecture (small files, no import from train/ into stitching/)."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fula_jax import attacks, models, sharding, stitching
from fula_jax.stitching import maps, plan, testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
# No test here reads the end model's self-stitch baselines (one more stitch per unit);
# test_stitching_convergence checks them.
BASE = dict(batch_size=100, eval_batch_size=100, progress=False,
            compilation_cache="off", baselines=False)


def _one_device():
  return sharding.line_mesh("devices", sharding.devices(1))


@pytest.fixture(scope="module")
def digits():
  return testing.digits_splits(400, 100)


@pytest.fixture(scope="module")
def cnns(digits):
  """Two small CNNs whose points have three different shapes (8x8x4, 4x4x8, 8)."""
  a = models.get_model("cnn", widths=(4, 8))
  b = models.get_model("cnn", widths=(6, 10))
  return ((a, testing.train_donor(a, digits[0], steps=150, lr=1e-2)),
          (b, testing.train_donor(b, digits[0], steps=150, lr=1e-2, seed=1)))


def _run(cnns, digits, **cfg):
  (a, va), (b, vb) = cnns
  return stitching.run_sweep(a, va, b, vb, *digits, dict(BASE, **cfg),
                             mesh=_one_device(), keep_params=True)


def test_merged_groups_equal_per_shape_groups_and_single_stitches(cnns, digits):
  cfg = dict(objectives=["tlm", "fula", "dm"], steps=6, learning_rate=3e-3,
             init="lstsq", lstsq_examples=200, dm={"num_examples": 200})
  merged = _run(cnns, digits, **cfg)
  shaped = _run(cnns, digits, grouping="shape", **cfg)
  single = _run(cnns, digits, grouping="single", max_group_size=1,
                max_stitches_per_wave=1, **cfg)
  # conv1 and conv2 of A (8x8x4 and 4x4x8) share one unit per end point and objective.
  ends = 2  # spatial end points conv1, conv2 (vectors go to 'pool' alone)
  assert merged.stats["units_computed"] == 3 * (ends + 1)
  assert shaped.stats["units_computed"] == 3 * (2 * ends + 1)
  assert single.stats["units_computed"] == 3 * 5
  for other in (shaped, single):
    for obj in cfg["objectives"]:
      for m in ("accuracy", "loss", "dm_error", "train_loss"):
        np.testing.assert_allclose(merged.values[obj][m], other.values[obj][m],
                                   rtol=2e-4, atol=1e-5 if m != "accuracy" else 0.011,
                                   err_msg=f"{obj}/{m}")
    for key, p in merged.params.items():
      for k in ("kernel", "bias"):
        np.testing.assert_allclose(p[k], other.params[key][k], rtol=1e-4, atol=1e-5)
  # Kept parameters have each front's own width: the padding never leaves the engine.
  assert merged.params[("tlm", "conv2", "conv1")]["kernel"].shape == (8, 6)
  assert merged.params[("tlm", "conv1", "conv1")]["kernel"].shape == (4, 6)


def test_merged_unit_computes_each_stitch_as_written(cnns, digits):
  """Each cell's accuracy equals f to the point, the kept map (bilinear resize plus
  1x1 conv, in NumPy), then g from the end point."""
  (a, va), (b, vb) = cnns
  _, test = digits
  res = _run(cnns, digits, objectives=["tlm"], steps=4, cols=["conv1"])
  for i, row in enumerate(("conv1", "conv2")):
    p = res.params[("tlm", row, "conv1")]
    x = np.asarray(models.forward(a, va, test.images, end=row))
    x = np.asarray(jax.image.resize(x, (len(x), 8, 8, x.shape[-1]), "bilinear"))
    z = np.einsum("bhwc,cd->bhwd", x, p["kernel"]) + p["bias"]
    logits = models.forward(b, vb, jnp.asarray(z, jnp.float32), start="conv1")
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == test.labels))
    assert res.values["tlm"]["accuracy"][i, 0] == pytest.approx(acc, abs=1.01 / 100)


def test_pgd_in_the_engine_equals_pgd_on_each_stitched_model(cnns, digits):
  (a, va), (b, vb) = cnns
  _, test = digits
  pgd = dict(enabled=True, eps=0.1, step_size=0.03, steps=3, num_examples=60)
  res = _run(cnns, digits, objectives=["tlm"], cols=["conv2"], pgd=pgd, steps=150,
             learning_rate=1e-2, eval_batch_size=40)
  tlm = res.values["tlm"]
  assert np.isfinite(tlm["pgd_accuracy"][:2, 0]).all()
  n, batch = pgd["num_examples"], 40
  for i, row in enumerate(("conv1", "conv2")):
    p = {k: jnp.asarray(v) for k, v in res.params[("tlm", row, "conv2")].items()}
    spec = maps.plan(row, models.point_shapes(a, (1, 8, 8, 1))[row].shape[1:], "conv2",
                     (4, 4, 10))

    def stitched(x):
      return models.forward(b, vb, maps.apply(spec, p, models.forward(a, va, x, end=row)),
                            start="conv2")

    key = plan.cell_rng(1, row, "conv2")  # the sweep's seed 0, plus one
    correct = 0.0
    for k, lo in enumerate(range(0, n, batch)):
      x = jnp.asarray(test.images[lo:min(lo + batch, n)])
      y = jnp.asarray(test.labels[lo:min(lo + batch, n)])
      kb = jax.random.fold_in(key, k)
      start = attacks.random_starts(kb, x, pgd["eps"], "linf", lo + jnp.arange(len(x)))
      adv = attacks.pgd(stitched, x, y, None, eps=pgd["eps"], step_size=pgd["step_size"],
                        steps=pgd["steps"], random_start=False, start=start)
      correct += float(jnp.sum(jnp.argmax(stitched(adv), -1) == y))
    assert tlm["pgd_accuracy"][i, 0] == pytest.approx(correct / n, abs=1.01 / n)
  # The matching layers stitch well, and the attack hurts.
  assert tlm["accuracy"][1, 0] > 0.5 and tlm["pgd_accuracy"][1, 0] < tlm["accuracy"][1, 0]


def test_pgd_is_the_same_over_8_devices(cnns, digits):
  (a, va), (b, vb) = cnns
  cfg = dict(BASE, objectives=["dm"], cols=["conv2"], eval_batch_size=40,
             pgd=dict(enabled=True, eps=0.1, step_size=0.03, steps=2, num_examples=80))
  one = stitching.run_sweep(a, va, b, vb, *digits, cfg, mesh=_one_device())
  eight = stitching.run_sweep(a, va, b, vb, *digits, cfg)
  assert eight.stats["devices"] == 8
  np.testing.assert_allclose(one.values["dm"]["pgd_accuracy"],
                             eight.values["dm"]["pgd_accuracy"], atol=1.01 / 80)


def test_plan_one_training_program_per_end_point_and_objective():
  shapes_a = {"a0": (8, 8, 4), "a1": (4, 4, 8), "a2": (2, 2, 16), "v": (16,)}
  shapes_b = {"b0": (8, 8, 6), "b1": (4, 4, 6), "bv": (10,)}
  cells = [(r, c) for r in ("a0", "a1", "a2") for c in ("b0", "b1")] + [("v", "bv")]

  class O:
    def __init__(self, name, decomposable=True):
      self.name, self.decomposable = name, decomposable

  objs = [O("tlm"), O("fula", decomposable=False)]
  kw = dict(shapes_a=shapes_a, shapes_b=shapes_b, trains={"tlm": True, "fula": True},
            num_devices=4, batch_sizes=(64, 128), bytes_per_stitch=lambda e, w: 1,
            budget_bytes=1e9, max_group_size=0, fingerprints={"tlm": "x", "fula": "y"})
  units = plan.plan(cells, objs, finished=set(), grouping="end", **kw)
  assert {(u.arm, u.end) for u in units} == {(o, e) for o in ("tlm", "fula")
                                            for e in ("b0", "b1", "bv")}
  u = next(u for u in units if u.arm == "tlm" and u.end == "b0")
  assert u.fronts == ("a0", "a1", "a2") and u.width == 16 and u.ways == 1
  f = next(u for u in units if u.arm == "fula" and u.end == "b0")
  assert f.ways == 4 and f.size == 4 and f.padded_fronts[-1] == "a0"
  # Finished cells are not planned again; a budget of one stitch splits the rest.
  done = {("tlm", "a0", "b0")}
  again = plan.plan(cells, objs[:1], finished=done, grouping="end",
                    **dict(kw, budget_bytes=1.0, num_devices=1))
  assert sorted(u.fronts for u in again if u.end == "b0") == [("a1",), ("a2",)]
  assert plan.stitch_ways(5, 8, (256,)) == 1
  assert plan.stitch_ways(5, 8, (100,)) == 2  # 100 splits 4 ways at most
  assert plan.stitch_ways(3, 8, (256,), batch_split_ok=False) == 8
  waves = plan.pack_waves(units, 8)
  assert [u for w in waves for u in w] == units
  assert all(sum(u.size for u in w) <= 8 or len(w) == 1 for w in waves)



def test_waves_grow_from_one_end_point_so_later_ones_compile_while_others_run():
  """With the ramp, the first wave holds the first end point's units and each later one
  at most twice the one before (within the budget), in the units' order; without it,
  waves fill the budget."""
  from types import SimpleNamespace as U
  units = [U(end=f"b{e}", size=3, k=(e, i)) for e in range(9) for i in range(3)]
  sizes = lambda waves: [sum(u.size for u in w) for w in waves]
  ramped = plan.pack_waves(units, 4096)
  assert sizes(ramped) == [9, 18, 36, 18]
  assert [u for w in ramped for u in w] == units
  assert {u.end for u in ramped[0]} == {"b0"}
  assert sizes(plan.pack_waves(units, 4096, ramp=False)) == [81]
  assert sizes(plan.pack_waves(units, 20)) == [9, 18, 18, 18, 18]
  assert sizes(plan.pack_waves(units, 1)) == [3] * 27  # a unit over the budget: alone
  assert plan.pack_waves([], 8) == []

def test_stitching_package_keeps_its_architecture():
  """Small files (about 400 lines at most), and train/ never imports stitching/ (the
  mesh helpers live in fula_jax/sharding.py)."""
  for path in (ROOT / "fula_jax" / "stitching").glob("*.py"):
    assert len(path.read_text().splitlines()) <= 410, path.name
  for path in (ROOT / "fula_jax" / "train").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n.startswith("fula_jax.stitching") for n in names), path.name
