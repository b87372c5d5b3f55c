"""Entry point: ``python -m fula_jax.main --config=configs/X.py[:args] --workdir=DIR``.

Thin on purpose: parse flags, start `jax.distributed` when there are several processes,
write the resolved config into the workdir, and hand over to the job's library function
(which a Colab can call directly with the same config).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fula_jax import registry

# job name -> "module:function"; imported lazily so one job's dependencies never slow
# down another's start-up.
JOBS = {
    "train": "fula_jax.train.loop:run",
    "similarity": "fula_jax.similarity.job:run",
    "stitch": "fula_jax.stitching.job:run",
    "quickstart": "fula_jax.quickstart:run",
    # Studies live in experiments/ (importable from the repository root).
    "study_jones": "experiments.study_jones:run",
    "study_fula": "experiments.study_fula:run",
}

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
flags.mark_flags_as_required(["config", "workdir"])


def resolve_job(name: str):
  """The library function that runs job `name`."""
  module_name, fn_name = registry.lookup("job", name, JOBS).split(":")
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


def main(argv, job: Callable[..., Any] | None = None):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  job = job or resolve_job(config.job)
  initialize_distributed()
  from fula_jax import io
  if io.is_writer():
    io.write_json(os.path.join(_WORKDIR.value, "config.json"), config.to_dict())
  job(config, _WORKDIR.value)


def script(job: Callable[..., Any]) -> None:
  """Run `job(config, workdir)` with this module's flags: the ``__main__`` of a study
  script in experiments/, which then takes the same flags as ``fula_jax.main``."""
  app.run(functools.partial(main, job=job))


if __name__ == "__main__":
  app.run(main)
