"""TFDS datasets read through `tfds.data_source` (array_record; no TensorFlow graph).

A dataset that is not prepared on disk fails at once with instructions, unless
`download` is set: a real download without network hangs for minutes before failing.
"""

from __future__ import annotations

import os

import numpy as np

from fula_jax import io
from fula_jax.data import transforms
from fula_jax.errors import UserError

_CHUNK = 1024


class DatasetNotReadyError(UserError, RuntimeError):
  """A tfds dataset that is not prepared (in a readable format) where we looked."""


def _default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _not_prepared(tfds_name: str, data_dir: str | None, variant_dir: str) -> str:
  looked = data_dir if data_dir else f"{_default_data_dir()} (the tfds default)"
  return (
      f"Dataset {tfds_name!r} is not prepared in data_dir {looked} "
      f"(no dataset_info.json/features.json in {variant_dir}) and download is False.\n"
      "Fix it in one of two ways:\n"
      "  * let fula_jax download and prepare it: --config.data.download=True "
      "(needs network and disk);\n"
      f"  * prepare it elsewhere, e.g. `tfds build {tfds_name} --file_format=array_record "
      "--data_dir=DIR`, copy DIR here and pass --config.data.data_dir=DIR.")


def builder(tfds_name: str, *, data_dir: str | None, download: bool):
  """A prepared tfds builder; prepares it (array_record) only when `download` is set."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = io.resolve(data_dir) if data_dir else None
  b = tfds.builder(tfds_name, data_dir=data_dir)
  if not b.is_prepared():
    if not download:
      raise DatasetNotReadyError(_not_prepared(tfds_name, data_dir, str(b.data_path)))
    b.download_and_prepare(file_format="array_record")
  return b


def _to_float(images: np.ndarray, size: int) -> np.ndarray:
  """(n, H, W, C) uint8 -> (n, size, size, C) float32 in [0, 1]."""
  images = images.astype(np.float32) / 255.0
  if images.shape[1] != images.shape[2]:
    images = np.stack([transforms.center_crop_square(im) for im in images])
  return transforms.resize(images, size)


def _as_hwc(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  return image[..., None] if image.ndim == 2 else image


def read(tfds_name: str, split: str, *, data_dir: str | None, download: bool,
         size: int, image_key: str = "image", label_key: str = "label"
         ) -> tuple[np.ndarray, np.ndarray]:
  """One tfds split as float32 (N, size, size, C) images in [0, 1] and int32 labels.

  Non-square images are centre-cropped to a square before resizing.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = io.resolve(data_dir) if data_dir else None
  builder(tfds_name, data_dir=data_dir, download=download)
  try:
    source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:
    raise DatasetNotReadyError(
        f"Dataset {tfds_name!r} is prepared in data_dir {data_dir or _default_data_dir()} "
        "but not as array_record, which tfds.data_source needs. Re-prepare it with "
        f"`tfds build {tfds_name} --file_format=array_record` (or "
        "`tfds convert_format`).") from e
  n = len(source)
  if n == 0:
    raise DatasetNotReadyError(f"Split {split!r} of {tfds_name!r} is empty.")
  labels = np.empty((n,), np.int32)
  images = None
  for start in range(0, n, _CHUNK):
    stop = min(start + _CHUNK, n)
    records = [source[i] for i in range(start, stop)]
    raw = [_as_hwc(r[image_key]) for r in records]
    labels[start:stop] = [int(r[label_key]) for r in records]
    if all(im.shape == raw[0].shape for im in raw):
      chunk = _to_float(np.stack(raw), size)
    else:
      chunk = np.concatenate([_to_float(im[None], size) for im in raw])
    if images is None:
      images = np.empty((n,) + chunk.shape[1:], np.float32)
    images[start:stop] = chunk
  return images, labels
