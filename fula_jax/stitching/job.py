"""The stitching job: whole L_A x L_B stitching matrices between two trained models.

``run(config, workdir)`` (config: ``configs/stitch.py``) loads both models
(`fula_jax.donors`: a trained workdir, or an architecture and a weights file), loads the
data (model A's data settings, or ``config.data`` -- always for a model from a weights
file; with ``config.data_overrides`` on top, e.g. the shortcut cue removed at
evaluation), runs :func:`fula_jax.stitching.run_sweep` with ``config.stitch`` (resuming
from ``<workdir>/stitch`` when interrupted) and writes every matrix with
:func:`fula_jax.results.save` as ``stitch_<objective>_<measure>``.

When model B was trained on a different view of the same dataset (e.g. grayscale, or
another image size), B sees the examples as its own data config describes them, in the
same order; the stitch always goes from A's activations to B's.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from fula_jax import registry

_VIEW_KEYS = ("image_size", "channels", "grayscale")


def _data_config(base: ml_collections.ConfigDict, overrides: Any
                 ) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(base.to_dict())
  if overrides:
    cfg.update(ml_collections.ConfigDict(dict(overrides)))
  return cfg


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Run (or resume) the sweep `config` describes and save its matrices in `workdir`.

  Returns ``{'matrices': {name: {'shape', 'nan_cells'}}, 'end_accuracy', 'stats'}``.
  """
  from fula_jax import data, donors, io, report, results
  from fula_jax import stitching

  a = donors.load(config, "a")
  b = donors.load(config, "b", required=False) or a
  name_a, name_b = a.name, b.name
  model_a, vars_a, model_b, vars_b = a.model, a.variables, b.model, b.variables

  source = config.get("data_from", "model_a")
  registry.lookup("data source", source, {"model_a": 0, "config": 0})
  if a.data is None:
    source = "config"  # a model from a weights file: the data is config.data
  overrides = config.get("data_overrides", None)
  overrides = overrides.to_dict() if hasattr(overrides, "to_dict") else overrides
  dcfg_a = _data_config(a.data if source == "model_a" else config.data, overrides)
  dcfg_b = dcfg_a
  if source == "model_a" and b.data is not None and any(
      b.data.get(k) != a.data.get(k) for k in _VIEW_KEYS):
    dcfg_b = _data_config(a.data, overrides)
    for k in _VIEW_KEYS:
      dcfg_b[k] = b.data.get(k)

  n_train, n_test = config.get("num_train", None), config.get("num_test", None)
  train = data.source(dcfg_a, "train").take(n_train)
  test = data.source(dcfg_a, "test").take(n_test)
  train_b = test_b = None
  if dcfg_b is not dcfg_a:
    train_b = data.source(dcfg_b, "train").take(n_train)
    test_b = data.source(dcfg_b, "test").take(n_test)

  res = stitching.run_sweep(model_a, vars_a, model_b, vars_b, train, test, config.stitch,
                          workdir, train_b=train_b, test_b=test_b, name_a=name_a,
                          name_b=name_b)
  mats = res.matrices(name_a, name_b)
  summary = {}
  for name, m in mats.items():
    m.meta.update(data=train.name, data_overrides=overrides or {})
    results.save(workdir, name, m, png=bool(config.get("png", True)))
    summary[name] = {"shape": list(m.matrix.shape),
                     "nan_cells": int(np.isnan(m.matrix).sum())}
  unconverged = res.unconverged()
  rows = report.write(
      workdir, "Functional similarity by model stitching, layer by layer",
      [f"A (rows, the front): **{name_a}**",
       f"B (columns, the end): **{name_b}**, test accuracy {res.end_accuracy:.4f}"],
      mats, name_a=name_a, name_b=name_b)
  print()
  report.print_table(rows, convergence=False)
  line = res.convergence_summary()
  print("\n" + (line or "stitch sweep: every trained stitch converged."), flush=True)
  out = {"matrices": summary, "end_accuracy": res.end_accuracy, "stats": res.stats,
         "unconverged": {o: len(v) for o, v in unconverged.items()}}
  data.note_skipped(out, {"train": train, "test": test, "train_b": train_b,
                         "test_b": test_b})
  print()
  results.finish_job(workdir, out, report=io.path(workdir) / report.REPORT_FILE)
  return out
