"""Every trained stitch says whether it converged: the rule on hand-made loss traces
(against a NumPy restatement of it), an under-trained sweep flagged and warned about,
and the library's defaults (a least-squares start) recovering a self-stitch with every
trained cell converged."""

import warnings

import numpy as np
import pytest

from fula_jax import models, stitching
from fula_jax.stitching import measures, testing


def readout(traces):
  """A Readout whose `trend` holds the quarter sums of each stitch's loss trace, as the
  training program accumulates them."""
  trend = np.zeros((len(traces), 3, 3), np.float32)
  for s, loss in enumerate(traces):
    loss = np.asarray(loss, np.float64)
    steps = len(loss)
    if not steps:
      continue
    q = max(steps // 4, 1)
    quarters = (loss[:q], loss[max(steps - 2 * q, 0):steps - q], loss[steps - q:])
    for slot, part in enumerate(quarters):
      trend[s, slot] = (len(part), part.sum(), (part ** 2).sum())
  nan = np.full(len(traces), np.nan)
  return measures.Readout({}, 1.0, 1.0, None, None, nan, None, trend)


def test_the_rule_on_known_traces():
  rng = np.random.default_rng(0)
  falling = np.linspace(2.0, 1.0, 40)                         # 19% per quarter
  traces = {
      "flat": 1.0 + 0.001 * rng.normal(size=40),
      "falling": falling,
      "noisy, slightly falling": falling[::-1][:40] * 0 + 1.0 - np.linspace(0, 0.08, 40)
      + 0.5 * rng.normal(size=40),                            # drop well inside the noise
      "near zero": np.linspace(0.004, 0.001, 40),             # FuLA at a self-stitch
      "too short": np.ones(4),
      # The last quarter's drop against 10% of the first-to-last gain (the relative
      # and absolute allowances are smaller here): 0.042 < 0.064, 0.055 < 0.061 and
      # 0.115 > 0.065 (where 5% of the loss is 0.065 too).
      "1/t (cross-entropy on separable data)": 2.0 / (1.0 + np.arange(100) / 5),
      "exponential over 4 time constants": 1.0 + np.exp(-np.arange(100) / 25),
      "exponential over 2 time constants": 1.0 + np.exp(-np.arange(100) / 50),
      "not trained": [],
  }
  got = dict(zip(traces, measures.Converged().value(readout(list(traces.values())))))
  assert got["flat"] == 1.0 and got["falling"] == 0.0
  assert got["noisy, slightly falling"] == 1.0 and got["near zero"] == 1.0
  assert got["too short"] == 0.0 and np.isnan(got["not trained"])
  assert got["1/t (cross-entropy on separable data)"] == 1.0
  assert got["exponential over 4 time constants"] == 1.0
  assert got["exponential over 2 time constants"] == 0.0
  trend = measures.LossTrend().value(readout([falling]))[0]
  want = (falling[20:30].mean() - falling[30:].mean()) / falling[20:30].mean()
  assert trend == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def donor():
  train, test = testing.digits_splits(600, 300)
  model = models.get_model("cnn", widths=(6, 8))
  # Trained to its plateau: a self-stitch of a model that can still improve keeps
  # lowering its TLM loss (it trains the model on), and the flag rightly says so.
  return model, testing.train_donor(model, train, steps=1000, lr=1e-2), train, test


def test_an_under_trained_sweep_is_flagged_and_warned_about(donor):
  model, v, train, test = donor
  with pytest.warns(stitching.ConvergenceWarning, match="6 of 6 trained stitches did "
                    "not converge .*Raise stitch.steps .*stitch.init='lstsq'"):
    mats = stitching.sweep(model, v, model, v, train, test,
                           dict(objectives=["tlm", "fula", "dm"], pairs="diagonal",
                                steps=2, init="random", progress=False))
  for obj in ("tlm", "fula"):
    conv = mats[f"stitch_{obj}/converged"]
    assert np.all(np.diag(conv.matrix) == 0.0)
    assert set(conv.meta["unconverged"]) == {f"{p}->{p}" for p in model.point_names}
    assert "fewer than 8 training steps" in conv.meta["reasons"]["conv1->conv1"]
  assert np.all(np.isnan(np.diag(mats["stitch_dm/converged"].matrix)))


def test_library_defaults_recover_a_self_stitch_and_converge(donor):
  """`stitching.sweep` with nothing but the objectives set, g = f: on the diagonal (the
  self-stitch) every objective recovers at least 0.95 of the model's own accuracy, and
  every trained diagonal cell is flagged converged. (A cross-layer TLM cell may still
  be learning; the warning then names only such cells.)"""
  model, v, train, test = donor
  own = testing.accuracy(model, v, test)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mats = stitching.sweep(model, v, model, v, train, test,
                           {"objectives": ["tlm", "slm", "dm", "fula"], "progress": False})
  for w in caught:
    if issubclass(w.category, stitching.ConvergenceWarning):
      for obj in ("tlm", "slm", "fula"):
        cells = mats[f"stitch_{obj}/converged"].meta["unconverged"]
        assert all(c.split("->")[0] != c.split("->")[1] for c in cells), cells
  for obj in ("tlm", "slm", "dm", "fula"):
    diag = np.diag(mats[f"stitch_{obj}/accuracy"].matrix)
    assert np.all(diag >= 0.95 * own), (obj, diag, own)
    conv = np.diag(mats[f"stitch_{obj}/converged"].matrix)
    assert np.all(conv == 1.0) if obj != "dm" else np.all(np.isnan(conv)), (obj, conv)


@pytest.fixture(scope="module")
def other(donor):
  """A second model of the donor's architecture (another seed): the end model."""
  model, _, train, _ = donor
  return testing.train_donor(model, train, steps=300, seed=1)


def test_every_sweep_carries_its_baselines(donor, other):
  """B's own accuracy, chance, and B's self-stitch at each of its points (trained with
  the same settings, equal to running that self-stitch directly); cells read relative
  to it through `analysis.relative_to_baseline`. Opt out with baselines=False, which
  changes no other number."""
  from fula_jax import analysis
  model, v, train, test = donor
  cfg = dict(objectives=["tlm", "dm"], steps=10, progress=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stitching.ConvergenceWarning)
    mats = stitching.sweep(model, v, model, other, train, test, cfg)
    alone = stitching.sweep(model, other, model, other, train, test,
                            dict(cfg, pairs="diagonal"))
    off = stitching.sweep(model, v, model, other, train, test, dict(cfg, baselines=False))
  for obj in ("tlm", "dm"):
    m = mats[f"stitch_{obj}/accuracy"]
    assert m.meta["chance"] == pytest.approx(0.1)
    assert m.meta["end_accuracy"] == pytest.approx(testing.accuracy(model, other, test))
    want = np.diag(alone[f"stitch_{obj}/accuracy"].matrix)
    np.testing.assert_allclose([m.meta["baseline"][c] for c in m.cols], want, atol=1e-6)
    rel = analysis.relative_to_baseline(m)
    np.testing.assert_allclose(rel.matrix, m.matrix / want[None, :], rtol=1e-6)
    assert off[f"stitch_{obj}/accuracy"].meta["baseline"] == {}
    np.testing.assert_array_equal(off[f"stitch_{obj}/accuracy"].matrix, m.matrix)
  with pytest.raises(ValueError, match="baselines=True"):
    analysis.relative_to_baseline(off["stitch_tlm/accuracy"])


def test_baselines_share_their_columns_units_and_resume_with_them(donor, other, tmp_path):
  """The self-stitch into column c trains in the units of the sweep's other stitches
  into c (one more stitch in programs the sweep compiles anyway), is written with them,
  and a rerun resumes it. PGD attacks the other stitches of those units, not it: their
  PGD accuracies equal those of a sweep without baselines, and its clean accuracy is
  the same as without the attack."""
  model, v, train, test = donor
  cfg = dict(objectives=["tlm", "dm"], steps=10, progress=False)
  n_cols = len(model.point_names)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", stitching.ConvergenceWarning)
    on = stitching.run_sweep(model, v, model, other, train, test, cfg, str(tmp_path))
    off = stitching.run_sweep(model, v, model, other, train, test,
                              dict(cfg, baselines=False))
    again = stitching.run_sweep(model, v, model, other, train, test, cfg, str(tmp_path))
    pgd = dict(cfg, pgd=dict(enabled=True, steps=2, num_examples=32))
    attacked = stitching.run_sweep(model, v, model, other, train, test, pgd)
    alone = stitching.run_sweep(model, v, model, other, train, test,
                                dict(pgd, baselines=False))
  assert on.stats["units_computed"] == off.stats["units_computed"] == 2 * n_cols
  assert on.stats["stitches_computed"] == off.stats["stitches_computed"] > 2 * n_cols
  assert on.stats["baseline_stitches_computed"] == 2 * n_cols
  assert off.stats["baseline_stitches_computed"] == 0 and off.meta["baseline_accuracy"] == {}
  for name in ("units_computed", "stitches_computed", "baseline_stitches_computed"):
    assert again.stats[name] == 0, name
  assert again.meta["baseline_accuracy"] == on.meta["baseline_accuracy"]
  assert set(on.meta["baseline_accuracy"]) == {"tlm", "dm"}
  assert attacked.stats["units_computed"] == 2 * n_cols
  for obj, base in on.meta["baseline_accuracy"].items():
    assert list(base) == list(model.point_names)
    np.testing.assert_allclose(list(attacked.meta["baseline_accuracy"][obj].values()),
                               list(base.values()), atol=1e-6)
    np.testing.assert_array_equal(attacked.values[obj]["pgd_accuracy"],
                                  alone.values[obj]["pgd_accuracy"])
    assert np.isfinite(attacked.values[obj]["pgd_accuracy"]).sum() == \
        on.stats["stitches_computed"] // 2
