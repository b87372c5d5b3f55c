"""Image transforms: static ones in NumPy (resize, channels, grayscale, shortcut cue)
applied once when a split is loaded, and the random training augmentation in JAX.

Normalisation is deliberately absent: images stay in [0, 1] and models standardise their
inputs themselves, so attacks and inversions can clip to [0, 1].
"""

from __future__ import annotations

import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import registry

# ITU-R BT.601 luma weights (R, G, B).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Ten well-separated RGB colours for the first ten classes.
BASE_PALETTE = (
    (1.0, 0.0, 0.0),  # red
    (0.0, 1.0, 0.0),  # green
    (0.0, 0.0, 1.0),  # blue
    (1.0, 1.0, 0.0),  # yellow
    (1.0, 0.0, 1.0),  # magenta
    (0.0, 1.0, 1.0),  # cyan
    (1.0, 0.5, 0.0),  # orange
    (0.5, 0.0, 1.0),  # purple
    (1.0, 1.0, 1.0),  # white
    (0.5, 0.5, 0.5),  # grey
)

SHORTCUT_EVAL_MODES = ("present", "absent", "permuted")


# ---------------------------------------------------------------------------- resize


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) bilinear interpolation matrix with half-pixel centres.

  When shrinking, the triangle kernel is widened by in/out (antialiasing), as in
  `jax.image.resize(..., 'linear', antialias=True)`. Rows sum to one. Read-only.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"Sizes must be positive, got {in_size} -> {out_size}.")
  inv_scale = in_size / out_size
  kernel_scale = max(inv_scale, 1.0)
  centres = (np.arange(out_size, dtype=np.float64) + 0.5) * inv_scale - 0.5
  dist = np.abs(np.arange(in_size, dtype=np.float64)[None, :] - centres[:, None])
  w = np.maximum(0.0, 1.0 - dist / kernel_scale)
  w /= w.sum(axis=1, keepdims=True)
  w.flags.writeable = False
  return w


def resize(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of (N, H, W, C) images to `size`."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"Expected (N, H, W, C) images, got shape {images.shape}.")
  out_h, out_w = (size, size) if isinstance(size, int) else size
  _, h, w, _ = images.shape
  if (h, w) == (out_h, out_w):
    return images.astype(np.float32, copy=False)
  n, c = images.shape[0], images.shape[-1]
  wh = resize_weights(h, out_h).astype(np.float32)
  ww = resize_weights(w, out_w).astype(np.float32)
  # Two single BLAS matmuls (an einsum here is ~20x slower).
  x = np.matmul(wh, images.astype(np.float32, copy=False).reshape(n, h, w * c))
  x = np.matmul(x.reshape(n, out_h, w, c).transpose(0, 1, 3, 2).reshape(-1, w), ww.T)
  return np.ascontiguousarray(x.reshape(n, out_h, c, out_w).transpose(0, 1, 3, 2))


def center_crop_square(image: np.ndarray) -> np.ndarray:
  """The largest central square of an (H, W, C) image."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return image[top:top + side, left:left + side]


# ---------------------------------------------------------------------------- colour


def luminance(images: np.ndarray) -> np.ndarray:
  """BT.601 luma of (..., 3) RGB images, keeping a trailing channel axis of 1."""
  images = np.asarray(images, dtype=np.float32)
  if images.shape[-1] == 1:
    return images
  if images.shape[-1] != 3:
    raise ValueError(f"Luminance needs 1 or 3 channels, got {images.shape[-1]}.")
  return (images @ np.asarray(LUMA_WEIGHTS, np.float32))[..., None]


def to_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
  """Converts (..., C) images to `channels` (1: luminance, 3: replicate grey)."""
  images = np.asarray(images, dtype=np.float32)
  have = images.shape[-1]
  if channels is None or channels == have:
    return images
  if channels == 1:
    return luminance(images)
  if channels == 3 and have == 1:
    return np.repeat(images, 3, axis=-1)
  raise ValueError(f"Cannot convert {have} channels to {channels}; use 1 or 3.")


def grayscale(images: np.ndarray, channels: int | None = None) -> np.ndarray:
  """Luminance replicated to `channels` (default: the input's channel count)."""
  images = np.asarray(images, dtype=np.float32)
  channels = images.shape[-1] if channels is None else channels
  return to_channels(luminance(images), channels)


# ---------------------------------------------------------------------------- shortcut


def palette(num_classes: int, channels: int = 3) -> np.ndarray:
  """(num_classes, channels) float32 cue colours in [0, 1], distinct per class.

  RGB: ten hand-picked colours, then golden-ratio hues with alternating saturation and
  value. One channel: evenly spaced grey levels strictly inside (0, 1).
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  if channels == 1:
    return (np.arange(1, num_classes + 1, dtype=np.float32) / (num_classes + 1))[:, None]
  if channels != 3:
    raise ValueError(f"Palette needs 1 or 3 channels, got {channels}.")
  colours = list(BASE_PALETTE[:num_classes])
  for k in range(len(colours), num_classes):
    hue = (k * 0.6180339887498949) % 1.0
    sat = 1.0 if k % 2 == 0 else 0.55
    val = 1.0 if (k // 2) % 2 == 0 else 0.7
    colours.append(colorsys.hsv_to_rgb(hue, sat, val))
  return np.asarray(colours, dtype=np.float32)


def shortcut_cues(labels: np.ndarray, num_classes: int, *, correlation: float,
                  mode: str, seed: int, stream: int = 0) -> np.ndarray:
  """Which class's cue each example carries (int32, -1 for none).

  'present': the example's own class with probability `correlation`, otherwise a
  uniformly random other class. 'permuted': always a random other class. 'absent': -1.
  Deterministic in (seed, stream); `stream` separates the splits' draws.
  """
  labels = np.asarray(labels, dtype=np.int64)
  if mode not in SHORTCUT_EVAL_MODES:
    raise registry.unknown("shortcut mode", mode, SHORTCUT_EVAL_MODES)
  if mode == "absent":
    return np.full(labels.shape, -1, np.int32)
  if num_classes < 2:
    raise ValueError("A shortcut cue needs at least 2 classes.")
  if not 0.0 <= correlation <= 1.0:
    raise ValueError(f"shortcut.correlation must be in [0, 1], got {correlation}.")
  rng = np.random.default_rng([int(seed), int(stream)])
  uniform = rng.random(labels.shape)
  other = (labels + rng.integers(1, num_classes, size=labels.shape)) % num_classes
  if mode == "permuted":
    return other.astype(np.int32)
  return np.where(uniform < correlation, labels, other).astype(np.int32)


def stamp_patch(images: np.ndarray, cues: np.ndarray, colours: np.ndarray, *,
                patch_size: int, strength: float) -> np.ndarray:
  """Blends a `patch_size` square of colour `colours[cue]` into each image's top-left
  corner: `(1 - strength) * image + strength * colour`. Rows with cue -1 are unchanged.
  """
  images = np.array(images, dtype=np.float32, copy=True)
  cues = np.asarray(cues)
  _, h, w, c = images.shape
  if not 1 <= patch_size <= min(h, w):
    raise ValueError(f"patch_size {patch_size} must be in [1, {min(h, w)}].")
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"shortcut.strength must be in [0, 1], got {strength}.")
  if colours.shape[-1] != c:
    raise ValueError(f"Palette has {colours.shape[-1]} channels, images have {c}.")
  rows = np.flatnonzero(cues >= 0)
  colour = colours[cues[rows]][:, None, None, :]
  corner = images[rows, :patch_size, :patch_size, :]
  images[rows, :patch_size, :patch_size, :] = (1.0 - strength) * corner + strength * colour
  return images


# ---------------------------------------------------------------------------- augment


def augment(rng: jax.Array, images: jax.Array, *, crop_padding: int = 4,
            flip: bool = True) -> jax.Array:
  """Random crop (zero-pad by `crop_padding`, crop back) and horizontal flip, per image.

  Jittable with `crop_padding` and `flip` static; (N, H, W, C) in, same shape out.
  """
  if images.ndim != 4:
    raise ValueError(f"Expected (N, H, W, C) images, got shape {images.shape}.")
  n, h, w, c = images.shape
  crop_key, flip_key = jax.random.split(rng)
  out = images
  if crop_padding > 0:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * p + 1)
    out = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (n,))
    out = jnp.where(mirror[:, None, None, None], out[:, :, ::-1, :], out)
  return out
