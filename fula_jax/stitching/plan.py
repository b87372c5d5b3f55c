"""Planning, pure: requested cells -> units of stitches -> waves. No arrays, no devices.

A *unit* is the stitches one compiled program trains together under `jax.vmap`: one
arm (an objective through a stitch map), one end point j of g, and a set of front
points of f, one stitch each. With the default grouping ('end') every front into j
shares the unit, whatever its shape: each stitch maps its own front onto j's grid
inside the program, so there is one training program per (end point, arm). 'shape'
groups only fronts of the same shape (the previous engine's layout, kept to check that
merging changes no number) and 'single' makes one unit per stitch (the one-pair-at-a-
time baseline). A unit larger than the memory budget is split into equal chunks, which
share their program. Units are laid out on a (stitch x batch) view of the devices.

A *wave* is a run of consecutive units up to a stitch budget; per batch, each wave runs
both donors once and every unit of the wave steps on those activations. The waves grow
from one end point's units, so that all but the first compile while another runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax

from fula_jax import registry

def parse_pairs(pairs: Any, rows: Sequence[str], cols: Sequence[str]
                ) -> tuple[list[tuple[str, str]], bool]:
  """The requested (row, col) cells and whether they were named explicitly."""
  if isinstance(pairs, str) and pairs == "all":
    return [(r, c) for r in rows for c in cols], False
  if isinstance(pairs, str) and pairs == "diagonal":
    return [(rows[k], cols[k]) for k in range(min(len(rows), len(cols)))], False
  if isinstance(pairs, str) and pairs.startswith("offset:"):
    arg = pairs.split(":", 1)[1].strip()
    k = int(arg)
    shifts = [k] if arg[:1] in "+-" else sorted({k, -k})
    out = [(rows[a], cols[a + s]) for a in range(len(rows)) for s in shifts
           if 0 <= a + s < len(cols)]
    return out, False
  if isinstance(pairs, str):
    if "->" not in pairs:
      raise registry.unknown("stitch pairs", pairs,
                             ("all", "diagonal", "offset:1", "a->b,c->d"))
    pairs = [p for p in pairs.split(",") if p.strip()]
  out = []
  for p in pairs:
    a, b = (p.split("->") if isinstance(p, str) else p)
    out.append((a.strip(), b.strip()))
  return out, True


def cell_key(row: str, col: str) -> str:
  return f"{row}->{col}"


# A front of the end model itself: its self-stitch at point p, the baseline of column p,
# trained in the units of the sweep's other stitches into p.
SELF = "self:"


def self_front(point: str) -> str:
  return SELF + point


def is_self(front: str) -> bool:
  return front.startswith(SELF)


def point_of(front: str) -> str:
  """The donor point a front reads: its own name, or the end model's for a self front."""
  return front[len(SELF):] if is_self(front) else front


def cell_salt(row: str, col: str) -> int:
  """Salt of one cell's random numbers: independent of grouping, devices, objective,
  and of which donor a front comes from (a baseline self-stitch draws what the same
  self-stitch run on its own draws)."""
  return zlib.crc32(cell_key(point_of(row), col).encode()) & 0x7FFFFFFF


def cell_rng(seed: int, row: str, col: str) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), cell_salt(row, col))


def digest(obj: Any, n: int = 16) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                        ).hexdigest()[:n]


def safe_name(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


@dataclasses.dataclass(frozen=True)
class Unit:
  """Stitches of one arm (an objective through a stitch map, named `arm`) into end
  point `end`, trained by one program call.

  Stitch s maps front point ``fronts[s]`` (per-example shape ``front_shapes[s]``) to
  `end`; the program pads the stitch axis to `size` (repeating the first front; padded
  stitches take no steps) and stores every stitch's kernel with `width` rows (the
  widest front's features).
  """
  arm: str
  end: str
  end_shape: tuple[int, ...]
  fronts: tuple[str, ...]
  front_shapes: tuple[tuple[int, ...], ...]
  width: int
  size: int
  ways: int      # the stitch axis is split `ways` ways; each stitch's batch the rest
  trains: bool
  uid: str
  front_prefix: tuple[int, ...] = ()  # prefix tokens of each front (empty: none)
  end_prefix: int = 0

  @property
  def padded_prefix(self) -> tuple[int, ...]:
    prefix = self.front_prefix or (0,) * len(self.fronts)
    return prefix + (prefix[0],) * (self.size - len(self.fronts))

  @property
  def cells(self) -> tuple[tuple[str, str], ...]:
    return tuple((r, self.end) for r in self.fronts)

  @property
  def padded_fronts(self) -> tuple[str, ...]:
    return self.fronts + (self.fronts[0],) * (self.size - len(self.fronts))

  @property
  def padded_shapes(self) -> tuple[tuple[int, ...], ...]:
    return self.front_shapes + (self.front_shapes[0],) * (self.size - len(self.fronts))

  @property
  def grid(self) -> tuple[int, ...]:
    """The end point's spatial or token layout (() for vectors)."""
    return self.end_shape[:-1]


def stitch_ways(num_stitches: int, num_devices: int, batch_sizes: Sequence[int],
                batch_split_ok: bool = True) -> int:
  """How many ways to split a unit's stitch axis; the other devices split each stitch's
  batch. Splitting the batch is preferred (no padded stitches, and every device shares
  every stitch's work); the stitch axis takes the devices the batch sizes do not divide
  by, or all of them when an objective cannot split its batch."""
  if not batch_split_ok:
    return num_devices
  for ways in sorted(d for d in range(1, num_devices + 1) if num_devices % d == 0):
    if not any(bs % (num_devices // ways) for bs in batch_sizes):
      return ways
  return num_devices


def group(cells: Sequence[tuple[str, str]], shapes_a: Mapping[str, tuple[int, ...]],
          grouping: str) -> list[list[tuple[str, str]]]:
  """Cells that may share one program, in first-seen order: by end point ('end'), by
  end point and exact front shape ('shape'), or one each ('single')."""
  table: dict[Any, list[tuple[str, str]]] = {}
  for row, col in cells:
    key = {"end": (col,), "shape": (col, shapes_a[row]), "single": (row, col)}[grouping]
    table.setdefault(key, []).append((row, col))
  return list(table.values())


def plan(cells: Sequence[tuple[str, str]], arms: Sequence[Any], *,
         finished: Any, shapes_a: Mapping[str, tuple[int, ...]],
         shapes_b: Mapping[str, tuple[int, ...]], trains: Mapping[str, bool],
         grouping: str, num_devices: int, batch_sizes: Sequence[int],
         bytes_per_stitch: Callable[[str, int], int], budget_bytes: float,
         max_group_size: int, fingerprints: Mapping[str, str],
         prefix_a: Mapping[str, int] | None = None,
         prefix_b: Mapping[str, int] | None = None,
         batch_split: bool = True) -> list[Unit]:
  """Units for every (arm, cell) not in `finished`, laid out over the devices.

  `arms` are values with `.name` and `.decomposable`; `trains[name]` says whether that
  arm takes gradient steps; `bytes_per_stitch(end, width)` is the memory of
  one stitch's train step; `prefix_a` / `prefix_b` give the points' prefix tokens;
  `batch_split=False` keeps every stitch's batch on one device (BatchNorms in train mode
  need the whole batch's statistics). Self fronts (`self_front`) are cells like any
  other, their shapes and prefixes in `shapes_a` and `prefix_a`.
  """
  prefix_a, prefix_b = prefix_a or {}, prefix_b or {}
  points_b = list(shapes_b)
  units = []
  for members in group(cells, shapes_a, grouping):
    end = members[0][1]
    width = max(shapes_a[r][-1] for r, _ in members)
    per = bytes_per_stitch(end, width)
    cap = max(1, int(budget_bytes // max(per, 1))) * num_devices
    if max_group_size:
      cap = min(cap, int(max_group_size))
    for arm in arms:
      todo = [r for r, c in members if (arm.name, r, c) not in finished]
      if not todo:
        continue
      n_chunks = -(-len(todo) // cap)
      per_chunk = -(-len(todo) // n_chunks)
      for k in range(n_chunks):
        fronts = tuple(todo[k * per_chunk:(k + 1) * per_chunk])
        ways = stitch_ways(len(fronts), num_devices, batch_sizes,
                           arm.decomposable and batch_split)
        size = -(-len(fronts) // ways) * ways
        uid = safe_name(f"{end}-{digest([fronts, width, fingerprints[arm.name]], 12)}")
        units.append(Unit(arm.name, end, tuple(shapes_b[end]), fronts,
                          tuple(tuple(shapes_a[r]) for r in fronts), width, size, ways,
                          trains[arm.name], uid,
                          tuple(int(prefix_a.get(r, 0)) for r in fronts),
                          int(prefix_b.get(end, 0))))
  order = {a.name: k for k, a in enumerate(arms)}
  units.sort(key=lambda u: (points_b.index(u.end), order[u.arm], u.width))
  return units


def pack_waves(units: Sequence[Unit], max_stitches: int, *,
               ramp: bool = True) -> list[list[Unit]]:
  """Consecutive units, up to `max_stitches` (padded) stitches per wave.

  With `ramp`, the first wave holds only the units into the first end point and each
  wave after it at most twice the stitches of the one before: the sweep waits only for
  the first wave's programs, and every later wave's compile while a wave about half its
  size runs."""
  waves, cur, n = [], [], 0
  cap = max_stitches
  if ramp and units:
    cap = min(max_stitches, sum(u.size for u in units if u.end == units[0].end))
  for u in units:
    if cur and n + u.size > cap:
      waves.append(cur)
      cap = min(max_stitches, 2 * n) if ramp else max_stitches
      cur, n = [], 0
    cur.append(u)
    n += u.size
  if cur:
    waves.append(cur)
  return waves
