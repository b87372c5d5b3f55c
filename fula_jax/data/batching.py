"""Which examples each process reads at each step: one deterministic, resumable schedule
shared by every batch source, whether it holds its split in memory or streams it.

A training step s reads batch s % steps_per_epoch of epoch s // steps_per_epoch, so a
run resumed at `start_step` sees the same batches; each process takes its contiguous
1/process_count slice of every global batch. Evaluation reads the split in order, the
last global batch zero-padded with 'mask' 0 on the padding.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


def check_batch(batch_size: int, process_index: int, process_count: int) -> int:
  """This process's share of a global batch (validated)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"Bad process_index {process_index} of {process_count}.")
  if batch_size % process_count:
    raise ValueError(f"Global batch_size {batch_size} is not divisible by "
                     f"process_count {process_count}.")
  return batch_size // process_count


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_rows(n: int, batch_size: int, *, seed: int, start_step: int = 0,
               num_steps: int | None = None, process_index: int = 0,
               process_count: int = 1, name: str = "split") -> Iterator[np.ndarray]:
  """For each step from `start_step`: the example indices this process reads. Endless
  when `num_steps` is None."""
  local = check_batch(batch_size, process_index, process_count)
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} is larger than split {name!r} "
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
    yield perm[b * batch_size + lo:b * batch_size + lo + local]
    step += 1


def num_eval_batches(n: Any, batch_size: int, limit: int | None = None) -> int:
  """Evaluation batches of a source (or of `n` examples)."""
  n = n if isinstance(n, (int, np.integer)) else len(n)
  n = n if limit is None else min(n, int(limit))
  return -(-n // batch_size)


def eval_rows(n: int, batch_size: int, *, process_index: int = 0, process_count: int = 1,
              limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """For each evaluation batch: (indices of this process's real rows, float32 mask of
  its `batch_size / process_count` rows). Every process yields the same number."""
  local = check_batch(batch_size, process_index, process_count)
  n = n if limit is None else min(n, int(limit))
  for b in range(num_eval_batches(n, batch_size)):
    rows = np.arange(b * batch_size + process_index * local,
                     b * batch_size + (process_index + 1) * local)
    real = rows < n
    yield rows[real], real.astype(np.float32)


def steps_per_epoch(source: Any, batch_size: int) -> int:
  """Full global batches per epoch (the remainder is dropped)."""
  return len(source) // batch_size


def train_batches(source: Any, batch_size: int, **kwargs) -> Iterator[dict[str, Any]]:
  """`source.train_batches` (seed, start_step, num_steps, process_index, process_count)."""
  return source.train_batches(batch_size, **kwargs)


def eval_batches(source: Any, batch_size: int, **kwargs) -> Iterator[dict[str, Any]]:
  """`source.eval_batches` (process_index, process_count, limit)."""
  return source.eval_batches(batch_size, **kwargs)
