"""The model x model job (`configs/model_matrix.py`): load a zoo of trained workdirs or
architecture + weights files, and write one :func:`across_models.model_matrix` per
measure, a report, `summary.json` and its closing lines."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from fula_jax import errors
from fula_jax import results
from fula_jax.similarity.across_models import model_matrix


def _name(spec: str, taken: set[str]) -> str:
  base = os.path.basename(spec.rstrip("/")) or spec
  name, k = base, 2
  while name in taken:
    name, k = f"{base}_{k}", k + 1
  taken.add(name)
  return name


def load_zoo(config: ml_collections.ConfigDict) -> tuple[dict, Any]:
  """({name: (model, variables)}, data config of the first trained workdir or None)."""
  from fula_jax import donors, io
  specs = list(config.models or ())
  if len(specs) < 2:
    raise errors.ConfigError(
        "config.models needs at least 2 models: trained workdirs, or 'ARCH=FILE' for an "
        "architecture and its weights file, e.g. --config.models=\"('/tmp/cnn_s0', "
        "'/tmp/cnn_s1')\".")
  zoo, taken, data_cfg = {}, set(), None
  for spec in specs:
    spec = str(spec)
    arch, sep, weights = spec.partition("=")
    block = (ml_collections.ConfigDict(dict(model_a=dict(arch=arch, weights=weights,
                                                             kwargs={})))
             if sep else ml_collections.ConfigDict(dict(
                 model_a=dict(workdir=io.resolve(spec)))))
    donor = donors.load(block, "a")
    zoo[_name(spec if not sep else f"{arch}:{os.path.basename(weights)}", taken)] = (
        donor.model, donor.variables)
    data_cfg = data_cfg or donor.data
  return zoo, data_cfg


def _plain(options: Any) -> dict:
  return options.to_dict() if hasattr(options, "to_dict") else dict(options or {})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Load the zoo and data as `config` says; write one model x model matrix per
  measure under `workdir`/results. Returns {measure: the matrix as nested lists}."""
  from fula_jax import data, io, report
  t0 = time.perf_counter()
  zoo, trained_on = load_zoo(config)
  data_cfg = trained_on if config.data_from == "model_a" and trained_on else config.data
  split = data.source(data_cfg, config.split)
  mats = model_matrix(zoo, split, tuple(config.measures), point=config.point,
                      batch_size=int(config.batch_size),
                      max_examples=int(config.max_examples),
                      progress=jax.process_index() == 0, **_plain(config.options))
  names = list(zoo)
  for name, m in mats.items():
    m.meta.update(split=config.split, data=getattr(split, "name", ""))
    results.save(workdir, f"models_{name}", m, png=bool(config.png))
  summary = {"job": "model_matrix", "models": names, "point": config.point,
             "split": config.split, "data": getattr(split, "name", ""),
             "measures": {name: {"nan_cells": int(np.isnan(m.matrix).sum()),
                                 "n": None if m.meta.get("n") is None else int(m.meta["n"])}
                          for name, m in mats.items()},
             "elapsed_s": time.perf_counter() - t0}
  for name, m in mats.items():
    off = m.matrix[~np.eye(len(names), dtype=bool)]
    off = off[np.isfinite(off)]
    print(f"{name:28s} {len(names)} x {len(names)} models, off-diagonal mean "
          + (f"{off.mean():.3f}" if off.size else "n/a"), flush=True)
  report.write(workdir, f"Model x model similarity at '{config.point}'",
               [f"**{n}**" for n in names], {f"models_{k}": m for k, m in mats.items()})
  results.finish_job(workdir, summary, report=io.path(workdir) / report.REPORT_FILE)
  return {name: m.matrix.tolist() for name, m in mats.items()}
