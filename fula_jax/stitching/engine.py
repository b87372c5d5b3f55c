"""The vmapped stitch trainer: one compiled program trains a whole group of stitches.

A *group* is a set of stitches that share a compiled shape: their front points have the
same activation shape and they all end at the same point j of the end model g. The
programs take the group's front activations (from one donor pass, shared) and g's
targets, gather each stitch's front by index, and run, under ``jax.vmap`` over the
stitches' parameters, the stitch map and g's tail (j -> the furthest point any of the
unit's objectives needs) inside one jitted program; stitches of several objectives
share it, each with its own loss. The programs are ``shard_map``s over a 2-D
(stitch x batch) view of the devices: the stitch axis is split over the first mesh axis
and every stitch's batch over the second (gradients averaged, sums reduced), so small
groups still use every device. Train steps donate their state.

Donor variables enter as arguments (never as closure constants, never in an optimiser
state) and BatchNorm runs in inference mode.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fula_jax.models.base import LOGITS, StagedModel
from fula_jax.stitching import lstsq, maps
from fula_jax.stitching.objectives import Objective, Where

AXIS = "stitch"
BATCH = "batch"


@dataclasses.dataclass(frozen=True)
class Group:
  """Stitches that share one compiled program (same front shape, same end point)."""

  end: str
  src_shape: tuple[int, ...]
  dst_shape: tuple[int, ...]
  fronts: tuple[str, ...]  # distinct front points, all of shape `src_shape`

  @property
  def spec(self) -> maps.MapSpec:
    return maps.plan(self.fronts[0], self.src_shape, self.end, self.dst_shape)

  @property
  def key(self) -> str:
    return f"{self.end}@{'x'.join(map(str, self.src_shape))}"


class StitchState(NamedTuple):
  """Per-stitch training state; every leaf has the stitch axis first."""
  params: dict[str, jax.Array]   # kernel (S, C_in, C_out), bias (S, C_out)
  opt: Any                       # Adam moments, vmapped
  front: jax.Array               # (S,) int32: index into Group.fronts
  objective: jax.Array           # (S,) int32: index into the unit's objectives
  steps: jax.Array               # (S,) int32: training steps this stitch takes
  lr: jax.Array                  # (S,) float32
  diverged: jax.Array            # (S,) bool
  diverged_step: jax.Array       # (S,) int32, -1 while finite
  loss_sum: jax.Array            # (S,) weighted sum of training losses
  loss_weight: jax.Array         # (S,) sum of the weights


def adam(cfg: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
  """Adam's scaling without the learning rate (applied per stitch)."""
  cfg = cfg or {}
  return optax.scale_by_adam(b1=float(cfg.get("b1", 0.9)), b2=float(cfg.get("b2", 0.999)),
                             eps=float(cfg.get("eps", 1e-8)))


def init_state(params: Mapping[str, np.ndarray], front: np.ndarray,
               objective: np.ndarray, steps: np.ndarray, lr: np.ndarray,
               tx: optax.GradientTransformation) -> StitchState:
  """Host-side (NumPy) initial state for stacked `params` (leading stitch axis)."""
  params = {k: np.asarray(v, np.float32) for k, v in params.items()}
  # Adam's state starts at zero: build it on the host instead of running tx.init.
  opt = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                               jax.eval_shape(jax.vmap(tx.init), params))
  s = front.shape[0]
  return StitchState(params, opt, np.asarray(front, np.int32),
                     np.asarray(objective, np.int32), np.asarray(steps, np.int32),
                     np.asarray(lr, np.float32), np.zeros((s,), bool),
                     np.full((s,), -1, np.int32), np.zeros((s,), np.float32),
                     np.zeros((s,), np.float32))


def random_init(spec: maps.MapSpec, seed: int, salts: Sequence[int]
                ) -> dict[str, np.ndarray]:
  """Stacked fan-in inits (LeCun normal: a normal truncated at two standard deviations,
  rescaled to variance 1 / fan_in; zero bias), one per salt, on the host.

  Stitch s draws from ``np.random.default_rng([seed, salts[s]])`` whatever else is
  stacked with it, so an init never depends on grouping or devices; NumPy keeps it free
  of per-shape compilations.
  """
  c_in, c_out = spec.in_features, spec.out_features
  std = np.sqrt(1.0 / c_in) / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
  kernels = np.empty((len(salts), c_in, c_out), np.float32)
  for k, salt in enumerate(salts):
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, int(salt)])
    draw = rng.standard_normal((c_in, c_out))
    bad = np.abs(draw) > 2.0
    while bad.any():
      draw[bad] = rng.standard_normal(int(bad.sum()))
      bad = np.abs(draw) > 2.0
    kernels[k] = draw * std
  return {"kernel": kernels, "bias": np.zeros((len(salts), c_out), np.float32)}


def tail(model_b: StagedModel, vars_b: Any, z: jax.Array, j: str, end: str
         ) -> dict[str, jax.Array]:
  """g run from point j to `end` (a point or LOGITS): {j: z, every later point, ...}."""
  outs = {j: z}
  if end == j:
    return outs
  h, acts = model_b.apply(vars_b, z, start=j, end=None if end == LOGITS else end,
                          train=False, capture=True)
  outs.update(acts)
  if end == LOGITS:
    outs[LOGITS] = h
  return outs


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree_util.tree_leaves(tree)]))


def _select(pred: jax.Array, a: Any, b: Any) -> Any:
  """Per-stitch `where` over pytrees whose leaves have the stitch axis first."""
  def pick(x, y):
    return jnp.where(pred.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
  return jax.tree_util.tree_map(pick, a, b)


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted programs of one group (several objectives) on one (stitch x batch) mesh."""
  train: Callable[..., StitchState]
  evaluate: Callable[..., dict[str, jax.Array]]
  train_targets: tuple[str, ...]  # g's points the train step needs as targets
  eval_targets: tuple[str, ...]
  mesh: Mesh
  collective: bool                # the programs communicate over the batch axis


def unit_mesh(devices: Sequence[Any], stitch_ways: int) -> Mesh:
  """(stitch_ways x rest) mesh over `devices` (same order, so replicated arrays of the
  1-D sweep mesh are valid inputs without any copy)."""
  devs = np.asarray(devices).reshape(stitch_ways, -1)
  return Mesh(devs, (AXIS, BATCH))


def stitch_ways(num_stitches: int, num_devices: int, batch_sizes: Sequence[int],
                batch_split_ok: bool = True) -> int:
  """How many ways to split a unit's stitch axis; the rest of the devices split the
  batch. Minimises the padded stitch count (a lone stitch is spread over every device
  by its batch instead of being padded to the device count), preferring fewer batch
  splits on ties. Batch sizes must divide by the batch ways."""
  if not batch_split_ok:
    return num_devices
  best = num_devices
  for s in sorted((d for d in range(1, num_devices + 1) if num_devices % d == 0),
                  reverse=True):
    b = num_devices // s
    if any(bs % b for bs in batch_sizes):
      continue
    if -(-num_stitches // s) * s < -(-num_stitches // best) * best:
      best = s
  return best


def _latest(points: Sequence[str], ends: Sequence[str]) -> str:
  """The furthest of several end points (LOGITS after every stitch point)."""
  order = {p: k for k, p in enumerate(points)}
  order[LOGITS] = len(points)
  return max(ends, key=lambda p: order[p])


def build(objectives: Sequence[Objective], model_b: StagedModel, group: Group,
          mesh: Mesh, tx: optax.GradientTransformation) -> Programs:
  """Jitted train and eval programs for one group on a 2-D mesh.

  Stitches of several objectives share the programs: each stitch carries the index of
  its objective, g's tail runs once per stitch to the furthest point any of the
  objectives needs, and each stitch's loss is its own objective's. `mesh` has axes
  (AXIS, BATCH): the stitch axis is split over AXIS and every stitch's batch over BATCH.
  With a batch split, gradients are averaged over BATCH (objectives that are means over
  examples only) and evaluation sums are reduced over it.
  """
  objectives = tuple(objectives)
  points_b = tuple(model_b.point_names)
  where = Where(group.end, points_b)
  spec = group.spec
  j = group.end
  train_end = _latest(points_b, [o.train_end(points_b, j) for o in objectives])
  needed: list[str] = []
  for o in objectives:
    needed += [j] if o.closed_form else []
    needed += list(o.layers(points_b, j)) if hasattr(o, "layers") else []
  train_targets = tuple(dict.fromkeys(needed))
  eval_targets = tuple(dict.fromkeys([j] + needed))
  batch_ways = mesh.shape[BATCH]
  split = batch_ways > 1
  for o in objectives:
    if split and not o.decomposable:
      raise ValueError(f"Objective {o.name!r} with these settings is not a mean over "
                       "examples; its batch cannot be split over devices.")

  def gather(state_front, fronts):
    return jnp.stack(fronts)[state_front]

  def pick(which, values):
    if len(values) == 1:
      return values[0]
    return sum(jnp.where(which == k, v, 0.0) for k, v in enumerate(values))

  def train_local(state: StitchState, vars_b, fronts, shared, window, step):
    x = gather(state.front, fronts)
    weight = (step >= state.steps - window).astype(jnp.float32)  # the last epoch

    def one(params, xs, which):
      def loss_fn(p):
        z = maps.apply(spec, p, xs)
        outs = tail(model_b, vars_b, z, j, train_end)
        return pick(which, [o.loss(outs, shared, where) for o in objectives])
      return jax.value_and_grad(loss_fn)(params)

    loss, grads = jax.vmap(one)(state.params, x, state.objective)
    if split:
      loss, grads = jax.lax.pmean((loss, grads), BATCH)
    updates, opt = jax.vmap(tx.update)(grads, state.opt, state.params)
    new_params = jax.tree_util.tree_map(
        lambda p, u: p - state.lr.reshape((-1,) + (1,) * (p.ndim - 1)) * u,
        state.params, updates)
    active = step < state.steps
    finite = jnp.isfinite(loss) & jax.vmap(_all_finite)(new_params)
    fails = active & ~finite & ~state.diverged
    ok = active & finite & ~state.diverged
    return StitchState(
        params=_select(ok, new_params, state.params),
        opt=_select(ok, opt, state.opt),
        front=state.front, objective=state.objective, steps=state.steps, lr=state.lr,
        diverged=state.diverged | fails,
        diverged_step=jnp.where(fails, step, state.diverged_step),
        loss_sum=state.loss_sum + jnp.where(ok, weight * loss, 0.0),
        loss_weight=state.loss_weight + jnp.where(ok, weight, 0.0))

  def eval_local(acc, params, front, vars_b, fronts, shared, mask):
    x = gather(front, fronts)

    def one(p, xs):
      z = maps.apply(spec, p, xs)
      outs = tail(model_b, vars_b, z, j, LOGITS)
      t = shared["targets"][j]
      zf = z.reshape(z.shape[0], -1).astype(jnp.float32)
      tf = t.reshape(t.shape[0], -1).astype(jnp.float32)
      terms = {}
      for o in objectives:
        for k, v in o.eval_terms(outs, shared, mask, where).items():
          terms[f"{o.name}/{k}"] = v
      terms["correct"] = jnp.sum(
          mask * (jnp.argmax(outs[LOGITS], -1) == shared["label"]))
      terms["dm_num"] = jnp.sum(mask * jnp.sum(jnp.square(zf - tf), 1))
      terms["dm_den"] = jnp.sum(mask * jnp.sum(jnp.square(tf), 1))
      return terms

    sums = jax.vmap(one)(params, x)
    if split:
      sums = jax.lax.psum(sums, BATCH)
    return jax.tree_util.tree_map(jnp.add, acc, sums)

  st, rep, bt = P(AXIS), P(), P(BATCH)
  shmap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
  train = jax.jit(shmap(train_local, in_specs=(st, rep, bt, bt, rep, rep), out_specs=st),
                  donate_argnums=(0,))
  evaluate = jax.jit(shmap(eval_local, in_specs=(st, st, st, rep, bt, bt, bt),
                           out_specs=st), donate_argnums=(0,))
  return Programs(train, evaluate, train_targets, eval_targets, mesh, split)


@dataclasses.dataclass(frozen=True)
class StatsProgram:
  """Least-squares statistics of a group's stitches (rows at g's resolution)."""
  update: Callable[..., lstsq.Stats]
  mesh: Mesh
  collective: bool


def build_stats(group: Group, mesh: Mesh) -> StatsProgram:
  """Jitted accumulation of the DM normal-equation statistics for one group."""
  spec = group.spec
  split = mesh.shape[BATCH] > 1

  def stats_local(stats, front, fronts, target):
    x = jnp.stack(fronts)[front]

    def one(st, xs):
      xr, tr = lstsq.rows(maps.relayout(spec, xs)), lstsq.rows(target)
      b = lstsq.batch_stats(xr, tr)
      if split:
        b = lstsq.psum_stats(b, BATCH)
      return lstsq.merge(st, b)

    return jax.vmap(one)(stats, x)

  st, bt = P(AXIS), P(BATCH)
  update = jax.jit(jax.shard_map(stats_local, mesh=mesh, check_vma=False,
                                 in_specs=(st, st, bt, bt), out_specs=st),
                   donate_argnums=(0,))
  return StatsProgram(update, mesh, split)


def eval_terms_shape(objectives: Sequence[Objective], model_b: StagedModel, vars_b: Any,
                     group: Group, batch: int, num_classes: int,
                     target_dims: Mapping[str, tuple[int, ...]]
                     ) -> dict[str, jax.ShapeDtypeStruct]:
  """Names and shapes of one stitch's eval sums (from jax.eval_shape, no compute).

  `target_dims` gives the per-example shape of each of g's points the objectives read.
  """
  points_b = tuple(model_b.point_names)
  spec = group.spec
  where = Where(group.end, points_b)

  def f(v, p, x, t, label, teacher, mask):
    z = maps.apply(spec, p, x)
    outs = tail(model_b, v, z, group.end, LOGITS)
    shared = {"label": label, "teacher": teacher, "targets": t}
    return {f"{o.name}/{k}": val for o in objectives
            for k, val in o.eval_terms(outs, shared, mask, where).items()}

  f32 = jnp.float32
  shapes = jax.eval_shape(
      f, vars_b, maps.param_shapes(spec),
      jax.ShapeDtypeStruct((batch,) + group.src_shape, f32),
      {p: jax.ShapeDtypeStruct((batch,) + tuple(s), f32) for p, s in target_dims.items()},
      jax.ShapeDtypeStruct((batch,), jnp.int32),
      jax.ShapeDtypeStruct((batch, num_classes), f32),
      jax.ShapeDtypeStruct((batch,), f32))
  names = dict(shapes)
  for k in ("correct", "dm_num", "dm_den"):
    names[k] = jax.ShapeDtypeStruct((), f32)
  return names


def zeros_like_terms(shapes: Mapping[str, jax.ShapeDtypeStruct], size: int
                     ) -> dict[str, np.ndarray]:
  return {k: np.zeros((size,) + tuple(v.shape), np.float32) for k, v in shapes.items()}


def stats_zeros(size: int, c: int, d: int) -> lstsq.Stats:
  z = np.zeros
  return lstsq.Stats(z((size,), np.float32), z((size, c), np.float32),
                     z((size, d), np.float32), z((size, c, c), np.float32),
                     z((size, c, d), np.float32))


def mesh_for(num_devices: int | None = None) -> Mesh:
  """1-D sweep mesh over the first `num_devices` devices (all, across hosts, by default).

  Built with `jax.sharding.Mesh`, whose axes are Auto, so shard_map accepts the
  replicated donor inputs (`jax.make_mesh` would default to Explicit axes).
  """
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (AXIS,))


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds in full."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_tree(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree_util.tree_map(lambda a: put(a, sharding), tree)


def fetch(tree: Any, mesh: Mesh) -> Any:
  """Host NumPy copy of a (possibly multi-host) sharded pytree, on every process."""
  if jax.process_count() > 1:
    tree = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
  return jax.tree_util.tree_map(np.asarray, tree)


def needs_sync(mesh: Mesh) -> bool:
  """Whether to wait for each collective program before dispatching the next.

  On the CPU backend, back-to-back asynchronous executions of programs with collectives
  over several (fake) devices can starve each other's rendezvous and abort after 40 s
  (seen with jax 0.10.2 on a 2-core machine); accelerators need no such wait.
  """
  return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"
