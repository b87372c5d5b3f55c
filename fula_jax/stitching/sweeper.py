"""The sweep engine: a whole L_A x L_B stitching matrix, for several objectives at once.

Plan. The requested cells (``pairs``: 'all', 'diagonal', 'offset:k', or explicit
``'a->b'`` pairs) are grouped by compiled shape: stitches whose front points have the
same activation shape and that end at the same point of g form a *group*. A group's
stitches of every trained objective (TLM, SLM, FuLA, and DM when refined) form one
*unit*, trained under ``jax.vmap`` by one program (see :mod:`.engine`); DM's
closed-form stitches form a second, evaluation-only unit. A unit whose memory estimate
(``jax.eval_shape`` of g's tail) exceeds ``memory_budget_mb`` per device is split.
Each unit is laid out on a (stitch x batch) view of every device of every process: the
stitch axis is split as far as it goes without much padding and each stitch's batch
over the remaining devices (a lone stitch is data-parallel over all of them); padded
stitches are ignored.

Run. Units are packed into *waves* (``max_stitches_per_wave``). All of a wave's programs
are compiled ahead of time, in parallel threads, and their XLA cost analyses kept. Per
batch of a wave, f and g run ONCE (batch-sharded, activations replicated), capturing
every stitch point, and every unit of the wave takes its step on those shared
activations. DM (and ``init='lstsq'``) first accumulates least-squares statistics over
the same batch stream. Each wave is then evaluated on the test split (one donor pass per
batch again) and every unit is written atomically, one JSON per objective,
``<workdir>/stitch/<objective>/<unit>.json``, by process 0.

Resume. A unit file records its cells and a fingerprint of every setting that affects
their numbers (including digests of both donors' variables). A rerun loads every cell
whose fingerprint matches and plans only the rest, so an interrupted sweep recomputes
nothing finished (an interruption loses the wave in flight). Settings that do not change
the numbers (pairs, grouping, wave size, memory budget, devices) keep finished cells.

Failures. A stitch whose loss or parameters become non-finite is frozen and its cell is
NaN, with the step recorded; the others go on. Cells whose points cannot be connected
(vector <-> map) are NaN with the reason when they come from 'all' / 'diagonal' /
'offset', and raise for explicitly requested pairs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fula_jax import io as fio
from fula_jax import registry
from fula_jax.models import base as models
from fula_jax.stitching import engine, lstsq, maps
from fula_jax.stitching import objectives as objectives_lib
from fula_jax.stitching.engine import Group

MEASURES = ("accuracy", "relative_accuracy", "loss", "train_loss", "dm_error",
            "pgd_accuracy")
FORMAT_VERSION = 1
# Settings that change how a sweep runs but not its numbers (kept out of fingerprints).
_RUN_ONLY = ("objectives", "pairs", "rows", "cols", "grouping", "max_stitches_per_wave",
             "memory_budget_mb", "max_group_size", "num_devices", "progress",
             "progress_every_s", "save_params", "slm", "fula", "dm")


def default_config() -> ml_collections.ConfigDict:
  """Every sweep setting with its default (Adam 1e-3, batch 256: the literature's)."""
  return ml_collections.ConfigDict(dict(
      objectives=("tlm", "slm", "dm", "fula"),
      pairs="all",            # 'all' | 'diagonal' | 'offset:k' (i->i+-k) | 'offset:+k' |
                              # 'offset:-k' | 'a->b,c->d' | a list of 'a->b' or (a, b)
      rows=config_dict.placeholder(tuple),  # front points (A); None = every point
      cols=config_dict.placeholder(tuple),  # end points (B); None = every point
      batch_size=256,
      eval_batch_size=512,
      epochs=3.0,
      steps=0,                # > 0 overrides epochs
      learning_rate=1e-3,
      adam=dict(b1=0.9, b2=0.999, eps=1e-8),
      init="random",          # 'random' (fan-in) | 'lstsq' (the DM solution)
      lstsq_examples=512,     # examples for init='lstsq'
      ridge=1e-6,             # relative ridge of the least-squares solves
      seed=0,
      cell_lr="",             # per-cell learning rates: 'a->b=lr,...' (or a dict)
      slm=dict(tau=1.0),
      dm=dict(num_examples=0,     # rows of the closed form from this many examples
                                  # (0 = one epoch of the training split)
              refine_epochs=0.0),  # gradient refinement of the closed form
      fula=dict(C="1",            # scalar, 'c1,c2,..' per point of g, or 'point=c,..'
                k=config_dict.placeholder(str),  # last latent point (None: g's last)
                squared=False, normalise="example", eps=1e-8),
      pgd=dict(enabled=False, norm="linf", eps=8 / 255, step_size=2 / 255, steps=20,
               random_start=True, num_examples=512),
      grouping="shape",       # 'shape' (vmapped groups) | 'single' (one stitch each)
      max_stitches_per_wave=64,
      memory_budget_mb=2048,  # per device, for one unit's train step
      max_group_size=0,       # > 0 caps the stitches of one unit
      num_devices=0,          # 0 = every device of every process
      save_params=False,      # also write each unit's stitch parameters (.npz)
      progress=True,
      progress_every_s=10.0,
  ))


def _plain(x: Any) -> Any:
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def resolve(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
  """Defaults overlaid with `cfg` (a ConfigDict or dict); unknown keys are errors."""
  full = _plain(default_config())

  def merge(base, over, path):
    for k, v in over.items():
      if k not in base:
        raise registry.unknown(f"stitch setting {path}", k, base.keys())
      if isinstance(base[k], dict) and isinstance(v, Mapping) and k not in ("cell_lr",):
        merge(base[k], v, f"{path}{k}.")
      else:
        base[k] = _plain(v)

  merge(full, _plain(cfg or {}), "")
  if full["grouping"] not in ("shape", "single"):
    raise registry.unknown("stitch grouping", full["grouping"], ("shape", "single"))
  if full["init"] not in ("random", "lstsq"):
    raise registry.unknown("stitch init", full["init"], ("random", "lstsq"))
  if isinstance(full["objectives"], str):
    full["objectives"] = [o for o in full["objectives"].replace(" ", "").split(",") if o]
  return full


def parse_cell_lr(spec: Any) -> dict[str, float]:
  if not spec:
    return {}
  if isinstance(spec, Mapping):
    return {str(k): float(v) for k, v in spec.items()}
  out = {}
  for part in str(spec).split(","):
    cell, _, lr = part.rpartition("=")
    out[cell.strip()] = float(lr)
  return out


def parse_fula_c(c: Any) -> Any:
  """'1' -> 1.0; '1,1,0.5' -> [1, 1, 0.5]; 'conv1=2,pool=0' -> {'conv1': 2, 'pool': 0}."""
  if isinstance(c, str):
    parts = [p.strip() for p in c.split(",") if p.strip()]
    if any("=" in p for p in parts):
      return {p.split("=")[0]: float(p.split("=")[1]) for p in parts}
    return float(parts[0]) if len(parts) == 1 else [float(p) for p in parts]
  return c


def make_objectives(cfg: Mapping[str, Any]) -> dict[str, objectives_lib.Objective]:
  ocfg = dict(cfg)
  ocfg["fula"] = dict(cfg["fula"], C=parse_fula_c(cfg["fula"]["C"]))
  return {name: objectives_lib.get(name, ocfg) for name in cfg["objectives"]}


# ------------------------------------------------------------------------- planning


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


def cell_salt(row: str, col: str) -> int:
  """Salt of one cell's PRNG key: independent of grouping, devices and objective."""
  return zlib.crc32(cell_key(row, col).encode()) & 0x7FFFFFFF


def cell_rng(seed: int, row: str, col: str) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), cell_salt(row, col))


@dataclasses.dataclass(frozen=True)
class Unit:
  """Stitches trained and evaluated by one program call; files are written per unit.

  A unit holds stitches of one group (same front shape, same end point) for one or
  several objectives; ``stitches`` are (objective, row, col) triples.
  """
  group: Group
  stitches: tuple[tuple[str, str, str], ...]
  objectives: tuple[str, ...]
  size: int   # padded stitch count (a multiple of `ways`)
  ways: int   # the stitch axis is split `ways` ways, each stitch's batch the rest
  trains: bool
  uid: str

  @property
  def cells(self) -> tuple[tuple[str, str], ...]:
    return tuple(dict.fromkeys((r, c) for _, r, c in self.stitches))


def _safe(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _digest(obj: Any, n: int = 16) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                        ).hexdigest()[:n]


def _tree_digest(tree: Any) -> str:
  """Digest of a pytree's structure and values (the donors' identity in fingerprints)."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = np.ascontiguousarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:24]


def check_eval_sets(eval_sets: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any]]:
  """``{name: (split, split as the end model sees it)}`` from ``{name: split}`` or
  ``{name: (split, split_b)}``; names become the measures ``accuracy@<name>``."""
  out = {}
  for name, v in (eval_sets or {}).items():
    if not name or _safe(name) != name:
      raise ValueError(f"Evaluation set names must be non-empty and use only letters, "
                       f"digits, '.', '_' or '-'; got {name!r}.")
    a, b = (v if isinstance(v, (tuple, list)) else (v, None))
    out[name] = (a, b or a)
  return out


def group_cells(cells: Sequence[tuple[str, str]], shapes_a: Mapping[str, tuple],
                shapes_b: Mapping[str, tuple], grouping: str
                ) -> list[tuple[Group, list[tuple[str, str]]]]:
  """Cells that can share a compiled program, grouped in first-seen order."""
  table: dict[Any, list[tuple[str, str]]] = {}
  for row, col in cells:
    key = (col, shapes_a[row]) if grouping == "shape" else (row, col)
    table.setdefault(key, []).append((row, col))
  out = []
  for members in table.values():
    fronts = tuple(dict.fromkeys(r for r, _ in members))
    col = members[0][1]
    out.append((Group(col, shapes_a[fronts[0]], shapes_b[col], fronts), members))
  return out


def bytes_per_stitch(model_b, vars_b, group: Group, batch: int) -> int:
  """Memory of one stitch in a train step: params + Adam + activations of g's tail.

  Activation sizes come from `jax.eval_shape` of the stitch and g's whole tail;
  backward passes keep roughly the forward residuals plus their cotangents (factor 3).
  """
  spec = group.spec

  def fwd(v, p, x):
    return engine.tail(model_b, v, maps.apply(spec, p, x), group.end, models.LOGITS)

  outs = jax.eval_shape(fwd, vars_b, maps.param_shapes(spec),
                        jax.ShapeDtypeStruct((batch,) + group.src_shape, jnp.float32))
  acts = sum(math.prod(o.shape) for o in jax.tree_util.tree_leaves(outs))
  acts += batch * math.prod(group.src_shape)
  return int(4 * (3 * acts + 4 * spec.num_params))


def pack_waves(units: Sequence[Unit], max_stitches: int) -> list[list[Unit]]:
  """Consecutive units, up to `max_stitches` (padded) stitches per wave."""
  waves, cur, n = [], [], 0
  for u in units:
    if cur and n + u.size > max_stitches:
      waves.append(cur)
      cur, n = [], 0
    cur.append(u)
    n += u.size
  if cur:
    waves.append(cur)
  return waves


# ------------------------------------------------------------------------- results


@dataclasses.dataclass
class SweepResult:
  """Every cell of every objective, as arrays; `matrices()` gives results.Matrix."""
  rows: list[str]
  cols: list[str]
  values: dict[str, dict[str, np.ndarray]]   # objective -> measure -> (rows, cols)
  reasons: dict[str, dict[str, str]]         # objective -> 'a->b' -> why it is NaN
  end_accuracy: float
  stats: dict[str, Any]
  meta: dict[str, Any]
  params: dict[tuple[str, str, str], dict[str, np.ndarray]] = dataclasses.field(
      default_factory=dict)

  def matrices(self, model_a: str = "A", model_b: str = "B") -> dict[str, Any]:
    """``{'stitch_<objective>/<measure>': results.Matrix}``."""
    from fula_jax import results
    out = {}
    for obj, measures in self.values.items():
      for measure, m in measures.items():
        name = f"stitch_{obj}/{measure}"
        meta = dict(self.meta, objective=obj, reasons=self.reasons.get(obj, {}),
                    end_accuracy=self.end_accuracy)
        out[name] = results.Matrix(matrix=np.asarray(m, np.float64), rows=list(self.rows),
                                   cols=list(self.cols), measure=name, model_a=model_a,
                                   model_b=model_b, meta=meta)
    return out


def _to_json_value(v: float) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None


def _from_json_value(v: Any) -> float:
  return float("nan") if v is None else float(v)


# ------------------------------------------------------------------------- the run


class _Progress:
  def __init__(self, total: int, every_s: float, enabled: bool):
    from fula_jax.progress import Progress
    self.p = Progress("stitch sweep", total, unit="batch", every_s=every_s,
                      enabled=enabled)
    self.count = 0

  def advance(self) -> None:
    self.count += 1
    self.p.update(self.count)


class _Sweep:
  """One sweep run: donors, data, meshes, programs; see `run_sweep`."""

  def __init__(self, model_a, vars_a, model_b, vars_b, train, test, cfg, workdir,
               train_b, test_b, name_a, name_b, mesh, keep_params, cache, profile,
               eval_sets):
    self.cfg = cfg
    self.model_a, self.model_b = model_a, model_b
    self.train, self.test = train, test
    self.train_b, self.test_b = train_b or train, test_b or test
    self.eval_sets = check_eval_sets(eval_sets)
    self.workdir = workdir
    self.name_a, self.name_b = name_a, name_b
    self.keep_params = keep_params
    self.profile = profile
    self.compiled = self.compiled_late = 0
    self.compile_s = 0.0
    self.kept_params: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    self.mesh = mesh or engine.mesh_for(cfg["num_devices"] or None)
    self.n_dev = self.mesh.size
    self.sync = engine.needs_sync(self.mesh)
    self.rep = NamedSharding(self.mesh, P())
    self.batch_sh = NamedSharding(self.mesh, P(engine.AXIS))
    host_a = jax.tree_util.tree_map(np.asarray, vars_a)
    host_b = jax.tree_util.tree_map(np.asarray, vars_b)
    self.vars_digest = (_tree_digest(host_a), _tree_digest(host_b))
    self.vars_a = engine.put_tree(host_a, self.rep)
    self.vars_b = engine.put_tree(host_b, self.rep)
    self.objectives = make_objectives(cfg)
    self.tx = engine.adam(cfg["adam"])
    self.points_a = tuple(model_a.point_names)
    self.points_b = tuple(model_b.point_names)
    in_a = (1,) + tuple(train.images.shape[1:])
    in_b = (1,) + tuple(self.train_b.images.shape[1:])
    self.dtypes_a = {p: (tuple(s.shape[1:]), s.dtype) for p, s in
                     models.point_shapes(model_a, in_a).items()}
    self.dtypes_b = {p: (tuple(s.shape[1:]), s.dtype) for p, s in
                     models.point_shapes(model_b, in_b).items()}
    self.shapes_a = {p: v[0] for p, v in self.dtypes_a.items()}
    self.shapes_b = {p: v[0] for p, v in self.dtypes_b.items()}
    self.num_classes = int(self.shapes_b[models.LOGITS][-1])
    n_train = len(train.labels)
    self.batch = min(int(cfg["batch_size"]), n_train)
    self.steps_per_epoch = max(1, n_train // self.batch)
    self.steps = int(cfg["steps"]) or max(1, round(float(cfg["epochs"]) *
                                                   self.steps_per_epoch))
    self.refine_steps = int(round(float(cfg["dm"]["refine_epochs"]) *
                                  self.steps_per_epoch))
    self.eval_batch = -(-min(int(cfg["eval_batch_size"]), len(test.labels))
                        // self.n_dev) * self.n_dev
    self.cell_lr = parse_cell_lr(cfg["cell_lr"])
    self._programs: dict[Any, Any] = {} if cache is None else cache
    mesh_ids = tuple(d.id for d in self.mesh.devices.flat)
    self._key = (id(model_a), id(model_b), mesh_ids, json.dumps(cfg["adam"],
                                                              sort_keys=True))
    self.end_accuracy: float | None = None
    self.end_accuracy_sets: dict[str, float] = {}
    pairs = [(self.train_b, train), (self.test_b, test)] + [
        (b, a) for a, b in self.eval_sets.values()]
    for other, mine in pairs:
      if len(other.labels) != len(mine.labels) or not np.array_equal(other.labels,
                                                                     mine.labels):
        raise ValueError("The end model's splits must hold the same examples, in the "
                         "same order, as the front model's.")
    for name, (split, split_b) in self.eval_sets.items():
      for s in (split, split_b):
        if s.images.shape[1:] != (test if s is split else self.test_b).images.shape[1:]:
          raise ValueError(f"Evaluation set {name!r} has images of shape "
                           f"{s.images.shape[1:]}; the test split's are "
                           f"{test.images.shape[1:]}.")

  # -- planning

  def stitch_steps(self, objective: str) -> int:
    return self.refine_steps if self.objectives[objective].closed_form else self.steps

  def plan(self, cells: Sequence[tuple[str, str]],
           finished: Mapping[tuple[str, str, str], Any]) -> list[Unit]:
    """Units for every (objective, cell) not finished, laid out over the devices."""
    cfg = self.cfg
    budget = float(cfg["memory_budget_mb"]) * 2**20
    fps = {o: self.fingerprint(o) for o in self.objectives}
    units = []
    for group, members in group_cells(cells, self.shapes_a, self.shapes_b,
                                      cfg["grouping"]):
      per = bytes_per_stitch(self.model_b, self.vars_b, group, self.batch)
      cap = max(1, int(budget // per)) * self.n_dev
      if cfg["max_group_size"]:
        cap = min(cap, int(cfg["max_group_size"]))
      todo = {True: [], False: []}
      for name in self.objectives:
        trains = self.stitch_steps(name) > 0
        todo[trains] += [(name, r, c) for r, c in members
                         if (name, r, c) not in finished]
      for trains, stitches in todo.items():
        if not stitches:
          continue
        n_chunks = -(-len(stitches) // cap)
        if n_chunks > 1:
          logging.info("Stitch group %s (%d stitches, ~%.1f MiB each) split into %d "
                       "units to fit %s MiB per device.", group.key, len(stitches),
                       per / 2**20, n_chunks, cfg["memory_budget_mb"])
        per_chunk = -(-len(stitches) // n_chunks)
        for k in range(n_chunks):
          chunk = tuple(stitches[k * per_chunk:(k + 1) * per_chunk])
          objs = tuple(o for o in self.objectives if any(s[0] == o for s in chunk))
          decomposable = all(self.objectives[o].decomposable for o in objs)
          ways = engine.stitch_ways(len(chunk), self.n_dev,
                                    (self.batch, self.eval_batch), decomposable)
          size = -(-len(chunk) // ways) * ways
          fronts = tuple(dict.fromkeys(r for _, r, _ in chunk))
          g = dataclasses.replace(group, fronts=fronts)
          uid = _safe(f"{g.key}-{_digest([chunk, [fps[o] for o in objs]], 12)}")
          units.append(Unit(g, chunk, objs, size, ways, trains, uid))
    col_pos = {c: k for k, c in enumerate(self.points_b)}
    units.sort(key=lambda u: (col_pos[u.group.end], u.group.src_shape,
                              u.stitches[0][1], not u.trains))
    return units

  # -- settings and files

  def fingerprint(self, objective: str) -> str:
    common = {k: v for k, v in self.cfg.items() if k not in _RUN_ONLY}
    obj = self.objectives[objective]
    settings = dict(common, objective=objective,
                    objective_settings=dataclasses.asdict(obj),
                    dm=self.cfg["dm"] if obj.closed_form else None,
                    model_a=[self.name_a, type(self.model_a).__name__, self.points_a,
                             self.vars_digest[0]],
                    model_b=[self.name_b, type(self.model_b).__name__, self.points_b,
                             self.vars_digest[1]],
                    train=[self.train.name, self.data_digest["train"]],
                    test=[self.test.name, self.data_digest["test"]],
                    version=FORMAT_VERSION)
    if self.eval_sets:
      settings["eval_sets"] = {n: [a.name, self.data_digest[n]]
                               for n, (a, _) in self.eval_sets.items()}
    return _digest(settings, 24)

  @functools.cached_property
  def data_digest(self) -> dict[str, str]:
    """Digests of every split's images and labels (both models' views): a result is
    reused only for the very same examples, e.g. not for another shortcut-cue mode."""
    views = {"train": (self.train, self.train_b), "test": (self.test, self.test_b),
             **self.eval_sets}
    return {k: _tree_digest([[s.images, s.labels] for s in (v[:1] if v[1] is v[0] else v)])
            for k, v in views.items()}

  def unit_path(self, objective: str, unit: Unit, suffix: str = ".json"):
    from etils import epath
    return epath.Path(self.workdir) / "stitch" / objective / f"{unit.uid}{suffix}"

  def load_finished(self) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Cells already computed (matching fingerprints) in the workdir."""
    from etils import epath
    done: dict[tuple[str, str, str], dict[str, Any]] = {}
    if self.workdir is None:
      return done
    root = epath.Path(self.workdir) / "stitch"
    for obj in self.objectives:
      folder = root / obj
      if not folder.exists():
        continue
      fp = self.fingerprint(obj)
      for path in sorted(folder.glob("*.json")):
        try:
          rec = fio.read_json(path)
        except (ValueError, OSError):
          continue
        if rec.get("fingerprint") != fp:
          continue
        if rec.get("end_accuracy") is not None and self.end_accuracy is None:
          self.end_accuracy = float(rec["end_accuracy"])
          self.end_accuracy_sets = {k: float(v) for k, v in
                                    rec.get("end_accuracy_sets", {}).items()}
        for c in rec["cells"]:
          done[(obj, c["row"], c["col"])] = c
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      mine = np.frombuffer(bytes.fromhex(_digest(sorted(done), 32)), np.uint8)
      root_digest = multihost_utils.broadcast_one_to_all(mine)
      if not np.array_equal(np.asarray(root_digest), mine):
        raise RuntimeError("Processes disagree on the finished stitch cells in "
                           f"{root}; is the workdir shared by every process?")
    return done

  def write_unit(self, unit: Unit, records: Mapping[str, list[dict[str, Any]]],
                 params: Mapping[str, Mapping[str, np.ndarray]], seconds: float) -> None:
    """One atomic JSON per objective (params first, when asked: the JSON marks done)."""
    if self.workdir is None or not fio.is_writer():
      return
    for obj, cells in records.items():
      if self.cfg["save_params"]:
        fio.write_npz(self.unit_path(obj, unit, ".npz"), **params[obj])
      fio.write_json(self.unit_path(obj, unit), {
          "version": FORMAT_VERSION, "objective": obj, "uid": unit.uid,
          "fingerprint": self.fingerprint(obj), "end": unit.group.end,
          "front_shape": list(unit.group.src_shape), "end_accuracy": self.end_accuracy,
          "end_accuracy_sets": self.end_accuracy_sets,
          "seconds": seconds, "cells": cells})

  # -- device programs

  def programs(self, unit: Unit) -> engine.Programs:
    # Keyed by shapes only: units of the same shapes share compiled programs.
    objs = tuple(self.objectives[o] for o in unit.objectives)
    key = self._key + ("unit", objs, unit.group.key, len(unit.group.fronts), unit.ways)
    if key not in self._programs:
      mesh = engine.unit_mesh(self.mesh.devices.flat, unit.ways)
      self._programs[key] = (engine.build(objs, self.model_b, unit.group, mesh, self.tx),
                             self.model_a, self.model_b)
    return self._programs[key][0]

  def stats_program(self, group: Group, ways: int) -> engine.StatsProgram:
    key = self._key + ("stats", group.key, len(group.fronts), ways)
    if key not in self._programs:
      mesh = engine.unit_mesh(self.mesh.devices.flat, ways)
      self._programs[key] = (engine.build_stats(group, mesh), self.model_a, self.model_b)
    return self._programs[key][0]

  # -- compiled executables (ahead of time, in parallel, with their FLOPs)

  @staticmethod
  def _signature(fn: Callable[..., Any], args: tuple) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return (id(fn), treedef, tuple((tuple(np.shape(a)), str(a.dtype),
                                    getattr(a, "sharding", None)) for a in leaves))

  def _compile(self, fn: Callable[..., Any], args: tuple, key: tuple) -> Any:
    compiled = fn.lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    self._programs[self._key + ("exe", key)] = (compiled, flops, fn)
    return compiled

  def precompile(self, calls: Sequence[tuple[Callable[..., Any], tuple]]) -> None:
    """Compile every (jitted fn, abstract args) not compiled yet, in parallel threads
    (XLA compiles without the GIL), so a wave does not wait on one compile at a time."""
    todo = {}
    for fn, args in calls:
      key = self._signature(fn, args)
      if self._key + ("exe", key) not in self._programs:
        todo[key] = (fn, args)
    if not todo:
      return
    t0 = time.perf_counter()
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      futures = [pool.submit(self._compile, fn, args, key)
                 for key, (fn, args) in todo.items()]
      for f in futures:
        f.result()
    self.compiled += len(todo)
    self.compile_s += time.perf_counter() - t0

  def call(self, prog, fn: Callable[..., Any], *args) -> Any:
    """Run `fn` through its compiled executable (compiled now if it was not ahead)."""
    key = self._signature(fn, args)
    entry = self._programs.get(self._key + ("exe", key))
    if entry is None:
      t0 = time.perf_counter()
      self._compile(fn, args, key)
      self.compiled_late += 1
      self.compile_s += time.perf_counter() - t0
      entry = self._programs[self._key + ("exe", key)]
    if self.profile is not None:
      rec = self.profile.setdefault(key, {"flops": entry[1], "calls": 0})
      rec["calls"] += 1
    out = entry[0](*args)
    if (prog is None or prog.collective) and self.sync:
      jax.block_until_ready(out)
    return out

  def abstract_batch(self, batch: int, which: str) -> tuple[dict, Any, dict]:
    """Abstract (acts_a, logits_b, acts_b) of the donor pass for a batch size."""
    shapes = self.dtypes_a if which == "a" else self.dtypes_b
    def sds(p):
      shape, dtype = shapes[p]
      return jax.ShapeDtypeStruct((batch,) + shape, dtype, sharding=self.rep)
    if which == "a":
      return {p: sds(p) for p in self.points_a}
    return sds(models.LOGITS), {p: sds(p) for p in self.points_b}

  def abstract_inputs(self, batch: int, eval_: bool) -> dict[str, Any]:
    sh = self.batch_sh if batch % self.n_dev == 0 else self.rep
    img_a = (batch,) + tuple(self.train.images.shape[1:])
    img_b = (batch,) + tuple(self.train_b.images.shape[1:])
    out = {"xa": jax.ShapeDtypeStruct(img_a, jnp.float32, sharding=sh),
           "xb": jax.ShapeDtypeStruct(img_b, jnp.float32, sharding=sh),
           "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=self.rep)}
    if eval_:
      out["mask"] = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=self.rep)
    return out

  @staticmethod
  def sharding(prog) -> NamedSharding:
    """The stitch-axis sharding of a unit's arrays (as its programs return them: a
    size-1 stitch axis comes back unpartitioned)."""
    if prog.mesh.shape[engine.AXIS] == 1:
      return NamedSharding(prog.mesh, P())
    return NamedSharding(prog.mesh, P(engine.AXIS))

  def captures(self):
    """The jitted donor pass: f and g on a batch-sharded batch, every stitch point
    replicated out (one program for both donors)."""
    key = self._key + ("donors",)
    if key not in self._programs:
      model_a, model_b = self.model_a, self.model_b

      def donors(va, vb, xa, xb):
        acts_a = models.capture(model_a, va, xa)[1]
        logits_b, acts_b = models.capture(model_b, vb, xb)
        return acts_a, logits_b, acts_b

      self._programs[key] = (jax.jit(donors, out_shardings=self.rep), model_a, model_b)
    return self._programs[key][0]

  def batch_arrays(self, batch: Mapping[str, np.ndarray],
                   batch_b: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    n = batch["label"].shape[0]
    sh = self.batch_sh if n % self.n_dev == 0 else self.rep
    out = {"xa": engine.put(batch["image"], sh), "xb": engine.put(batch_b["image"], sh),
           "label": engine.put(batch["label"], self.rep)}
    if "mask" in batch:
      out["mask"] = engine.put(batch["mask"], self.rep)
    return out

  def donor_pass(self, arrays):
    """f and g once each on the batch, every stitch point captured and replicated."""
    return self.call(None, self.captures(), self.vars_a, self.vars_b, arrays["xa"],
                     arrays["xb"])

  def train_stream(self, num_steps: int) -> Iterable[tuple[dict, dict]]:
    from fula_jax import data
    seed = int(self.cfg["seed"])
    a = data.train_batches(self.train, self.batch, seed=seed, num_steps=num_steps)
    b = data.train_batches(self.train_b, self.batch, seed=seed, num_steps=num_steps)
    return zip(a, b)

  def eval_stream(self, which: str = "") -> Iterable[tuple[dict, dict]]:
    """Batches of the test split ('') or of the evaluation set `which`."""
    from fula_jax import data
    test, test_b = self.eval_sets[which] if which else (self.test, self.test_b)
    return zip(data.eval_batches(test, self.eval_batch),
               data.eval_batches(test_b, self.eval_batch))

  # -- one wave

  def _lstsq_needs(self, wave: Sequence[Unit]) -> tuple[int, int]:
    """Batches of least-squares statistics for inits and for DM solutions."""
    cfg = self.cfg
    needs_init = cfg["init"] == "lstsq" and any(
        not self.objectives[o].closed_form for u in wave for o, _, _ in u.stitches)
    has_dm = any(self.objectives[o].closed_form for u in wave for o, _, _ in u.stitches)
    init_batches = -(-int(cfg["lstsq_examples"]) // self.batch) if needs_init else 0
    dm_examples = int(cfg["dm"]["num_examples"])
    dm_batches = ((-(-dm_examples // self.batch) if dm_examples else self.steps_per_epoch)
                  if has_dm else 0)
    return init_batches, dm_batches

  def wave_batches(self, wave: Sequence[Unit]) -> int:
    n_eval = sum(-(-len(t.labels) // self.eval_batch)
                 for t in [self.test] + [a for a, _ in self.eval_sets.values()])
    train = max([self.stitch_steps(o) for u in wave for o, _, _ in u.stitches] + [0])
    return max(self._lstsq_needs(wave)) + train + n_eval

  def _stats_jobs(self, wave: Sequence[Unit]) -> list[tuple]:
    """One least-squares job per group of the wave: (key, group, cells, program, size)."""
    if not max(self._lstsq_needs(wave)):
      return []
    jobs: dict[str, tuple[Group, list[tuple[str, str]]]] = {}
    for u in wave:
      needed = [(r, c) for o, r, c in u.stitches
                if self.objectives[o].closed_form or self.cfg["init"] == "lstsq"]
      if needed:
        group, cells = jobs.setdefault(u.group.key, (u.group, []))
        cells += [c for c in needed if c not in cells]
    out = []
    for key, (group, cells) in jobs.items():
      fronts = tuple(dict.fromkeys(r for r, _ in cells))
      group = dataclasses.replace(group, fronts=fronts)
      ways = engine.stitch_ways(len(cells), self.n_dev, (self.batch,))
      size = -(-len(cells) // ways) * ways
      out.append((key, group, cells, self.stats_program(group, ways), size))
    return out

  def _precompile_wave(self, wave: Sequence[Unit]) -> None:
    """Every program the wave will run, compiled up front in parallel."""
    def sds(tree, sharding):
      return jax.tree_util.tree_map(
          lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype,
                                         sharding=sharding), tree)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    calls = []
    train_needed = max(self._lstsq_needs(wave)) > 0 or any(u.trains for u in wave)
    batches = ([(self.batch, False)] if train_needed else []) + [(self.eval_batch, True)]
    acts = {}
    for batch, eval_ in batches:
      inputs = self.abstract_inputs(batch, eval_)
      calls.append((self.captures(), (self.vars_a, self.vars_b, inputs["xa"],
                                      inputs["xb"])))
      acts[eval_] = (inputs, self.abstract_batch(batch, "a"),
                     *self.abstract_batch(batch, "b"))
    for _, group, _, prog, size in self._stats_jobs(wave):
      _, acts_a, _, acts_b = acts[False]
      spec = group.spec
      calls.append((prog.update, (
          sds(engine.stats_zeros(size, spec.in_features, spec.out_features),
              self.sharding(prog)),
          jax.ShapeDtypeStruct((size,), jnp.int32, sharding=self.sharding(prog)),
          tuple(acts_a[p] for p in group.fronts), acts_b[group.end])))
    for u in wave:
      prog = self.programs(u)
      spec = u.group.spec
      zeros = np.zeros((u.size,), np.int32)
      state = sds(engine.init_state(
          {"kernel": np.zeros((u.size, spec.in_features, spec.out_features), np.float32),
           "bias": np.zeros((u.size, spec.out_features), np.float32)},
          zeros, zeros, zeros, zeros.astype(np.float32), self.tx), self.sharding(prog))
      if u.trains:
        _, acts_a, logits_b, acts_b = acts[False]
        shared = {"label": acts[False][0]["label"], "teacher": logits_b,
                  "targets": {p: acts_b[p] for p in prog.train_targets}}
        calls.append((prog.train, (state, self.vars_b,
                                   tuple(acts_a[p] for p in u.group.fronts), shared,
                                   scalar, scalar)))
      inputs, acts_a, logits_b, acts_b = acts[True]
      shared = {"label": inputs["label"], "teacher": logits_b,
                "targets": {p: acts_b[p] for p in prog.eval_targets}}
      calls.append((prog.evaluate, (
          sds(engine.zeros_like_terms(self.eval_shapes(u, prog), u.size),
              self.sharding(prog)),
          state.params, state.front, self.vars_b,
          tuple(acts_a[p] for p in u.group.fronts), shared, inputs["mask"])))
    self.precompile(calls)

  def eval_shapes(self, u: Unit, prog: engine.Programs) -> dict:
    key = self._key + ("eval_shapes", u.objectives, u.group.key, self.eval_batch)
    if key not in self._programs:
      self._programs[key] = engine.eval_terms_shape(
          [self.objectives[o] for o in u.objectives], self.model_b, self.vars_b,
          u.group, self.eval_batch, self.num_classes,
          {p: self.shapes_b[p] for p in prog.eval_targets})
    return self._programs[key]

  def least_squares(self, wave: Sequence[Unit], progress
                    ) -> tuple[dict[tuple[str, str], Any], dict[tuple[str, str], Any]]:
    """Closed-form solutions per cell: (for inits, for DM); values (params, error)."""
    init_batches, dm_batches = self._lstsq_needs(wave)
    n_batches = max(init_batches, dm_batches)
    if not n_batches:
      return {}, {}
    states = {}
    for key, group, cells, prog, size in self._stats_jobs(wave):
      spec = group.spec
      padded = cells + [cells[0]] * (size - len(cells))
      front = np.array([group.fronts.index(r) for r, _ in padded], np.int32)
      states[key] = (group, cells, prog, engine.put(front, self.sharding(prog)),
                     engine.put_tree(engine.stats_zeros(size, spec.in_features,
                                                        spec.out_features),
                                     self.sharding(prog)))
    init_sol, dm_sol = {}, {}
    for b, (batch, batch_b) in enumerate(self.train_stream(n_batches)):
      arrays = self.batch_arrays(batch, batch_b)
      acts_a, _, acts_b = self.donor_pass(arrays)
      for key, (group, cells, prog, front, st) in states.items():
        st = self.call(prog, prog.update, st, front,
                       tuple(acts_a[p] for p in group.fronts), acts_b[group.end])
        states[key] = (group, cells, prog, front, st)
      for count, out in ((init_batches, init_sol), (dm_batches, dm_sol)):
        if b + 1 == count:
          for group, cells, prog, _, st in states.values():
            out.update(self._solve(group, cells, engine.fetch(st, self.mesh)))
      progress.advance()
    return init_sol, dm_sol

  def _solve(self, group: Group, cells, stats: lstsq.Stats
             ) -> dict[tuple[str, str], tuple[dict[str, np.ndarray], str]]:
    """Host float64 solutions per cell, with an error message when one fails."""
    ridge = float(self.cfg["ridge"])
    spec = group.spec
    out = {}
    for s, cell in enumerate(cells):
      one = lstsq.Stats(*(np.asarray(x)[s] for x in stats))
      err = ""
      try:
        sol = lstsq.solve(one, ridge)
        if not all(np.all(np.isfinite(v)) for v in sol.values()):
          raise ValueError("non-finite least-squares solution")
      except (ValueError, np.linalg.LinAlgError) as e:
        err = f"least squares failed: {e}"
        sol = {"kernel": np.zeros((spec.in_features, spec.out_features), np.float32),
               "bias": np.zeros((spec.out_features,), np.float32)}
      out[cell] = (sol, err)
    return out

  def run_wave(self, wave: list[Unit], progress) -> dict[tuple[str, str, str], dict]:
    """Train, evaluate and write every unit of `wave`; the records of its stitches."""
    cfg = self.cfg
    t0 = time.perf_counter()
    self._precompile_wave(wave)
    init_sol, dm_sol = self.least_squares(wave, progress)

    states, failed, max_steps = {}, {}, {}
    for u in wave:
      padded = list(u.stitches) + [u.stitches[0]] * (u.size - len(u.stitches))
      randoms = engine.random_init(u.group.spec, int(cfg["seed"]),
                                   [cell_salt(r, c) for _, r, c in padded])
      params, errors = [], {}
      for k, (o, r, c) in enumerate(padded):
        if self.objectives[o].closed_form:
          p, err = dm_sol[(r, c)]
        elif cfg["init"] == "lstsq":
          p, err = init_sol[(r, c)]
        else:
          p, err = {name: v[k] for name, v in randoms.items()}, ""
        params.append(p)
        if err and k < len(u.stitches):
          errors[k] = err
      failed[u.uid] = errors
      steps = np.array([self.stitch_steps(o) for o, _, _ in padded], np.int32)
      steps[len(u.stitches):] = 0
      max_steps[u.uid] = int(steps.max())
      state = engine.init_state(
          {k: np.stack([p[k] for p in params]) for k in params[0]},
          np.array([u.group.fronts.index(r) for _, r, _ in padded], np.int32),
          np.array([u.objectives.index(o) for o, _, _ in padded], np.int32), steps,
          np.array([self.cell_lr.get(cell_key(r, c), float(cfg["learning_rate"]))
                    for _, r, c in padded], np.float32), self.tx)
      states[u.uid] = engine.put_tree(state, self.sharding(self.programs(u)))

    # Training: one donor pass per batch, shared by every unit of the wave.
    n_steps = max(max_steps.values())
    for step, (batch, batch_b) in enumerate(self.train_stream(n_steps)):
      arrays = self.batch_arrays(batch, batch_b)
      acts_a, logits_b, acts_b = self.donor_pass(arrays)
      for u in wave:
        if step >= max_steps[u.uid]:
          continue
        prog = self.programs(u)
        shared = {"label": arrays["label"], "teacher": logits_b,
                  "targets": {p: acts_b[p] for p in prog.train_targets}}
        states[u.uid] = self.call(
            prog, prog.train, states[u.uid], self.vars_b,
            tuple(acts_a[p] for p in u.group.fronts), shared,
            np.int32(self.steps_per_epoch), np.int32(step))
      progress.advance()

    # Evaluation on the test split (and any extra sets): one donor pass per batch.
    accs, end_correct = self.evaluate(wave, states, "", progress)
    n_test = float(len(self.test.labels))
    self.end_accuracy = end_correct / n_test
    extra_correct = {}
    for name, (split, _) in self.eval_sets.items():
      terms, correct = self.evaluate(wave, states, name, progress)
      extra_correct[name] = {uid: t["correct"] for uid, t in terms.items()}
      self.end_accuracy_sets[name] = correct / float(len(split.labels))

    out = {}
    seconds = (time.perf_counter() - t0) / max(len(wave), 1)
    host = engine.fetch({u.uid: (states[u.uid], accs[u.uid]) for u in wave}, self.mesh)
    extra_host = engine.fetch(extra_correct, self.mesh)
    for u in wave:
      st, terms = host[u.uid]
      extra = {n: np.asarray(c[u.uid]) / float(len(self.eval_sets[n][0].labels))
               for n, c in extra_host.items()}
      records = self._records(u, st, terms, n_test, failed[u.uid], extra)
      by_obj: dict[str, list[dict[str, Any]]] = {o: [] for o in u.objectives}
      params_by_obj: dict[str, dict[str, list]] = {o: {"kernel": [], "bias": []}
                                                   for o in u.objectives}
      for k, ((o, r, c), rec) in enumerate(zip(u.stitches, records)):
        by_obj[o].append(rec)
        out[(o, r, c)] = rec
        one = {name: np.asarray(v[k]) for name, v in st.params.items()}
        if self.keep_params:
          self.kept_params[(o, r, c)] = one
        for name in params_by_obj[o]:
          params_by_obj[o][name].append(one[name])
      params_np = {o: {k: np.stack(v) for k, v in d.items()}
                   for o, d in params_by_obj.items()}
      self.write_unit(u, by_obj, params_np, seconds)
    return out

  def evaluate(self, wave: Sequence[Unit], states: Mapping[str, engine.StitchState],
               which: str, progress) -> tuple[dict[str, Any], float]:
    """Every unit's summed evaluation terms on the test split ('') or evaluation set
    `which` (one donor pass per batch), and the end model's number of correct answers."""
    accs = {}
    for u in wave:
      prog = self.programs(u)
      accs[u.uid] = engine.put_tree(engine.zeros_like_terms(self.eval_shapes(u, prog),
                                                            u.size), self.sharding(prog))
    end_correct = 0.0
    for batch, batch_b in self.eval_stream(which):
      arrays = self.batch_arrays(batch, batch_b)
      acts_a, logits_b, acts_b = self.donor_pass(arrays)
      end_correct += float(np.sum(batch["mask"] * (
          np.argmax(np.asarray(logits_b), -1) == batch["label"])))
      for u in wave:
        prog = self.programs(u)
        st = states[u.uid]
        shared = {"label": arrays["label"], "teacher": logits_b,
                  "targets": {p: acts_b[p] for p in prog.eval_targets}}
        accs[u.uid] = self.call(prog, prog.evaluate, accs[u.uid], st.params, st.front,
                                self.vars_b, tuple(acts_a[p] for p in u.group.fronts),
                                shared, arrays["mask"])
      progress.advance()
    return accs, end_correct

  def _records(self, u: Unit, st: engine.StitchState, terms, n_test: float,
               failed: Mapping[int, str], extra: Mapping[str, np.ndarray]
               ) -> list[dict[str, Any]]:
    acc = terms["correct"] / n_test
    dm_err = terms["dm_num"] / np.maximum(terms["dm_den"], 1e-30)
    train_loss = np.where(st.loss_weight > 0,
                          st.loss_sum / np.maximum(st.loss_weight, 1e-30), np.nan)
    pgd = self._pgd(u, st) if self.cfg["pgd"]["enabled"] else None
    records = []
    for s, (o, row, col) in enumerate(u.stitches):
      obj = self.objectives[o]
      where = objectives_lib.Where(u.group.end, self.points_b)
      own = {k.split("/", 1)[1]: np.asarray(v)[s] for k, v in terms.items()
             if k.startswith(f"{o}/")}
      metrics = {
          "accuracy": float(acc[s]),
          "relative_accuracy": (float(acc[s] / self.end_accuracy) if self.end_accuracy
                                else float("nan")),
          "loss": float(obj.eval_value(own, n_test, where)),
          "train_loss": float(train_loss[s]),
          "dm_error": float(dm_err[s]),
          "pgd_accuracy": float(pgd[s]) if pgd is not None else float("nan"),
          **{f"accuracy@{n}": float(a[s]) for n, a in extra.items()},
      }
      status, reason = "ok", ""
      if s in failed:
        status, reason = "failed", failed[s]
      elif bool(st.diverged[s]):
        status = "diverged"
        reason = (f"non-finite loss or parameters at training step "
                  f"{int(st.diverged_step[s])} (learning rate {float(st.lr[s]):g})")
      elif not all(math.isfinite(metrics[m]) for m in ("accuracy", "loss", "dm_error")):
        status, reason = "diverged", "non-finite value on the test split"
      if status != "ok":
        metrics = {k: float("nan") for k in metrics}
      records.append({"row": row, "col": col, "status": status, "reason": reason,
                      "metrics": {k: _to_json_value(v) for k, v in metrics.items()}})
    return records

  def pgd_program(self, row: str, col: str) -> Callable[..., jax.Array]:
    """Jitted count of correct answers of the stitched model row -> col under PGD;
    one per cell for the whole sweep (the objectives' stitches share it)."""
    pcfg = self.cfg["pgd"]
    key = self._key + ("pgd", row, col, json.dumps(pcfg, sort_keys=True))
    if key not in self._programs:
      from fula_jax import attacks
      model_a, model_b = self.model_a, self.model_b
      spec = maps.plan(row, self.shapes_a[row], col, self.shapes_b[col])

      def stitched(p, va, vb, x):
        z = maps.apply(spec, p, models.forward(model_a, va, x, end=row))
        return models.forward(model_b, vb, z, start=col)

      @jax.jit
      def correct(p, va, vb, x, y, rng):
        x_adv = attacks.pgd(lambda xx: stitched(p, va, vb, xx), x, y, rng,
                            eps=float(pcfg["eps"]), step_size=float(pcfg["step_size"]),
                            steps=int(pcfg["steps"]), norm=str(pcfg["norm"]),
                            random_start=bool(pcfg["random_start"]))
        return jnp.sum(jnp.argmax(stitched(p, va, vb, x_adv), -1) == y)

      self._programs[key] = (correct, model_a, model_b)
    return self._programs[key][0]

  def _pgd(self, u: Unit, st: engine.StitchState) -> np.ndarray:
    """Accuracy of each stitched model under PGD on the first test examples."""
    pcfg = self.cfg["pgd"]
    n = min(int(pcfg["num_examples"]), len(self.test.labels))
    x_all, y_all = self.test.images[:n], self.test.labels[:n]
    vars_a = engine.fetch(self.vars_a, self.mesh)
    vars_b = engine.fetch(self.vars_b, self.mesh)
    out = np.full((len(u.stitches),), np.nan)
    from fula_jax.progress import Progress
    bar = Progress(f"stitch PGD ({u.group.end})", len(u.stitches), unit="stitch",
                   every_s=float(self.cfg["progress_every_s"]),
                   enabled=bool(self.cfg["progress"]) and jax.process_index() == 0)
    for s, (_, row, col) in enumerate(u.stitches):
      correct = self.pgd_program(row, col)
      p = {k: np.asarray(v)[s] for k, v in st.params.items()}
      total = 0.0
      key = cell_rng(int(self.cfg["seed"]) + 1, row, col)
      for lo in range(0, n, self.eval_batch):
        key, sub = jax.random.split(key)
        total += float(correct(p, vars_a, vars_b, x_all[lo:lo + self.eval_batch],
                               y_all[lo:lo + self.eval_batch], sub))
      out[s] = total / n
      bar.update(s + 1)
    return out


def run_sweep(model_a: models.StagedModel, vars_a: Any, model_b: models.StagedModel,
              vars_b: Any, train, test, cfg: Mapping[str, Any] | None = None,
              workdir: str | None = None, *, train_b=None, test_b=None,
              name_a: str = "A", name_b: str = "B", mesh: Mesh | None = None,
              keep_params: bool = False, cache: dict | None = None,
              profile: dict | None = None,
              eval_sets: Mapping[str, Any] | None = None) -> SweepResult:
  """Run (or resume) a stitching sweep; see the module docstring.

  Args:
    model_a, vars_a: the front model f and its frozen variables.
    model_b, vars_b: the end model g and its frozen variables.
    train, test: `fula_jax.data.Split`s (images in [0, 1]); stitches train on `train`
      and are evaluated on `test`.
    cfg: settings overriding `default_config()`.
    workdir: where unit files go (``<workdir>/stitch/...``) and are resumed from; None
      keeps everything in memory (e.g. in a Colab).
    train_b, test_b: the same examples as the end model sees them, when its inputs
      differ (e.g. a grayscale model); default: the same splits.
    name_a, name_b: model identities, part of the fingerprints and of the results.
    mesh: a 1-D mesh of the devices to use; default: every device of every process.
    keep_params: return the trained stitch parameters in `SweepResult.params`.
    cache: a dict owned by the caller; passing the same one to several sweeps over the
      same model objects reuses their compiled programs.
    profile: a dict to fill with every compiled program's FLOPs and call count, for
      `program_flops`.
    eval_sets: more test sets every stitch is evaluated on, ``{name: split}`` or
      ``{name: (split, split_b)}`` (e.g. the shortcut cue absent); their accuracies are
      the measures ``accuracy@<name>`` and the end model's are in
      ``meta['end_accuracy_sets']``.

  Returns:
    A `SweepResult`; `stats` counts the units and cells computed in this run and the
    cells resumed from the workdir.
  """
  cfg = resolve(cfg)
  t0 = time.perf_counter()
  workdir = None if workdir is None else fio.resolve(workdir)
  sw = _Sweep(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir, train_b,
              test_b, name_a, name_b, mesh, keep_params, cache, profile, eval_sets)
  rows = list(cfg["rows"] or sw.points_a)
  cols = list(cfg["cols"] or sw.points_b)
  pairs, explicit = parse_pairs(cfg["pairs"], rows, cols)
  for r, c in [(r, cols[0]) for r in rows] + [(rows[0], c) for c in cols] + pairs:
    if r not in sw.points_a:
      raise registry.unknown(f"stitch point of the front model ({name_a})", r,
                             sw.points_a)
    if c not in sw.points_b:
      raise registry.unknown(f"stitch point of the end model ({name_b})", c,
                             sw.points_b)

  unstitchable: dict[tuple[str, str], str] = {}
  stitchable = []
  for r, c in pairs:
    try:
      maps.plan(r, sw.shapes_a[r], c, sw.shapes_b[c])
      stitchable.append((r, c))
    except maps.UnstitchableError as e:
      if explicit:
        raise
      unstitchable[(r, c)] = str(e)

  finished = sw.load_finished()
  units = sw.plan(stitchable, finished)
  waves = pack_waves(units, int(cfg["max_stitches_per_wave"]))
  show = bool(cfg["progress"]) and jax.process_index() == 0
  progress = _Progress(sum(sw.wave_batches(w) for w in waves),
                       float(cfg["progress_every_s"]), show)
  resumed = sum(1 for key in finished if (key[1], key[2]) in set(stitchable))
  if show:
    print(f"stitch sweep: {len(pairs)} cells x {len(sw.objectives)} objectives; "
          f"{resumed} (objective, cell) results resumed from the workdir; "
          f"{sum(len(u.stitches) for u in units)} stitches in {len(units)} units, "
          f"{len(waves)} waves, on {sw.n_dev} devices ({jax.process_count()} "
          f"processes).", flush=True)

  records = dict(finished)
  for wave in waves:
    records.update(sw.run_wave(wave, progress))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fula_jax.stitching.sweeper done")

  values: dict[str, dict[str, np.ndarray]] = {}
  reasons: dict[str, dict[str, str]] = {}
  requested = set(pairs)
  measures = [m for m in MEASURES if m != "pgd_accuracy" or cfg["pgd"]["enabled"]]
  measures += [f"accuracy@{n}" for n in sw.eval_sets]
  for name in sw.objectives:
    mats = {m: np.full((len(rows), len(cols)), np.nan) for m in measures}
    why: dict[str, str] = {}
    for a, r in enumerate(rows):
      for b, c in enumerate(cols):
        if (r, c) not in requested:
          continue
        if (r, c) in unstitchable:
          why[cell_key(r, c)] = unstitchable[(r, c)]
          continue
        rec = records[(name, r, c)]
        for m in measures:
          mats[m][a, b] = _from_json_value(rec["metrics"].get(m))
        if rec["status"] != "ok":
          why[cell_key(r, c)] = f"{rec['status']}: {rec['reason']}"
    values[name], reasons[name] = mats, why
  stats = {"units_computed": len(units), "waves": len(waves),
           "programs_compiled": sw.compiled + sw.compiled_late,
           "programs_compiled_late": sw.compiled_late,
           "compile_seconds": sw.compile_s,
           "stitches_computed": sum(len(u.stitches) for u in units),
           "stitches_resumed": resumed, "devices": sw.n_dev,
           "processes": jax.process_count(), "seconds": time.perf_counter() - t0}
  meta = {"settings": cfg, "n_train": len(train.labels), "n_test": len(test.labels),
          "train": train.name, "test": test.name, "batch_size": sw.batch,
          "steps": sw.steps, "estimator": "stitching",
          "end_accuracy_sets": dict(sw.end_accuracy_sets),
          "eval_sets": {n: a.name for n, (a, _) in sw.eval_sets.items()}}
  return SweepResult(rows, cols, values, reasons,
                     float("nan") if sw.end_accuracy is None else sw.end_accuracy,
                     stats, meta, sw.kept_params)


def program_flops(profile: Mapping[Any, Mapping[str, Any]]) -> float:
  """Total FLOPs a profiled sweep executed: XLA's cost analysis of each compiled
  program (``jitted.lower(...).compile().cost_analysis()``) times its calls."""
  return float(sum(e["flops"] * e["calls"] for e in profile.values()))


def sweep(model_a: models.StagedModel, vars_a: Any, model_b: models.StagedModel,
          vars_b: Any, train, test, cfg: Mapping[str, Any] | None = None,
          workdir: str | None = None, **kwargs: Any) -> dict[str, Any]:
  """`run_sweep`, returned as ``{'stitch_<objective>/<measure>': results.Matrix}``.

  Callable from a Colab with models and splits in memory and ``workdir=None``.
  """
  res = run_sweep(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir, **kwargs)
  return res.matrices(kwargs.get("name_a", "A"), kwargs.get("name_b", "B"))
