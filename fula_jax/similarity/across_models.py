"""Model x model matrices: one chosen point of every model of a zoo, compared pairwise.

This is the matrix Jones et al. (2022) and platonic-rep (Huh et al. 2024) show: rows
and columns are models, each cell a measure between two models' representations of the
same examples at one point (by default each model's last stitch point, the features
its head reads: 'penultimate').

  mats = similarity.model_matrix({"r18_s0": (m0, v0), "r18_s1": (m1, v1), ...},
                                 test_split, ("cka_linear_debiased", "mutual_knn"))
  mats["mutual_knn"].plot()

The job (`configs/model_matrix.py`, :mod:`model_matrix_job`) takes the models as
trained workdirs or architecture + weights files. Every measure is computed in memory on the first
`max_examples` examples, which each model's forward pass sees once, batch by batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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
  from fula_jax.similarity.layers import capture_fn
  batches, num = data_lib.as_batches(data, batch_size)
  captures = {name: capture_fn(model, [points[name]]) for name, (model, _) in zoo.items()}
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
