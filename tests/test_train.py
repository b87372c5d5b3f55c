"""Training: CLI overrides, accuracy on digits, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy import special

import shared_runs
from fula_jax import data, defaults
from fula_jax.train import checkpoint, loop

REPO = Path(__file__).resolve().parents[1]


def _env(cache: Path | None = None) -> dict[str, str]:
  """One device; with `cache`, JAX's persistent compilation cache shared by the runs of
  one test (they compile the same programs; results do not depend on it)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  if cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _main(*args: str, timeout: float = 240, cache: Path | None = None
          ) -> subprocess.CompletedProcess:
  env = _env(cache)
  return subprocess.run([sys.executable, "-m", "fula_jax.main", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _load_config(arg: str):
  return defaults.load_config(REPO / "configs" / "train.py", arg)


def test_unknown_model_and_dataset_list_valid_names(tmp_path):
  config = _load_config("runlocal")
  config.model.name = "resnet19"
  with pytest.raises(KeyError, match="resnet18"):
    loop.build_model(config)
  config = _load_config("runlocal")
  config.data.name = "cifar11"
  with pytest.raises(KeyError, match="cifar10"):
    loop.run(config, str(tmp_path))


def test_cli_override_reaches_the_job_and_config_is_written(tmp_path):
  r = _main("--config=configs/train.py:runlocal", f"--workdir={tmp_path}",
            "--config.train.num_steps=3", "--config.train.batch_size=32",
            "--config.model.kwargs.widths=(4,8)", "--config.seed=7")
  assert r.returncode == 0, r.stderr[-3000:]
  model, variables, config = checkpoint.load_trained(tmp_path)
  assert config.seed == 7 and config.train.num_steps == 3
  assert tuple(config.model.kwargs.widths) == (4, 8)
  assert model.point_names == ("conv1", "conv2", "pool")
  assert variables["params"]["conv2"]["Conv_0"]["kernel"].shape[-1] == 8
  assert (tmp_path / "checkpoints" / "3").is_dir()


def test_runlocal_cnn_reaches_90_percent_on_digits(computed_once):
  """configs/train.py:model=cnn,runlocal as shipped (the suite's shared first model,
  tests/shared_runs.py, trained by the command as a user types it) reaches 0.9, and
  ends with where the model is and a next command that works as printed."""
  import shlex
  workdir, run = shared_runs.first_model_run(computed_once)
  assert run["train"]["rc"] == 0, run["train"]["stderr"][-3000:]
  config = checkpoint.read_config(workdir)
  shipped = _load_config("model=cnn,runlocal").to_json()  # as the job stores it
  assert config.to_dict() == json.loads(shipped)
  out = checkpoint.io.read_json(workdir / "summary.json")
  assert out["test_accuracy"] >= 0.90, out["test_accuracy"]
  lines = run["train"]["stdout"].strip().splitlines()
  assert lines[-2].startswith(f"Model:   {workdir} ")
  command = lines[-1].removeprefix("Next:    ").split("  (")[0]
  argv = shlex.split(command)
  assert argv[:3] == ["python", "-m", "fula_jax.main"], argv
  assert run["next"]["argv"] == argv[1:]
  assert run["next"]["rc"] == 0, run["next"]["stderr"][-2000:]
  assert (Path(f"{workdir}_similarity") / "summary.json").exists()
  # The report: final accuracy and the curves it drew from the run's history.
  hist = checkpoint.io.read_json(workdir / "history.json")
  steps = [r["step"] for r in hist["train"]]
  assert steps == sorted(set(steps)) and steps[-1] == out["steps"]
  assert hist["test"][-1]["test/accuracy"] == pytest.approx(out["test_accuracy"])
  report = (workdir / "report.md").read_text()
  assert f"test accuracy **{out['test_accuracy']:.4f}**" in report
  assert (workdir / "curves.png").stat().st_size > 5000
  assert out["test_n"] == len(data.load(config.data, "test").labels)
  # The workdir is loadable and reproduces the reported accuracy.
  model, variables, cfg = checkpoint.load_trained(workdir)
  ev = loop.evaluate(model, variables, data.load(cfg.data, "test"), 100)
  assert ev["accuracy"] == pytest.approx(out["test_accuracy"])


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  common = ["--config=configs/train.py:runlocal", "--config.train.num_steps=60",
            "--config.train.checkpoint_every_steps=10", "--config.train.batch_size=64",
            "--config.model.kwargs.widths=(8,16)"]
  cache = tmp_path / "compilation_cache"
  # Uninterrupted reference run.
  ref = _main(*common, f"--workdir={tmp_path / 'ref'}", cache=cache)
  assert ref.returncode == 0, ref.stderr[-3000:]

  # Interrupted run: SIGKILL once a mid-run checkpoint exists, then rerun.
  work = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, "-m", "fula_jax.main", *common,
                           f"--workdir={work}"], cwd=REPO, env=_env(cache),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (work / "checkpoints" / "20").is_dir():
      break
    time.sleep(0.05)
  assert proc.poll() is None, "training finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and max(steps) < 60, steps

  resumed = _main(*common, f"--workdir={work}", cache=cache)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  summary = checkpoint.io.read_json(work / "summary.json")
  assert 0 < summary["resumed_from"] < 60

  _, v_ref, _ = checkpoint.load_trained(tmp_path / "ref")
  _, v_res, _ = checkpoint.load_trained(work)
  for a, b in zip(jax.tree_util.tree_leaves(v_ref), jax.tree_util.tree_leaves(v_res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The curves survive the kill: one entry per logged step, as in the reference run.
  h_ref, h_res = (checkpoint.io.read_json(d / "history.json") for d in (tmp_path / "ref", work))
  assert [r["step"] for r in h_res["train"]] == [r["step"] for r in h_ref["train"]]
  np.testing.assert_allclose([r["train/loss"] for r in h_res["train"]],
                             [r["train/loss"] for r in h_ref["train"]], rtol=1e-6)


def test_missing_and_corrupted_checkpoints_fail_clearly(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
    checkpoint.load_trained(tmp_path / "nothing")
  r = _main("--config=configs/train.py:runlocal", f"--workdir={tmp_path / 'w'}",
            "--config.train.num_steps=2", "--config.train.batch_size=32",
            "--config.model.kwargs.widths=(4,8)")
  assert r.returncode == 0, r.stderr[-3000:]
  for f in (tmp_path / "w" / "checkpoints" / "2").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\x00garbage")
  with pytest.raises(checkpoint.CheckpointError, match="could not be read"):
    checkpoint.load_trained(tmp_path / "w")


def test_models_rebuilt_from_json_config_are_hashable(tmp_path):
  config = _load_config("runlocal")
  config.model.kwargs = dict(widths=[4, 8])  # what a JSON round trip gives back
  model = loop.build_model(config)
  assert model.widths == (4, 8)
  hash(model)


def test_evaluating_new_weights_of_a_model_compiles_nothing_and_equals_a_forward_pass():
  """`loop.evaluate` keeps the weights as arguments, so evaluating other weights of the
  same model (the next evaluation during training, another seed) reuses its program;
  its accuracy and mean loss are those of a plain forward pass, in NumPy."""
  from fula_jax import models, sharding
  cfg = _load_config("runlocal")
  cfg.data.image_size, cfg.data.channels = None, 1  # native 8x8 digits
  test = data.load(cfg.data, "test")
  model = models.get_model("cnn", num_classes=10, widths=(4, 8))
  first, second = (models.init(model, jax.random.PRNGKey(s), (1, 8, 8, 1)) for s in (0, 1))
  loop.evaluate(model, first, test, 64)
  with sharding.count_compiles() as count:
    got = loop.evaluate(model, second, test, 64)
  assert count.compiled == 0, count
  log_p = special.log_softmax(
      np.asarray(models.forward(model, second, test.images), np.float64), -1)
  assert got["n"] == len(test.labels)
  assert got["accuracy"] == pytest.approx(np.mean(log_p.argmax(-1) == test.labels))
  assert got["loss"] == pytest.approx(-log_p[np.arange(len(test.labels)), test.labels].mean(),
                                      rel=1e-5)
