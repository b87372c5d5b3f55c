"""Runs that several test files read, each made once per session through the
`computed_once` fixture: `computed_once(name, MAKERS[name])`. Each maker fills the
directory it is given; `WORKDIRS[name]` is the workdir inside it. Among them the runlocal
CNN (`first_model`), which the training, stitching and command-line tests all read: the
suite trains it once."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shlex
import subprocess
import sys

import job_endings

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
  """The environment of a command-line job run by a test: one CPU device, the
  repository importable, the run's shared compilation cache, no verbose tracebacks;
  `extra` on top."""
  from conftest import subprocess_cache_env

  from fula_jax import main
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(REPO), **subprocess_cache_env())
  env.pop(main.VERBOSE_ENV, None)
  return dict(env, **extra)


def quickstart_tiny(root: pathlib.Path) -> None:
  """The command `results.load` suggests for a workdir without results, run as printed
  (but for the config's path: it says "from the repository root", and this runs
  elsewhere), from a directory that is not the repository, with a relative config path
  and a relative workdir holding a space, on one CPU device."""
  from fula_jax import results
  cwd = root / "somewhere else"
  cwd.mkdir()
  try:
    results.load("runs/quick start")
    raise AssertionError("results.load found results in a directory that has none")
  except results.NoResultsError as missing:
    suggested = re.search(r"`(python -m fula_jax\.main [^`]*)`", str(missing)).group(1)
  argv = shlex.split(suggested)[1:]
  assert argv == ["-m", "fula_jax.main", "--config=configs/quickstart.py:tiny",
                  "--workdir=runs/quick start"], argv
  argv[2] = argv[2].replace("configs", os.path.relpath(REPO / "configs", cwd), 1)
  proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=cli_env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def first_model(root: pathlib.Path) -> None:
  """A new user's first model, trained as the stitch job's missing-model error says
  (configs/train.py:model=cnn,runlocal as shipped), then the command its run ends with,
  both run as printed from the repository root on one CPU device. What each printed and
  returned goes to `root / run.json`; the model is `root / model`."""
  def run(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    return {"argv": argv, "rc": proc.returncode, "stdout": proc.stdout,
            "stderr": proc.stderr}

  missing = run(["-m", "fula_jax.main", "--config=configs/stitch.py:runlocal",
                 f"--workdir={root / 'stitch'}", f"--config.model_a_workdir={root / 'model'}"])
  suggested = missing["stderr"].split("`")[1]
  train = run(shlex.split(suggested)[1:])
  record = {"missing": missing, "suggested": suggested, "train": train}
  if train["rc"] == 0:
    lines = train["stdout"].strip().splitlines()
    record["next"] = run(shlex.split(lines[-1].removeprefix("Next:    ").split("  (")[0])[1:])
  (root / "run.json").write_text(json.dumps(record))


def study_config(name: str):
  """The study's `tiny` config as its tests run it (the FuLA study keeps its stitch
  parameters, which the tests rebuild stitches from)."""
  import importlib
  config = importlib.import_module(f"configs.study_{name}").get_config("tiny")
  if name == "fula":
    config.stitch.save_params = True
  return config


def run_study(name: str, root: pathlib.Path) -> None:
  """Study `name` at `tiny` into `root / name`; what it returned, with what it printed,
  into `root / out.pickle`."""
  import importlib
  study = importlib.import_module(f"experiments.study_{name}")
  out, printed = job_endings.run_printing(study.run, study_config(name), str(root / name))
  out["printed"] = printed
  (root / "out.pickle").write_bytes(pickle.dumps(out))


def in_own_process(module: str, function: str, *args):
  """`module.function(*args)` in a process of its own on one CPU device, as a CPU
  user's run has; its return value. For long training that needs no sharding: in a test
  worker it would run on the worker's 8 fake devices, about a quarter slower (the FuLA
  study at tiny: 86 s against 67 s; the Jones runlocal donors: 73 s against 55 s)."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    call, back = pathlib.Path(tmp) / "call.pickle", pathlib.Path(tmp) / "return.pickle"
    call.write_bytes(pickle.dumps((module, function, args)))
    proc = subprocess.run([sys.executable, __file__, str(call), str(back)], env=cli_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return pickle.loads(back.read_bytes())


def _study(name: str):
  def make(root: pathlib.Path) -> None:
    """The tests that rerun the study (and the README walk) resume it in the worker,
    on 8 devices."""
    in_own_process("shared_runs", "run_study", name, root)
  return make


def tiny_study(computed_once, name: str) -> tuple:
  """(config, workdir, what run returned with what it printed) of study `name` at
  `tiny`, computed once per session."""
  root = computed_once(f"study_{name}-tiny", MAKERS[f"study_{name}-tiny"])
  return study_config(name), root / name, pickle.loads((root / "out.pickle").read_bytes())


MAKERS = {"quickstart-tiny": quickstart_tiny, "study_fula-tiny": _study("fula"),
          "study_jones-tiny": _study("jones"), "first-model": first_model}
WORKDIRS = {"quickstart-tiny": "somewhere else/runs/quick start",
            "study_fula-tiny": "fula", "study_jones-tiny": "jones", "first-model": "model"}


def first_model_run(computed_once) -> tuple[pathlib.Path, dict]:
  """(the model's workdir, what each command of :func:`first_model` printed and
  returned), computed once per session."""
  root = computed_once("first-model", first_model)
  return root / "model", json.loads((root / "run.json").read_text())


if __name__ == "__main__":  # in_own_process's process: python shared_runs.py CALL RETURN
  import importlib
  module, function, args = pickle.loads(pathlib.Path(sys.argv[1]).read_bytes())
  value = getattr(importlib.import_module(module), function)(*args)
  pathlib.Path(sys.argv[2]).write_bytes(pickle.dumps(value))
