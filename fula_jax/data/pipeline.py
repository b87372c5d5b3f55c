"""From `config.data` to a batch source: the dataset registry, `source` (streamed, or in
memory for the embedded digits) and `load` (a whole split in memory, for small data)."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict
import numpy as np

from fula_jax import errors, registry
from fula_jax.data import split as split_lib
from fula_jax.data import digits
from fula_jax.data import folder
from fula_jax.data import preprocess
from fula_jax.data import tfds_source
from fula_jax.data import transforms
from fula_jax.data.records import ON_CORRUPT, RecordSource
from fula_jax.data.split import Split

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset: tfds (`tfds_name`), a folder of images (`folder`), or,
  with neither, the embedded digits."""
  num_classes: int
  native_size: int        # side of the (square, centre-cropped) images when image_size is None
  native_channels: int
  tfds_name: str | None = None
  train_split: str = "train"
  test_split: str = "test"
  image_key: str = "image"
  label_key: str = "label"
  folder: str | None = None  # the 'folder:<path>' name
  imagenet_ids: tuple[int, ...] | None = None  # label -> ImageNet-1k class, if a subset


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
                              tfds_name="imagenette/160px", test_split="validation",
                              imagenet_ids=(0, 217, 482, 491, 497, 566, 569, 571, 574,
                                            701)),
    # Needs the manual download tfds describes; the validation split is the test split.
    "imagenet2012": DatasetSpec(num_classes=1000, native_size=224, native_channels=3,
                                tfds_name="imagenet2012", test_split="validation"),
})


def default_config() -> ml_collections.ConfigDict:
  """Every field `source` reads. The default runs anywhere: digits upsampled to 32x32x3.

  `name` is a registered dataset or 'folder:<path>' (ImageFolder layout)."""
  return ml_collections.ConfigDict(dict(
      name="digits",
      # tfds data_dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
      data_dir=config_dict.placeholder(str),
      download=False,         # True: tfds download_and_prepare when not on disk
      image_size=32,          # None = native size
      crop="square",          # 'square' | 'imagenet_eval' (resize 256, centre crop 224)
      in_memory=False,        # True: read a streamed split into host memory once
      imagenet_labels=False,  # True: an ImageNet subset's labels as ImageNet-1k ids,
                              # for models with a 1000-class head (imagenette)
      on_corrupt="error",     # unreadable image: 'error' (names it) | 'skip' (counted)
      num_threads=4,          # decoding threads per process (each decodes whole batches)
      prefetch_batches=4,     # batches decoded ahead (at least num_threads)
      num_workers=0,          # decoding processes (grain workers); 0: threads only
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
  if folder.is_folder(name):
    return DatasetSpec(num_classes=len(folder.classes(name)), native_size=0,
                       native_channels=3, folder=name)
  return registry.lookup("dataset", name, DATASETS, extra="or 'folder:<path>' for a "
                         "folder of images (<path>/<split>/<class>/*.png|jpg)")


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


def _check_split(cfg, split: str) -> DatasetSpec:
  registry.lookup("split", split, {s: s for s in SPLITS})
  if cfg.channels not in (None, 1, 3):
    raise errors.ConfigError(f"data.channels must be None, 1 or 3, got {cfg.channels}.")
  return spec(cfg.name)


def _digits(cfg, split: str) -> tuple[Split, np.ndarray]:
  ds = spec(cfg.name)
  images, labels = digits.load_split(split, test_fraction=float(cfg.digits_test_fraction),
                                     seed=int(cfg.digits_split_seed))
  images = transforms.resize(images, cfg.image_size or ds.native_size)
  images = transforms.to_channels(images, cfg.channels)
  if cfg.grayscale:
    images = transforms.grayscale(images)
  cues = split_cues(cfg, labels, ds.num_classes, split)
  if cfg.shortcut.enabled:
    images = transforms.stamp_patch(
        images, cues, transforms.palette(ds.num_classes, images.shape[-1]),
        patch_size=int(cfg.shortcut.patch_size), strength=float(cfg.shortcut.strength))
  images = np.ascontiguousarray(images, dtype=np.float32)
  return Split(images, np.asarray(labels, np.int32), ds.num_classes,
               f"{cfg.name}/{split}"), cues


def _reader(cfg, ds: DatasetSpec, split: str):
  if ds.folder is not None:
    return folder.FolderReader(ds.folder, split)
  return tfds_source.TfdsReader(
      ds.tfds_name, ds.train_split if split == "train" else ds.test_split,
      data_dir=cfg.data_dir, download=bool(cfg.download), image_key=ds.image_key,
      label_key=ds.label_key)


def _streamed(cfg, split: str) -> tuple[RecordSource, np.ndarray]:
  ds = spec(cfg.name)
  reader = _reader(cfg, ds, split)
  size = cfg.image_size or ds.native_size or folder.native_size(reader)
  channels = cfg.channels or ds.native_channels
  cues = None
  if cfg.shortcut.enabled:
    cues = split_cues(cfg, reader.labels, ds.num_classes, split)
  prep = preprocess.Preprocess(
      size=int(size), crop=cfg.crop, channels=channels, grayscale=bool(cfg.grayscale),
      cues=cues, palette=transforms.palette(ds.num_classes, channels) if cues is not None
      else None, patch_size=int(cfg.shortcut.patch_size),
      strength=float(cfg.shortcut.strength))
  registry.lookup("data.on_corrupt", cfg.on_corrupt, ON_CORRUPT)
  num_classes, label_map = ds.num_classes, None
  if cfg.imagenet_labels:
    if ds.imagenet_ids is None and ds.num_classes != 1000:
      raise errors.ConfigError(
          f"data.imagenet_labels needs an ImageNet subset; {cfg.name!r} is not one "
          f"(subsets: {[n for n, d in DATASETS.items() if d.imagenet_ids]}).")
    if ds.imagenet_ids is not None:
      num_classes, label_map = 1000, np.asarray(ds.imagenet_ids, np.int32)
  source = RecordSource(reader, prep, num_classes, f"{cfg.name}/{split}",
                        on_corrupt=cfg.on_corrupt, num_threads=int(cfg.num_threads),
                        prefetch_batches=int(cfg.prefetch_batches),
                        num_workers=int(cfg.get("num_workers", 0)), label_map=label_map)
  return source, (cues if cues is not None else np.full((len(source),), -1, np.int32))


def source(cfg: ml_collections.ConfigDict, split: str) -> Any:
  """The batch source of one split ('train' | 'test') with the static transforms of
  `cfg`: streamed for tfds and folder datasets (unless `data.in_memory`), a `Split` in
  memory for the embedded digits."""
  return source_with_cues(cfg, split)[0]


def source_with_cues(cfg: ml_collections.ConfigDict, split: str) -> tuple[Any, np.ndarray]:
  """`source`, plus the cue class of every example (int32, -1 where none)."""
  cfg = _resolve(cfg)
  ds = _check_split(cfg, split)
  if ds.tfds_name is None and ds.folder is None:
    return _digits(cfg, split)
  streamed, cues = _streamed(cfg, split)
  if cfg.in_memory:
    return split_lib.materialize(streamed), cues
  return streamed, cues


def load_with_cues(cfg: ml_collections.ConfigDict, split: str) -> tuple[Split, np.ndarray]:
  """`load`, plus the cue class of every example (int32, -1 where none)."""
  src, cues = source_with_cues(cfg, split)
  return split_lib.materialize(src), cues


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  """Number of classes of `cfg.name`, without loading anything."""
  return spec(_resolve(cfg).name).num_classes


def image_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the images of `source(cfg, ...)`, without reading the split."""
  cfg = _resolve(cfg)
  ds = spec(cfg.name)
  size = cfg.image_size or ds.native_size
  if not size:
    size = folder.native_size(folder.FolderReader(ds.folder, "train"))
  return (size, size, cfg.channels or ds.native_channels)


def digits_splits(image_size: int | None = None, channels: int | None = None
                  ) -> tuple[Split, Split]:
  """(train, test): the embedded digits exactly as every job reads them
  (`data.name='digits'`): scikit-learn's 1,797 8x8 digits, the stratified 80/20 split
  (1,438 / 359), pixels in [0, 1], at `image_size` (None: the native 8x8; the
  `:runlocal` configs use 16) with `channels` (None: the native 1; the configs use 3)."""
  cfg = default_config()
  cfg.image_size, cfg.channels = image_size, channels
  return load(cfg, "train"), load(cfg, "test")


def load(cfg: ml_collections.ConfigDict, split: str) -> Split:
  """A whole split ('train' | 'test') in host memory, static transforms applied. Only
  for data that fits; jobs read `source`."""
  return load_with_cues(cfg, split)[0]
