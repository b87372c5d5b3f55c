"""One wave of units: compile, least squares, train, evaluate, attack, write.

Per batch, f and g run once (batch-sharded, every stitch point replicated out) and every
unit of the wave steps on those shared activations. Least-squares statistics (for DM and
``init='lstsq'``) come first, over the same batch stream; evaluation runs one donor pass
per held-out batch again. Every program the wave calls is compiled first (a named phase
of the progress output), in threads, from its calls' exact shapes and shardings, filling
JAX's caches: the wave itself then compiles nothing. A wave returns what it computed (a
`WaveResult`) and sets nothing on the sweep.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import sharding
from fula_jax.progress import timed
from fula_jax.stitching import compiling, ladder, lstsq, passes, records, stacks
from fula_jax.stitching import measures as measures_lib
from fula_jax.stitching import plan as plan_lib
from fula_jax.stitching import pgd as pgd_lib
from fula_jax.stitching import programs as P
from fula_jax.stitching import store as store_lib
from fula_jax.stitching.context import SweepContext

AHEAD = "ahead"  # compile scope of a wave compiling while an earlier one runs


@dataclasses.dataclass
class UnitRun:
  """A unit and everything its run holds, on the devices until it is written."""
  unit: plan_lib.Unit
  ctx: P.UnitContext
  eval_ctx: P.UnitContext  # its evaluation's: every objective scored (`eval_context`)
  state: P.StitchState | None = None
  max_steps: int = 0
  failed: dict[int, str] = dataclasses.field(default_factory=dict)  # stitch -> why
  sums: dict[str, Any] = dataclasses.field(default_factory=dict)    # set -> eval sums
  pgd: np.ndarray | None = None
  sum_shapes: dict[str, Any] | None = None  # one stitch's evaluation sums

  @property
  def sharding(self):
    return P.stitch_sharding(self.ctx.mesh)


def _sds(tree: Any, sharding_: Any = None) -> Any:
  """Abstract arrays of `tree`'s shapes and dtypes, laid out as `sharding_`."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding_), tree)


class Wave:
  """Runs one wave of a sweep (its context supplies donors, data and settings) and
  writes its units to `store`; `reference`: g's OOD reference (`passes.ood_reference`)
  when the OOD scores are on."""

  def __init__(self, sweep: SweepContext, units: Sequence[plan_lib.Unit],
               label: str = "", *, store: store_lib.Store,
               reference: passes.Reference | None = None):
    self.sw, self.store, self.reference = sweep, store, reference
    self.label = label  # 'wave k/W: ' in its progress lines
    self.runs = [UnitRun(u, ctx, sweep.eval_context(ctx))
                 for u in units for ctx in [sweep.unit_context(u)]]
    sci = sweep.science
    solved = [sci.arm(r.unit.arm) for r in self.runs if sci.arm(r.unit.arm).closed_form]
    self.needs_init = any(self._lstsq_init(r) for r in self.runs)
    self.needs_dm = bool(solved)
    self.init_batches = (-(-sci.lstsq_examples // sweep.batch) if self.needs_init else 0)
    dm_examples = max([a.num_examples for a in solved] + [0])
    self.dm_batches = ((-(-dm_examples // sweep.batch) if dm_examples
                        else sweep.steps_per_epoch) if self.needs_dm else 0)
    for r in self.runs:
      r.max_steps = sweep.stitch_steps(r.unit.arm) if r.unit.trains else 0
    self.train_steps = max([r.max_steps for r in self.runs] + [0])

  def _lstsq_init(self, r: UnitRun) -> bool:
    """Whether `r`'s start needs the statistics pass: its trained map starts from its
    closed form (init='lstsq'), or holds fitting-set statistics whatever the init."""
    sci = self.sw.science
    if sci.arm(r.unit.arm).closed_form:
      return False
    form, opts = r.ctx.form, r.ctx.form_options
    return ((sci.init == "lstsq" and ladder.has_closed_form(form, opts))
            or ladder.needs_statistics(form, opts))

  # -- sizes

  def num_batches(self) -> int:
    """Batches this wave reads (for the progress bar)."""
    sw = self.sw
    n_eval = sum(sw.test_views[name].num_batches for name in sw.test_views)
    return max(self.init_batches, self.dm_batches) + self.train_steps + n_eval

  def stats_jobs(self) -> dict[tuple, list[UnitRun]]:
    """Units whose least squares are needed, grouped by identical front sets."""
    jobs: dict[tuple, list[UnitRun]] = {}
    sci = self.sw.science
    for r in self.runs:
      if sci.arm(r.unit.arm).closed_form or self._lstsq_init(r):
        key = (r.unit.end, r.unit.padded_fronts, r.unit.width, r.unit.ways)
        jobs.setdefault(key, []).append(r)
    return jobs

  # -- compilation

  def compile_ahead(self) -> sharding.CompileCount:
    """`warm_up` in a background thread, while an earlier wave runs: its compilations
    count here, not in that wave's late compilations."""
    with sharding.compile_scope(AHEAD), sharding.count_compiles(AHEAD) as count:
      self.warm_up(announce=False)
    return count

  def warm_up(self, *, announce: bool = True) -> None:
    """Compile every program of the wave, from the shapes and shardings of its calls."""
    sw = self.sw
    calls: list[compiling.Call] = []
    trains = self.train_steps > 0 or self.init_batches or self.dm_batches
    donors = {}
    for batch, is_eval in ([(sw.batch, False)] if trains else []) + [(sw.eval_batch, True)]:
      args = sw.donor_args_abstract(batch)
      ctx = sw.donor_context(train=not is_eval)
      calls.append((P.donor_pass, args, {"ctx": ctx}))
      donors[is_eval] = jax.eval_shape(
          lambda *a, ctx=ctx: P.donor_pass(*a, ctx=ctx), *args)
    rep = sharding.replicated(sw.mesh)
    as_rep = lambda t: _sds(t, rep)
    if self.init_batches or self.dm_batches:
      out = donors[False]
      for runs in self.stats_jobs().values():
        r = runs[0]
        stats = _sds(P.stats_zeros(r.unit.size, r.unit.width, r.unit.end_shape[-1]),
                     r.sharding)
        fronts = tuple(map(as_rep, sw.front_acts(out, r.unit.padded_fronts)))
        calls.append((P.lstsq_stats, (stats, fronts, as_rep(out["acts_b"][r.unit.end])),
                      {"ctx": r.ctx}))
    for r in self.runs:
      state = _sds(self.initial_host_state(r, zeros=True), r.sharding)
      if r.max_steps:
        out = donors[False]
        calls.append((P.train_step, (
            state, sw.b.variables,
            tuple(map(as_rep, sw.front_acts(out, r.unit.padded_fronts))),
            as_rep(self.shared(r, out, train=True)), jax.ShapeDtypeStruct((), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32)), {"ctx": r.ctx}))
      out = donors[True]
      calls.append((P.evaluate, (
          _sds(self.zero_sums(r), r.sharding), state.params, state.bn, sw.b.variables,
          tuple(map(as_rep, sw.front_acts(out, r.unit.padded_fronts))),
          as_rep(self.shared(r, out, train=False)), as_rep(out["mask"])),
          {"ctx": r.eval_ctx}))
      if sw.needs(measures_lib.PGD) and passes.attacked(r.unit):
        calls.append((pgd_lib.pgd_correct, passes.pgd_args_abstract(
            sw, r.unit, r.ctx, state.params, state.bn),
            {"ctx": passes.pgd_context(sw, r.unit, r.ctx)}))
    self._compile(calls, announce)

  def _ends(self) -> str:
    return ", ".join(sorted({r.unit.end for r in self.runs}))

  def _compile(self, calls: Sequence[compiling.Call], announce: bool) -> None:
    sw = self.sw
    ends = self._ends()
    compiling.compile_all(
        calls, parallel=sw.execution.parallel_compile, profile=sw.profile,
        message=f"stitch sweep: {self.label}compiling {{n}} programs (end points: {ends})",
        done=f"stitch sweep: {self.label}compiled",
        announce=announce and sw.execution.progress and jax.process_index() == 0)

  # -- pieces of the calls

  def shared(self, r: UnitRun, out: Mapping[str, Any], *, train: bool) -> dict:
    targets = r.ctx.train_targets() if train else r.eval_ctx.eval_targets()
    shared = {"label": out["label"], "teacher": out["logits_b"],
              "targets": {p: out["acts_b"][p] for p in targets}}
    reference = None if train else self.reference
    return shared if reference is None else dict(shared, **{
        measures_lib.OOD: reference[r.unit.end]})

  def zero_sums(self, r: UnitRun) -> dict[str, np.ndarray]:
    """Zeroed evaluation sums of `r`'s stitches (their shapes traced once per unit)."""
    sw = self.sw
    if r.sum_shapes is None:
      r.sum_shapes = P.eval_terms_shapes(
          r.eval_ctx, sw.b.variables, sw.eval_batch, sw.num_classes,
          {p: sw.b.shapes[p] for p in r.eval_ctx.eval_targets()},
          None if self.reference is None else self.reference[r.unit.end])
    return {k: np.zeros((r.unit.size,) + tuple(v.shape), np.float32)
            for k, v in r.sum_shapes.items()}

  def initial_host_state(self, r: UnitRun, params: Any = None, zeros: bool = False):
    sw, u = self.sw, r.unit
    c_out = u.end_shape[-1]
    if params is None:
      params = stacks.init_params(r.ctx.form, r.ctx.form_options, [], c_out, u.width, 0,
                                  [0] * u.size, r.ctx.learned_prefix)
    steps = np.zeros((u.size,), np.int32)
    if not zeros:
      steps[:len(u.fronts)] = r.max_steps
    lr = np.array([sw.science.lr(plan_lib.point_of(f), u.end) for f in u.padded_fronts],
                  np.float32)
    bn = (jax.tree_util.tree_map(lambda a: np.repeat(a[None], u.size, 0), sw.host_bn_b)
          if r.ctx.bn_train else None)
    return P.init_state(params, steps, lr, P.adam(*sw.science.adam), bn)

  # -- running

  def least_squares(self, progress) -> tuple[dict, dict]:
    """Closed-form solutions per cell: (for inits, for DM); values (params, error)."""
    sw = self.sw
    n_batches = max(self.init_batches, self.dm_batches)
    if not n_batches:
      return {}, {}
    jobs = []
    for runs in self.stats_jobs().values():
      r = runs[0]
      jobs.append([runs, sharding.put_tree(
          P.stats_zeros(r.unit.size, r.unit.width, r.unit.end_shape[-1]), r.sharding)])
    init_sol, dm_sol = {}, {}
    for b, out in enumerate(sw.donor_stream(sw.train_stream(n_batches), train=True)):
      for job in jobs:
        r = job[0][0]
        job[1] = sw.call(P.lstsq_stats, job[1],
                         sw.front_acts(out, r.unit.padded_fronts),
                         out["acts_b"][r.unit.end], ctx=r.ctx)
      for count, sol in ((self.init_batches, init_sol), (self.dm_batches, dm_sol)):
        if b + 1 == count:
          for runs, st in jobs:
            host = sharding.fetch(st)
            for ctx in {r.ctx.form_key: r.ctx for r in runs}.values():
              sol.update(self._solve(runs[0].unit, host, ctx))
      progress.advance()
    return init_sol, dm_sol

  def _solve(self, u: plan_lib.Unit, stats: lstsq.Stats, ctx: P.UnitContext) -> dict:
    """Host float64 closed forms of `ctx`'s map per cell, on each front's own features;
    values ``(params, error)`` keyed ``ctx.form_key + (row, end)``."""
    ridge = self.sw.science.ridge
    form, opts = ctx.form, ctx.form_options
    out = {}
    for s, (row, shape) in enumerate(zip(u.fronts, u.front_shapes)):
      c = shape[-1]
      one = lstsq.Stats(*(np.asarray(x)[s] for x in stats))
      one = one._replace(mean_x=one.mean_x[:c], cxx=one.cxx[:c, :c], cxt=one.cxt[:c])
      sol, err = {}, ""
      try:
        ladder.check(form, c, u.end_shape[-1], opts)
        sol = ladder.fit_from_stats(form, one, ridge, opts)
        if not all(np.all(np.isfinite(v)) for v in sol.values()):
          raise ValueError("non-finite closed-form solution")
      except (ValueError, np.linalg.LinAlgError) as e:
        sol, err = {}, f"closed form of the {form} map failed: {e}"
      out[ctx.form_key + (row, u.end)] = (sol, err)
    return out

  def init_states(self, init_sol: Mapping, dm_sol: Mapping) -> None:
    sci = self.sw.science
    for r in self.runs:
      u = r.unit
      arm = sci.arm(u.arm)
      form = r.ctx.form
      salts = [plan_lib.cell_salt(f, u.end) for f in u.padded_fronts]
      params = stacks.init_params(form, r.ctx.form_options,
                                  [s[-1] for s in u.padded_shapes], u.end_shape[-1],
                                  u.width, sci.seed, salts, r.ctx.learned_prefix)
      solutions = (dm_sol if arm.closed_form else
                   init_sol if self._lstsq_init(r) else {})
      for s, row in enumerate(u.padded_fronts):
        sol, err = solutions.get(r.ctx.form_key + (row, u.end), ({}, ""))
        if sci.init != "lstsq" and not arm.closed_form:  # statistics, random weights
          sol = ladder.statistics(sol)
        stacks.place(params, s, sol)
        why = err or arm.inapplicable(u.padded_shapes[s][-1], u.end_shape[-1],
                                      r.max_steps)
        if why and s < len(u.fronts):
          r.failed[s] = why
      r.state = sharding.put_tree(self.initial_host_state(r, params), r.sharding)

  def train(self, progress) -> None:
    sw = self.sw
    if not self.train_steps:
      return
    window = np.int32(sw.steps_per_epoch)
    for step, out in enumerate(sw.donor_stream(sw.train_stream(self.train_steps),
                                               train=True)):
      for r in self.runs:
        if step < r.max_steps:
          r.state = sw.call(P.train_step, r.state, sw.b.variables,
                            sw.front_acts(out, r.unit.padded_fronts),
                            self.shared(r, out, train=True), window, np.int32(step),
                            ctx=r.ctx)
      progress.advance()

  def evaluate(self, name: str, progress) -> float:
    """Every unit's sums on held-out set `name` ('' = the test split); returns the
    number of examples g itself gets right."""
    sw = self.sw
    for r in self.runs:
      r.sums[name] = sharding.put_tree(self.zero_sums(r), r.sharding)
    end_correct = 0.0
    for out in sw.donor_stream(sw.eval_stream(name)):
      end_correct += sw.end_correct(out)
      for r in self.runs:
        r.sums[name] = sw.call(P.evaluate, r.sums[name], r.state.params, r.state.bn,
                               sw.b.variables,
                               sw.front_acts(out, r.unit.padded_fronts),
                               self.shared(r, out, train=False), out["mask"],
                               ctx=r.eval_ctx)
      progress.advance()
    return end_correct

  def run(self, progress, *, ahead: concurrent.futures.Future | None = None,
          compiled: Callable[[], None] = lambda: None) -> WaveResult:
    """Run the wave and write its units. `ahead`: its programs compiling in the
    background (`compile_ahead`), else compiled here; `compiled()` is called once they
    are (to start the next wave's)."""
    sw = self.sw
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    with progress.bar.paused(), timed(seconds, "compile"):  # the time the sweep waits
      if ahead is None:
        with sharding.count_compiles() as warm:
          self.warm_up()
      else:
        warm = compiling.wait_for(ahead, f"stitch sweep: {self.label}", self._ends(),
                                  announce=sw.execution.progress and jax.process_index() == 0)
    progress.compiled(self, seconds["compile"])
    compiled()
    with sharding.count_compiles() as late:
      with timed(seconds, "least_squares"):
        init_sol, dm_sol = self.least_squares(progress)
        self.init_states(init_sol, dm_sol)
      with timed(seconds, "train"):
        self.train(progress)
        jax.block_until_ready([r.state for r in self.runs])
      with timed(seconds, "evaluate"):
        end_correct = {name: self.evaluate(name, progress) for name in sw.test_views}
        jax.block_until_ready([r.sums for r in self.runs])
      end_accuracy = {name: c / sw.test_views[name].n for name, c in end_correct.items()}
      if sw.needs(measures_lib.PGD):
        with timed(seconds, "pgd"):
          for r in self.runs:
            r.pgd = passes.pgd_accuracy(sw, r.unit, r.ctx, r.state)
    per_unit = (time.perf_counter() - t0) / max(len(self.runs), 1)
    host = sharding.fetch([(r.state, r.sums) for r in self.runs])
    done, kept = {}, {}
    for r, (state, sums) in zip(self.runs, host):
      recs = records.unit_records(sw, r.unit, state, sums, end_accuracy, r.failed, r.pgd)
      n = len(r.unit.fronts)
      params = {k: np.asarray(v)[:n] for k, v in state.params.items()}
      for s, (row, rec) in enumerate(zip(r.unit.fronts, recs)):
        done[(r.unit.arm, row, r.unit.end)] = rec
        if sw.keep_params and not plan_lib.is_self(row):
          kept[(r.unit.arm, row, r.unit.end)] = {
              k: np.asarray(v)
              for k, v in stacks.stitch_params(params, s, r.ctx.specs()[s]).items()}
      self.store.write(r.unit, recs, params if sw.execution.save_params else None,
                     seconds=per_unit, end_accuracy=end_accuracy[""],
                     end_accuracy_sets={k: v for k, v in end_accuracy.items() if k})
    return WaveResult(done, end_accuracy, kept, warm, late, seconds)


@dataclasses.dataclass(frozen=True)
class WaveResult:
  """What one wave computed: a record per (arm, row, col), the end model's accuracy per
  evaluation set ('' the test split), the stitch parameters when kept, the programs
  compiled before it ran (`warm_up`) and while it ran (`late`, which it waited for),
  and its wall time per phase."""
  records: dict[tuple[str, str, str], dict[str, Any]]
  end_accuracy: dict[str, float]
  params: dict[tuple[str, str, str], dict[str, np.ndarray]]
  warm_up: sharding.CompileCount
  late: sharding.CompileCount
  seconds: dict[str, float]
