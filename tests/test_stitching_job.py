"""The stitch job end to end: two model workdirs -> configs/stitch.py -> results files."""

import json
import pathlib

import numpy as np
import pytest

import shared_runs
from fula_jax import defaults, registry, results
from fula_jax.stitching import job

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_module(name):
  return defaults.config_module(ROOT / "configs" / f"{name}.py")


def test_cross_architecture_job_writes_and_resumes(tmp_path, model_workdir, capsys):
  a = model_workdir(tmp_path / "cnn", "cnn", {"widths": (4, 6)}, 1, 0)
  b = model_workdir(tmp_path / "mlp", "mlp", {"widths": (6,)}, 3, 1)
  config = _config_module("stitch").get_config("variant=cross_arch,objectives=dm+fula,"
                                               "runlocal")
  config.model_a_workdir, config.model_b_workdir = a, b
  config.num_train, config.num_test = 300, 100
  config.png = False
  config.stitch.update(dict(steps=3, batch_size=100, eval_batch_size=100,
                            progress=False))
  out = job.run(config, str(tmp_path / "sweep"))
  assert out["stats"]["stitches_computed"] == 2  # pool -> fc1 for DM and FuLA
  mats = results.load(tmp_path / "sweep")
  m = mats["stitch_fula/accuracy"]
  assert m.rows == ["conv1", "conv2", "pool"] and m.cols == ["fc1"]
  assert (m.model_a, m.model_b) == (a, b)
  assert np.isnan(m.matrix[:2, 0]).all() and np.isfinite(m.matrix[2, 0])
  assert "cannot be stitched" in m.meta["reasons"]["conv1->fc1"]
  assert set(mats) == {f"stitch_{o}/{k}" for o in ("dm", "fula")
                       for k in ("accuracy", "relative_accuracy", "loss", "train_loss",
                                 "loss_trend", "converged", "dm_error", "disagreement",
                                 "jsd", "error_consistency")}
  # Three FuLA steps cannot converge: the cell says why and the job's last line says so.
  assert out["unconverged"] == {"fula": 1}
  assert mats["stitch_fula/converged"].matrix[2, 0] == 0.0
  assert np.isnan(mats["stitch_dm/converged"].matrix[2, 0])  # closed form: not trained
  assert "raise the training budget" in mats["stitch_fula/accuracy"].meta["unconverged"][
      "pool->fc1"]
  printed = capsys.readouterr().out
  assert "1 of 1 trained stitches did not converge (fula 1; 3 steps" in printed
  assert f"Results: {tmp_path / 'sweep'}/results" in printed  # and where to go next
  assert "explore_results.ipynb" in printed
  report = (tmp_path / "sweep" / "report.md").read_text()
  assert "![overview](results/overview.png)" in report and "## Baselines" in report
  table = report[report.index("## Matrices"):].splitlines()
  row = next(l for l in table if l.startswith("| `stitch_fula/accuracy`"))
  assert row.split("|")[6].strip() == "1"  # one cell not converged
  saved = json.loads((tmp_path / "sweep" / "summary.json").read_text())
  assert saved["unconverged"] == {"fula": 1} and saved["stats"]["stitches_computed"] == 2
  again = job.run(config, str(tmp_path / "sweep"))
  assert again["stats"]["stitches_computed"] == 0
  np.testing.assert_array_equal(results.load(tmp_path / "sweep")[
      "stitch_dm/dm_error"].matrix, mats["stitch_dm/dm_error"].matrix)


def test_config_variants():
  mod = _config_module("stitch")
  pairs = {v: mod.get_config(f"variant={v},runlocal").stitch.pairs
           for v in ("cross_seed", "cross_arch", "self", "offset")}
  assert pairs == {"cross_seed": "all", "cross_arch": "all", "self": "diagonal",
                   "offset": "offset:1"}
  cfg = mod.get_config("objectives=fula+dm,epochs=5")
  assert tuple(cfg.stitch.objectives) == ("fula", "dm") and cfg.stitch.epochs == 5.0
  assert cfg.job == "stitch"
  with pytest.raises(registry.UnknownNameError, match="'self'"):
    mod.get_config("variant=selff")


def test_self_variant_at_runlocal_recovers_the_model_and_converges(tmp_path, capsys,
                                                                  computed_once):
  """configs/stitch.py:variant=self,runlocal as shipped, on a CNN trained by
  configs/train.py:model=cnn,runlocal as shipped (the suite's shared first model,
  tests/shared_runs.py): every objective recovers at least 0.95 of the model's own
  accuracy at every point, and every trained cell converged. (A donor trained for a
  third of that is still improvable, and a TLM self-stitch then goes on lowering its
  loss: the flag says so, rightly.)"""
  model, run = shared_runs.first_model_run(computed_once)
  assert run["train"]["rc"] == 0, run["train"]["stderr"][-3000:]
  config = _config_module("stitch").get_config("variant=self,runlocal")
  config.model_a_workdir = str(model)
  config.png = False
  config.stitch.progress = False
  out = job.run(config, str(tmp_path / "self"))
  mats = results.load(tmp_path / "self")
  own = out["end_accuracy"]
  assert own > 0.9
  for obj in ("tlm", "slm", "dm", "fula"):
    acc = np.diag(mats[f"stitch_{obj}/accuracy"].matrix)
    assert np.all(acc >= 0.95 * own), (obj, acc, own)
    conv = np.diag(mats[f"stitch_{obj}/converged"].matrix)
    assert np.all(conv == 1.0) if obj != "dm" else np.all(np.isnan(conv)), (obj, conv)
  assert out["unconverged"] == {}
  assert "every trained stitch converged" in capsys.readouterr().out


def test_every_variant_trains_by_the_self_variants_protocol():
  """The variants differ in which cells they compute, never in how a stitch trains, so
  the test above (self-stitch recovered and converged) holds for each variant's own
  baseline diagonal (stitch.baselines): the same protocol on the end model."""
  from fula_jax.stitching import settings
  mod = _config_module("stitch")
  science = {v: settings.split(mod.get_config(f"variant={v},runlocal").stitch)[0]
             for v in ("cross_seed", "cross_arch", "self", "offset")}
  assert all(s == science["self"] for s in science.values()), science
  assert all(mod.get_config(f"variant={v},runlocal").stitch.baselines
             for v in ("cross_seed", "cross_arch", "offset"))


def test_ctrl_c_ends_with_one_line_and_a_rerun_resumes(tmp_path, model_workdir):
  """SIGINT during a stitching job: exit status 130, no traceback, one line saying what
  was kept and that the same command resumes; the same command then resumes."""
  import os
  import signal
  import subprocess
  import sys
  import time
  a = model_workdir(tmp_path / "cnn", "cnn", {"widths": (4, 6)}, 1, 0)
  wd = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "fula_jax.main",
         "--config=configs/stitch.py:variant=self,runlocal,objectives=tlm",
         f"--workdir={wd}", f"--config.model_a_workdir={a}", "--config.png=False",
         "--config.num_train=256", "--config.num_test=128", "--config.stitch.steps=400",
         "--config.stitch.grouping=single", "--config.stitch.max_stitches_per_wave=1",
         "--config.stitch.progress=False", "--config.stitch.baselines=False"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # The job with SIGINT raising KeyboardInterrupt, as from a shell: a child inherits an
  # ignored SIGINT, and an earlier test in this worker process may have left it
  # ignored here (the job then never sees the signal and finishes with status 0).
  shim = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
          " runpy.run_module('fula_jax.main', run_name='__main__', alter_sys=True)")
  proc = subprocess.Popen([sys.executable, "-c", shim, *cmd[3:]], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while not list(wd.glob("stitch/*/*.json")):
      assert proc.poll() is None, proc.communicate()
      assert time.time() < deadline, "no unit finished"
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, (out, err)
  assert "Traceback" not in err, err
  line = [l for l in err.splitlines() if "interrupted" in l]
  assert len(line) == 1 and "rerun the same command to resume" in line[0], err
  done = int(line[0].split("interrupted: ")[1].split(" of ")[0])
  assert 1 <= done < 3
  kept = {p: p.stat().st_mtime_ns for p in wd.glob("stitch/*/*.json")}
  assert len(kept) == done
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert {p: p.stat().st_mtime_ns for p in kept} == kept  # resumed, not recomputed
  assert len(list(wd.glob("stitch/*/*.json"))) == 3
