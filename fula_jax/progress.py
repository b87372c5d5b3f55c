"""Progress lines with rate and ETA for long loops (training, sweeps, inversion)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TextIO



def _fmt_seconds(s: float) -> str:
  s = max(0, int(round(s)))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


class Progress:
  """Prints `label: done/total (pct) rate unit/s, elapsed, ETA` at most every `every_s`.

  The rate is measured from the first `update` on (so compilation before the first
  step is not taken for the pace of the work), leaves out time spent in `paused()`
  (compiling a later wave), and counts only work done in this process, so a resumed
  run reports an honest rate. The ETA adds `pending_s`: known work outside the rate,
  such as the compiles still to come.
  """

  def __init__(self, label: str, total: int, *, unit: str = "it", start: int = 0,
               every_s: float = 5.0, stream: TextIO | None = None,
               enabled: bool = True):
    self.label, self.total, self.unit = label, total, unit
    self.every_s, self.enabled = every_s, enabled
    self.stream = stream
    self.start_count = self.count = start
    self.t0 = time.perf_counter()
    self._first: tuple[float, int] | None = None  # (time, count) of the first update
    self._last = -float("inf")
    self._paused_s = 0.0
    self.pending_s = 0.0

  @property
  def rate(self) -> float:
    if self._first is None:
      return 0.0
    dt = time.perf_counter() - self._first[0] - self._paused_s
    return (self.count - self._first[1]) / dt if dt > 0 else 0.0

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside is left out of the rate (it is not the work being counted)."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      if self._first is not None:
        self._paused_s += time.perf_counter() - t0

  def line(self) -> str:
    rate = self.rate
    left = self.total - self.count
    eta = _fmt_seconds(left / rate + self.pending_s) if rate > 0 else "?"
    if rate > 0 and self.pending_s >= 1.0:
      eta += f" (incl. ~{_fmt_seconds(self.pending_s)} compiling)"
    pct = 100.0 * self.count / max(self.total, 1)
    return (f"{self.label}: {self.count}/{self.total} ({pct:.0f}%) "
            f"{rate:.2f} {self.unit}/s, elapsed {_fmt_seconds(time.perf_counter() - self.t0)}, "
            f"ETA {eta}")

  def update(self, count: int, *, force: bool = False, extra: str = "") -> None:
    self.count = count
    if self._first is None:
      self._first = (time.perf_counter(), count)
    now = time.perf_counter()
    if not self.enabled or (not force and now - self._last < self.every_s
                            and count < self.total):
      return
    self._last = now
    msg = self.line() + (f" | {extra}" if extra else "")
    print(msg, file=self.stream or sys.stdout, flush=True)


@contextlib.contextmanager
def phase(doing: str, done: str, *, enabled: bool = True, stream: TextIO | None = None):
  """Prints `doing` + " ..." before the block and `done` with its seconds after it."""
  out = stream or sys.stdout
  if enabled:
    print(f"{doing} ...", file=out, flush=True)
  t0 = time.perf_counter()
  yield
  if enabled:
    print(f"{done} in {time.perf_counter() - t0:.1f} s", file=out, flush=True)


@contextlib.contextmanager
def timed(seconds: dict[str, float], phase: str):
  """Adds the block's wall time to ``seconds[phase]`` (a run's time per phase)."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t0
