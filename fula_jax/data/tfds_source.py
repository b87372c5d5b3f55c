"""TFDS datasets read record by record through `tfds.data_source` (array_record; no
TensorFlow graph, nothing materialised).

A dataset that is not prepared on disk fails at once with instructions, unless
`download` is set: a real download without network hangs for minutes before failing.
"""

from __future__ import annotations

import os

import numpy as np

from fula_jax import io
from fula_jax.errors import UserError


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


def _as_hwc(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  return image[..., None] if image.ndim == 2 else image


def data_source(tfds_name: str, split: str, *, data_dir: str | None, download: bool):
  """The split's `tfds.data_source` (random access to decoded records)."""
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
  if len(source) == 0:
    raise DatasetNotReadyError(f"Split {split!r} of {tfds_name!r} is empty.")
  return source


class TfdsReader:
  """The records of one tfds split, read one at a time."""

  def __init__(self, tfds_name: str, split: str, *, data_dir: str | None, download: bool,
               image_key: str = "image", label_key: str = "label"):
    self.source = data_source(tfds_name, split, data_dir=data_dir, download=download)
    self.tfds_name, self.split = tfds_name, split
    self.image_key, self.label_key = image_key, label_key
    self._labels = None

  def __len__(self) -> int:
    return len(self.source)

  def read(self, index: int) -> tuple[np.ndarray, int]:
    record = self.source[index]
    return _as_hwc(record[self.image_key]), int(record[self.label_key])

  def describe(self, index: int) -> str:
    return f"{self.tfds_name}[{self.split}][{index}]"

  def identity(self) -> str:
    return f"tfds {self.tfds_name} {self.split} {len(self)}"

  @property
  def labels(self) -> np.ndarray:
    """Every label (one pass over the records; only the shortcut cue needs them)."""
    if self._labels is None:
      self._labels = np.asarray([int(self.source[i][self.label_key])
                                 for i in range(len(self))], np.int32)
    return self._labels
