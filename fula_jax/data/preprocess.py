"""Per-example preprocessing of streamed images: to float32 in [0, 1], crop and resize to
the model's input size, channels, grayscale and the shortcut cue.

It applies the same NumPy transforms as a split loaded in memory, one image at a time,
so a streamed split and the same split in memory hold the same pixels. Models
standardise their inputs themselves, so nothing here normalises.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Mapping

import numpy as np

from fula_jax import registry
from fula_jax.data import transforms

# Crop presets: how an image of any shape becomes size x size.
CROPS: Mapping[str, str] = {
    "square": "centre-crop to the largest square, then resize to the input size",
    "imagenet_eval": "resize the shorter side to size/0.875 (256 for 224), then "
                     "centre-crop to the input size",
}
IMAGENET_CROP_FRACTION = 0.875


def to_float(image: np.ndarray) -> np.ndarray:
  """(..., H, W[, C]) uint8 or float images -> float32 (..., H, W, C) in [0, 1]. A
  single grey image (H, W) gains its channel axis; batches must have one."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32, copy=False)


def crop_resize(image: np.ndarray, size: int, crop: str = "square") -> np.ndarray:
  """One (H, W, C) float image, or a batch (N, H, W, C) of one shape, to
  (size, size, C) by the `crop` preset."""
  registry.lookup("crop", crop, CROPS)
  batch = image if image.ndim == 4 else image[None]
  h, w = batch.shape[1:3]
  if crop == "imagenet_eval":
    short = int(round(size / IMAGENET_CROP_FRACTION))
    scale = short / min(h, w)
    new = (max(size, int(round(h * scale))), max(size, int(round(w * scale))))
    batch = transforms.resize(batch, new)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    out = np.ascontiguousarray(batch[:, top:top + size, left:left + size])
  else:
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    out = transforms.resize(batch[:, top:top + side, left:left + side], size)
  return out if image.ndim == 4 else out[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocess:
  """The static transforms of one split, applied to example `index` of it."""
  size: int
  crop: str = "square"
  channels: int | None = None
  grayscale: bool = False
  cues: np.ndarray | None = None        # (N,) int32 cue class per example, -1: none
  palette: np.ndarray | None = None     # (num_classes, C) cue colours
  patch_size: int = 4
  strength: float = 1.0

  def __post_init__(self):
    registry.lookup("crop", self.crop, CROPS)

  def __call__(self, image: np.ndarray, index: int) -> np.ndarray:
    return self.batch(to_float(image)[None], np.asarray([index]))[0]

  def batch(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Float (N, H, W, C) images of one shape, examples `indices` of the split."""
    images = crop_resize(images, self.size, self.crop)
    images = transforms.to_channels(images, self.channels)
    if self.grayscale:
      images = transforms.grayscale(images)
    if self.cues is not None:
      images = transforms.stamp_patch(images, self.cues[indices], self.palette,
                                      patch_size=self.patch_size, strength=self.strength)
    return np.ascontiguousarray(images, np.float32)

  def describe(self) -> str:
    """Everything that changes the pixels, for fingerprints."""
    cue = "" if self.cues is None else (
        f" cue {self.patch_size} {self.strength} "
        f"{hashlib.sha256(np.ascontiguousarray(self.cues).tobytes()).hexdigest()[:16]}")
    return f"{self.size} {self.crop} {self.channels} {self.grayscale}{cue}"
