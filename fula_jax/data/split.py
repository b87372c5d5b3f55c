"""`Split`: a whole split held in memory, the batch source of the embedded digits and of
data passed as arrays."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator

import numpy as np

from fula_jax.data import batching


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """A whole split in memory, and a batch source.

  A batch source is what jobs read data through, so a streamed dataset can stand in for
  a split held in memory: ``len(source)``, `name`, `num_classes`, `image_shape`
  (H, W, C), `train_batches` and `eval_batches` (each process gets its own slice of every
  global batch), `take(n)` (the first n examples), and `fingerprint` (a digest of the
  examples, for resuming).
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

  def take(self, n: int | None) -> "Split":
    """The first `n` examples (all when n is None, 0 or at least len)."""
    if not n or n >= len(self):
      return self
    return dataclasses.replace(self, images=self.images[:n], labels=self.labels[:n])

  def gather(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the examples at `indices`."""
    indices = np.asarray(indices, np.int64)
    return self.images[indices], self.labels[indices]

  def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                    num_steps: int | None = None, process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled training batches on the schedule of `batching.train_rows`."""
    for idx in batching.train_rows(len(self), batch_size, seed=seed, start_step=start_step,
                                   num_steps=num_steps, process_index=process_index,
                                   process_count=process_count, name=self.name):
      yield {"image": self.images[idx], "label": self.labels[idx]}

  def eval_batches(self, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1, limit: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """The split in order (its first `limit` examples when given), zero-padded, with a
    float32 'mask' that is 1 on real rows."""
    local = batching.check_batch(batch_size, process_index, process_count)
    for take, mask in batching.eval_rows(len(self), batch_size, process_index=process_index,
                                         process_count=process_count, limit=limit):
      image = np.zeros((local,) + self.images.shape[1:], np.float32)
      label = np.zeros((local,), np.int32)
      image[:len(take)] = self.images[take]
      label[:len(take)] = self.labels[take]
      yield {"image": image, "label": label, "mask": mask}

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


def materialize(source: Any, *, batch_size: int = 256) -> Any:
  """A `Split` holding every example of `source` (for small sources only)."""
  if isinstance(source, Split):
    return source
  images, labels = [], []
  for batch in source.eval_batches(batch_size):
    keep = batch["mask"] > 0
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return Split(np.concatenate(images).astype(np.float32), np.concatenate(labels).astype(
      np.int32), source.num_classes, source.name)
