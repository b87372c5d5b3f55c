"""The FuLA testbeds study (experiments/study_fula.py) end to end at its `tiny` scale.

One run trains the four roles of a small CNN and runs the three testbeds with stitch
parameters saved. The checks rebuild what the study stored from the saved models and
stitch parameters with plain forward passes and NumPy (the stitched accuracy under each
cue mode, the models' own accuracies), re-aggregate by_depth.csv independently against
the findings, compare the control pair across testbeds, and rerun the study to see that
nothing is retrained or re-stitched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_collections
import numpy as np
import pandas as pd
import pytest

import job_endings
import shared_runs
from configs import study_fula as study_config
from experiments import fula_report
from experiments import study_fula as study
from fula_jax import models, registry, results
from fula_jax.train import checkpoint, zoo


@pytest.fixture(scope="module")
def tiny_run(computed_once):
  """The study at `tiny` (tests/shared_runs.py), computed once per session (the README
  walk resumes a copy): (config, workdir, what run returned with what it printed).
  Tests that write into the workdir work on a copy."""
  return shared_runs.tiny_study(computed_once, "fula")


def test_ends_with_summary_report_and_next_step(tiny_run):
  _, workdir, out = tiny_run
  job_endings.check_study(workdir, out, study.REPORT_FILE,
                          "notebooks/explore_results.ipynb")


def _accuracy(logits, labels) -> float:
  return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))


def _saved_stitches(folder: Path, objective: str) -> dict[tuple[str, str], dict]:
  """(row, col) -> {'kernel', 'bias'} from a sweep's unit files: each kernel's first
  ``in_features`` rows (the rest pad it to its unit's widest front). The end model's
  self-stitches, which the same files hold (rows 'self:<point>'), are left out."""
  out = {}
  for js in (folder / "stitch" / objective).glob("*.json"):
    unit = json.loads(js.read_text())
    params = np.load(js.with_suffix(".npz"))
    for k, (c, n) in enumerate(zip(unit["cells"], unit["in_features"])):
      if not c["row"].startswith("self:"):
        out[(c["row"], c["col"])] = {"kernel": params["kernel"][k][:n],
                                     "bias": params["bias"][k]}
  return out


def test_trains_every_role_with_its_settings(tiny_run):
  config, workdir, out = tiny_run
  assert sorted(out["trained"]) == sorted(f"cnn_{r}" for r in study.ROLES)
  cfgs = {r: checkpoint.read_config(workdir / "models" / f"cnn_{r}") for r in study.ROLES}
  assert cfgs["second_seed"].seed == cfgs["standard"].seed + 1
  assert cfgs["robust"].train.adversarial.enabled
  assert cfgs["robust"].train.adversarial.eps == pytest.approx(config.robust.eps)
  assert not cfgs["standard"].train.adversarial.enabled
  assert cfgs["shortcut"].data.shortcut.enabled
  assert not cfgs["standard"].data.shortcut.enabled
  for r in study.ROLES:
    assert (workdir / "models" / f"cnn_{r}" / "summary.json").exists()


def test_model_table_matches_direct_evaluation(tiny_run):
  config, workdir, out = tiny_run
  splits = study.load_splits(config, ["shortcut"])
  rows = {r["role"]: r for r in out["models"]}
  for role in ("standard", "shortcut"):
    model, variables, _ = checkpoint.load_trained(workdir / "models" / f"cnn_{role}")
    clean = _accuracy(models.forward(model, variables, splits["test"].images),
                      splits["test"].labels)
    assert rows[role]["clean"] == pytest.approx(clean, abs=1e-6)
    for mode, split in splits["cue_tests"].items():
      acc = _accuracy(models.forward(model, variables, split.images), split.labels)
      assert rows[role][f"cue_{mode}"] == pytest.approx(acc, abs=1e-6), (role, mode)


def test_cue_modes_are_scored_on_the_right_images(tiny_run):
  """Each stored accuracy@<mode> equals the saved stitch run by hand on that mode's
  images: f up to the point, the 1x1 map in NumPy, g from the point."""
  config, workdir, _ = tiny_run
  splits = study.load_splits(config, ["shortcut"])
  depth = pd.read_csv(workdir / study.DEPTH_CSV)
  front, end = "shortcut", "standard"
  mf, vf, _ = checkpoint.load_trained(workdir / "models" / f"cnn_{front}")
  mg, vg, _ = checkpoint.load_trained(workdir / "models" / f"cnn_{end}")
  folder = workdir / "stitch" / "cnn" / "shortcut" / f"{front}_to_{end}"
  checked = 0
  for obj in ("tlm", "fula"):
    for (row, col), p in _saved_stitches(folder, obj).items():
      for mode, split in splits["cue_tests"].items():
        z = np.asarray(models.forward(mf, vf, split.images, end=row), np.float64)
        z = np.einsum("...c,cd->...d", z, p["kernel"]) + p["bias"]
        acc = _accuracy(models.forward(mg, vg, z.astype(np.float32), start=col),
                        split.labels)
        stored = depth[(depth.testbed == "shortcut") & (depth.objective == obj)
                       & (depth["map"] == "affine")
                       & (depth.pair == f"{front}->{end}") & (depth.cell == f"{row}->{col}")
                       & (depth.measure == f"accuracy@{mode}")].value
        assert len(stored) == 1
        assert float(stored.iloc[0]) == pytest.approx(acc, abs=1.01 / len(split.labels))
        checked += 1
  assert checked == 2 * len(mf.point_names) * 3


def test_models_learned_and_no_findings_come_from_models_near_chance(tiny_run):
  """The tiny models are well above chance (the robust one against its own attack, the
  shortcut one with its cue), listed before the findings; rows near chance would give
  no findings at all."""
  config, workdir, out = tiny_run
  rows = {r["role"]: r for r in out["models"]}
  for role in ("standard", "second_seed", "robust"):
    assert rows[role]["clean"] > 0.6, rows[role]
  assert rows["robust"]["robust"] > 0.3 and rows["shortcut"]["cue_present"] > 0.9
  report = (workdir / study.REPORT_FILE).read_text()
  assert report.index("## Models") < report.index("## Findings") < report.index(
      "**Robust vs standard")
  near = [dict(rows["standard"], clean=0.18), dict(rows["robust"], robust=0.05)]
  problems = fula_report.model_problems(near, 10)
  assert len(problems) == 2 and "not robust" in problems[1]
  assert fula_report.model_problems(list(rows.values()), 10) == []


def test_findings_agree_with_an_independent_aggregation(tiny_run):
  config, workdir, out = tiny_run
  depth = pd.read_csv(workdir / study.DEPTH_CSV)
  depth = depth[depth["map"] == "affine"]  # the main findings' map
  means = depth.groupby(["testbed", "pair", "objective", "measure"]).value.mean()
  facts = out["facts"]["cnn"]
  for obj in config.stitch.objectives:
    assert facts["robust"]["clean"][obj] == pytest.approx(
        means["robust", "robust->standard", obj, "accuracy"])
    assert facts["robust"]["pgd"][obj] == pytest.approx(
        means["robust", "robust->standard", obj, "pgd_accuracy"])
    assert facts["shortcut"]["present"][obj] == pytest.approx(
        means["shortcut", "shortcut->standard", obj, "accuracy@present"])
    assert facts["shortcut"]["drop"][obj] == pytest.approx(
        means["shortcut", "shortcut->standard", obj, "accuracy@present"]
        - means["shortcut", "shortcut->standard", obj, "accuracy@absent"])
  report = (workdir / study.REPORT_FILE).read_text()
  fula, tlm = (facts["shortcut"]["present"][o] for o in ("fula", "tlm"))
  n_test = len(study.load_splits(config, []).get("test").labels)
  verdict = ("the same within one test example" if abs(fula - tlm) * n_test < 1 else
             "lower than TLM does" if fula < tlm else "higher than TLM does")
  assert re.search(rf"Shortcut vs clean \(cnn\).*FuLA.* {verdict} "
                   rf"\({fula:.3f} vs {tlm:.3f}\)", report)
  for fig in out["figures"]:
    assert (workdir / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert f"figures/{fig}" in report
  assert {"robust_cnn.png", "shortcut_cnn.png", "cross_seed_cnn.png",
          "summary_cnn.png"} <= set(out["figures"])


def test_capacity_verdicts_agree_with_an_independent_aggregation(tiny_run):
  """Per map, FuLA's and TLM's ratings re-aggregated from by_depth.csv; the identity
  map has nothing to train, so every objective rates every pair the same there."""
  config, workdir, out = tiny_run
  depth = pd.read_csv(workdir / study.DEPTH_CSV)
  assert set(depth["map"]) == {"identity", "affine"}
  means = depth.groupby(["testbed", "pair", "map", "objective", "measure"]).value.mean()
  n_test = len(study.load_splits(config, []).get("test").labels)
  capacity = out["facts"]["cnn"]["capacity"]
  report = (workdir / study.REPORT_FILE).read_text()
  for testbed, measure in (("robust", "accuracy"), ("shortcut", "accuracy@present")):
    pair = f"{testbed}->standard"
    for form in ("identity", "affine"):
      got = capacity[testbed][form]
      fula, tlm = (means[testbed, pair, form, o, measure] for o in ("fula", "tlm"))
      assert got["fula"] == pytest.approx(fula) and got["tlm"] == pytest.approx(tlm)
      assert got["fula_control"] == pytest.approx(
          means[testbed, "second_seed->standard", form, "fula", measure])
      expected = ("same" if abs(fula - tlm) * n_test < 1 else
                  "lower" if fula < tlm else "higher")
      assert got["verdict"] == expected
    assert capacity[testbed]["identity"]["fula"] == capacity[testbed]["identity"]["tlm"]
    assert capacity[testbed]["identity"]["verdict"] == "same"
    main = capacity[testbed]["affine"]["verdict"]
    fate = ("survives at every capacity" if main == "same" else
            "holds at 1 of 2 maps and changes at identity")
    assert re.search(rf"Across stitch capacities \(cnn, {testbed}, {measure}\)\.\*\* .*"
                     rf"identity same, affine {main}; .*\(FuLA {main}\) {fate}", report)
  cross = depth[(depth.testbed == "cross_seed") & (depth.measure == "accuracy")]
  for form in ("identity", "affine"):
    sel = cross[(cross["map"] == form) & (cross.objective == "fula")]
    on = sel[sel.front_point == sel.end_point].value
    off = sel[sel.front_point != sel.end_point].value.dropna()
    assert capacity["cross_seed"][form]["fula"] == pytest.approx(on.mean() - off.mean(),
                                                                 nan_ok=True)
  # identity across different widths: no off-diagonal cell, so no contrast
  assert np.isnan(capacity["cross_seed"]["identity"]["fula"])
  assert "capacity_cnn.png" in out["figures"]
  assert "## cnn: FuLA vs TLM across stitch capacities" in report


def test_ood_scores_summarised_per_pair(tiny_run):
  """The OOD table's means re-aggregated from by_depth.csv, and the identity map's
  scores equal for every objective (the same stitched model)."""
  _, workdir, out = tiny_run
  depth = pd.read_csv(workdir / study.DEPTH_CSV)
  ood = out["facts"]["cnn"]["ood"]
  sel = depth[depth.measure == "mahalanobis_ratio"]
  means = sel[sel["map"] == "affine"].groupby(["testbed", "pair", "objective"]).value.mean()
  assert set(ood) == {"robust", "shortcut", "cross_seed"}
  for (testbed, pair, obj), v in means.items():
    assert ood[testbed][pair][obj]["mahalanobis_ratio"] == pytest.approx(v)
  ident = sel[sel["map"] == "identity"].pivot_table(
      index=["testbed", "pair", "cell"], columns="objective", values="value")
  assert len(ident) > 0 and np.isfinite(ident.to_numpy()).all()
  np.testing.assert_allclose(ident["fula"], ident["tlm"], rtol=1e-6)
  assert "out-of-distribution scores of the stitched activations" in (
      workdir / study.REPORT_FILE).read_text()


def test_capacity_sentence_names_the_maps_where_the_verdict_changes():
  """On made-up records: FuLA lower than TLM at affine and mlp, higher at lowrank."""
  from experiments import fula_report as report
  records = []
  for form, fula, tlm in (("mlp", 0.5, 0.7), ("lowrank", 0.6, 0.4), ("affine", 0.3, 0.6)):
    for obj, v in (("fula", fula), ("tlm", tlm)):
      for pair in ("robust->standard", "second_seed->standard"):
        records.append(dict(architecture="a", testbed="robust", pair=pair, objective=obj,
                            map=form, measure="accuracy", value=v, cell="c->c"))
  lines, facts = report.capacity("a", ["robust"], records, ["mlp", "lowrank", "affine"],
                                 ["present"], n_test=100)
  assert [m for m in facts["robust"]] == ["lowrank", "affine", "mlp"]  # ladder order
  assert report.ladder_order(["mlp", "lowrank:rank=8", "identity", "lowrank:rank=2"]) == [
      "identity", "lowrank:rank=2", "lowrank:rank=8", "mlp"]
  assert facts["robust"]["lowrank"]["verdict"] == "higher"
  assert lines == ["**Across stitch capacities (a, robust, accuracy).** How FuLA rates "
                   "robust->standard against TLM, by map: lowrank higher, affine lower, "
                   "mlp lower; the verdict at the affine map (FuLA lower) holds at 2 of 3 "
                   "maps and changes at lowrank."]


def test_cross_seed_matrix_and_control_pair(tiny_run):
  """The full matrix loads back by name; its diagonal is the control pair of the
  robust testbed trained again (same data, seeds and init: equal up to grouping)."""
  config, workdir, out = tiny_run
  mats = results.load(workdir)
  points = None
  for obj in config.stitch.objectives:
    m = mats[f"fula/cnn/cross_seed/second_seed_to_standard/stitch_{obj}/accuracy"]
    points = m.rows
    # A pooled vector and a spatial map cannot be stitched: exactly those cells are NaN.
    is_map = np.array([p != "pool" for p in points])
    np.testing.assert_array_equal(np.isfinite(m.matrix), is_map[:, None] == is_map[None])
    assert "cannot be stitched" in m.meta["reasons"]["conv1->pool"]
    ctrl = mats[f"fula/cnn/robust/second_seed_to_standard/stitch_{obj}/accuracy"]
    np.testing.assert_allclose(np.diag(m.matrix), np.diag(ctrl.matrix), atol=3 / 359,
                               err_msg=obj)
    summary = out["cross_seed"]["cnn"][obj]
    assert summary["diagonal"] == pytest.approx(np.mean(np.diag(m.matrix)))
    assert summary["off_diagonal"] == pytest.approx(
        np.nanmean(m.matrix[~np.eye(len(points), dtype=bool)]))
  assert points == list(models.get_model("cnn", widths=(8, 16)).point_names)


def test_rerun_reuses_models_and_stitches(tiny_run, tmp_path):
  import shutil
  config, shared, _ = tiny_run
  workdir = tmp_path / "fula"
  shutil.copytree(shared, workdir)  # moved, as a user may move a finished study
  before = pd.read_csv(workdir / study.DEPTH_CSV)
  stamps = {p: p.stat().st_mtime_ns for p in (workdir / "stitch").rglob("*.json")}
  again = study.run(config, str(workdir))
  assert again["trained"] == [] and len(again["reused"]) == 4
  assert {p: p.stat().st_mtime_ns for p in (workdir / "stitch").rglob("*.json")} == stamps
  pd.testing.assert_frame_equal(pd.read_csv(workdir / study.DEPTH_CSV), before)


def test_refuses_to_reuse_a_model_trained_differently(tiny_run):
  config, workdir, _ = tiny_run
  other = ml_collections.ConfigDict(config.to_dict())
  other.robust.eps = 0.3
  with pytest.raises(ValueError, match=r"train.adversarial.eps"):
    zoo.check_existing(workdir / "models" / "cnn_robust",
                       study.model_config(other, "cnn", "robust"))


@pytest.mark.parametrize("field,value,match", [
    ("testbeds", ("robust", "shortcuts"), "Did you mean 'shortcut'"),
    ("architectures", ("resnet",), "Valid choices"),
])
def test_bad_config_names_the_valid_choices(field, value, match):
  config = study_config.get_config("tiny")
  config[field] = value
  with pytest.raises(registry.UnknownNameError, match=match):
    study.check_config(config)


def test_paper_config_builds_every_model_and_stitch_setting():
  """The accelerator-scale config is consistent without running it: every role of
  ResNet-18, VGG-16 and ViT-Tiny builds for CIFAR-10 images, and each testbed's stitch
  settings resolve."""
  from fula_jax import data
  from fula_jax.main import resolve_job
  from fula_jax.train import loop
  config = study_config.get_config()
  archs, testbeds = study.check_config(config)
  assert archs == ["resnet18", "vgg16", "vit_tiny"] and len(testbeds) == 3
  assert config.data.name == "cifar10" and config.robust.eps == pytest.approx(8 / 255)
  assert resolve_job(config.job) is study.run
  for arch in archs:
    for role in study.roles_for(testbeds):
      cfg = study.model_config(config, arch, role)
      assert cfg.data.name == "cifar10" and cfg.train.num_epochs == 200
      model = loop.build_model(cfg)
      shapes = models.point_shapes(model, (1,) + data.image_shape(cfg.data))
      assert shapes["logits"].shape == (1, 10)
  for testbed in testbeds:
    cfg = study.stitch_settings(config, testbed)
    assert cfg["pgd"]["enabled"] == (testbed == "robust")
    assert cfg["pairs"] == ("all" if testbed == "cross_seed" else "diagonal")


def test_script_entry_point_reports_bad_names(tmp_path):
  """`python experiments/study_fula.py` takes fula_jax.main's flags and fails at once,
  naming the valid testbeds, before anything is trained."""
  import subprocess
  import sys
  repo = Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, str(repo / "experiments" / "study_fula.py"),
       f"--config={repo / 'configs' / 'study_fula.py'}:tiny",
       "--config.testbeds=('robust','shortcuts')", f"--workdir={tmp_path}"],
      capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode != 0
  assert "Unknown FuLA testbed 'shortcuts'" in proc.stderr
  assert "Valid choices: shortcut, " in proc.stderr
  assert not (tmp_path / "models").exists()


def test_the_study_job_is_found_from_any_working_directory(tmp_path):
  """`python -m fula_jax.main --config=.../study_fula.py` from outside the repository:
  the study in experiments/ still resolves (the package is installed from the clone)."""
  import subprocess
  import sys
  code = ("import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
          "from fula_jax import main; fn = main.resolve_job('study_fula'); "
          "print(fn.__module__, fn.__name__)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["experiments.study_fula", "run"]
