"""The embedded default dataset: scikit-learn's 1,797 real 8x8 handwritten digits.

Shipped inside scikit-learn, so it needs no download; a deterministic stratified split
stands in for the missing train/test division.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_EXAMPLES = 1797
NUM_CLASSES = 10
NATIVE_SIZE = 8


@functools.lru_cache(maxsize=1)
def raw() -> tuple[np.ndarray, np.ndarray]:
  """All digits: read-only float32 (1797, 8, 8, 1) in [0, 1] and int32 (1797,) labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  bunch = datasets.load_digits()
  images = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
  labels = np.asarray(bunch.target, np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (train, test) indices; each class contributes round(fraction * n_c) test
  examples (at least one to each side), chosen by a permutation from `seed`."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"digits_test_fraction must be in (0, 1), got {test_fraction}.")
  labels = np.asarray(labels)
  rng = np.random.default_rng(int(seed))
  train, test = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    if len(members) < 2:
      raise ValueError(f"Class {c} has {len(members)} example(s); cannot split it.")
    n_test = min(max(int(round(test_fraction * len(members))), 1), len(members) - 1)
    test.append(members[:n_test])
    train.append(members[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_split(split: str, *, test_fraction: float = 0.2, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
  """Native (N, 8, 8, 1) float32 images in [0, 1] and int32 labels of one split."""
  images, labels = raw()
  train_idx, test_idx = stratified_split(labels, test_fraction, seed)
  idx = {"train": train_idx, "test": test_idx}[split]
  return images[idx], labels[idx]
