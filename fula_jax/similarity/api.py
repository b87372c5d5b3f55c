"""`matrices`: every requested similarity measure between two models, as results.Matrix.

  from fula_jax import similarity
  mats = similarity.matrices(model_a, vars_a, model_b, vars_b, test_images,
                             measures=("cka_linear_debiased", "procrustes"))
  mats["cka_linear_debiased"].plot()

Models follow the model protocol (the zoo, `fula_jax.models.from_flax`, ...). `data` is
a batch source (e.g. a `fula_jax.data.Split`), images (N, H, W, C) in [0, 1], ``(images,
labels)``, or any iterable of batches ``{'image', 'mask'?}`` of one size (pad the last,
with mask 0 on padding).
"""

from __future__ import annotations

from typing import Any, Sequence

from fula_jax import results


def matrices(model_a: Any, vars_a: Any, model_b: Any = None, vars_b: Any = None,
             data: Any = None, measures: Sequence[str] = ("cka_linear_debiased",), *,
             batch_size: int = 256, name_a: str = "A", name_b: str | None = None,
             **kwargs: Any) -> dict[str, results.Matrix]:
  """``{measure: results.Matrix}`` of layer-by-layer similarity, rows = A's points.

  `model_b` None compares A with itself. Other keyword arguments are those of the
  engine, :func:`fula_jax.similarity.layers.matrices`: the typed `points`,
  `estimator` and `uncertainty` (:class:`~fula_jax.similarity.layers.Points`, ...) or
  their flat keywords (``points_a=[...]``, ``estimator='exact'``, ``calibrate=200``),
  `mesh`, `progress`.
  """
  from fula_jax.data import as_batches
  from fula_jax.similarity import layers
  if data is None:
    raise ValueError("similarity.matrices needs data: images, a Split, or batches.")
  batches, n = as_batches(data, batch_size)
  out = layers.matrices(model_a, vars_a, model_b, vars_b, batches, measures,
                        model_a_name=name_a, model_b_name=name_b, num_batches=n, **kwargs)
  return {m.measure: m for m in out}
