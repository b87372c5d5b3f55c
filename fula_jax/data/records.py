"""`RecordSource`: a split streamed from random-access records (tfds array_record, files
of a folder), decoded and preprocessed batch by batch as they are read.

Host memory holds only the batches in flight, whatever the split's size. Each process
decodes only its own rows of every global batch, on the schedule of `batching`, so the
order is deterministic for a seed and a run resumed at a step reads the same batches.
Decoding runs on grain's thread pool with a bounded prefetch buffer.

An unreadable record fails with its name, or, with ``on_corrupt='skip'``, is counted
(`skipped`) and left out: masked out of evaluation batches, replaced in training
batches by the next readable record, so batch shapes never change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

from fula_jax import registry
from fula_jax.data import batching
from fula_jax.data.preprocess import Preprocess, to_float
from fula_jax.errors import UserError

ON_CORRUPT = {"error": "stop at the first unreadable record, naming it",
              "skip": "leave unreadable records out and count them"}
_SKIP_TRIES = 64
_LOG = logging.getLogger(__name__)


class CorruptRecordError(UserError, ValueError):
  """A record (an image file, a tfds example) that cannot be decoded."""


class Reader(Protocol):
  """Random access to one split's raw records."""

  def __len__(self) -> int: ...
  def read(self, index: int) -> tuple[np.ndarray, int]:
    """(image as stored: uint8 or float, (H, W[, C])), label) of record `index`."""
  def describe(self, index: int) -> str:
    """Where record `index` lives, for error messages (a file path, 'cifar10[train][7]')."""
  def identity(self) -> str:
    """What the records are, for fingerprints (paths and sizes, a tfds name and version)."""
  @property
  def labels(self) -> np.ndarray:
    """Every record's label, in order (for the shortcut cue and pair sampling)."""


class _TrainSteps(Sequence):
  """Lazy step -> this process's split positions, for `num_steps` training steps."""

  def __init__(self, n, batch_size, local, lo, seed, start_step, num_steps):
    self.n, self.batch, self.local, self.lo = n, batch_size, local, lo
    self.seed, self.start, self.per_epoch = seed, start_step, n // batch_size
    self.length = num_steps if num_steps is not None else 2**40
    self._perm = (-1, None)

  def __len__(self):
    return self.length

  def __getitem__(self, k):
    step = self.start + k
    epoch, perm = self._perm
    if epoch != step // self.per_epoch:
      epoch = step // self.per_epoch
      perm = batching.epoch_permutation(self.n, self.seed, epoch)
      self._perm = (epoch, perm)  # one tuple: threads see a consistent pair
    lo = (step % self.per_epoch) * self.batch + self.lo
    return perm[lo:lo + self.local]


class _Decode:
  """Positions -> (decoded batch, records skipped so far): a picklable task, so worker
  processes can run it and report what they skipped back to the parent."""

  def __init__(self, source: "RecordSource", replace: bool):
    self.source, self.replace = source, replace

  def __call__(self, positions):
    out = self.source.batch(positions, replace=self.replace)
    return out, self.source.skipped


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSource:
  """A batch source (see `Split`) over `reader`'s records, `indices` of them in order."""
  reader: Any                       # a `Reader`
  preprocess: Preprocess
  num_classes: int
  name: str
  indices: np.ndarray | None = None  # which records, in order (None: all)
  on_corrupt: str = "error"
  num_threads: int = 4
  prefetch_batches: int = 4
  num_workers: int = 0               # decoding processes (0: threads of this process)
  label_map: np.ndarray | None = None  # stored label -> label reported (e.g. ImageNet id)

  def __post_init__(self):
    registry.lookup("data.on_corrupt", self.on_corrupt, ON_CORRUPT)
    object.__setattr__(self, "_lock", threading.Lock())
    object.__setattr__(self, "_skipped", set())

  def __getstate__(self):
    """Picklable for loader worker processes: the fields, without the lock."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def __setstate__(self, state):
    for k, v in state.items():
      object.__setattr__(self, k, v)
    self.__post_init__()

  def __len__(self) -> int:
    return len(self.reader) if self.indices is None else len(self.indices)

  @property
  def image_shape(self) -> tuple[int, ...]:
    c = self.preprocess.channels
    if c is None:
      c = self.example(0, replace=True)["image"].shape[-1]
    return (self.preprocess.size, self.preprocess.size, int(c))

  @property
  def skipped(self) -> list[str]:
    """Records left out so far as unreadable (on_corrupt='skip')."""
    with self._lock:
      return sorted(self._skipped)

  def take(self, n: int | None) -> "RecordSource":
    """The first `n` examples (all when n is None, 0 or at least len)."""
    if not n or n >= len(self):
      return self
    first = np.arange(n) if self.indices is None else self.indices[:n]
    return dataclasses.replace(self, indices=first)

  @property
  def labels(self) -> np.ndarray:
    """Every label, in order (a folder knows them; a tfds split is read once for them)."""
    labels = np.asarray(self.reader.labels, np.int32)
    if self.label_map is not None:
      labels = self.label_map[labels]
    return labels if self.indices is None else labels[self.indices]

  def gather(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of the examples at `indices` (a few: they are held in memory)."""
    rows = [self.example(int(i)) for i in np.asarray(indices).reshape(-1)]
    for i, r in zip(np.asarray(indices).reshape(-1), rows):
      if not r["mask"]:
        raise CorruptRecordError(f"Example {i} ({self.reader.describe(self._record(i))}) "
                                 "is unreadable.")
    size, c = self.image_shape[0], self.image_shape[-1]
    if not rows:
      return np.zeros((0, size, size, c), np.float32), np.zeros((0,), np.int32)
    return (np.stack([r["image"] for r in rows]),
            np.asarray([r["label"] for r in rows], np.int32))

  def fingerprint(self) -> str:
    h = hashlib.sha256(self.reader.identity().encode())
    h.update(self.preprocess.describe().encode())
    if self.indices is not None:
      h.update(np.ascontiguousarray(self.indices, np.int64).tobytes())
    return h.hexdigest()[:24]

  # ---------------------------------------------------------------- one example

  def _record(self, position: int) -> int:
    return int(position if self.indices is None else self.indices[position])

  def _read(self, record: int) -> tuple[np.ndarray, int] | None:
    try:
      return self.reader.read(record)
    except Exception as e:  # pylint: disable=broad-except
      where = self.reader.describe(record)
      if self.on_corrupt == "error":
        raise CorruptRecordError(
            f"Cannot read {where}: {type(e).__name__}: {e}. Remove or replace it, or set "
            "--config.data.on_corrupt=skip to leave unreadable records out (they are "
            "counted).") from e
      with self._lock:
        new = where not in self._skipped
        self._skipped.add(where)
      if new:
        _LOG.warning("Skipping unreadable record %s (%s: %s).", where, type(e).__name__, e)
      return None

  def _raw(self, position: int, replace: bool) -> tuple[int, np.ndarray, int] | None:
    """(record, stored image, label) at `position`; None for padding (-1) or an
    unreadable record, which with `replace` is the next readable one instead."""
    if position < 0:
      return None
    for k in range(_SKIP_TRIES if replace else 1):
      record = self._record((position + k) % len(self))
      raw = self._read(record)
      if raw is not None:
        label = raw[1] if self.label_map is None else self.label_map[raw[1]]
        return record, raw[0], int(label)
    if replace:
      raise CorruptRecordError(f"{_SKIP_TRIES} records in a row from "
                               f"{self.reader.describe(self._record(position))} are "
                               "unreadable; is the dataset damaged?")
    return None

  def batch(self, positions: Sequence[int], *, replace: bool = False
            ) -> dict[str, np.ndarray]:
    """The examples at `positions` (-1: a padding row), preprocessed together (one
    resize per shape); 'mask' is 0 on padding and on unreadable records, or with
    `replace` those are the next readable records."""
    raws = [self._raw(int(p), replace) for p in positions]
    shapes: dict[tuple[int, ...], list[int]] = {}
    for row, r in enumerate(raws):
      if r is not None:
        shapes.setdefault(np.shape(r[1]), []).append(row)
    image = None
    for rows in shapes.values():
      done = self.preprocess.batch(to_float(np.stack([raws[r][1] for r in rows])),
                                   np.asarray([raws[r][0] for r in rows]))
      if image is None:
        image = np.zeros((len(raws),) + done.shape[1:], np.float32)
      image[rows] = done
    if image is None:  # only padding or unreadable rows
      image = np.zeros((len(raws),) + self.image_shape, np.float32)
    return {"image": image,
            "label": np.asarray([0 if r is None else r[2] for r in raws], np.int32),
            "mask": np.asarray([r is not None for r in raws], np.float32)}

  def example(self, position: int, *, replace: bool = False) -> dict[str, Any]:
    """Example `position` of this source (see `batch`)."""
    return {k: v[0] for k, v in self.batch([position], replace=replace).items()}

  # ---------------------------------------------------------------- batches

  def _stream(self, batches: Sequence, replace: bool) -> Iterator[dict[str, np.ndarray]]:
    """Each element of `batches` (positions, -1 for padding) decoded as one batch on
    grain's thread pool: whole batches per task, since grain's per-element overhead
    would cost as much as decoding a small image. With `num_workers`, grain's worker
    processes decode in turn (each with its own threads), which escapes the GIL that
    image decoders partly hold, at a start-up cost of a process import each."""
    import grain  # pylint: disable=g-import-not-at-top

    options = grain.ReadOptions(
        num_threads=self.num_threads,
        prefetch_buffer_size=max(1, self.num_threads, self.prefetch_batches))
    ds = (grain.MapDataset.source(batches).map(_Decode(self, replace))
          .to_iter_dataset(options))
    if self.num_workers > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (a notebook)
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers,
          per_worker_buffer_size=max(1, self.prefetch_batches // self.num_workers)))
    for out, skipped in ds:
      if skipped:
        with self._lock:
          self._skipped.update(skipped)
      yield out

  def train_batches(self, batch_size: int, *, seed: int, start_step: int = 0,
                    num_steps: int | None = None, process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled training batches on the schedule of `batching.train_rows`."""
    local = batching.check_batch(batch_size, process_index, process_count)
    next(batching.train_rows(len(self), batch_size, seed=seed, start_step=start_step,
                             num_steps=1, name=self.name))  # validates the arguments
    if num_steps == 0:
      return iter(())
    steps = _TrainSteps(len(self), batch_size, local, process_index * local, seed,
                        start_step, num_steps)
    return ({"image": b["image"], "label": b["label"]}
            for b in self._stream(steps, replace=True))

  def eval_batches(self, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1, limit: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """The split in order, zero-padded, 'mask' 1 on real, readable rows."""
    batches = [np.concatenate([take, np.full(len(mask) - len(take), -1, np.int64)])
               for take, mask in batching.eval_rows(
                   len(self), batch_size, process_index=process_index,
                   process_count=process_count, limit=limit)]
    return self._stream(batches, replace=False) if batches else iter(())


def skipped_records(sources: Mapping[str, Any]) -> dict[str, list[str]]:
  """{split name: the records it left out as unreadable} for the sources that skipped
  any (on_corrupt='skip'), for a job's summary."""
  return {name: list(src.skipped) for name, src in sources.items()
          if getattr(src, "skipped", None)}


def skipped_line(skipped: Mapping[str, Sequence[str]]) -> str | None:
  """One line naming how many records each split left out, and the first of them."""
  if not skipped:
    return None
  parts = [f"{name} {len(v)} (first: {v[0]})" for name, v in skipped.items()]
  return ("data: unreadable records left out (data.on_corrupt=skip): " + "; ".join(parts))


def note_skipped(summary: dict, sources: Mapping[str, Any]) -> None:
  """Adds `skipped_records` to a job's `summary` and prints `skipped_line`, when any of
  `sources` left records out."""
  skipped = skipped_records(sources)
  if skipped:
    summary["skipped_records"] = skipped
    print(skipped_line(skipped), flush=True)
