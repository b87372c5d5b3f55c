"""The Jones et al. study (experiments/study_jones.py) end to end at its `tiny` scale.

One run trains a 2-architecture x 2-eps zoo into a temporary workdir; the checks
recompute what the study stored from the saved models, pairs and inverted images with
NumPy (linear CKA from its published formula, the inversion loss), parse report.md
against the loaded matrices, and rerun the study (from notebooks/reproduce_jones.ipynb,
as a Colab user would) to see that no model is retrained.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import job_endings
import shared_runs
from configs import study_jones as study_config
from experiments import study_jones as study
from fula_jax import data, models, results
from fula_jax.train import checkpoint
from fula_jax.train.zoo import check_existing


def _tag(eps: float) -> str:
  return f"{float(eps):g}"


def _numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
  """Kornblith et al. (2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
  return float(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))


def _penultimate(model, variables, images: np.ndarray) -> np.ndarray:
  point = "pool" if "pool" in model.point_names else model.point_names[-1]
  h = models.forward(model, variables, np.asarray(images, np.float32), end=point)
  return np.asarray(h, np.float64).reshape(len(images), -1)


def _offdiag_table(report: str) -> dict[str, tuple[float, float]]:
  """eps tag -> (inverted, natural) mean off-diagonal CKA, parsed from report.md."""
  lines = report.splitlines()
  start = next(i for i, l in enumerate(lines)
               if l.startswith("| ε | mean off-diagonal inverted CKA"))
  out = {}
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    out[cells[0]] = (float(cells[1]), float(cells[2]))
  return out


@pytest.fixture(scope="module")
def tiny_run(computed_once):
  """The study at `tiny` (tests/shared_runs.py), computed once per session (the README
  walk resumes a copy): (config, workdir, what run returned with what it printed).
  Tests that write into the workdir work on a copy."""
  return shared_runs.tiny_study(computed_once, "jones")


def test_ends_with_summary_report_and_next_step(tiny_run):
  _, workdir, out = tiny_run
  job_endings.check_study(workdir, out, study.REPORT_FILE,
                          "notebooks/reproduce_jones.ipynb")


def test_trains_every_model_with_its_attack(tiny_run):
  config, workdir, out = tiny_run
  expected = {f"{a}_eps{_tag(e)}" for a in config.architectures for e in config.eps}
  assert set(out["trained"]) == expected and not out["reused"]
  for a in config.architectures:
    for e in config.eps:
      cfg = checkpoint.read_config(workdir / "models" / f"{a}_eps{_tag(e)}")
      assert cfg.model.name == a
      assert bool(cfg.train.adversarial.enabled) == (e > 0)
      if e > 0:
        assert cfg.train.adversarial.eps == pytest.approx(e)
        assert cfg.train.adversarial.step_size == pytest.approx(
            config.attack.step_size_factor * e / config.attack.steps)
      assert cfg.data.to_dict() == config.data.to_dict()


def test_tiny_models_learned_and_the_robust_ones_are_robust(tiny_run):
  """The smallest scale still trains every model, robust ones included, well above
  chance (0.1), so its finding is about models that learned; the report lists them
  before the finding."""
  config, workdir, out = tiny_run
  for r in out["models"]:
    assert r["clean"] > 0.6, r
    if r["eps"] > 0:
      assert r["robust_own"] > 0.3, r
  assert out["donor_problems"] == []
  report = (workdir / "report.md").read_text()
  assert report.index("## Models") < report.index("**Finding")


def train_runlocal_grid_ends(workdir) -> tuple:
  """(specs, the grid's two ends, rows, trained) of the study's own `prepare_zoo` at
  configs/study_jones.py:runlocal, for the models at the ends of its eps grid only."""
  config = study_config.get_config("runlocal")
  specs, eps = study.check_grid(config)
  ends = (min(eps), max(eps))
  test = data.source(config.data, "test")
  _, rows, trained, _ = study.prepare_zoo(config, workdir, specs, ends, test,
                                          jax.random.PRNGKey(0), max(eps))
  return specs, ends, rows, trained


def test_runlocal_donors_at_both_ends_of_the_eps_grid_learned_and_resist_pgd(tmp_path):
  """configs/study_jones.py:runlocal, the README's CPU-scale run, trains models that can
  carry its finding. Trained by the study's own code, in a process of its own on one
  device as on a CPU machine, at the grid's two ends: the clean models and the most
  robust ones (eps 0.2, the hardest to train; the middle radii train the same way with a
  smaller attack). Measured: clean 0.94-0.98, robust accuracy at their own eps
  0.42-0.58, chance 0.1."""
  specs, ends, rows, trained = shared_runs.in_own_process(
      "test_study_jones", "train_runlocal_grid_ends", tmp_path)
  assert ends == (0.0, 0.2)
  assert len(trained) == 2 * len(specs) == len(rows)
  for r in rows:
    assert r["clean"] > 0.9, r
    if r["eps"] > 0:
      assert r["robust_own"] > 0.3, r
  assert study.donor_problems(rows, 10) == []


def test_no_verdict_from_models_near_chance():
  rows = [{"arch": "cnn", "eps": 0.0, "clean": 0.35, "robust_own": None},
          {"arch": "mlp", "eps": 0.0, "clean": 0.178, "robust_own": None},
          {"arch": "cnn", "eps": 0.1, "clean": 0.5, "robust_own": 0.0}]
  problems = study.donor_problems(rows, 10)
  assert len(problems) == 2 and "mlp at eps 0" in problems[0]
  assert "not robust" in problems[1]
  assert study.no_verdict(problems).startswith("No verdict on the trend")
  assert study.donor_problems(rows[:1], 10) == []


def test_outputs_exist(tiny_run):
  config, workdir, _ = tiny_run
  assert (workdir / "report.md").stat().st_size > 0
  pngs = [f"heatmaps_eps{_tag(e)}.png" for e in config.eps]
  pngs += [f"inversions_eps{_tag(e)}.png" for e in config.eps] + ["offdiag_vs_eps.png"]
  for name in pngs:
    assert (workdir / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_matrices_have_architecture_axes_and_unit_diagonals(tiny_run):
  config, workdir, _ = tiny_run
  mats = results.load(workdir)
  archs = list(config.architectures)
  for e in config.eps:
    inv = mats[f"jones/eps{_tag(e)}/inverted_cka"]
    nat = mats[f"jones/eps{_tag(e)}/natural_cka"]
    for m in (inv, nat):
      assert m.rows == archs and m.cols == archs
      assert np.all(np.isfinite(m.matrix))
      np.testing.assert_allclose(np.diag(m.matrix), 1.0, atol=1e-5)
      assert np.all(m.matrix > -1e-6) and np.all(m.matrix < 1 + 1e-5)
    np.testing.assert_allclose(nat.matrix, nat.matrix.T, atol=1e-6)
    assert inv.meta["eps"] == pytest.approx(e)
    assert inv.meta["n_pairs"] == config.n_pairs
    assert inv.meta["inversion"]["steps"] == config.inversion.steps
    assert 0.0 < inv.meta["mean_loss_reduction"] <= 1.0


def test_natural_cka_matches_numpy(tiny_run):
  config, workdir, _ = tiny_run
  mats = results.load(workdir)
  test = data.load(config.data, "test")
  pairs = np.load(workdir / "pairs.npz")
  seeds = test.images[pairs["seed_idx"]]
  assert np.all(test.labels[pairs["seed_idx"]] != test.labels[pairs["target_idx"]])
  e = max(config.eps)
  reps = {}
  for a in config.architectures:
    model, variables, _ = checkpoint.load_trained(workdir / "models" / f"{a}_eps{_tag(e)}")
    reps[a] = _penultimate(model, variables, seeds)
  nat = mats[f"jones/eps{_tag(e)}/natural_cka"]
  for i, a in enumerate(nat.rows):
    for j, b in enumerate(nat.cols):
      assert nat.matrix[i, j] == pytest.approx(_numpy_linear_cka(reps[a], reps[b]),
                                               abs=2e-4), (a, b)


def test_inverted_cka_matches_numpy_on_saved_inversions(tiny_run):
  config, workdir, _ = tiny_run
  mats = results.load(workdir)
  test = data.load(config.data, "test")
  e = max(config.eps)
  zoo = {a: checkpoint.load_trained(workdir / "models" / f"{a}_eps{_tag(e)}")[:2]
         for a in config.architectures}
  inv = mats[f"jones/eps{_tag(e)}/inverted_cka"]
  for i, a in enumerate(inv.rows):
    saved = np.load(workdir / "inversions" / f"eps{_tag(e)}" / f"{a}.npz")
    x = saved["images"]
    assert x.shape == (config.n_pairs, *test.images.shape[1:])
    assert x.min() >= 0.0 and x.max() <= 1.0
    # The reference model's loss ||rep(x) - rep(t)|| / ||rep(t)|| on its own images.
    rep_x = _penultimate(*zoo[a], x)
    rep_t = _penultimate(*zoo[a], test.images[saved["target_idx"]])
    loss = np.linalg.norm(rep_x - rep_t, axis=1) / np.linalg.norm(rep_t, axis=1)
    np.testing.assert_allclose(loss, saved["loss"], rtol=1e-3, atol=1e-4)
    assert np.mean(loss) == pytest.approx(inv.meta["loss_final"][a], rel=1e-3)
    assert np.mean(saved["loss"]) < np.mean(saved["initial_loss"])
    # Row a: CKA of a's and b's representations on a's inverted images.
    for j, b in enumerate(inv.cols):
      ref = _numpy_linear_cka(rep_x, _penultimate(*zoo[b], x))
      assert inv.matrix[i, j] == pytest.approx(ref, abs=2e-4), (a, b)


def test_report_numbers_match_loaded_matrices(tiny_run):
  config, workdir, out = tiny_run
  mats = results.load(workdir)
  table = _offdiag_table((workdir / "report.md").read_text())
  assert sorted(table) == sorted(_tag(e) for e in config.eps)
  eps = sorted(config.eps)
  recomputed = {}
  for measure, col in (("inverted_cka", 0), ("natural_cka", 1)):
    values = []
    for e in eps:
      m = mats[f"jones/eps{_tag(e)}/{measure}"].matrix
      off = m[~np.eye(len(m), dtype=bool)].mean()
      assert table[_tag(e)][col] == pytest.approx(off, abs=6e-5), (measure, e)
      values.append(off)
    recomputed[measure] = values
  # The finding sentence follows from the numbers: up from the first to the last eps
  # with a positive rank correlation.
  report = (workdir / "report.md").read_text()
  v = recomputed["inverted_cka"]
  rho = np.corrcoef(np.argsort(np.argsort(eps)), np.argsort(np.argsort(v)))[0, 1]
  rises = v[-1] > v[0] and rho > 0
  verb = "rises" if rises else "does not rise"
  assert f"Inter-architecture inverted-image CKA {verb} with ε in this run" in report
  assert out["trend"]["inverted_cka"]["rises"] == rises


def test_refuses_mismatched_model_and_bad_grid(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  with pytest.raises(ValueError, match="adversarial.eps"):
    check_existing(workdir / "models" / "cnn_eps0",
                   study.model_config(config, "cnn", 0.1))
  bad = study_config.get_config("tiny")
  bad.architectures = ("cnn", "mpl")
  with pytest.raises(ValueError, match="Did you mean 'mlp'"):
    study.run(bad, str(tmp_path / "bad"))
  bad = study_config.get_config("tiny")
  bad.eps = (0.0, 0.0)
  with pytest.raises(ValueError, match="distinct"):
    study.run(bad, str(tmp_path / "bad"))


def test_reproduce_jones_notebook_draws_this_run_beside_the_paper(tiny_run, tmp_path,
                                                                   run_notebook):
  """notebooks/reproduce_jones.ipynb on the finished study: its table of off-diagonal
  means is the one recomputed here, and the figures are drawn."""
  config, workdir, _ = tiny_run
  nb = run_notebook("reproduce_jones", tmp_path, WORKDIR=str(workdir),
                    RUN_IF_MISSING=False)
  printed = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  for r in tiny_run[2]["models"]:  # the models' accuracies come first
    assert f"clean accuracy {r['clean']:.3f}" in printed, printed
  mats = results.load(workdir)
  table = next(o["data"]["text/plain"] for c in nb.cells for o in c.get("outputs", [])
               if "inverted_cka" in o.get("data", {}).get("text/plain", ""))
  for e in config.eps:
    for measure in ("inverted_cka", "natural_cka"):
      m = mats[study.result_name(e, measure)].matrix
      assert f"{study.offdiag_mean(m):.6f}" in table, (e, measure, table)
  figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                for o in c.get("outputs", []))
  assert figures == 2  # the curve against eps, the matrices at both ends


def test_reproduce_jones_notebook_reruns_the_study_reusing_its_models(tiny_run, tmp_path,
                                                                      run_notebook):
  """With no results in WORKDIR the notebook runs the study itself. Given the finished
  models it must reuse every one (nothing retrained, no new checkpoint) and write the
  same matrices as the first run."""
  import shutil
  config, workdir, _ = tiny_run
  models_dir = tmp_path / "jones" / "models"
  shutil.copytree(workdir / "models", models_dir)
  summaries = sorted(models_dir.glob("*/summary.json"))
  assert len(summaries) == len(config.architectures) * len(config.eps)
  before = {p: p.stat().st_mtime_ns for p in summaries}
  ckpts_before = sorted(str(p) for p in models_dir.glob("*/checkpoints/*"))

  run_notebook("reproduce_jones", tmp_path, WORKDIR="jones", RUN_IF_MISSING=True)
  assert {p: p.stat().st_mtime_ns for p in summaries} == before
  assert sorted(str(p) for p in models_dir.glob("*/checkpoints/*")) == ckpts_before
  first, second = results.load(workdir), results.load(tmp_path / "jones")
  assert sorted(first) == sorted(second)
  for name in first:
    np.testing.assert_allclose(second[name].matrix, first[name].matrix, atol=1e-6)
