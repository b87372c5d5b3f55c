"""The sweep engine: a whole L_A x L_B stitching matrix, for several objectives at once.

Plan. The requested cells (``pairs``: 'all', 'diagonal', 'offset:k', or explicit
``'a->b'`` pairs) are grouped by compiled shape: stitches whose front points have the
same activation shape and that end at the same point of g form a *group*, trained under
``jax.vmap`` by one program (see :mod:`fula_jax.stitching.engine`). A group whose memory
estimate (from ``jax.eval_shape`` of g's tail) exceeds ``memory_budget_mb`` per device is
split into *units*; each unit's stitch axis is padded to a multiple of the device count
(padded stitches are ignored) and sharded over every device of every process.

Run. Units are packed into *waves* (``max_stitches_per_wave``). Per batch of a wave, f
and g each run ONCE, capturing every stitch point (batch-sharded, then replicated), and
every unit of the wave (all objectives) takes its step on those shared activations. DM
(and ``init='lstsq'``) accumulates least-squares statistics in a first pass over the
same batch stream. After training, each wave is evaluated on the test split (one donor
pass per batch again) and every unit is written atomically as
``<workdir>/stitch/<objective>/<unit>.json`` by process 0.

Resume. A unit file records its cells and a fingerprint of every setting that affects
their numbers. A rerun loads every cell whose fingerprint matches and plans only the
rest, so an interrupted sweep recomputes nothing finished (waves are the unit of loss:
an interruption loses the wave in flight). Changing a setting that does not change the
numbers (pairs, grouping, wave size, memory budget, devices) keeps finished cells.

Failures. A stitch whose loss or parameters become non-finite is frozen and its cell is
NaN with the reason recorded; the others go on. Cells whose points cannot be connected
(vector <-> map) are NaN with the reason when they come from 'all' / 'diagonal' /
'offset', and raise for explicitly requested pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
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
      rows=None,              # front points (model A); None = all stitch points
      cols=None,              # end points (model B); None = all stitch points
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
                k=None,           # last latent point (None: g's last stitch point)
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


def cell_rng(seed: int, row: str, col: str) -> jax.Array:
  """Key of one cell, independent of grouping, devices and objective."""
  return jax.random.fold_in(jax.random.PRNGKey(seed),
                            zlib.crc32(cell_key(row, col).encode()) & 0x7FFFFFFF)


@dataclasses.dataclass(frozen=True)
class Unit:
  """Stitches of one objective trained by one program call; the resume granule."""
  objective: str
  group: Group
  cells: tuple[tuple[str, str], ...]
  size: int  # padded stitch count (a multiple of the device count)
  uid: str


def _shape_tag(shape: Sequence[int]) -> str:
  return "x".join(map(str, shape)) or "scalar"


def _safe(name: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def _digest(obj: Any, n: int = 16) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()
                        ).hexdigest()[:n]


def group_cells(cells: Sequence[tuple[str, str]], shapes_a: Mapping[str, tuple],
                shapes_b: Mapping[str, tuple], grouping: str) -> list[Group]:
  """Groups of cells that can share a compiled program, in first-seen order."""
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


def unit_bytes_per_stitch(objective: objectives_lib.Objective, model_b, vars_b,
                          group: Group, batch: int) -> int:
  """Memory of one stitch in a train step: params + Adam + activations of g's tail.

  Activation sizes come from `jax.eval_shape` of the stitch and g's tail; backward
  passes keep roughly the forward residuals plus their cotangents (factor 3).
  """
  end = objective.train_end(tuple(model_b.point_names), group.end)
  spec = group.spec

  def fwd(v, p, x):
    z = maps.apply(spec, p, x)
    return engine.tail(model_b, v, z, group.end, end)

  outs = jax.eval_shape(fwd, vars_b, maps.param_shapes(spec),
                        jax.ShapeDtypeStruct((batch,) + group.src_shape, jnp.float32))
  acts = sum(math.prod(o.shape) for o in jax.tree_util.tree_leaves(outs))
  acts += batch * math.prod(group.src_shape)
  return int(4 * (3 * acts + 4 * spec.num_params))


def plan_units(objective: objectives_lib.Objective, cells, shapes_a, shapes_b, model_b,
               vars_b, cfg, n_dev: int, batch: int, fingerprint: str) -> list[Unit]:
  """Groups split to fit the memory budget and padded to the device count."""
  units = []
  budget = float(cfg["memory_budget_mb"]) * 2**20
  for group, members in group_cells(cells, shapes_a, shapes_b, cfg["grouping"]):
    per = unit_bytes_per_stitch(objective, model_b, vars_b, group, batch)
    cap = max(1, int(budget // per)) * n_dev
    if cfg["max_group_size"]:
      cap = min(cap, int(cfg["max_group_size"]))
    cap = max(cap, 1)
    n_chunks = -(-len(members) // cap)
    if n_chunks > 1:
      logging.info("Stitch group %s (%d stitches, ~%.1f MiB each) split into %d units "
                   "to fit %s MiB per device.", group.key, len(members), per / 2**20,
                   n_chunks, cfg["memory_budget_mb"])
    per_chunk = -(-len(members) // n_chunks)
    size = -(-per_chunk // n_dev) * n_dev
    for k in range(n_chunks):
      chunk = tuple(members[k * per_chunk:(k + 1) * per_chunk])
      fronts = tuple(dict.fromkeys(r for r, _ in chunk))
      g = dataclasses.replace(group, fronts=fronts)
      uid = _safe(f"{g.key}-{_digest([chunk, fingerprint], 10)}")
      units.append(Unit(objective.name, g, chunk, size, uid))
  return units


def pack_waves(units: Sequence[Unit], max_stitches: int) -> list[list[Unit]]:
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
        meta = dict(self.meta, objective=obj, reasons=self.reasons.get(obj, {}),
                    end_accuracy=self.end_accuracy)
        name = f"stitch_{obj}/{measure}"
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


class _Sweep:
  """State of one sweep run (donors, data, mesh, programs); see `run_sweep`."""

  def __init__(self, model_a, vars_a, model_b, vars_b, train, test, cfg, workdir,
               train_b, test_b, name_a, name_b, mesh, log):
    self.cfg = cfg
    self.model_a, self.model_b = model_a, model_b
    self.train, self.test = train, test
    self.train_b, self.test_b = train_b or train, test_b or test
    self.workdir = workdir
    self.name_a, self.name_b = name_a, name_b
    self.log = log
    self.mesh = mesh or engine.mesh_for(cfg["num_devices"] or None)
    self.n_dev = self.mesh.size
    self.sync = engine.needs_sync(self.mesh)
    self.rep = NamedSharding(self.mesh, P())
    self.split_sh = NamedSharding(self.mesh, P(engine.AXIS))
    self.vars_a = engine.put_tree(jax.tree_util.tree_map(np.asarray, vars_a), self.rep)
    self.vars_b = engine.put_tree(jax.tree_util.tree_map(np.asarray, vars_b), self.rep)
    self.objectives = make_objectives(cfg)
    self.tx = engine.adam(cfg["adam"])
    self.points_a = tuple(model_a.point_names)
    self.points_b = tuple(model_b.point_names)
    in_a = (1,) + tuple(train.images.shape[1:])
    in_b = (1,) + tuple(self.train_b.images.shape[1:])
    self.shapes_a = {p: tuple(s.shape[1:]) for p, s in
                     models.point_shapes(model_a, in_a).items()}
    self.shapes_b = {p: tuple(s.shape[1:]) for p, s in
                     models.point_shapes(model_b, in_b).items()}
    self.num_classes = int(self.shapes_b[models.LOGITS][-1])
    n_train = len(train.labels)
    self.batch = min(int(cfg["batch_size"]), n_train)
    self.steps_per_epoch = max(1, n_train // self.batch)
    self.steps = int(cfg["steps"]) or max(1, round(float(cfg["epochs"]) *
                                                   self.steps_per_epoch))
    self.eval_batch = -(-min(int(cfg["eval_batch_size"]), len(test.labels))
                        // self.n_dev) * self.n_dev
    self.cell_lr = parse_cell_lr(cfg["cell_lr"])
    self._programs: dict[tuple[str, str], engine.Programs] = {}
    self._captures = None
    self.end_accuracy: float | None = None
    for other, mine in ((self.train_b, train), (self.test_b, test)):
      if len(other.labels) != len(mine.labels) or not np.array_equal(other.labels,
                                                                     mine.labels):
        raise ValueError("The end model's splits must hold the same examples, in the "
                         "same order, as the front model's.")

  # -- settings and files

  def fingerprint(self, objective: str) -> str:
    common = {k: v for k, v in self.cfg.items() if k not in _RUN_ONLY}
    obj = self.objectives[objective]
    settings = dict(common, objective=objective, objective_settings=dataclasses.asdict(obj),
                    dm=self.cfg["dm"] if objective == "dm" else None,
                    model_a=[self.name_a, type(self.model_a).__name__, self.points_a],
                    model_b=[self.name_b, type(self.model_b).__name__, self.points_b],
                    train=[self.train.name, len(self.train.labels)],
                    test=[self.test.name, len(self.test.labels)],
                    version=FORMAT_VERSION)
    return _digest(settings, 24)

  def unit_path(self, unit: Unit, suffix: str = ".json"):
    from etils import epath
    return epath.Path(self.workdir) / "stitch" / unit.objective / f"{unit.uid}{suffix}"

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

  def write_unit(self, unit: Unit, cells: list[dict[str, Any]],
                 params: Mapping[str, np.ndarray] | None, seconds: float) -> None:
    if self.workdir is None or not fio.is_writer():
      return
    if params is not None:
      fio.write_npz(self.unit_path(unit, ".npz"), **params)
    fio.write_json(self.unit_path(unit), {
        "version": FORMAT_VERSION, "objective": unit.objective, "uid": unit.uid,
        "fingerprint": self.fingerprint(unit.objective), "end": unit.group.end,
        "front_shape": list(unit.group.src_shape), "end_accuracy": self.end_accuracy,
        "seconds": seconds, "cells": cells})

  # -- device programs

  def programs(self, objective: str, group: Group) -> engine.Programs:
    key = (objective, group.key, group.fronts)
    if key not in self._programs:
      self._programs[key] = engine.build(self.objectives[objective], self.model_b,
                                         group, self.mesh, self.tx)
    return self._programs[key]

  def captures(self):
    """Jitted donor passes: batch-sharded compute, every point replicated out."""
    if self._captures is None:
      model_a, model_b, rep = self.model_a, self.model_b, self.rep

      def cap_a(v, x):
        return models.capture(model_a, v, x)[1]

      def cap_b(v, x):
        return models.capture(model_b, v, x)

      self._captures = (jax.jit(cap_a, out_shardings=rep),
                        jax.jit(cap_b, out_shardings=rep))
    return self._captures

  def batch_arrays(self, batch: Mapping[str, np.ndarray], batch_b: Mapping[str, np.ndarray]
                   ) -> dict[str, jax.Array]:
    n = batch["label"].shape[0]
    sh = self.split_sh if n % self.n_dev == 0 else self.rep
    out = {"xa": engine.put(batch["image"], sh), "xb": engine.put(batch_b["image"], sh),
           "label": engine.put(batch["label"], self.rep)}
    if "mask" in batch:
      out["mask"] = engine.put(batch["mask"], self.rep)
    return out

  def donor_pass(self, arrays):
    cap_a, cap_b = self.captures()
    acts_a = cap_a(self.vars_a, arrays["xa"])
    if self.sync:
      jax.block_until_ready(acts_a)
    logits_b, acts_b = cap_b(self.vars_b, arrays["xb"])
    if self.sync:
      jax.block_until_ready(acts_b)
    return acts_a, logits_b, acts_b

  def train_stream(self, num_steps: int) -> Iterable[tuple[dict, dict]]:
    from fula_jax import data
    seed = int(self.cfg["seed"])
    a = data.train_batches(self.train, self.batch, seed=seed, num_steps=num_steps)
    b = data.train_batches(self.train_b, self.batch, seed=seed, num_steps=num_steps)
    return zip(a, b)

  def eval_stream(self) -> Iterable[tuple[dict, dict]]:
    from fula_jax import data
    return zip(data.eval_batches(self.test, self.eval_batch),
               data.eval_batches(self.test_b, self.eval_batch))

  # -- one wave

  def _lstsq_batches(self, wave: Sequence[Unit]) -> tuple[bool, int, int]:
    """(init needs least squares, batches for the init, batches for DM)."""
    cfg = self.cfg
    needs_init = cfg["init"] == "lstsq" and any(
        not self.objectives[u.objective].closed_form for u in wave)
    has_dm = any(self.objectives[u.objective].closed_form for u in wave)
    init_batches = -(-int(cfg["lstsq_examples"]) // self.batch) if needs_init else 0
    dm_examples = int(cfg["dm"]["num_examples"])
    dm_batches = ((-(-dm_examples // self.batch) if dm_examples else self.steps_per_epoch)
                  if has_dm else 0)
    return needs_init, init_batches, dm_batches

  def stats_batches(self, wave: Sequence[Unit]) -> int:
    _, init_batches, dm_batches = self._lstsq_batches(wave)
    return max(init_batches, dm_batches)

  def run_wave(self, wave: list[Unit], progress) -> dict[str, list[dict[str, Any]]]:
    cfg = self.cfg
    t0 = time.perf_counter()
    sharded = self.split_sh
    needs_init_lstsq, init_batches, _ = self._lstsq_batches(wave)
    stats_batches = self.stats_batches(wave)

    # Least-squares statistics, shared by every objective's unit of the same cells.
    stats_units: dict[tuple, Unit] = {}
    for u in wave:
      if self.objectives[u.objective].closed_form or needs_init_lstsq:
        stats_units.setdefault((u.group.key, u.cells), u)
    init_solutions: dict[tuple, list] = {}
    full_solutions: dict[tuple, list] = {}
    if stats_units and stats_batches:
      stats = {}
      fronts_idx = {}
      for key, u in stats_units.items():
        spec = u.group.spec
        stats[key] = engine.put_tree(
            engine.stats_zeros(u.size, spec.in_features, spec.out_features), sharded)
        fronts_idx[key] = engine.put(self._front_index(u), sharded)
      for b, (batch, batch_b) in enumerate(self.train_stream(stats_batches)):
        arrays = self.batch_arrays(batch, batch_b)
        acts_a, _, acts_b = self.donor_pass(arrays)
        for key, u in stats_units.items():
          prog = self.programs(u.objective, u.group)
          stats[key] = prog.stats(stats[key], fronts_idx[key],
                                  tuple(acts_a[p] for p in u.group.fronts),
                                  acts_b[u.group.end])
        if b + 1 == init_batches:
          for key, u in stats_units.items():
            init_solutions[key] = self._solve(u, engine.fetch(stats[key], self.mesh))
        progress.advance()
      for key, u in stats_units.items():
        full_solutions[key] = self._solve(u, engine.fetch(stats[key], self.mesh))

    # Initial states.
    states, weights_from = {}, {}
    closed_failed: dict[str, dict[int, str]] = {}
    for u in wave:
      obj = self.objectives[u.objective]
      key = (u.group.key, u.cells)
      if obj.closed_form:
        params, bad = full_solutions[key]
        closed_failed[u.uid] = bad
      elif cfg["init"] == "lstsq":
        params, bad = init_solutions[key]
        closed_failed[u.uid] = bad
      else:
        params = self._random_init(u)
        closed_failed[u.uid] = {}
      lr = np.array([self.cell_lr.get(cell_key(*c), float(cfg["learning_rate"]))
                     for c in self._padded(u.cells, u.size)], np.float32)
      state = engine.init_state(params, self._front_index(u), lr, self.tx)
      states[u.uid] = engine.put_tree(state, sharded)
      weights_from[u.uid] = self._unit_steps(u)

    # Training: one donor pass per batch, shared by every unit of the wave.
    max_steps = max(weights_from.values())
    if max_steps:
      for step, (batch, batch_b) in enumerate(self.train_stream(max_steps)):
        arrays = self.batch_arrays(batch, batch_b)
        acts_a, logits_b, acts_b = self.donor_pass(arrays)
        for u in wave:
          n_steps = weights_from[u.uid]
          if step >= n_steps:
            continue
          prog = self.programs(u.objective, u.group)
          shared = {"label": arrays["label"], "teacher": logits_b,
                    "targets": {p: acts_b[p] for p in prog.train_targets}}
          last_epoch = step >= n_steps - self.steps_per_epoch
          states[u.uid] = prog.train(
              states[u.uid], self.vars_b, tuple(acts_a[p] for p in u.group.fronts),
              shared, np.float32(last_epoch), np.int32(step))
        progress.advance()

    # Evaluation on the test split: again one donor pass per batch.
    accs = {}
    for u in wave:
      prog = self.programs(u.objective, u.group)
      shapes = engine.eval_terms_shape(
          self.objectives[u.objective], self.model_b, self.vars_b, u.group,
          self.eval_batch, self.num_classes,
          {p: self.shapes_b[p] for p in prog.eval_targets})
      accs[u.uid] = engine.put_tree(engine.zeros_like_terms(shapes, u.size), sharded)
    end_correct = 0.0
    for batch, batch_b in self.eval_stream():
      arrays = self.batch_arrays(batch, batch_b)
      acts_a, logits_b, acts_b = self.donor_pass(arrays)
      end_correct += float(np.sum(batch["mask"] * (
          np.argmax(np.asarray(logits_b), -1) == batch["label"])))
      for u in wave:
        prog = self.programs(u.objective, u.group)
        st = states[u.uid]
        shared = {"label": arrays["label"], "teacher": logits_b,
                  "targets": {p: acts_b[p] for p in prog.eval_targets}}
        accs[u.uid] = prog.evaluate(accs[u.uid], st.params, st.front, self.vars_b,
                                    tuple(acts_a[p] for p in u.group.fronts), shared,
                                    arrays["mask"])
      progress.advance()
    n_test = float(len(self.test.labels))
    self.end_accuracy = end_correct / n_test

    out = {}
    seconds = (time.perf_counter() - t0) / max(len(wave), 1)
    for u in wave:
      st = engine.fetch(states[u.uid], self.mesh)
      terms = engine.fetch(accs[u.uid], self.mesh)
      cells = self._cell_records(u, st, terms, n_test, closed_failed[u.uid])
      params = None
      if cfg["save_params"] or self._keep_params:
        params = {k: v[:len(u.cells)] for k, v in st.params.items()}
        for (row, col), s in zip(u.cells, range(len(u.cells))):
          self.kept_params[(u.objective, row, col)] = {k: v[s] for k, v in params.items()}
      self.write_unit(u, cells, params if cfg["save_params"] else None, seconds)
      out[u.uid] = cells
    return out

  _keep_params = False
  kept_params: dict

  def _padded(self, cells, size):
    return list(cells) + [cells[0]] * (size - len(cells))

  def _front_index(self, u: Unit) -> np.ndarray:
    return np.array([u.group.fronts.index(r) for r, _ in self._padded(u.cells, u.size)],
                    np.int32)

  def _unit_steps(self, u: Unit) -> int:
    if self.objectives[u.objective].closed_form:
      return int(round(float(self.cfg["dm"]["refine_epochs"]) * self.steps_per_epoch))
    return self.steps

  def _random_init(self, u: Unit) -> dict[str, np.ndarray]:
    spec = u.group.spec
    ps = [maps.as_numpy(maps.init_random(spec, cell_rng(int(self.cfg["seed"]), r, c)))
          for r, c in self._padded(u.cells, u.size)]
    return {k: np.stack([p[k] for p in ps]) for k in ps[0]}

  def _solve(self, u: Unit, stats: lstsq.Stats):
    """Per-stitch closed-form solutions (host, float64) and failures {index: why}."""
    ridge = float(self.cfg["ridge"])
    sols, bad = [], {}
    for s in range(u.size):
      one = lstsq.Stats(*(np.asarray(x)[s] for x in stats))
      try:
        sol = lstsq.solve(one, ridge)
        if not all(np.all(np.isfinite(v)) for v in sol.values()):
          raise ValueError("non-finite least-squares solution")
      except (ValueError, np.linalg.LinAlgError) as e:
        bad[s] = f"least squares failed: {e}"
        spec = u.group.spec
        sol = {"kernel": np.zeros((spec.in_features, spec.out_features), np.float32),
               "bias": np.zeros((spec.out_features,), np.float32)}
      sols.append(sol)
    return {k: np.stack([p[k] for p in sols]) for k in sols[0]}, bad

  def _cell_records(self, u: Unit, st: engine.StitchState, terms, n_test: float,
                    failed: Mapping[int, str]) -> list[dict[str, Any]]:
    obj = self.objectives[u.objective]
    where = objectives_lib.Where(u.group.end, self.points_b)
    value = obj.eval_value({k: v for k, v in terms.items()}, n_test, where)
    acc = terms["correct"] / n_test
    dm_err = terms["dm_num"] / np.maximum(terms["dm_den"], 1e-30)
    train_loss = np.where(st.loss_weight > 0, st.loss_sum / np.maximum(st.loss_weight, 1),
                          np.nan)
    records = []
    pgd = self._pgd(u, st) if self.cfg["pgd"]["enabled"] else None
    for s, (row, col) in enumerate(u.cells):
      metrics = {
          "accuracy": float(acc[s]),
          "relative_accuracy": float(acc[s] / self.end_accuracy) if self.end_accuracy
          else float("nan"),
          "loss": float(value[s]),
          "train_loss": float(train_loss[s]),
          "dm_error": float(dm_err[s]),
          "pgd_accuracy": float(pgd[s]) if pgd is not None else float("nan"),
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

  def _pgd(self, u: Unit, st: engine.StitchState) -> np.ndarray:
    """Accuracy of each stitched model under PGD on the first test examples."""
    from fula_jax import attacks
    pcfg = self.cfg["pgd"]
    n = min(int(pcfg["num_examples"]), len(self.test.labels))
    x_all, y_all = self.test.images[:n], self.test.labels[:n]
    model_a, model_b = self.model_a, self.model_b
    vars_a = jax.tree_util.tree_map(np.asarray, engine.fetch(self.vars_a, self.mesh))
    vars_b = jax.tree_util.tree_map(np.asarray, engine.fetch(self.vars_b, self.mesh))
    out = np.full((len(u.cells),), np.nan)
    for s, (row, col) in enumerate(u.cells):
      spec = maps.plan(row, self.shapes_a[row], col, self.shapes_b[col])

      def stitched(p, x, row=row, col=col, spec=spec):
        z = maps.apply(spec, p, models.forward(model_a, vars_a, x, end=row))
        return models.forward(model_b, vars_b, z, start=col)

      @jax.jit
      def correct(p, x, y, key, stitched=stitched):
        x_adv = attacks.pgd(lambda xx: stitched(p, xx), x, y, key,
                            eps=float(pcfg["eps"]), step_size=float(pcfg["step_size"]),
                            steps=int(pcfg["steps"]), norm=str(pcfg["norm"]),
                            random_start=bool(pcfg["random_start"]))
        return jnp.sum(jnp.argmax(stitched(p, x_adv), -1) == y)

      p = {k: v[s] for k, v in st.params.items()}
      total = 0.0
      key = cell_rng(int(self.cfg["seed"]) + 1, row, col)
      for lo in range(0, n, self.eval_batch):
        key, sub = jax.random.split(key)
        total += float(correct(p, x_all[lo:lo + self.eval_batch],
                               y_all[lo:lo + self.eval_batch], sub))
      out[s] = total / n
    return out


class _Progress:
  def __init__(self, total: int, cfg, enabled: bool):
    from fula_jax.progress import Progress
    self.p = Progress("stitch sweep", total, unit="batch",
                      every_s=float(cfg["progress_every_s"]), enabled=enabled)
    self.count = 0

  def advance(self):
    self.count += 1
    self.p.update(self.count)


def run_sweep(model_a: models.StagedModel, vars_a: Any, model_b: models.StagedModel,
              vars_b: Any, train, test, cfg: Mapping[str, Any] | None = None,
              workdir: str | None = None, *, train_b=None, test_b=None,
              name_a: str = "A", name_b: str = "B", mesh: Mesh | None = None,
              keep_params: bool = False) -> SweepResult:
  """Run (or resume) a stitching sweep; see the module docstring.

  Args:
    model_a, vars_a: the front model f and its frozen variables.
    model_b, vars_b: the end model g and its frozen variables.
    train, test: `fula_jax.data.Split`s (images in [0, 1]); stitches train on `train`
      and are evaluated on `test`.
    cfg: sweep settings overriding `default_config()`.
    workdir: where unit files go (``<workdir>/stitch/...``) and are resumed from; None
      keeps everything in memory (e.g. in a Colab).
    train_b, test_b: the same examples as the end model sees them, when its inputs
      differ (e.g. a grayscale model); default: the same splits.
    name_a, name_b: model identities for fingerprints and results.
    mesh: a 1-D mesh whose axis is ``engine.AXIS``; default: every device.
    keep_params: return every stitch's trained parameters in `SweepResult.params`.
  """
  cfg = resolve(cfg)
  t0 = time.perf_counter()
  sw = _Sweep(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir, train_b,
              test_b, name_a, name_b, mesh, print)
  sw._keep_params = keep_params
  sw.kept_params = {}
  rows = list(cfg["rows"] or sw.points_a)
  cols = list(cfg["cols"] or sw.points_b)
  for p in rows:
    if p not in sw.points_a:
      raise registry.unknown(f"stitch point of the front model ({name_a})", p, sw.points_a)
  for p in cols:
    if p not in sw.points_b:
      raise registry.unknown(f"stitch point of the end model ({name_b})", p, sw.points_b)
  pairs, explicit = parse_pairs(cfg["pairs"], rows, cols)
  for r, c in pairs:
    if r not in sw.points_a:
      raise registry.unknown(f"stitch point of the front model ({name_a})", r, sw.points_a)
    if c not in sw.points_b:
      raise registry.unknown(f"stitch point of the end model ({name_b})", c, sw.points_b)

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
  units = []
  for name, obj in sw.objectives.items():
    todo = [(r, c) for r, c in stitchable if (name, r, c) not in finished]
    units += plan_units(obj, todo, sw.shapes_a, sw.shapes_b, model_b, sw.vars_b, cfg,
                        sw.n_dev, sw.batch, sw.fingerprint(name))
  col_pos = {c: k for k, c in enumerate(sw.points_b)}
  obj_pos = {o: k for k, o in enumerate(sw.objectives)}
  units.sort(key=lambda u: (col_pos[u.group.end], u.group.src_shape, u.cells[0][0],
                            obj_pos[u.objective]))
  waves = pack_waves(units, int(cfg["max_stitches_per_wave"]))

  n_eval = -(-len(test.labels) // sw.eval_batch)
  total = sum(sw.stats_batches(w) + max(sw._unit_steps(u) for u in w) + n_eval
              for w in waves)
  show = bool(cfg["progress"]) and jax.process_index() == 0
  progress = _Progress(total, cfg, show)
  if show:
    print(f"stitch sweep: {len(pairs)} cells x {len(sw.objectives)} objectives, "
          f"{len(finished)} cell results found in the workdir; {len(units)} units in "
          f"{len(waves)} waves on {sw.n_dev} devices ({jax.process_count()} processes).",
          flush=True)

  records = dict(finished)
  for wave in waves:
    for u, cells in zip(wave, sw.run_wave(wave, progress).values()):
      for c in cells:
        records[(u.objective, c["row"], c["col"])] = c
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fula_jax.stitching.sweep done")

  values: dict[str, dict[str, np.ndarray]] = {}
  reasons: dict[str, dict[str, str]] = {}
  requested = set(pairs)
  for name in sw.objectives:
    mats = {m: np.full((len(rows), len(cols)), np.nan) for m in MEASURES}
    why: dict[str, str] = {}
    for a, r in enumerate(rows):
      for b, c in enumerate(cols):
        if (r, c) not in requested:
          continue
        if (r, c) in unstitchable:
          why[cell_key(r, c)] = unstitchable[(r, c)]
          continue
        rec = records[(name, r, c)]
        for m in MEASURES:
          mats[m][a, b] = _from_json_value(rec["metrics"].get(m))
        if rec["status"] != "ok":
          why[cell_key(r, c)] = f"{rec['status']}: {rec['reason']}"
    if not sw.cfg["pgd"]["enabled"]:
      del mats["pgd_accuracy"]
    values[name], reasons[name] = mats, why
  n_units_done = len(units)
  stats = {"units_computed": n_units_done, "waves": len(waves),
           "cells_computed": sum(len(u.cells) for u in units),
           "cells_resumed": len(finished), "devices": sw.n_dev,
           "processes": jax.process_count(), "seconds": time.perf_counter() - t0}
  meta = {"settings": cfg, "n_train": len(train.labels), "n_test": len(test.labels),
          "train": train.name, "test": test.name, "batch_size": sw.batch,
          "steps": sw.steps, "estimator": "stitching"}
  return SweepResult(rows, cols, values, reasons,
                     float("nan") if sw.end_accuracy is None else sw.end_accuracy,
                     stats, meta, sw.kept_params)


def sweep(model_a: models.StagedModel, vars_a: Any, model_b: models.StagedModel,
          vars_b: Any, train, test, cfg: Mapping[str, Any] | None = None,
          workdir: str | None = None, **kwargs: Any) -> dict[str, Any]:
  """`run_sweep`, returned as ``{'stitch_<objective>/<measure>': results.Matrix}``.

  Callable from a Colab with models and splits in memory and ``workdir=None``.
  """
  res = run_sweep(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir, **kwargs)
  return res.matrices(kwargs.get("name_a", "A"), kwargs.get("name_b", "B"))
