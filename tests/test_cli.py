"""The command line as a new user meets it: relative, ``~`` and spaced paths from any
working directory, and user errors that end in one line and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import shared_runs

from fula_jax import analysis, io, main, results
from fula_jax.train import checkpoint

REPO = Path(__file__).resolve().parents[1]
ERROR_PREFIX = "fula_jax: error: "


def _start(args, cwd, **env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *args], cwd=cwd,
                          env=shared_runs.cli_env(**env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resolve_makes_local_paths_absolute_and_leaves_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert io.resolve("runs/a b") == str(tmp_path / "runs" / "a b")
  assert io.resolve("~/x") == str(tmp_path / "home" / "x")
  assert io.resolve("./y/../z") == str(tmp_path / "z")
  assert io.resolve(tmp_path / "abs") == str(tmp_path / "abs")
  for url in ("gs://bucket/run", "s3://b/r", "gs://bucket/relative/../x"):
    assert io.resolve(url) == url
  with pytest.raises(ValueError):
    io.resolve("")


@pytest.fixture(scope="module")
def quickstart(computed_once):
  """The README's first command, but :tiny, from a directory that is not the
  repository, with a relative config path and a relative workdir holding a space
  (tests/shared_runs.py). Returns (cwd, workdir). Computed once per session (the
  README walk reuses it): read it, copy it before changing it."""
  root = computed_once("quickstart-tiny", shared_runs.MAKERS["quickstart-tiny"])
  cwd = root / "somewhere else"
  return cwd, cwd / "runs" / "quick start"


def test_quickstart_from_another_directory_with_a_relative_workdir(quickstart, monkeypatch):
  cwd = quickstart[0]
  monkeypatch.chdir(cwd)  # everything below reads through relative paths
  mats = results.load("runs/quick start")
  assert {"cka_linear_debiased", "stitch_tlm/accuracy", "stitch_slm/accuracy",
          "stitch_dm/accuracy", "stitch_fula/accuracy"} <= set(mats)
  tlm = mats["stitch_tlm/accuracy"]
  assert (tlm.model_a, tlm.model_b) == ("cnn (seed 0)", "cnn (seed 1)")
  assert np.isfinite(tlm.matrix).any()
  assert 0.0 <= np.nanmin(tlm.matrix) and np.nanmax(tlm.matrix) <= 1.0
  model, variables, cfg = checkpoint.load_trained("runs/quick start/models/a_cnn")
  assert cfg.model.name == "cnn" and model.point_names == ("conv1", "conv2", "pool")
  assert mats["cka_linear_debiased"].rows == list(model.point_names)

  # The workdir written into config.json is the absolute one.
  written = io.read_json("runs/quick start/config.json")
  assert written["model_a"]["model"]["name"] == "cnn"
  assert (cwd / "runs" / "quick start" / "results" / "overview.png").stat().st_size > 0
  report = (cwd / "runs" / "quick start" / "report.md").read_text()
  for key in ("cka_linear_debiased", "stitch_tlm/accuracy", "stitch_fula/accuracy"):
    assert f"`{key}`" in report
  assert "results/overview.png" in report
  # Titles name each model once (they once read "A: A:cnn B: B:resnet20").
  for m in mats.values():
    title = m.title()
    assert title.count("seed 0") == 1 and title.count("seed 1") == 1, title


def test_every_nan_cell_of_the_quickstart_has_its_reason(quickstart):
  mats = results.load(quickstart[1])
  nans = analysis.all_nan_cells(mats)
  assert len(nans) and (nans["reason"] != analysis.NO_REASON).all(), (
      nans[nans["reason"] == analysis.NO_REASON])
  # The stitching matrices mark the pooled-vector / map cells, every objective alike.
  unstitchable = nans[nans["reason"].str.contains("Cannot stitch")]
  assert set(unstitchable["layer_a"] + "->" + unstitchable["layer_b"]) == {
      "conv1->pool", "conv2->pool", "pool->conv1", "pool->conv2"}
  dm_loss = analysis.nan_cells(mats["stitch_dm/train_loss"])
  assert dm_loss["reason"].str.contains("closed form").sum() == 5  # the stitchable cells


def test_explore_results_notebook_on_two_quickstart_runs(quickstart, tmp_path, run_notebook):
  """notebooks/explore_results.ipynb where its WORKDIR has no results yet (as on a fresh
  Colab): it runs the tiny quickstart there itself -- here with model B retrained with
  another seed (model A is copied in and reused) -- then diffs it against the first run."""
  first = quickstart[1]
  second = tmp_path / "runs" / "other seed"
  shutil.copytree(first / "models" / "a_cnn", second / "models" / "a_cnn")
  nb = run_notebook("explore_results", tmp_path, WORKDIR="runs/other seed",
                    QUICKSTART_ARGS="tiny,seed_b=2", OTHER_WORKDIR=str(first),
                    LABELS=("seed 2", "seed 1"))
  assert io.read_json(second / "models" / "b_cnn" / "config.json")["seed"] == 2
  assert io.read_json(second / "summary.json")["model_b"]["name"] == "cnn (seed 2)"
  text = _outputs_text(nb)
  assert f"{len(results.load(second))} matrices in runs/other seed" in text
  for shown in ("Spearman(cka_linear_debiased, accuracy)", "closed form",  # NaN reasons
                "max_abs_difference", "mean_this"):
    assert shown in text, shown
  assert _figures(nb) >= 6  # overview, depth lines, scatter, three difference maps


def _outputs_text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      parts.append(o.get("text", ""))
      parts.append(o.get("data", {}).get("text/plain", ""))
  return "\n".join(parts)


def _figures(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def broken_workdirs(tmp_path_factory, model_workdir):
  """Model workdirs for the error cases: a CNN, an MLP, and a CNN whose checkpoint
  files are overwritten with garbage."""
  make_model_workdir = model_workdir
  root = tmp_path_factory.mktemp("models")
  cnn = make_model_workdir(root / "cnn", "cnn", {"widths": (4, 6)})
  mlp = make_model_workdir(root / "mlp", "mlp", {"widths": (6,)}, seed=1)
  damaged = make_model_workdir(root / "damaged", "cnn", {"widths": (4, 6)})
  for f in (Path(damaged) / "checkpoints").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\x00garbage")
  results = root / "sim"  # a similarity job's workdir
  results.mkdir()
  (results / "config.json").write_text(json.dumps({"job": "similarity"}))
  failed = root / "failed"  # a train job that stopped before its first checkpoint
  failed.mkdir()
  (failed / "config.json").write_text(json.dumps({"job": "train",
                                                  "model": {"name": "resnet21"}}))
  return {"cnn": cnn, "mlp": mlp, "damaged": damaged, "root": root,
          "results": str(results), "failed": str(failed)}


def test_user_errors_end_with_one_line_and_status_2(tmp_path, broken_workdirs):
  w = broken_workdirs
  stitch = ["-m", "fula_jax.main", "--config=configs/stitch.py:runlocal",
            f"--workdir={tmp_path / 'out'}"]
  train = ["-m", "fula_jax.main", f"--workdir={tmp_path / 'out'}"]
  cases = {
      "unknown model": (train + ["--config=configs/train.py:model=resnet19,runlocal"],
                        ["Unknown model 'resnet19'", "resnet18", "Valid choices"]),
      "unknown config key": (train + ["--config=configs/train.py:runlocal",
                                      "--config.train.lerning_rate=0.1"],
                             ["train.lerning_rate", "train.learning_rate",
                              "Valid choices"]),
      "unknown config argument": (train + ["--config=configs/train.py:runlocl"],
                                  ["'runlocl'", "runlocal", "Valid choices"]),
      "unknown job": (train + ["--config=configs/train.py:runlocal",
                               "--config.job=trian"],
                      ["Unknown job 'trian'", "'train'", "stitch"]),
      "missing config file": (train + ["--config=configs/trian.py"],
                              ["configs/trian.py", "does not exist", "train.py"]),
      "missing checkpoint": (stitch + [f"--config.model_a_workdir={w['root']}/none"],
                             ["No trained model", "config.json is missing",
                              "configs/train.py"]),
      "not a trained model": (stitch + [f"--config.model_a_workdir={w['results']}"],
                              ["is not a trained model", "job='similarity'",
                               "configs/train.py"]),
      "training that failed": (stitch + [f"--config.model_a_workdir={w['failed']}"],
                               ["No trained model", "before its first checkpoint",
                                "Rerun its training command"]),
      "damaged checkpoint": (stitch + [f"--config.model_a_workdir={w['damaged']}"],
                             ["could not be read", "Delete that step"]),
      "dataset not prepared": (train + ["--config=configs/train.py:dataset=cifar10",
                                        f"--config.data.data_dir={tmp_path}/tfds"],
                               ["'cifar10' is not prepared", "download=True",
                                "data_dir"]),
      "unstitchable": (stitch + [f"--config.model_a_workdir={w['cnn']}",
                                 f"--config.model_b_workdir={w['mlp']}",
                                 "--config.stitch.pairs=conv1->fc1"],
                       ["Cannot stitch 'conv1'", "'fc1' (B, 6)", "pick pooled points"]),
  }
  procs = {}
  for name, (args, _) in cases.items():  # two at a time: this machine has 2 cores
    procs[name] = _start(args, REPO)
    if len(procs) % 2 == 0:
      procs[name].wait(timeout=300)
  for name, (args, wanted) in cases.items():
    out, err = procs[name].communicate(timeout=300)
    assert procs[name].returncode == 2, (name, (out + err)[-3000:])
    assert "Traceback" not in err, (name, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), (name, err[-3000:])
    for text in wanted:
      assert text in lines[0], (name, text, lines[0])


def test_the_suggested_training_command_works_as_printed(computed_once):
  """The missing-model error suggests a command; run as printed it trains a model (the
  suite's shared runlocal CNN, tests/shared_runs.py: the tests of training and of the
  stitch job read the same run)."""
  model, run = shared_runs.first_model_run(computed_once)
  missing = run["missing"]
  assert missing["rc"] == 2 and "Traceback" not in missing["stderr"], missing["stderr"]
  assert run["suggested"].startswith("python -m fula_jax.main --config=configs/train.py")
  assert run["suggested"].endswith(f"--workdir={model}"), run["suggested"]
  assert run["train"]["rc"] == 0, run["train"]["stderr"][-3000:]
  assert list((model / "checkpoints").iterdir())


def test_verbose_shows_user_error_tracebacks_and_bugs_keep_theirs(tmp_path):
  script = tmp_path / "job.py"
  script.write_text(textwrap.dedent("""
      import sys
      from fula_jax import errors, main

      BUG = sys.argv.pop() == "--bug"

      def job(config, workdir):
        if BUG:
          return 1 / 0
        raise errors.ConfigError("config.thing must be positive, got -1.")

      main.script(job)
  """))
  args = [str(script), f"--config={REPO}/configs/train.py:runlocal",
          f"--workdir={tmp_path}"]
  runs = {"user": _start(args + ["--user"], REPO),
          "verbose": _start(args + ["--verbose", "--user"], REPO),
          "env": _start(args + ["--user"], REPO, **{main.VERBOSE_ENV: "1"}),
          "bug": _start(args + ["--bug"], REPO)}
  out = {k: p.communicate(timeout=120) + (p.returncode,) for k, p in runs.items()}
  _, err, rc = out["user"]
  assert rc == 2 and "Traceback" not in err
  assert err.strip().endswith(f"{ERROR_PREFIX}config.thing must be positive, got -1.")
  for k in ("verbose", "env"):
    _, err, rc = out[k]
    assert rc != 0 and "Traceback" in err and "ConfigError" in err, (k, err[-2000:])
  _, err, rc = out["bug"]
  assert rc == 1 and "Traceback" in err and "ZeroDivisionError" in err
  assert ERROR_PREFIX not in err


def test_cli_jobs_keep_compiled_programs_in_their_workdir_unless_told_otherwise():
  import ml_collections

  from fula_jax import main
  stitch = ml_collections.ConfigDict({"stitch": {"compilation_cache": ""}})
  assert main.compilation_cache(stitch, "/w") == "/w/compilation_cache"
  assert main.compilation_cache(ml_collections.ConfigDict({"job": "train"}), "/w") == (
      "/w/compilation_cache")
  stitch.stitch.compilation_cache = "off"
  assert main.compilation_cache(stitch, "/w") is None
  stitch.stitch.compilation_cache = "/cache"
  assert main.compilation_cache(stitch, "/w") == "/cache"


def test_jobs_turn_off_ynn_convolutions_and_keep_a_users_own_setting():
  """The jobs start with XLA's YNNPACK convolutions off, added once to the XLA_FLAGS
  they were given; XLA_FLAGS that set that option already are left as they are."""
  from fula_jax import cpu_flags
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  cpu_flags.set_for_jobs(env)
  assert env["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=2",
      "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
  cpu_flags.set_for_jobs(env)
  assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  cpu_flags.set_for_jobs(own)
  assert own == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  unset: dict = {}
  cpu_flags.set_for_jobs(unset)
  assert unset == {
      "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}


def test_main_starts_every_job_with_its_cpu_flags(tmp_path, monkeypatch):
  """`fula_jax.main` extends XLA_FLAGS before the job its config names runs (here a
  stand-in job that records them)."""
  from absl import flags

  from fula_jax import main, sharding
  monkeypatch.setattr(sharding, "use_compilation_cache", lambda path: None)
  seen = {}
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  for config in ("similarity.py:runlocal", "train.py:runlocal", "stitch.py:runlocal"):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    argv = main.parse_flags(["fula_jax.main", f"--config={REPO / 'configs' / config}",
                             f"--workdir={tmp_path / config}"])
    main.main(argv, job=lambda cfg, wd: seen.update({config: os.environ["XLA_FLAGS"]}))
    assert seen[config].split() == [
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"], seen
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
