"""Datasets by name (tfds and the embedded digits), static transforms, and batchers.

`load(config.data, 'train')` gives a whole `Split` in memory, images float32 in [0, 1];
`train_batches` / `eval_batches` cut it into deterministic per-process batches;
`augment` is the jittable random crop + flip used in training steps.
"""

from fula_jax.data.pipeline import DATASETS
from fula_jax.data.pipeline import DatasetSpec
from fula_jax.data.pipeline import SPLITS
from fula_jax.data.pipeline import Split
from fula_jax.data.pipeline import default_config
from fula_jax.data.pipeline import epoch_permutation
from fula_jax.data.pipeline import eval_batches
from fula_jax.data.pipeline import image_shape
from fula_jax.data.pipeline import load
from fula_jax.data.pipeline import load_with_cues
from fula_jax.data.pipeline import num_classes
from fula_jax.data.pipeline import num_eval_batches
from fula_jax.data.pipeline import spec
from fula_jax.data.pipeline import split_cues
from fula_jax.data.pipeline import steps_per_epoch
from fula_jax.data.pipeline import train_batches
from fula_jax.data.sources import as_batches
from fula_jax.data.sources import as_source
from fula_jax.data.tfds_source import DatasetNotReadyError
from fula_jax.data.transforms import augment
from fula_jax.data.transforms import grayscale
from fula_jax.data.transforms import luminance
from fula_jax.data.transforms import palette
from fula_jax.data.transforms import resize
from fula_jax.data.transforms import shortcut_cues
from fula_jax.data.transforms import stamp_patch
from fula_jax.data.transforms import to_channels
