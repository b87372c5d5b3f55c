"""The public sweep API: ``run_sweep`` and ``sweep`` over any two protocol models.

A whole L_A x L_B stitching matrix for several objectives, resumably: the requested
cells are planned into units and waves (:mod:`.plan`), what a previous run finished is
loaded (:mod:`.store`), each wave runs (:mod:`.wave`, reading the sweep's frozen
:mod:`.context`; the OOD reference and PGD are :mod:`.passes`), and
every cell of every objective and measure (:mod:`.measures`) comes back as arrays or as
`results.Matrix`.

Colab use, with models and data in memory::

  from fula_jax import stitching
  mats = stitching.sweep(model_a, vars_a, model_b, vars_b, train, test,
                         {"objectives": ["fula", "dm"], "epochs": 1})
  mats["stitch_fula/accuracy"].plot()
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from fula_jax import errors, registry, sharding
from fula_jax.errors import ConfigError
from fula_jax.progress import Progress, timed
from fula_jax.stitching import context as context_lib, invariance, maps, passes
from fula_jax.stitching import plan as plan_lib, settings
from fula_jax.stitching import store as store_lib
from fula_jax.stitching.result import NOT_REQUESTED, ConvergenceWarning, SweepResult
from fula_jax.stitching.wave import Wave

def run_sweep(model_a: Any, vars_a: Any, model_b: Any, vars_b: Any, train, test,
              cfg: Mapping[str, Any] | None = None, workdir: str | None = None, *,
              train_b=None, test_b=None, name_a: str = "A", name_b: str = "B",
              mesh: Mesh | None = None, keep_params: bool = False,
              profile: dict | None = None,
              eval_sets: Mapping[str, Any] | None = None) -> SweepResult:
  """Run (or resume) a stitching sweep; see the module docstring.

  Args:
    model_a, vars_a: the front model f (any model following the model protocol) and its
      frozen variables.
    model_b, vars_b: the end model g and its frozen variables.
    train, test: batch sources (e.g. `fula_jax.data.Split`s) or ``(images, labels)``
      arrays, images in [0, 1]; stitches train on `train` and are evaluated on `test`.
    cfg: settings overriding `settings.default_config()` (a dict or ConfigDict).
    workdir: where unit files (``<workdir>/stitch/...``) and the compilation cache go and
      are resumed from; None keeps everything in memory (e.g. in a Colab).
    train_b, test_b: the same examples as the end model sees them, when its inputs
      differ (e.g. a grayscale model); default: the same sources.
    name_a, name_b: model identities, part of the fingerprints and of the results.
    mesh: a 1-D mesh of the devices to use; default: every device of every process.
    keep_params: return the trained stitch parameters in `SweepResult.params`.
    profile: a dict to fill with every program's FLOPs and call count, keyed by
      (function name, ctx, argument shapes) (`program_flops`).
    eval_sets: more test sets every stitch is evaluated on, ``{name: source}`` or
      ``{name: (source, source_b)}``; their accuracies are the measures
      ``accuracy@<name>`` and the end model's are in ``meta['end_accuracy_sets']``.

  Returns:
    A `SweepResult`; `stats` counts units, waves, stitches computed and resumed (the
    end model's self-stitches, trained in the same units for `meta['baseline_accuracy']`,
    apart: ``baseline_stitches_computed``), and the programs compiled
    (``programs_compiled``, ``compile_seconds``; programs read back from the persistent
    cache are ``programs_from_cache``).
  """
  t0 = time.perf_counter()
  from fula_jax.data import as_source
  train, test = as_source(train, "train"), as_source(test, "test")
  full = settings.resolve(cfg)
  inv = invariance.options(full["invariance"])
  if inv["examples"] > 0:
    if train_b is not None or test_b is not None or eval_sets:
      raise ConfigError("Invariance-aware stitching makes its own fitting and test sets "
                        "(inverted through the front model); it takes no train_b, test_b "
                        "or eval_sets.")
    sub = dict(full, invariance=dict(inv, examples=0, test_examples=0))
    parts = [(row, run_sweep(model_a, vars_a, model_b, vars_b, row.train, row.test,
                             row.cfg, row.workdir, name_a=name_a, name_b=name_b,
                             mesh=mesh, keep_params=keep_params, profile=profile))
             for row in invariance.row_sweeps(model_a, vars_a, model_b, train, test, sub,
                                              workdir, inv)]
    return invariance.merge(parts, model_a, model_b, sub, inv)
  train_b = None if train_b is None else as_source(train_b, "train_b")
  test_b = None if test_b is None else as_source(test_b, "test_b")
  sw = context_lib.build(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir,
                         train_b=train_b, test_b=test_b, name_a=name_a, name_b=name_b,
                         mesh=mesh, keep_params=keep_params, profile=profile,
                         eval_sets=eval_sets)
  same = model_a is model_b and vars_a is vars_b and train_b is None and test_b is None
  grid = _grid(sw, name_a, name_b)
  selves = _baseline_cells(sw, grid) if sw.execution.baselines and not same else []
  store = store_lib.Store(sw.workdir, sw.science,
                          dict(sw.identity, **passes.fingerprint(sw)))
  finished, end = store.load()
  units = _plan(sw, grid.stitchable + selves, finished, store.fingerprints)
  done = _run_units(sw, units, store, grid, finished, end)
  n_grid, n_self = _stitch_counts(units)
  stats = {"units_computed": len(units), "waves": done.waves, **done.compile_stats(),
           "stitches_computed": n_grid, "baseline_stitches_computed": n_self,
           "stitches_resumed": grid.count(finished), "devices": sw.n_dev,
           "processes": jax.process_count(), "seconds": time.perf_counter() - t0,
           "phase_seconds": done.seconds}
  baseline = _baselines(sw, selves, done.records)
  num_classes = getattr(train, "num_classes", None)
  meta = {"settings": settings.resolve(_named(cfg)), "n_train": len(train),
          "chance": 1.0 / num_classes if num_classes else None,
          "self_stitch": same, "baseline_accuracy": baseline,
          "n_test": len(test), "train": train.name, "test": test.name,
          "batch_size": sw.batch, "steps": sw.steps, "estimator": "stitching",
          "end_accuracy_sets": {k: v for k, v in done.end_accuracy.items() if k},
          "eval_sets": {n: v.a.name for n, v in sw.test_views.items() if n},
          "objective_maps": {a.name: (a.objective.name, a.fmap.key)
                             for a in sw.science.arms}}
  values, reasons = _matrices(sw, grid, done.records)
  return SweepResult(grid.rows, grid.cols, values, reasons,
                     done.end_accuracy.get("", float("nan")), stats, meta, done.params)


@dataclasses.dataclass(frozen=True)
class _Grid:
  """The cells a sweep was asked for: its rows and cols, the requested (row, col)
  pairs, those that can be stitched, and why each of the others cannot."""
  rows: list[str]
  cols: list[str]
  pairs: list[tuple[str, str]]
  stitchable: list[tuple[str, str]]
  unstitchable: dict[tuple[str, str], str]

  def count(self, records: Mapping[tuple[str, str, str], Any]) -> int:
    """How many of `records` ((arm, row, col) keys) are of this grid's cells."""
    wanted = set(self.stitchable)
    return sum(1 for (_, r, c) in records if (r, c) in wanted)


def _grid(sw: context_lib.SweepContext, name_a: str, name_b: str) -> _Grid:
  """The requested cells, every point name checked; a cell whose shapes cannot be
  stitched is an error when the caller named it, else a NaN cell with its reason."""
  sci = sw.science
  rows = list(sw.cells.rows or sw.a.points)
  cols = list(sw.cells.cols or sw.b.points)
  pairs, explicit = plan_lib.parse_pairs(sw.cells.pairs, rows, cols)
  for r, c in [(r, cols[0]) for r in rows] + [(rows[0], c) for c in cols] + pairs:
    if r not in sw.a.points:
      raise registry.unknown(f"stitch point of the front model ({name_a})", r, sw.a.points)
    if c not in sw.b.points:
      raise registry.unknown(f"stitch point of the end model ({name_b})", c, sw.b.points)
  unstitchable: dict[tuple[str, str], str] = {}
  stitchable = []
  for r, c in pairs:
    try:
      maps.plan(r, sw.a.shapes[r], c, sw.b.shapes[c], src_prefix=sw.a.prefix.get(r, 0),
                dst_prefix=sw.b.prefix.get(c, 0), c2t=sci.c2t, t2c=sci.t2c)
      stitchable.append((r, c))
    except maps.UnstitchableError as e:
      if explicit:
        raise
      unstitchable[(r, c)] = str(e)
  return _Grid(rows, cols, pairs, stitchable, unstitchable)


def _baseline_cells(sw: context_lib.SweepContext, grid: _Grid) -> list[tuple[str, str]]:
  """The end model's self-stitch into each column (`plan.self_front`): the ceiling the
  column is read against, trained beside the column's other stitches, in their units
  and programs, with the same objectives and protocol."""
  out = []
  for c in grid.cols:
    shape, prefix = sw.b.shapes[c], sw.b.prefix.get(c, 0)
    try:
      maps.plan(c, shape, c, shape, src_prefix=prefix, dst_prefix=prefix,
                c2t=sw.science.c2t, t2c=sw.science.t2c)
    except maps.UnstitchableError:
      continue
    out.append((plan_lib.self_front(c), c))
  return out


def _baselines(sw: context_lib.SweepContext, cells: Sequence[tuple[str, str]],
               records: Mapping[tuple[str, str, str], Mapping[str, Any]]
               ) -> dict[str, dict[str, float]]:
  """objective -> {point: accuracy of g stitched into itself at that point}."""
  return {arm.name: {c: store_lib.from_json_value(
      records[(arm.name, front, c)]["metrics"].get("accuracy")) for front, c in cells}
          for arm in sw.science.arms} if cells else {}


def _plan(sw: context_lib.SweepContext, cells: Sequence[tuple[str, str]],
          finished: Mapping, fingerprints: Any) -> list[plan_lib.Unit]:
  """The units of every (arm, cell) not finished yet."""
  sci, ex = sw.science, sw.execution
  fronts = {r for r, _ in cells}
  return plan_lib.plan(
      cells, sci.arms, finished=finished,
      shapes_a={f: sw.front_shape(f) for f in fronts},
      shapes_b={p: sw.b.shapes[p] for p in sw.b.points},
      trains={a.name: sw.stitch_steps(a.name) > 0 for a in sci.arms},
      grouping=ex.grouping, num_devices=sw.n_dev, batch_sizes=(sw.batch, sw.eval_batch),
      bytes_per_stitch=functools.cache(sw.bytes_per_stitch),
      budget_bytes=ex.memory_budget_mb * 2**20, max_group_size=ex.max_group_size,
      fingerprints=fingerprints, prefix_a={f: sw.front_prefix(f) for f in fronts},
      prefix_b=sw.b.prefix, batch_split=not sw.bn_train)


@dataclasses.dataclass
class _Done:
  """Every (arm, row, col) record of a sweep (resumed and computed), the parameters
  kept, the end model's accuracy per evaluation set, and what the run compiled and
  how long each phase took."""
  records: dict[tuple[str, str, str], dict[str, Any]]
  end_accuracy: dict[str, float]
  params: dict = dataclasses.field(default_factory=dict)
  count: _Counts = dataclasses.field(default_factory=lambda: _Counts())
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)
  waves: int = 0

  def compile_stats(self) -> dict[str, Any]:
    c = self.count
    return {"programs_compiled": c.compiled, "programs_compiled_late": c.compiled_late,
            "programs_from_cache": c.from_cache, "compile_seconds": c.seconds,
            "compile_seconds_blocking": self.seconds.get("compile", 0.0) + c.late_seconds}


def _run_units(sw: context_lib.SweepContext, units: Sequence[plan_lib.Unit],
               store: store_lib.Store, grid: _Grid, finished: Mapping,
               end: Mapping | None) -> _Done:
  """Run `units` wave by wave (the next wave's programs compiling while one runs),
  each written to `store` as it finishes; with the `finished` records, everything the
  sweep's matrices are made of. Ctrl-C says what is kept and how to resume."""
  ex = sw.execution
  done = _Done(dict(finished), ({"": end["end_accuracy"], **end["end_accuracy_sets"]}
                                if end else {}))
  reference = None
  if units and sw.needs(passes.OOD):
    with timed(done.seconds, "ood_reference"), sharding.count_compiles() as compiles:
      reference = passes.ood_reference(sw)
    done.count.add_pass(compiles)
  packed = plan_lib.pack_waves(units, ex.max_stitches_per_wave,
                               ramp=ex.parallel_compile)
  waves = [Wave(sw, w, f"wave {k + 1}/{len(packed)}: " if len(packed) > 1 else "",
                store=store, reference=reference) for k, w in enumerate(packed)]
  done.waves = len(waves)
  show = ex.progress and jax.process_index() == 0
  progress = _Advance(Progress("stitch sweep", sum(w.num_batches() for w in waves),
                               unit="batch", every_s=ex.progress_every_s, enabled=show),
                      waves)
  if show:
    n_grid, n_self = _stitch_counts(units)
    selves = (f" and {n_self} self-stitches of the end model (its baselines)"
              if n_self else "")
    print(f"stitch sweep: {len(grid.pairs)} cells x {len(sw.science.arms)} objectives; "
          f"{grid.count(finished)} (objective, cell) results resumed from the "
          f"workdir; {n_grid} stitches{selves} in "
          f"{_n(len(units), 'unit')}, {_n(len(waves), 'wave')}, on "
          f"{_n(sw.n_dev, 'device')} ({_n(jax.process_count(), 'process', 'es')}).",
          flush=True)
  ahead: dict[int, concurrent.futures.Future] = {}
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")

  def compile_next(k: int) -> None:  # wave k's programs, while wave k - 1 runs
    if ex.parallel_compile and k < len(waves):
      ahead[k] = pool.submit(waves[k].compile_ahead)

  try:
    for k, w in enumerate(waves):
      out = w.run(progress, ahead=ahead.pop(k, None),
                  compiled=lambda k=k: compile_next(k + 1))
      done.records.update(out.records)
      done.params.update(out.params)
      done.end_accuracy = out.end_accuracy
      done.count.add(out.warm_up, out.late)
      for phase, t in out.seconds.items():
        done.seconds[phase] = done.seconds.get(phase, 0.0) + t
  except KeyboardInterrupt:
    total = len(grid.stitchable) * len(sw.science.arms)
    kept = (f" and saved in {sw.workdir}; rerun the same command to resume" if
            sw.workdir else "; with a workdir, a rerun would resume them")
    raise errors.Interrupted(
        f"interrupted: {grid.count(done.records)} of {total} "
        f"(objective, cell) results done{kept}") from None
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fula_jax.stitching done")
  return done


def _stitch_counts(units: Sequence[plan_lib.Unit]) -> tuple[int, int]:
  """Stitches of `units`: of the grid's cells, and the end model's self-stitches."""
  fronts = [f for u in units for f in u.fronts]
  n_self = sum(map(plan_lib.is_self, fronts))
  return len(fronts) - n_self, n_self


def _n(count: int, noun: str, plural: str = "s") -> str:
  return f"{count} {noun}{'' if count == 1 else plural}"


def _matrices(sw: context_lib.SweepContext, grid: _Grid,
              records: Mapping[tuple[str, str, str], Mapping[str, Any]]
              ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, str]]]:
  """arm -> measure -> (rows x cols) values, and arm -> cell -> why it is NaN."""
  measures = [m.name for m in sw.measures]
  values: dict[str, dict[str, np.ndarray]] = {}
  reasons: dict[str, dict[str, str]] = {}
  requested = set(grid.pairs)
  for arm in sw.science.arms:
    mats = {m: np.full((len(grid.rows), len(grid.cols)), np.nan) for m in measures}
    why: dict[str, str] = {}
    for a, r in enumerate(grid.rows):
      for b, c in enumerate(grid.cols):
        key = plan_lib.cell_key(r, c)
        if (r, c) not in requested:
          why[key] = NOT_REQUESTED
        elif (r, c) in grid.unstitchable:
          why[key] = grid.unstitchable[(r, c)]
        else:
          rec = records[(arm.name, r, c)]
          for m in measures:
            mats[m][a, b] = store_lib.from_json_value(rec["metrics"].get(m))
          if rec["status"] != "ok":
            why[key] = f"{rec['status']}: {rec['reason']}"
    values[arm.name], reasons[arm.name] = mats, why
  return values, reasons


def _named(cfg: Any) -> Any:
  """`cfg` with objective values replaced by their settings (JSON-able metadata)."""
  if cfg is None:
    return None
  plain = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  if "objectives" in plain and not isinstance(plain["objectives"], str):
    plain["objectives"] = [o if isinstance(o, str) else o.name
                           for o in plain["objectives"]]
  return plain


@dataclasses.dataclass
class _Counts:
  """Programs compiled over a sweep's waves, and the seconds it waited for them."""
  compiled: int = 0
  compiled_late: int = 0
  from_cache: int = 0
  seconds: float = 0.0
  late_seconds: float = 0.0  # compiling in a wave's run or a pass, which waits for it

  def add(self, warm_up: sharding.CompileCount, late: sharding.CompileCount) -> None:
    for c in (warm_up, late):
      self.compiled += c.compiled
      self.from_cache += c.from_cache
      self.seconds += c.seconds
    self.compiled_late += late.compiled
    self.late_seconds += late.seconds

  def add_pass(self, c: sharding.CompileCount) -> None:
    """What a pass outside the waves (the OOD reference) compiled as it ran."""
    self.compiled += c.compiled
    self.from_cache += c.from_cache
    self.seconds += c.seconds
    self.late_seconds += c.seconds


class _Advance:
  """The sweep's progress bar, advanced batch by batch by every wave."""

  def __init__(self, bar: Progress, waves: Sequence[Wave] = ()):
    self.bar, self.count, self.waves, self.waited = bar, 0, list(waves), 0.0

  def advance(self) -> None:
    self.count += 1
    self.bar.update(self.count)

  def compiled(self, wave: Wave, waited: float) -> None:
    """`wave` has compiled after `waited` seconds: the ETA counts the waves after it at
    the compile pace so far."""
    self.waited += waited
    done = self.waves.index(wave) + 1
    self.bar.pending_s = self.waited / done * (len(self.waves) - done)


def sweep(model_a: Any, vars_a: Any, model_b: Any, vars_b: Any, train, test,
          cfg: Mapping[str, Any] | None = None, workdir: str | None = None,
          **kwargs: Any) -> dict[str, Any]:
  """`run_sweep`, returned as ``{'stitch_<objective>/<measure>': results.Matrix}``.

  Callable from a Colab with models and data in memory and ``workdir=None``.
  """
  res = run_sweep(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir, **kwargs)
  line = res.convergence_summary()
  if line:
    warnings.warn(line, ConvergenceWarning, stacklevel=2)
  return res.matrices(kwargs.get("name_a", "A"), kwargs.get("name_b", "B"))


def program_flops(profile: Mapping[Any, Mapping[str, Any]]) -> float:
  """Total FLOPs a profiled sweep executed: XLA's cost analysis of each compiled
  program times its calls."""
  return float(sum(e["flops"] * e["calls"] for e in profile.values()))
