"""The compiled programs of a sweep: donor passes, and per unit its train step,
evaluation, least-squares statistics and PGD.

Each program is a module-level function jitted with a static, hashable context (the end
model, the unit's shapes, its objective (the evaluation's: all of the sweep's) and map,
the mesh), so one program serves units, waves and sweeps of one context and shapes, and
the persistent cache keeps it. Inside a unit's program each stitch maps its own
front (f's activation at its point, replicated from the donor pass) onto the end point's
grid with its own shapes -- the affine map before an upsampling resize and after a
downsampling one, the cheaper order -- so stitches from fronts of every shape share the
program without padding any activation (a nonlinear map of :mod:`.ladder` runs after the
resize); then, under `jax.vmap` over the stitches, g's tail runs (only as far as the
objective reads), with parameters stacked and padded to the unit's widest front
(:mod:`.stacks`). The programs are `shard_map`s over a (stitch x batch) mesh: each
stitch's batch is split over the batch axis (gradients averaged, sums reduced) and, when
a unit must, its stitches over the stitch axis (each device then runs the tails of its
own stitches). Donor variables are arguments, never closure constants. BatchNorm runs in
inference mode, unless the sweep sets ``donor_bn='train'``: then while stitches train,
the donors normalise by each whole batch's statistics (such units never split a stitch's
batch over devices) and every stitch carries its own copy of g's running averages
(`StitchState.bn`), updated with g's momentum and used when it is evaluated. """

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fula_jax.models.base import LOGITS
from fula_jax.stitching import ladder, lstsq, maps, stacks
from fula_jax.stitching import measures as measures_lib
from fula_jax.stitching.objectives import Objective, Where

AXIS = "stitch"
BATCH = "batch"


class StitchState(NamedTuple):
  """Per-stitch training state; every leaf has the stitch axis first."""
  params: dict[str, jax.Array]   # kernel (S, width, C_out), bias (S, C_out)
  opt: Any                       # Adam moments, vmapped
  steps: jax.Array               # (S,) int32: training steps this stitch takes
  lr: jax.Array                  # (S,) float32
  diverged: jax.Array            # (S,) bool
  diverged_step: jax.Array       # (S,) int32, -1 while finite
  loss_sum: jax.Array            # (S,) weighted sum of training losses
  loss_weight: jax.Array         # (S,) sum of the weights
  trend: jax.Array  # (S, 3, 3) [first, previous, last] quarter of steps x [n, sum, sum of
                    # squares] of the training loss
  bn: Any = None                 # per-stitch copy of g's batch_stats (donor_bn='train')


def adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """Adam's scaling without the learning rate (applied per stitch)."""
  return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)


def init_state(params: dict[str, np.ndarray], steps: np.ndarray, lr: np.ndarray,
               tx: optax.GradientTransformation, bn: Any = None) -> StitchState:
  """Host-side initial state for stacked `params` (leading stitch axis); `bn`: g's
  batch_stats stacked per stitch when the donors train their BatchNorms."""
  params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  s = steps.shape[0]
  opt = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                               jax.eval_shape(jax.vmap(tx.init, axis_size=s), params))
  return StitchState(params, opt, np.asarray(steps, np.int32), np.asarray(lr, np.float32),
                     np.zeros((s,), bool), np.full((s,), -1, np.int32),
                     np.zeros((s,), np.float32), np.zeros((s,), np.float32),
                     np.zeros((s, 3, 3), np.float32), {} if bn is None else bn)


def with_bn(vars_b: Any, bn: Any) -> Any:
  """g's variables with a stitch's own BatchNorm averages (`vars_b` without any)."""
  return dict(vars_b, batch_stats=bn) if bn else vars_b


def tail(model_b: Any, vars_b: Any, z: jax.Array, j: str, end: str, bn: Any = None
         ) -> dict[str, jax.Array]:
  """g run from point j to `end` (a point or LOGITS) in inference mode: {j: z, every
  later point, ...}; `bn`: the stitch's own BatchNorm averages, if it has them."""
  return tail_train(model_b, vars_b, z, j, end, bn, train=False)[0]


def tail_train(model_b: Any, vars_b: Any, z: jax.Array, j: str, end: str, bn: Any,
               train: bool = True) -> tuple[dict[str, jax.Array], Any]:
  """:func:`tail` with g's BatchNorms in train mode when `train` and `bn` (batch
  statistics, and `bn` updated with g's momentum): (outputs, the new `bn`)."""
  outs = {j: z}
  if end == j:
    return outs, bn
  kw = dict(start=j, end=None if end == LOGITS else end, capture=True)
  if train and bn:
    (h, acts), new = model_b.apply(with_bn(vars_b, bn), z, train=True,
                                   mutable=["batch_stats"], **kw)
    bn = new["batch_stats"]
  else:
    h, acts = model_b.apply(with_bn(vars_b, bn), z, train=False, **kw)
  outs.update(acts)
  if end == LOGITS:
    outs[LOGITS] = h
  return outs, bn


def latest(points: Sequence[str], ends: Sequence[str]) -> str:
  """The furthest of several points of g (LOGITS after every stitch point)."""
  order = {p: k for k, p in enumerate(points)}
  order[LOGITS] = len(points)
  return max(ends, key=lambda p: order[p])


@dataclasses.dataclass(frozen=True)
class UnitContext:
  """What a unit's programs are built from (hashable: the jit cache key). Shapes only,
  no point names of f, so units of the same shapes share their programs."""
  model_b: Any
  points_b: tuple[str, ...]
  end: str
  end_shape: tuple[int, ...]
  front_shapes: tuple[tuple[int, ...], ...]  # one per (padded) stitch
  width: int
  objective: Objective | None  # None: PGD's (no objective); measures.Scored: evaluate's
  fmap: ladder.MapChoice
  mesh: Mesh
  adam: tuple[float, float, float] = (0.9, 0.999, 1e-8)
  front_prefix: tuple[int, ...] = ()  # prefix tokens of each (padded) stitch's front
  end_prefix: int = 0
  c2t: str = "pool"
  t2c: str = "drop"
  bn_train: bool = False  # g's BatchNorms in train mode while training (donor_bn)

  @property
  def where(self) -> Where:
    return Where(self.end, self.points_b)

  @property
  def form(self) -> str:
    """The unit's stitch map (:mod:`.ladder`)."""
    return self.fmap.form

  @property
  def form_key(self) -> tuple[str, tuple]:
    """The map and its non-default options (what a closed form is keyed by)."""
    return self.fmap.form, self.fmap.options

  @property
  def form_options(self) -> dict[str, Any]:
    return self.fmap.option_values

  @property
  def split(self) -> bool:
    """Whether each stitch's batch is split over devices (then it communicates)."""
    return self.mesh.shape[BATCH] > 1

  def specs(self) -> tuple[maps.MapSpec, ...]:
    prefix = self.front_prefix or (0,) * len(self.front_shapes)
    return tuple(maps.plan("front", s, "end", self.end_shape, src_prefix=p,
                           dst_prefix=self.end_prefix, c2t=self.c2t, t2c=self.t2c)
                 for s, p in zip(self.front_shapes, prefix))

  @property
  def learned_prefix(self) -> int:
    """Rows of the 'cls' parameter: learned prefix tokens of the widest need."""
    return max([s.learned_prefix for s in self.specs()] + [0])

  def train_targets(self) -> tuple[str, ...]:
    return tuple(self.objective.targets(self.points_b, self.end))

  def eval_targets(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys((self.end,) + self.train_targets()))


def stitch_all(ctx: UnitContext, params, fronts: Sequence[jax.Array]) -> jax.Array:
  """(S, B, *end shape): every stitch's map of its own front, at the end point.

  Stitches whose fronts have the same shape share one vmapped map (fewer operations
  to compile than one map per stitch)."""
  specs = ctx.specs()
  groups: dict[maps.MapSpec, list[int]] = {}
  for s, spec in enumerate(specs):
    groups.setdefault(spec, []).append(s)
  outs, order = [], []
  for spec, idx in groups.items():
    p = stacks.stitch_params(params, np.asarray(idx), spec)
    x = jnp.stack([fronts[s] for s in idx])
    outs.append(jax.vmap(lambda p, x, spec=spec: maps.apply(spec, p, x, ctx.form))(p, x))
    order += idx
  z = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
  if order != sorted(order):
    z = z[np.argsort(order)]
  return z


def _local_stitches(ctx: UnitContext, z: jax.Array) -> jax.Array:
  """This device's share of the stitch axis of `z` (all of it unless split)."""
  ways = ctx.mesh.shape[AXIS]
  if ways == 1:
    return z
  n = z.shape[0] // ways
  return jax.lax.dynamic_slice_in_dim(z, jax.lax.axis_index(AXIS) * n, n, axis=0)


def _gather_stitches(ctx: UnitContext, v: Any) -> Any:
  """Every device's per-stitch values along the stitch axis, in stitch order."""
  if ctx.mesh.shape[AXIS] == 1:
    return v
  return jax.tree_util.tree_map(
      lambda a: jax.lax.all_gather(a, AXIS, tiled=True), v)


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree_util.tree_leaves(tree)]))


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
  """Per-stitch `where` over pytrees whose leaves have the stitch axis first."""
  def pick(x, y):
    return jnp.where(pred.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  return jax.tree_util.tree_map(pick, a, b)


def on_mesh(fn, ctx: UnitContext, in_specs, out_specs):
  """`fn` as a `shard_map` over the unit's mesh; on one device, `fn` itself: the map is
  then the identity, and without its boundary XLA's CPU compiler optimises the whole
  step (a ResNet-18 unit's train step ran 1.6x faster measured on 2 CPU cores)."""
  if ctx.mesh.size == 1:
    return fn
  return jax.shard_map(fn, mesh=ctx.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


@functools.partial(jax.jit, static_argnames=("ctx",), donate_argnums=(0,))
def train_step(state: StitchState, vars_b, fronts, shared, window, step, *,
               ctx: UnitContext) -> StitchState:
  """One training step of every stitch of a unit (stitch s takes it while
  ``step < state.steps[s]``; the last `window` steps count into the training loss)."""
  objective, where = ctx.objective, ctx.where
  train_end = objective.train_end(ctx.points_b, ctx.end)
  tx = adam(*ctx.adam)

  def local(state, vars_b, fronts, shared, window, step):
    bn = jax.tree_util.tree_map(lambda a: _local_stitches(ctx, a), state.bn)

    def one(zs, n, bs):
      outs, new = tail_train(ctx.model_b, vars_b, zs, ctx.end, train_end, bs,
                             train=ctx.bn_train)
      return objective.loss_at(outs, shared, where, step, n), new

    def total_loss(params):
      z = _local_stitches(ctx, stitch_all(ctx, params, fronts))
      losses, new_bn = jax.vmap(one)(z, _local_stitches(ctx, state.steps), bn)
      penalty = _local_stitches(ctx, jax.vmap(
          lambda p: ladder.penalty(ctx.form, p, ctx.form_options))(params))
      return jnp.sum(losses) + jnp.sum(penalty), (losses, new_bn)

    (_, (loss, new_bn)), grads = jax.value_and_grad(total_loss, has_aux=True)(
        state.params)
    loss, new_bn = _gather_stitches(ctx, (loss, new_bn))
    if ctx.mesh.shape[AXIS] > 1:
      grads = jax.lax.psum(grads, AXIS)  # each device holds its own stitches' grads
    if ctx.split:
      loss, grads, new_bn = jax.lax.pmean((loss, grads, new_bn), BATCH)
    weight = (step >= state.steps - window).astype(jnp.float32)
    q = jnp.maximum(state.steps // 4, 1)[:, None]  # the first, previous and last quarter
    start = jnp.concatenate([jnp.zeros_like(q), state.steps[:, None] - q * jnp.array([2, 1])],
                            1)
    slot = ((step >= start) & (step < start + q)).astype(jnp.float32)  # (S, 3)
    updates, opt = jax.vmap(tx.update)(grads, state.opt, state.params)
    new_params = jax.vmap(functools.partial(ladder.project, ctx.form))(
        jax.tree_util.tree_map(
            lambda p, u: p - state.lr.reshape((-1,) + (1,) * (p.ndim - 1)) * u,
            state.params, updates))
    active = step < state.steps
    finite = jnp.isfinite(loss) & jax.vmap(_all_finite)(new_params)
    fails = active & ~finite & ~state.diverged
    ok = active & finite & ~state.diverged
    return state._replace(
        params=_select(ok, new_params, state.params), opt=_select(ok, opt, state.opt),
        diverged=state.diverged | fails,
        diverged_step=jnp.where(fails, step, state.diverged_step),
        loss_sum=state.loss_sum + jnp.where(ok, weight * loss, 0.0),
        loss_weight=state.loss_weight + jnp.where(ok, weight, 0.0),
        trend=state.trend + jnp.where(ok[:, None, None], slot[:, :, None] * jnp.stack(
            [jnp.ones_like(loss), loss, loss * loss], -1)[:, None, :], 0.0),
        bn=_select(ok, new_bn, state.bn))

  rep, bt = P(), P(BATCH)
  return on_mesh(local, ctx, (rep, rep, bt, bt, rep, rep), rep)(
      state, vars_b, fronts, shared, window, step)


def _eval_terms(ctx: UnitContext, z, vars_b, shared, mask, bn=None
                ) -> dict[str, jax.Array]:
  return measures_lib.terms(measures_lib.Batch(
      tail(ctx.model_b, vars_b, z, ctx.end, LOGITS, bn), z, shared, mask, ctx.objective,
      ctx.where))


def eval_terms_shapes(ctx: UnitContext, vars_b, batch: int, num_classes: int,
                      target_shapes: dict[str, tuple[int, ...]], ood: Any = None
                      ) -> dict[str, Any]:
  """Names and shapes of one stitch's evaluation sums (`jax.eval_shape`, no compute);
  `ood`: the end point's OOD reference when those scores run."""
  f32 = jnp.float32

  def f(v, z, t, label, teacher, mask):
    shared = {"label": label, "teacher": teacher, "targets": t}
    if ood is not None:
      shared[measures_lib.OOD] = ood
    return _eval_terms(ctx, z, v, shared, mask)

  return jax.eval_shape(
      f, vars_b, jax.ShapeDtypeStruct((batch,) + ctx.end_shape, f32),
      {p: jax.ShapeDtypeStruct((batch,) + tuple(s), f32) for p, s in target_shapes.items()},
      jax.ShapeDtypeStruct((batch,), jnp.int32),
      jax.ShapeDtypeStruct((batch, num_classes), f32),
      jax.ShapeDtypeStruct((batch,), f32))


@functools.partial(jax.jit, static_argnames=("ctx",), donate_argnums=(0,))
def evaluate(acc, params, bn, vars_b, fronts, shared, mask, *, ctx: UnitContext):
  """`acc` plus every measure's sums of every stitch on one held-out batch (`bn`: the
  stitches' own BatchNorm averages of g, or {})."""

  def local(acc, params, bn, vars_b, fronts, shared, mask):
    z = _local_stitches(ctx, stitch_all(ctx, params, fronts))
    bn = jax.tree_util.tree_map(lambda a: _local_stitches(ctx, a), bn)
    sums = jax.vmap(lambda zs, bs: _eval_terms(ctx, zs, vars_b, shared, mask, bs))(z, bn)
    sums = _gather_stitches(ctx, sums)
    if ctx.split:
      sums = jax.lax.psum(sums, BATCH)
    return jax.tree_util.tree_map(jnp.add, acc, sums)

  rep, bt = P(), P(BATCH)
  shared_spec = {k: rep if k == measures_lib.OOD else bt for k in shared}  # a reference
  return on_mesh(local, ctx, (rep, rep, rep, rep, bt, shared_spec, bt), rep)(
      acc, params, bn, vars_b, fronts, shared, mask)


@functools.partial(jax.jit, static_argnames=("ctx",), donate_argnums=(0,))
def lstsq_stats(stats: lstsq.Stats, fronts, target, *, ctx: UnitContext) -> lstsq.Stats:
  """The DM normal-equation statistics of every stitch, plus one batch: rows of each
  front on the end point's grid (zero-padded to the unit's width) against g's rows."""

  def local(stats, fronts, target):
    out = []
    for s, (spec, x) in enumerate(zip(ctx.specs(), fronts)):
      xr = maps.relayout(spec, x)
      xr = jnp.pad(xr, [(0, 0)] * (xr.ndim - 1) + [(0, ctx.width - xr.shape[-1])])
      t = target
      if spec.learned_prefix:  # no source rows for tokens the stitch learns
        xr, t = xr[:, spec.dst_prefix:], t[:, spec.dst_prefix:]
      b = lstsq.batch_stats(lstsq.rows(xr), lstsq.rows(t))
      if ctx.split:
        b = lstsq.psum_stats(b, BATCH)
      out.append(lstsq.merge(jax.tree_util.tree_map(lambda a: a[s], stats), b))
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *out)

  rep, bt = P(), P(BATCH)
  return on_mesh(local, ctx, (rep, bt, bt), rep)(stats, fronts, target)


@dataclasses.dataclass(frozen=True)
class DonorContext:
  model_a: Any
  model_b: Any
  mesh: Mesh
  train: bool = False  # BatchNorms by the batch's statistics (donor_bn='train')

  @property
  def split(self) -> bool:
    """Whether the pass communicates (gathers a batch split over several devices)."""
    return self.mesh.size > 1


@functools.partial(jax.jit, static_argnames=("ctx",))
def donor_pass(vars_a, vars_b, xa, xb, label, mask, *, ctx: DonorContext):
  """f and g once on a batch, every stitch point captured, everything replicated."""
  acts_a = capture(ctx.model_a, vars_a, xa, ctx.train)[1]
  logits_b, acts_b = capture(ctx.model_b, vars_b, xb, ctx.train)
  out = {"acts_a": acts_a, "logits_b": logits_b, "acts_b": acts_b, "label": label,
         "mask": mask}
  return jax.lax.with_sharding_constraint(out, NamedSharding(ctx.mesh, P()))


def capture(model: Any, variables: Any, x: jax.Array, train: bool = False) -> Any:
  """(logits, {point: activation}) of a donor; with `train`, its BatchNorms use the
  batch's statistics and the averages they would write are dropped (a frozen donor)."""
  if train and "batch_stats" in variables:
    return model.apply(variables, x, train=True, capture=True, mutable=["batch_stats"])[0]
  return model.apply(variables, x, train=False, capture=True)


def stitch_sharding(mesh: Mesh) -> NamedSharding:
  """How a unit's per-stitch arrays (parameters, state, sums) are laid out: replicated;
  they are small, and a device that runs some stitches' tails computes every map."""
  return NamedSharding(mesh, P())


def stats_zeros(size: int, c: int, d: int) -> lstsq.Stats:
  z = np.zeros
  return lstsq.Stats(z((size,), np.float32), z((size, c), np.float32),
                     z((size, d), np.float32), z((size, c, c), np.float32),
                     z((size, c, d), np.float32), z((size, d), np.float32))
