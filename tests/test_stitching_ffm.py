"""Final-feature matching (ffm): the stitch matches g's last point only."""

import numpy as np

from fula_jax import models, stitching
from fula_jax.stitching import objectives, testing


def test_ffm_matches_only_the_last_point_and_self_stitches_reach_own_accuracy():
  points = ["fc1", "fc2", "fc3"]
  ffm = objectives.get("ffm", {})
  assert ffm.targets(points, "fc1") == ("fc3",) and ffm.train_end(points, "fc1") == "fc3"
  assert objectives.get("fula", {}).targets(points, "fc1") == ("fc1", "fc2", "fc3")
  train, test = testing.digits_splits(600, 200)
  model = models.get_model("mlp", widths=(16, 16, 16))
  v = testing.train_donor(model, train, steps=300, lr=3e-3)
  own = testing.accuracy(model, v, test)
  res = stitching.run_sweep(model, v, model, v, train, test, dict(
      objectives=["ffm", "fula"], pairs="diagonal", steps=400, learning_rate=1e-2,
      batch_size=100, eval_batch_size=100, progress=False))
  assert np.all(np.diag(res.values["ffm"]["accuracy"]) >= own - 0.03)
  # At the last point both objectives are the same loss on the same stitch.
  np.testing.assert_allclose(res.values["ffm"]["loss"][2, 2],
                             res.values["fula"]["loss"][2, 2], rtol=1e-5)


def test_ffm_options_come_from_the_sweep_config():
  from fula_jax.stitching import settings
  sci, _, _ = settings.split({"objectives": ["ffm"], "ffm": {"squared": True}})
  ffm = sci.arm("ffm").objective
  assert ffm.squared and ffm.normalise == "example"


def test_ffm_then_tlm_switches_loss_at_its_share_of_the_steps():
  """loss_at is FFM's loss before switch * steps and the task loss from there on, each
  equal to that objective's own loss; scored by the task loss."""
  import jax
  from fula_jax.models.base import LOGITS
  sched = objectives.get("ffm_tlm", {"ffm": {"switch": 0.25}})
  assert sched.switch == 0.25 and sched.train_end(["a", "b"], "a") == LOGITS
  rng = np.random.default_rng(0)
  outs = {"b": rng.normal(size=(8, 5)).astype(np.float32),
          LOGITS: rng.normal(size=(8, 10)).astype(np.float32)}
  shared = {"label": rng.integers(0, 10, 8), "teacher": outs[LOGITS],
            "targets": {"b": rng.normal(size=(8, 5)).astype(np.float32)}}
  where = objectives.Where("a", ("a", "b"))
  ffm_loss = float(objectives.get("ffm", {}).loss(outs, shared, where))
  tlm_loss = float(objectives.get("tlm", {}).loss(outs, shared, where))
  at = jax.jit(lambda s: sched.loss_at(outs, shared, where, s, 100))
  assert abs(ffm_loss - tlm_loss) > 0.1
  np.testing.assert_allclose([float(at(0)), float(at(24))], ffm_loss, rtol=1e-5)
  np.testing.assert_allclose([float(at(25)), float(at(99))], tlm_loss, rtol=1e-5)
  train, test = testing.digits_splits(600, 200)
  model = models.get_model("mlp", widths=(16, 16))
  v = testing.train_donor(model, train, steps=300, lr=3e-3)
  res = stitching.run_sweep(model, v, model, v, train, test, dict(
      objectives=["ffm_tlm"], pairs="fc1->fc1", steps=200, learning_rate=1e-2,
      batch_size=100, eval_batch_size=100, progress=False, compilation_cache="off"))
  assert res.values["ffm_tlm"]["accuracy"][0, 0] >= testing.accuracy(model, v, test) - 0.03
