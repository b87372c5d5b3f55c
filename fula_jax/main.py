"""Entry point: ``python -m fula_jax.main --config=configs/X.py[:args] --workdir=DIR``.

Thin on purpose: parse flags, start `jax.distributed` when there are several processes,
write the resolved config into the workdir, and hand over to the job's library function
(which a Colab can call directly with the same config).

Paths on the command line may be relative, start with ``~`` or hold spaces; they are
made absolute here, once (bucket URLs such as ``gs://...`` are left as they are). A
mistake in what was asked for (an unknown name or config key, a missing checkpoint, a
dataset that is not prepared, points that cannot be stitched) ends with one line on
stderr and exit status 2; ``--verbose`` (or ``FULA_JAX_VERBOSE=1``) adds the traceback.
Ctrl-C ends with one line (what was kept, and that rerunning the same command resumes)
and exit status 130.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from typing import Any, Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fula_jax import cpu_flags, errors, registry

# job name -> "module:function"; imported lazily so one job's dependencies never slow
# down another's start-up.
JOBS = {
    "train": "fula_jax.train.loop:run",
    "similarity": "fula_jax.similarity.job:run",
    "model_matrix": "fula_jax.similarity.model_matrix_job:run",
    "stitch": "fula_jax.stitching.job:run",
    "quickstart": "fula_jax.quickstart:run",
    # Studies live in experiments/ (importable from the repository root).
    "study_jones": "experiments.study_jones:run",
    "study_fula": "experiments.study_fula:run",
}
# Config fields that hold local paths (or bucket URLs), resolved like --workdir.
PATH_SUFFIXES = ("workdir", "data_dir", "weights")
VERBOSE_ENV = "FULA_JAX_VERBOSE"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally followed by ':args'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs go (local or gs://).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs on "
    "GPU clusters (on Cloud TPU VMs leave unset and pass --multihost).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() with auto-detection "
    "(Cloud TPU VM slices, SLURM, Open MPI).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, f"Show the traceback of user errors too (or set {VERBOSE_ENV}=1).")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_job(name: str):
  """The library function that runs job `name`. A study in experiments/ is found from
  any working directory when the package is used from its repository (pip install -e)."""
  module_name, fn_name = registry.lookup("job", name, JOBS).split(":")
  if module_name.startswith("experiments."):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repo, "experiments")) and repo not in sys.path:
      sys.path.append(repo)
    try:
      return getattr(importlib.import_module(module_name), fn_name)
    except ModuleNotFoundError as e:
      if e.name not in ("experiments", module_name):
        raise
      raise errors.ConfigError(
          f"Job {name!r} is a study in the repository's experiments/ folder, which this "
          "installation does not have: install fula_jax from a clone with "
          "`pip install -e .` (or run from the clone's root).") from None
  return getattr(importlib.import_module(module_name), fn_name)


def initialize_distributed() -> None:
  import jax
  if _COORDINATOR.value or (_NUM_PROCESSES.value or 1) > 1:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


class _QuietLibraries(logging.Filter):
  """Drop INFO chatter of checkpointing internals; warnings and errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        part in record.pathname for part in ("/orbax/", "/tensorstore/"))


# ---------------------------------------------------------------- the command line


def _verbose(argv: Sequence[str] = ()) -> bool:
  flag = any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1")
             for a in argv)
  return flag or os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def fail(message: str) -> None:
  """End the process after a user error: one line on stderr, exit status 2."""
  print(f"fula_jax: error: {errors.one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USER_ERROR)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for k, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and k + 1 < len(argv):
      return argv[k + 1]
  return None


def check_config_flags(argv: Sequence[str]) -> None:
  """Raise a `UserError` for a config file that does not exist, a bad ``:args``
  argument, or a ``--config.KEY=...`` override naming a key the config lacks.

  absl would report these with a traceback of the config loader; this names the
  problem and the valid choices instead.
  """
  from fula_jax import defaults
  spec = _flag_value(argv, "config")
  if spec is None:
    return
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    folder = os.path.dirname(os.path.abspath(path))
    found = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
        folder) else []
    where = (f" Config files in {folder}: {', '.join(found)}." if found else
             " Run from the repository root, or give the path to a configs/*.py file.")
    raise errors.ConfigError(f"Config file {path!r} does not exist (looked for "
                             f"{os.path.abspath(path)}).{where}")
  config = defaults.load_config(path, arg or None)
  for a in argv:
    if not a.startswith("--config."):
      continue
    dotted = a[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for key in dotted.split("."):
      if not hasattr(node, "keys"):
        break  # a value (or a dict-valued placeholder): config_flags takes it from here
      if key not in node.keys():
        prefix = "".join(f"{w}." for w in walked)
        raise registry.unknown("config key", f"{prefix}{key}",
                               [f"{prefix}{k}" for k in sorted(node.keys())])
      node, walked = node[key], walked + [key]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with user mistakes reported as one line and exit status 2."""
  try:
    check_config_flags(argv)
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      raise errors.ConfigError("--config is required.")
  except errors.UserError as e:
    if _verbose(argv):
      raise
    fail(str(e))
  except (flags.Error, OSError, KeyError, AttributeError) as e:
    if _verbose(argv):
      raise
    fail(f"{str(e).strip().splitlines()[0]} (run with --helpshort for the flags)")
  return rest


def resolve_paths(config: Any) -> Any:
  """`config` with every local path (a field named like `PATH_SUFFIXES`, at any depth)
  made absolute, so config.json records what was used; URLs stay as they are."""
  from fula_jax import io
  for key in list(config.keys()):
    value = config[key]
    if hasattr(value, "keys"):
      resolve_paths(value)
    elif isinstance(value, str) and value and key.endswith(PATH_SUFFIXES):
      config[key] = io.resolve(value)
  return config


def compilation_cache(config: Any, workdir: str) -> str | None:
  """Where a job keeps its compiled programs, so that a rerun or a resumed job compiles
  nothing: ``stitch.compilation_cache`` when set ('off': nowhere), else
  ``<workdir>/compilation_cache``."""
  stitch = config.get("stitch")
  named = str(stitch.get("compilation_cache") or "") if stitch is not None else ""
  if named == "off":
    return None
  return named or os.path.join(workdir, "compilation_cache")


def main(argv, job: Callable[..., Any] | None = None):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  verbose = _VERBOSE.value or _verbose()
  try:
    from fula_jax import io, sharding
    config = resolve_paths(_CONFIG.value)
    cpu_flags.set_for_jobs()
    workdir = io.resolve(_WORKDIR.value)
    job = job or resolve_job(config.job)
    initialize_distributed()
    if io.is_writer():
      io.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    sharding.use_compilation_cache(compilation_cache(config, workdir))
    job(config, workdir)
  except errors.UserError as e:
    if verbose:
      raise
    fail(str(e))
  except KeyboardInterrupt as e:
    if verbose:
      raise
    message = str(e) if isinstance(e, errors.Interrupted) else (
        "interrupted; what finished is kept in the workdir: rerun the same command to "
        "resume")
    print(f"fula_jax: {message}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_INTERRUPTED)


def script(job: Callable[..., Any]) -> None:
  """Run `job(config, workdir)` with this module's flags: the ``__main__`` of a study
  script in experiments/, which then takes the same flags as ``fula_jax.main``."""
  app.run(functools.partial(main, job=job), flags_parser=parse_flags)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
