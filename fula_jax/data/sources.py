"""Whatever a user passes as data, as a batch source or a stream of batches.

Public functions take data as a batch source (a `Split`, or anything with
`train_batches`/`eval_batches`), as arrays (images, or ``(images, labels)``), or --
where one pass is enough, as for similarity -- as any iterable of batches
(``{'image', 'label'?, 'mask'?}``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from fula_jax.data.batching import num_eval_batches
from fula_jax.data.split import Split
from fula_jax.errors import ConfigError


def is_source(data: Any) -> bool:
  return all(hasattr(data, a) for a in ("train_batches", "eval_batches", "image_shape"))


def as_source(data: Any, name: str = "arrays") -> Any:
  """A batch source from a source, images, ``(images, labels)`` or ``{'image', 'label'}``.

  Arrays are images (N, H, W, C) in [0, 1]; without labels every label is 0 (enough
  for measures that need none; task-loss stitching needs real labels).
  """
  if is_source(data):
    return data
  labels = None
  if isinstance(data, Mapping) and "image" in data:
    images, labels = data["image"], data.get("label")
  elif isinstance(data, (tuple, list)) and len(data) == 2:
    images, labels = data
  elif hasattr(data, "shape"):
    images = data
  else:
    raise ConfigError(f"Cannot read data of type {type(data).__name__}: pass a "
                      "fula_jax.data.Split (or another batch source), images "
                      "(N, H, W, C), or (images, labels).")
  images = np.ascontiguousarray(np.asarray(images, np.float32))
  if images.ndim != 4:
    raise ConfigError(f"Images must be (N, H, W, C) in [0, 1]; got shape {images.shape}.")
  labels = (np.zeros((len(images),), np.int32) if labels is None
            else np.asarray(labels, np.int32).reshape(-1))
  if len(labels) != len(images):
    raise ConfigError(f"{len(images)} images but {len(labels)} labels.")
  return Split(images, labels, int(labels.max()) + 1 if len(labels) else 1, name)


def as_batches(data: Any, batch_size: int, *, process_index: int = 0,
               process_count: int = 1) -> tuple[Iterable[Mapping[str, Any]], int | None]:
  """(batches, how many or None) for one pass over `data`: a source or arrays are cut
  into padded, masked batches; an iterable of batches is passed through."""
  if is_source(data) or hasattr(data, "shape") or (
      isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape")) or (
      isinstance(data, Mapping) and "image" in data):
    source = as_source(data)
    n = num_eval_batches(source, batch_size)
    return source.eval_batches(batch_size, process_index=process_index,
                               process_count=process_count), n
  if isinstance(data, Iterable):
    return iter(data), None
  raise ConfigError(f"Cannot read data of type {type(data).__name__} as batches.")
