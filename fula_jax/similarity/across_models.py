"""Model x model matrices: one chosen point of every model of a zoo, compared pairwise.

This is the matrix Jones et al. (2022) and platonic-rep (Huh et al. 2024) show: rows
and columns are models, each cell a measure between two models' representations of the
same examples at one point (by default each model's last stitch point, the features
its head reads: 'penultimate').

  mats = similarity.model_matrix({"r18_s0": (m0, v0), "r18_s1": (m1, v1), ...},
                                 test_split, ("cka_linear_debiased", "mutual_knn"))
  mats["mutual_knn"].plot()

The job (`configs/model_matrix.py`) takes the models as trained workdirs or
architecture + weights files. Every measure is computed in memory on the first
`max_examples` examples, which each model's forward pass sees once, batch by batch.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from fula_jax import errors
from fula_jax import progress as progress_lib
from fula_jax import results
from fula_jax.similarity import measures as measures_lib

PENULTIMATE = "penultimate"


def resolve_point(model: Any, point: str, name: str) -> str:
  """`point` of `model`: a point name, 'logits', or 'penultimate' (its last point)."""
  from fula_jax import models
  if point == PENULTIMATE:
    return list(model.point_names)[-1]
  try:
    return models.base.check_points(model, [point], extra=(models.LOGITS,))[0]
  except errors.UserError as e:
    raise errors.ConfigError(f"Model {name!r}: {e}") from e


def activations(zoo: Mapping[str, tuple[Any, Any]], points: Mapping[str, str], data: Any,
                *, batch_size: int = 256, max_examples: int = 2000,
                progress: bool = True) -> dict[str, np.ndarray]:
  """{model name: (n, ...) activation at its point} on the first `max_examples` real
  examples of `data` (a source, arrays, or batches)."""
  from fula_jax import data as data_lib
  from fula_jax.similarity.job import _capture_fn
  batches, num = data_lib.as_batches(data, batch_size)
  captures = {name: _capture_fn(model, [points[name]]) for name, (model, _) in zoo.items()}
  kept: dict[str, list[np.ndarray]] = {name: [] for name in zoo}
  count = 0
  total = min(num or 0, -(-max_examples // batch_size))
  bar = progress_lib.Progress("model matrix", total, unit="batch", enabled=progress)
  for step, batch in enumerate(batches):
    images = np.asarray(batch["image"], np.float32)
    mask = np.asarray(batch.get("mask", np.ones(len(images))), bool)
    idx = np.flatnonzero(mask)[:max_examples - count]
    for name, (_, variables) in zoo.items():
      kept[name].append(np.asarray(captures[name](variables, images)[0])[idx])
    count += len(idx)
    bar.update(step + 1, extra=f"{count} examples")
    if count >= max_examples:
      break
  if count == 0:
    raise ValueError("No examples: the data held no real (unmasked) rows.")
  return {name: np.concatenate(v) for name, v in kept.items()}


def model_matrix(zoo: Mapping[str, tuple[Any, Any]], data: Any,
                 measures: Sequence[str] = ("cka_linear_debiased",), *,
                 point: str | Mapping[str, str] = PENULTIMATE, batch_size: int = 256,
                 max_examples: int = 2000, progress: bool = True,
                 **options: Any) -> dict[str, results.Matrix]:
  """{measure: Matrix} with every model of `zoo` ({name: (model, variables)}) as a row
  and a column. `point` is one point for all models, or {name: point}. `options` go to
  every measure (e.g. k for the kNN family)."""
  if len(zoo) < 2:
    raise ValueError(f"A model matrix needs at least 2 models; got {len(zoo)}.")
  for m in measures:
    measures_lib.get(m)
  points = {name: resolve_point(model, point[name] if isinstance(point, Mapping)
                                else point, name) for name, (model, _) in zoo.items()}
  acts = activations(zoo, points, data, batch_size=batch_size, max_examples=max_examples,
                     progress=progress)
  names = list(zoo)
  out = {}
  for m in measures:
    measure = measures_lib.get(m)
    opts = {k: v for k, v in options.items() if k in measure.defaults}
    mat, info = measures_lib.matrix(m, acts, None, label_a="models", label_b="models",
                                    **opts)
    out[m] = results.Matrix(mat, names, names, m, "models", "models", dict(
        axes="models", points=points, n=info["n"], options=info["options"],
        nan_reasons=info["nan_reasons"], kind=measure.kind,
        symmetric=measure.symmetric, max_examples=max_examples))
  return out


# ----------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------


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
