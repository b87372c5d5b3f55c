"""The public sweep API: ``run_sweep`` and ``sweep`` over any two protocol models.

A whole L_A x L_B stitching matrix for several objectives, resumably: the requested
cells are planned into units and waves (:mod:`.plan`), what a previous run finished is
loaded (:mod:`.store`), each wave runs (:mod:`.wave`, set up by :mod:`.runner`), and
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
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from fula_jax import errors, registry, sharding
from fula_jax.errors import ConfigError
from fula_jax.progress import Progress
from fula_jax.stitching import invariance, maps, plan as plan_lib, settings
from fula_jax.stitching import measures as measures_lib
from fula_jax.stitching import store as store_lib
from fula_jax.stitching.result import NOT_REQUESTED, ConvergenceWarning, SweepResult
from fula_jax.stitching.runner import Sweep
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
    profile: a dict to fill with every program's FLOPs and call count
      (`program_flops`).
    eval_sets: more test sets every stitch is evaluated on, ``{name: source}`` or
      ``{name: (source, source_b)}``; their accuracies are the measures
      ``accuracy@<name>`` and the end model's are in ``meta['end_accuracy_sets']``.

  Returns:
    A `SweepResult`; `stats` counts units, waves, stitches computed and resumed, and the
    programs compiled (``programs_compiled``, ``compile_seconds``; programs read back
    from the persistent cache are ``programs_from_cache``).
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
    return invariance.run(run_sweep, model_a, vars_a, model_b, vars_b, train, test, sub,
                          workdir, inv, name_a=name_a, name_b=name_b, mesh=mesh,
                          keep_params=keep_params, profile=profile)
  train_b = None if train_b is None else as_source(train_b, "train_b")
  test_b = None if test_b is None else as_source(test_b, "test_b")
  sw = Sweep(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir,
             train_b=train_b, test_b=test_b, name_a=name_a, name_b=name_b, mesh=mesh,
             keep_params=keep_params, profile=profile, eval_sets=eval_sets)
  sci, ex = sw.science, sw.execution
  rows = list(sw.cells.rows or sw.points_a)
  cols = list(sw.cells.cols or sw.points_b)
  pairs, explicit = plan_lib.parse_pairs(sw.cells.pairs, rows, cols)
  for r, c in [(r, cols[0]) for r in rows] + [(rows[0], c) for c in cols] + pairs:
    if r not in sw.points_a:
      raise registry.unknown(f"stitch point of the front model ({name_a})", r, sw.points_a)
    if c not in sw.points_b:
      raise registry.unknown(f"stitch point of the end model ({name_b})", c, sw.points_b)
  unstitchable: dict[tuple[str, str], str] = {}
  stitchable = []
  for r, c in pairs:
    try:
      maps.plan(r, sw.shapes_a[r], c, sw.shapes_b[c], src_prefix=sw.prefix_a.get(r, 0),
                dst_prefix=sw.prefix_b.get(c, 0), c2t=sci.c2t, t2c=sci.t2c)
      stitchable.append((r, c))
    except maps.UnstitchableError as e:
      if explicit:
        raise
      unstitchable[(r, c)] = str(e)

  finished, end = sw.store.load()
  end_accuracy = ({"": end["end_accuracy"], **end["end_accuracy_sets"]} if end else {})
  units = plan_lib.plan(
      stitchable, sci.arms, finished=finished, shapes_a=sw.shapes_a,
      shapes_b={p: sw.shapes_b[p] for p in sw.points_b},
      trains={a.name: sw.stitch_steps(a.name) > 0 for a in sci.arms},
      grouping=ex.grouping, num_devices=sw.n_dev, batch_sizes=(sw.batch, sw.eval_batch),
      bytes_per_stitch=sw.bytes_per_stitch, budget_bytes=ex.memory_budget_mb * 2**20,
      max_group_size=ex.max_group_size, fingerprints=sw.store.fingerprints,
      prefix_a=sw.prefix_a, prefix_b=sw.prefix_b, batch_split=not sw.bn_train)
  packed = plan_lib.pack_waves(units, ex.max_stitches_per_wave)
  waves = [Wave(sw, w, f"wave {k + 1}/{len(packed)}: " if len(packed) > 1 else "")
           for k, w in enumerate(packed)]
  show = ex.progress and jax.process_index() == 0
  progress = _Advance(Progress("stitch sweep", sum(w.num_batches() for w in waves),
                               unit="batch", every_s=ex.progress_every_s, enabled=show),
                      waves)
  wanted = set(stitchable)
  resumed = sum(1 for (_, r, c) in finished if (r, c) in wanted)
  if show:
    print(f"stitch sweep: {len(pairs)} cells x {len(sci.arms)} objectives; "
          f"{resumed} (objective, cell) results resumed from the workdir; "
          f"{sum(len(u.fronts) for u in units)} stitches in {len(units)} units, "
          f"{len(waves)} waves, on {sw.n_dev} devices ({jax.process_count()} "
          f"processes).", flush=True)
  records, kept_params = dict(finished), {}
  count, seconds = _Counts(), {}
  ahead: dict[int, concurrent.futures.Future] = {}
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")

  def compile_next(k: int) -> None:  # wave k's programs, while wave k - 1 runs
    if ex.parallel_compile and k < len(waves):
      ahead[k] = pool.submit(waves[k].compile_ahead)

  try:
    for k, w in enumerate(waves):
      out = w.run(progress, ahead=ahead.pop(k, None),
                  compiled=lambda k=k: compile_next(k + 1))
      records.update(out.records)
      kept_params.update(out.params)
      end_accuracy = out.end_accuracy
      count.add(out.warm_up, out.late)
      for phase, t in out.seconds.items():
        seconds[phase] = seconds.get(phase, 0.0) + t
  except KeyboardInterrupt:
    total = len(stitchable) * len(sci.arms)
    kept = (f" and saved in {sw.workdir}; rerun the same command to resume" if
            sw.workdir else "; with a workdir, a rerun would resume them")
    raise errors.Interrupted(
        f"interrupted: {sum(1 for (_, r, c) in records if (r, c) in wanted)} of {total} "
        f"(objective, cell) results done{kept}") from None
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("fula_jax.stitching done")

  measures = [m.name for m in sw.measures] + [f"accuracy@{n}" for n in sw.eval_sets] + (
      [measures_lib.FIT_GAP] if measures_lib.FIT in sw.eval_sets else [])
  values: dict[str, dict[str, np.ndarray]] = {}
  reasons: dict[str, dict[str, str]] = {}
  requested = set(pairs)
  for arm in sci.arms:
    mats = {m: np.full((len(rows), len(cols)), np.nan) for m in measures}
    why: dict[str, str] = {}
    for a, r in enumerate(rows):
      for b, c in enumerate(cols):
        if (r, c) not in requested:
          why[plan_lib.cell_key(r, c)] = NOT_REQUESTED
          continue
        if (r, c) in unstitchable:
          why[plan_lib.cell_key(r, c)] = unstitchable[(r, c)]
          continue
        rec = records[(arm.name, r, c)]
        for m in measures:
          mats[m][a, b] = store_lib.from_json_value(rec["metrics"].get(m))
        if rec["status"] != "ok":
          why[plan_lib.cell_key(r, c)] = f"{rec['status']}: {rec['reason']}"
    values[arm.name], reasons[arm.name] = mats, why
  stats = {"units_computed": len(units), "waves": len(waves),
           "programs_compiled": count.compiled,
           "programs_compiled_late": count.compiled_late,
           "programs_from_cache": count.from_cache,
           "compile_seconds": count.seconds,
           "compile_seconds_blocking": seconds.get("compile", 0.0) + count.late_seconds,
           "stitches_computed": sum(len(u.fronts) for u in units),
           "stitches_resumed": resumed, "devices": sw.n_dev,
           "processes": jax.process_count(), "seconds": time.perf_counter() - t0,
           "phase_seconds": seconds}
  same = model_a is model_b and vars_a is vars_b and train_b is None and test_b is None
  baseline = {}
  if ex.baselines and not same:
    baseline = _baselines(model_b, vars_b, train_b or train, test_b or test, cfg, cols,
                          workdir, name_b, mesh)
  num_classes = getattr(train, "num_classes", None)
  meta = {"settings": settings.resolve(_named(cfg)), "n_train": len(train),
          "chance": 1.0 / num_classes if num_classes else None,
          "self_stitch": same, "baseline_accuracy": baseline,
          "n_test": len(test), "train": train.name, "test": test.name,
          "batch_size": sw.batch, "steps": sw.steps, "estimator": "stitching",
          "end_accuracy_sets": {k: v for k, v in end_accuracy.items() if k},
          "eval_sets": {n: v.a.name for n, v in sw.test_views.items() if n},
          "objective_maps": {a.name: (a.objective.name, a.fmap.key) for a in sci.arms}}
  return SweepResult(rows, cols, values, reasons, end_accuracy.get("", float("nan")),
                     stats, meta, kept_params)


def _baselines(model_b: Any, vars_b: Any, train, test, cfg: Any, cols: list[str],
               workdir: str | None, name_b: str, mesh: Mesh | None
               ) -> dict[str, dict[str, float]]:
  """objective -> {point: accuracy of g stitched into itself at that point}, by a
  diagonal sub-sweep with the same science (resumable under <workdir>/baseline)."""
  sub = dict(settings.resolve(cfg), pairs="diagonal", rows=cols, cols=cols,
             baselines=False)
  res = run_sweep(model_b, vars_b, model_b, vars_b, train, test, sub,
                  None if workdir is None else f"{workdir}/baseline", name_a=name_b,
                  name_b=name_b, mesh=mesh)
  return {obj: {c: float(v["accuracy"][k, k]) for k, c in enumerate(res.cols)}
          for obj, v in res.values.items()}


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
  late_seconds: float = 0.0  # compiling inside a wave's run, which waits for it

  def add(self, warm_up: sharding.CompileCount, late: sharding.CompileCount) -> None:
    for c in (warm_up, late):
      self.compiled += c.compiled
      self.from_cache += c.from_cache
      self.seconds += c.seconds
    self.compiled_late += late.compiled
    self.late_seconds += late.seconds


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
