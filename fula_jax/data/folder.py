"""A user's own images: ``folder:<path>`` in the ImageFolder layout
``<path>/<split>/<class>/*.{png,jpg,jpeg}``, classes sorted by name.

The test split is the first of ``test``, ``val``, ``validation`` that exists. Classes
come from the training split's folders; a test folder with a class the training split
lacks is an error, since its label would mean nothing to a trained model.
"""

from __future__ import annotations

import hashlib
import io as _io
import os
import numpy as np

from fula_jax import io
from fula_jax.errors import ConfigError

PREFIX = "folder:"
EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "validation")}


def is_folder(name: str) -> bool:
  return isinstance(name, str) and name.startswith(PREFIX)


def root(name: str) -> str:
  """The local or remote path of a ``folder:<path>`` dataset name."""
  path = name[len(PREFIX):]
  if not path:
    raise ConfigError("A folder dataset needs a path: data.name='folder:/path/to/images' "
                      "holding <split>/<class>/*.png|jpg.")
  return io.resolve(path)


def _listdir(path: str) -> list[str]:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return sorted(p.name for p in epath.Path(path).iterdir())


def _isdir(path: str) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).is_dir()


def split_dir(name: str, split: str) -> str:
  base = root(name)
  if not _isdir(base):
    raise ConfigError(f"Dataset folder {base} does not exist (from data.name={name!r}). "
                      f"It should hold {'/'.join(SPLIT_DIRS['train'])}/ and one of "
                      f"{', '.join(SPLIT_DIRS['test'])}/, each with a folder per class.")
  for d in SPLIT_DIRS[split]:
    if _isdir(os.path.join(base, d)):
      return os.path.join(base, d)
  have = [d for d in _listdir(base) if _isdir(os.path.join(base, d))]
  raise ConfigError(f"Dataset folder {base} has no {split} split: expected a subfolder "
                    f"named {' or '.join(SPLIT_DIRS[split])}; it has {have or 'none'}.")


def classes(name: str) -> list[str]:
  """Class names of a folder dataset: its training split's subfolders, sorted."""
  train = split_dir(name, "train")
  found = [d for d in _listdir(train) if _isdir(os.path.join(train, d))]
  if not found:
    raise ConfigError(f"{train} has no class folders: expected "
                      f"{train}/<class>/*.png|jpg.")
  return found


class FolderReader:
  """The image files of one split, in class then file-name order."""

  def __init__(self, name: str, split: str):
    names = classes(name)
    directory = split_dir(name, split)
    present = [d for d in _listdir(directory) if _isdir(os.path.join(directory, d))]
    unknown = sorted(set(present) - set(names))
    if unknown:
      raise ConfigError(f"{directory} has classes the training split lacks: {unknown}. "
                        f"Training classes: {names}.")
    self.paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(names):
      cdir = os.path.join(directory, cls)
      files = ([f for f in _listdir(cdir) if f.lower().endswith(EXTENSIONS)]
               if _isdir(cdir) else [])
      if not files and split == "train":
        raise ConfigError(f"Class folder {cdir} holds no images "
                          f"({', '.join(EXTENSIONS)}); every class needs at least one.")
      self.paths.extend(os.path.join(cdir, f) for f in files)
      labels.extend([label] * len(files))
    if not self.paths:
      raise ConfigError(f"{directory} holds no images ({', '.join(EXTENSIONS)}).")
    self.labels = np.asarray(labels, np.int32)
    self.classes = names

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, index: int) -> tuple[np.ndarray, int]:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    path = self.paths[index]
    if io.is_remote(path):
      from etils import epath  # pylint: disable=g-import-not-at-top
      encoded = epath.Path(path).read_bytes()
    else:
      with open(path, "rb") as f:
        encoded = f.read()
    # One read, then decoding from memory: PIL reading a file object makes many small
    # reads and seeks (3-4x slower for small images).
    with Image.open(_io.BytesIO(encoded)) as im:
      image = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    return image, int(self.labels[index])

  def describe(self, index: int) -> str:
    return self.paths[index]

  def identity(self) -> str:
    h = hashlib.sha256()
    for p in self.paths:
      h.update(p.encode())
    h.update(self.labels.tobytes())
    return f"folder {len(self.paths)} {h.hexdigest()}"


def native_size(reader: FolderReader) -> int:
  """The shorter side of the first image (the default input size)."""
  image, _ = reader.read(0)
  return int(min(image.shape[:2]))

