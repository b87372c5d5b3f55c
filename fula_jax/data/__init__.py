"""Datasets by name (tfds, folders of images, the embedded digits) as batch sources.

`source(config.data, 'train')` gives a split as a batch source: streamed record by record
for tfds and `folder:<path>` datasets (host memory flat in the dataset size), a `Split`
in memory for the embedded digits. `load` reads a whole split into memory, for data that
fits. Every source yields deterministic, resumable, per-process `train_batches` and
masked `eval_batches`; `augment` is the jittable random crop + flip of training steps.
"""

from fula_jax.data.batching import epoch_permutation
from fula_jax.data.batching import eval_batches
from fula_jax.data.split import materialize
from fula_jax.data.batching import num_eval_batches
from fula_jax.data.batching import steps_per_epoch
from fula_jax.data.batching import train_batches
from fula_jax.data.pipeline import DATASETS
from fula_jax.data.pipeline import DatasetSpec
from fula_jax.data.pipeline import SPLITS
from fula_jax.data.pipeline import default_config
from fula_jax.data.pipeline import digits_splits
from fula_jax.data.pipeline import image_shape
from fula_jax.data.pipeline import load
from fula_jax.data.pipeline import load_with_cues
from fula_jax.data.pipeline import num_classes
from fula_jax.data.pipeline import source
from fula_jax.data.pipeline import source_with_cues
from fula_jax.data.pipeline import spec
from fula_jax.data.pipeline import split_cues
from fula_jax.data.preprocess import CROPS
from fula_jax.data.records import CorruptRecordError
from fula_jax.data.records import RecordSource
from fula_jax.data.records import note_skipped
from fula_jax.data.records import skipped_line
from fula_jax.data.records import skipped_records
from fula_jax.data.sources import as_batches
from fula_jax.data.sources import as_source
from fula_jax.data.split import Split
from fula_jax.data.tfds_source import DatasetNotReadyError
from fula_jax.data.transforms import augment
from fula_jax.data.transforms import grayscale
from fula_jax.data.transforms import luminance
from fula_jax.data.transforms import palette
from fula_jax.data.transforms import resize
from fula_jax.data.transforms import shortcut_cues
from fula_jax.data.transforms import stamp_patch
from fula_jax.data.transforms import to_channels

__all__ = [
    "CROPS",
    "CorruptRecordError",
    "DATASETS",
    "DatasetNotReadyError",
    "DatasetSpec",
    "RecordSource",
    "SPLITS",
    "Split",
    "as_batches",
    "as_source",
    "augment",
    "default_config",
    "epoch_permutation",
    "eval_batches",
    "grayscale",
    "image_shape",
    "load",
    "load_with_cues",
    "luminance",
    "materialize",
    "num_classes",
    "num_eval_batches",
    "palette",
    "resize",
    "shortcut_cues",
    "source",
    "source_with_cues",
    "spec",
    "split_cues",
    "stamp_patch",
    "steps_per_epoch",
    "to_channels",
    "train_batches",
]
