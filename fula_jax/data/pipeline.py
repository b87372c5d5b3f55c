"""From `config.data` to batches: the dataset registry, `load` (a whole split in memory,
static transforms applied) and the deterministic, resumable, multi-process batchers."""

from __future__ import annotations

import dataclasses
import hashlib
import types
from typing import Iterator, Mapping

import ml_collections
from ml_collections import config_dict
import numpy as np

from fula_jax import errors, registry
from fula_jax.data import digits
from fula_jax.data import tfds_source
from fula_jax.data import transforms

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset. `tfds_name` None means the embedded digits."""
  num_classes: int
  native_size: int        # side of the (square, centre-cropped) images when image_size is None
  native_channels: int
  tfds_name: str | None = None
  train_split: str = "train"
  test_split: str = "test"
  image_key: str = "image"
  label_key: str = "label"


DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType({
    "digits": DatasetSpec(num_classes=10, native_size=8, native_channels=1),
    "cifar10": DatasetSpec(num_classes=10, native_size=32, native_channels=3,
                           tfds_name="cifar10"),
    "cifar100": DatasetSpec(num_classes=100, native_size=32, native_channels=3,
                            tfds_name="cifar100"),
    "mnist": DatasetSpec(num_classes=10, native_size=28, native_channels=1,
                         tfds_name="mnist"),
    "fashion_mnist": DatasetSpec(num_classes=10, native_size=28, native_channels=1,
                                 tfds_name="fashion_mnist"),
    # Shorter side 160; images are centre-cropped to 160x160 unless image_size is set.
    "imagenette": DatasetSpec(num_classes=10, native_size=160, native_channels=3,
                              tfds_name="imagenette/160px", test_split="validation"),
})


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """A whole split in memory, and a batch source.

  A batch source is what jobs read data through, so a streaming dataset can stand in
  for a split held in memory: ``len(source)``, `name`, `num_classes`, `image_shape`
  (H, W, C), `train_batches` and `eval_batches` (each process gets its own slice of every
  global batch), and `fingerprint` (a digest of the examples, for resuming).
  """
  images: np.ndarray  # float32 (N, H, W, C) in [0, 1]
  labels: np.ndarray  # int32 (N,)
  num_classes: int
  name: str           # e.g. "digits/train"

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(int(d) for d in self.images.shape[1:])

  def train_batches(self, batch_size: int, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """`train_batches` of this split (seed, start_step, num_steps, process_*)."""
    return train_batches(self, batch_size, **kwargs)

  def eval_batches(self, batch_size: int, **kwargs) -> Iterator[dict[str, np.ndarray]]:
    """`eval_batches` of this split (process_*, limit)."""
    return eval_batches(self, batch_size, **kwargs)

  def fingerprint(self) -> str:
    """Digest of the images and labels (computed once)."""
    cached = self.__dict__.get("_fingerprint")
    if cached is None:
      h = hashlib.sha256()
      for a in (self.images, self.labels):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
      cached = h.hexdigest()[:24]
      object.__setattr__(self, "_fingerprint", cached)
    return cached


def default_config() -> ml_collections.ConfigDict:
  """Every field `load` reads. The default runs anywhere: digits upsampled to 32x32x3."""
  return ml_collections.ConfigDict(dict(
      name="digits",
      # tfds data_dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
      data_dir=config_dict.placeholder(str),
      download=False,         # True: tfds download_and_prepare when not on disk
      image_size=32,          # None = native size
      channels=3,             # None = native; 1 or 3
      grayscale=False,        # luminance, keeping the channel count
      digits_test_fraction=0.2,
      digits_split_seed=0,
      shortcut=ml_collections.ConfigDict(dict(
          enabled=False,
          correlation=0.9,    # P(cue class == label) in training
          strength=1.0,       # alpha of the patch
          patch_size=4,       # pixels, in the final image
          eval="present",     # test split: 'present' | 'absent' | 'permuted'
          seed=0,
      )),
  ))


def _resolve(cfg: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  full = default_config()
  if cfg is not None:
    # Plain values: ml_collections cannot update one placeholder from another.
    full.update(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  return full


def spec(name: str) -> DatasetSpec:
  return registry.lookup("dataset", name, DATASETS)


def split_cues(cfg: ml_collections.ConfigDict, labels: np.ndarray, num_classes: int,
               split: str) -> np.ndarray:
  """Which class's shortcut cue each example of `split` carries (-1: none)."""
  cfg = _resolve(cfg)
  sc = cfg.shortcut
  if not sc.enabled:
    return np.full(np.shape(labels), -1, np.int32)
  mode = "present" if split == "train" else sc.eval
  return transforms.shortcut_cues(labels, num_classes, correlation=float(sc.correlation),
                                  mode=mode, seed=int(sc.seed),
                                  stream=SPLITS.index(split))


def load_with_cues(cfg: ml_collections.ConfigDict, split: str
                   ) -> tuple[Split, np.ndarray]:
  """`load`, plus the cue class of every example (int32, -1 where none)."""
  cfg = _resolve(cfg)
  registry.lookup("split", split, {s: s for s in SPLITS})
  ds = spec(cfg.name)
  size = cfg.image_size or ds.native_size
  if cfg.channels not in (None, 1, 3):
    raise errors.ConfigError(f"data.channels must be None, 1 or 3, got {cfg.channels}.")
  if ds.tfds_name is None:
    images, labels = digits.load_split(split, test_fraction=float(cfg.digits_test_fraction),
                                       seed=int(cfg.digits_split_seed))
    images = transforms.resize(images, size)
  else:
    tfds_split = ds.train_split if split == "train" else ds.test_split
    images, labels = tfds_source.read(ds.tfds_name, tfds_split, data_dir=cfg.data_dir,
                                      download=bool(cfg.download), size=size,
                                      image_key=ds.image_key, label_key=ds.label_key)
  images = transforms.to_channels(images, cfg.channels)
  if cfg.grayscale:
    images = transforms.grayscale(images)
  cues = split_cues(cfg, labels, ds.num_classes, split)
  if cfg.shortcut.enabled:
    images = transforms.stamp_patch(
        images, cues, transforms.palette(ds.num_classes, images.shape[-1]),
        patch_size=int(cfg.shortcut.patch_size), strength=float(cfg.shortcut.strength))
  images = np.ascontiguousarray(images, dtype=np.float32)
  labels = np.asarray(labels, np.int32)
  return Split(images, labels, ds.num_classes, f"{cfg.name}/{split}"), cues


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  """Number of classes of `cfg.name`, without loading anything."""
  return spec(_resolve(cfg).name).num_classes


def image_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images `load(cfg, ...)` returns, without loading anything."""
  cfg = _resolve(cfg)
  ds = spec(cfg.name)
  size = cfg.image_size or ds.native_size
  return (size, size, cfg.channels or ds.native_channels)


def load(cfg: ml_collections.ConfigDict, split: str) -> Split:
  """A whole split ('train' | 'test') with the static transforms of `cfg` applied."""
  return load_with_cues(cfg, split)[0]


# ---------------------------------------------------------------------------- batching


def _check_batch(batch_size: int, process_index: int, process_count: int) -> int:
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index {process_index} of {process_count}.")
  if batch_size % process_count:
    raise ValueError(f"Global batch_size {batch_size} is not divisible by "
                     f"process_count {process_count}.")
  return batch_size // process_count


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  return len(split) // batch_size


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_batches(split: Split, batch_size: int, *, seed: int, start_step: int = 0,
                  num_steps: int | None = None, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled training batches; step s is batch s % steps_per_epoch of epoch
  s // steps_per_epoch, so a run resumed at `start_step` sees the same batches.

  Each process yields its contiguous 1/process_count slice of the global batch. Endless
  when `num_steps` is None.
  """
  local = _check_batch(batch_size, process_index, process_count)
  n = len(split)
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} is larger than split {split.name!r} "
                     f"({n} examples).")
  if seed < 0 or start_step < 0 or (num_steps is not None and num_steps < 0):
    raise ValueError("seed, start_step and num_steps must be non-negative.")
  per_epoch = n // batch_size
  lo = process_index * local
  step, epoch, perm = start_step, -1, None
  while num_steps is None or step < start_step + num_steps:
    if step // per_epoch != epoch:
      epoch = step // per_epoch
      perm = epoch_permutation(n, seed, epoch)
    b = step % per_epoch
    idx = perm[b * batch_size + lo:b * batch_size + lo + local]
    yield {"image": split.images[idx], "label": split.labels[idx]}
    step += 1


def num_eval_batches(split: Split, batch_size: int, limit: int | None = None) -> int:
  n = len(split) if limit is None else min(len(split), int(limit))
  return -(-n // batch_size)


def eval_batches(split: Split, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, limit: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The split in order (its first `limit` examples when given); the last global batch
  is zero-padded to `batch_size` and 'mask' (float32) is 1 on real rows. Every process
  yields the same number of batches."""
  local = _check_batch(batch_size, process_index, process_count)
  n = len(split) if limit is None else min(len(split), int(limit))
  for b in range(num_eval_batches(split, batch_size, limit)):
    start = b * batch_size + process_index * local
    rows = np.arange(start, start + local)
    real = rows < n
    take = rows[real]
    image = np.zeros((local,) + split.images.shape[1:], np.float32)
    label = np.zeros((local,), np.int32)
    image[:len(take)] = split.images[take]
    label[:len(take)] = split.labels[take]
    yield {"image": image, "label": label, "mask": real.astype(np.float32)}
