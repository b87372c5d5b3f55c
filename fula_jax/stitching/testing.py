"""Tiny donors and data for stitching tests and benchmarks (seconds on a CPU).

`digits_splits` draws from the embedded digits as the jobs read them; `train_donor` and
`accuracy` are `fula_jax.train.quick`'s plain Adam loop and top-1 accuracy.
"""

from __future__ import annotations

import numpy as np

from fula_jax.train import quick


def digits_splits(n_train: int = 1438, n_test: int = 359, *, seed: int = 0):
  """(train, test): `n_train` and `n_test` examples drawn (by `seed`) from the embedded
  digits' own train and test splits at their native 8x8x1 (`fula_jax.data.digits_splits`,
  what the jobs read), so a test's data is the library's data."""
  from fula_jax import data
  train, test = data.digits_splits()
  rng = np.random.default_rng(seed)
  out = []
  for split, n in ((train, n_train), (test, n_test)):
    if n > len(split.labels):
      raise ValueError(f"{split.name} has {len(split.labels)} examples, asked for {n}.")
    keep = rng.permutation(len(split.labels))[:n]
    out.append(data.Split(split.images[keep], split.labels[keep], split.num_classes,
                          split.name))
  return tuple(out)


def synthetic_splits(n_train: int = 256, n_test: int = 128, *,
                     shape: tuple[int, ...] = (8, 8, 1), num_classes: int = 10,
                     seed: int = 0):
  """(train, test) splits of random images in [0, 1] labelled by a random linear
  teacher: NumPy only, for workers that must start fast."""
  from fula_jax.data import Split
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(n_train + n_test,) + tuple(shape)).astype(np.float32)
  w = rng.normal(size=(int(np.prod(shape)), num_classes))
  y = np.argmax(x.reshape(len(x), -1) @ w, -1).astype(np.int32)
  return (Split(x[:n_train], y[:n_train], num_classes, "synthetic/train"),
          Split(x[n_train:], y[n_train:], num_classes, "synthetic/test"))


train_donor = quick.fit
accuracy = quick.accuracy
