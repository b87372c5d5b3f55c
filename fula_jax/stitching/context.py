"""A sweep's context: its donors placed on the devices, data views, shapes, batch sizes
and settings, built once by `build` and frozen; and the donor and data streams every
pass reads, as methods of it. Nothing here changes while the sweep runs: the waves and
passes (`wave`, `passes`) return what they compute.

Models enter through the model protocol (`point_names`, ``apply(variables, x, *, start,
end, capture, train)``) and data through batch sources (``len``, `name`, `image_shape`,
`train_batches`, `eval_batches`, `fingerprint`; a `fula_jax.data.Split` is one), each
process reading its own slice of every batch; nothing here assumes the zoo or a split
held in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from fula_jax import io as fio
from fula_jax import sharding
from fula_jax.errors import ConfigError
from fula_jax.models.base import LOGITS
from fula_jax.stitching import compiling, measures as measures_lib, plan as plan_lib
from fula_jax.stitching import programs as P, settings, store as store_lib

DEVICES = "devices"


@dataclasses.dataclass(frozen=True)
class View:
  """A held-out set as both models see it (same examples, same order)."""
  a: Any
  b: Any
  batch: int
  limit: int | None = None

  @property
  def n(self) -> float:
    return float(len(self.a) if self.limit is None else min(len(self.a), self.limit))

  @property
  def num_batches(self) -> int:
    return -(-int(self.n) // self.batch)

  def batches(self) -> Iterable[tuple[dict, dict]]:
    kw = dict(process_index=jax.process_index(), process_count=jax.process_count(),
              limit=self.limit)
    return zip(self.a.eval_batches(self.batch, **kw), self.b.eval_batches(self.batch, **kw))


def point_shapes(model: Any, variables: Any, image_shape: tuple[int, ...]
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """Every stitch point's (and 'logits') per-example shape, from `jax.eval_shape`."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.float32)
  logits, acts = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture=True), variables, x)
  out = {p: acts[p] for p in model.point_names}
  out[LOGITS] = logits
  return {p: jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for p, s in out.items()}


@dataclasses.dataclass(frozen=True)
class Donor:
  """One donor model as a sweep holds it: frozen variables placed on the devices, its
  stitch points, and every point's (and 'logits') per-example shape."""
  name: str
  model: Any
  variables: Any
  points: tuple[str, ...]
  shapes: Mapping[str, tuple[int, ...]]
  prefix: Mapping[str, int]  # point -> leading tokens that are no grid (ViT's CLS)


@dataclasses.dataclass(frozen=True)
class SweepContext:
  """Everything a sweep's waves and passes read, built once (`build`)."""
  science: settings.Science
  cells: settings.Cells
  execution: settings.Execution
  workdir: str | None
  a: Donor                      # the front model f
  b: Donor                      # the end model g
  mesh: Mesh
  train: Any                    # the fitting split as f sees it ...
  train_b: Any                  # ... and as g sees it
  test_views: Mapping[str, View]  # '' the test split; then the other evaluation sets
  measures: tuple[measures_lib.Measure, ...]
  batch: int
  steps_per_epoch: int
  steps: int
  eval_batch: int
  host_bn_b: Any                # g's BatchNorm averages when donor_bn='train', else None
  identity: Mapping[str, Any]   # what the unit fingerprints hold of the models and data
  keep_params: bool = False
  profile: dict | None = None   # filled with every program's FLOPs and calls

  @property
  def n_dev(self) -> int:
    return self.mesh.size

  @property
  def sync(self) -> bool:
    return sharding.needs_sync(self.mesh)

  @property
  def num_classes(self) -> int:
    return int(self.b.shapes[LOGITS][-1])

  @property
  def bn_train(self) -> bool:
    """donor_bn='train': the donors' BatchNorms by batch statistics while stitches train
    (f's and g's passes on the fitting split), and per-stitch averages of g's."""
    return self.science.donor_bn == "train"

  # -- fronts: points of the front model, or of the end model itself (`plan.SELF`)

  def front_shape(self, front: str) -> tuple[int, ...]:
    donor = self.b if plan_lib.is_self(front) else self.a
    return tuple(donor.shapes[plan_lib.point_of(front)])

  def front_prefix(self, front: str) -> int:
    donor = self.b if plan_lib.is_self(front) else self.a
    return int(donor.prefix.get(plan_lib.point_of(front), 0))

  @staticmethod
  def front_acts(out: Mapping[str, Any], fronts: Iterable[str]) -> tuple:
    """Each front's activations in a donor pass's output (`programs.donor_pass`)."""
    return tuple(out["acts_b"][plan_lib.point_of(f)] if plan_lib.is_self(f)
                 else out["acts_a"][f] for f in fronts)

  # -- settings per unit

  def needs(self, which: str) -> bool:
    """Whether an active measure needs pass `which` (`measures.PASSES`)."""
    return measures_lib.needed(self.measures, which)

  def stitch_steps(self, arm: str) -> int:
    return self.science.arm(arm).train_steps(self.steps, self.steps_per_epoch)

  def unit_context(self, u: plan_lib.Unit) -> P.UnitContext:
    mesh = sharding.grid_mesh(self.mesh.devices.flat, u.ways, (P.AXIS, P.BATCH))
    sci = self.science
    arm = sci.arm(u.arm)
    return P.UnitContext(self.b.model, self.b.points, u.end, u.end_shape,
                         u.padded_shapes, u.width, arm.objective, arm.fmap, mesh,
                         sci.adam, u.padded_prefix, u.end_prefix, sci.c2t, sci.t2c,
                         bn_train=bool(self.host_bn_b))

  def eval_context(self, ctx: P.UnitContext) -> P.UnitContext:
    """The context of `ctx`'s evaluation program: every objective of the sweep scored
    at once (`measures.Scored`), so the units of all objectives through one map and
    shapes share that program."""
    parts = tuple(dict.fromkeys(a.objective for a in self.science.arms))
    return dataclasses.replace(ctx, objective=measures_lib.Scored(parts))

  def bytes_per_stitch(self, end: str, width: int) -> int:
    """Memory of one stitch in a train step: params + Adam + activations of g's tail
    (`jax.eval_shape`; backward keeps about the residuals and their cotangents)."""
    grid = self.b.shapes[end][:-1]
    z = jax.ShapeDtypeStruct((self.batch,) + grid + (self.b.shapes[end][-1],), np.float32)
    outs = jax.eval_shape(lambda v, z: P.tail(self.b.model, v, z, end, LOGITS),
                          self.b.variables, z)
    acts = sum(int(np.prod(o.shape)) for o in jax.tree_util.tree_leaves(outs))
    acts += self.batch * int(np.prod(grid)) * width
    params = (width + 1) * self.b.shapes[end][-1]
    return 4 * (3 * acts + 4 * params)

  # -- data and donors

  def place(self, batch: Mapping[str, np.ndarray]) -> jax.Array:
    n = batch.shape[0] * jax.process_count()
    if n % self.n_dev == 0:
      return sharding.put_local(batch, sharding.split(self.mesh))
    if jax.process_count() > 1:
      raise ConfigError(f"The global batch of {n} examples does not split over the "
                        f"{self.n_dev} devices; choose batch sizes that are multiples "
                        f"of {self.n_dev}.")
    return sharding.put_local(batch, sharding.replicated(self.mesh))

  def donor_context(self, train: bool = False) -> P.DonorContext:
    """The donor pass of the fitting split (`train`) or of an evaluation."""
    return P.DonorContext(self.a.model, self.b.model, self.mesh,
                          train=train and self.bn_train)

  def donor_stream(self, pairs: Iterable[tuple[dict, dict]], train: bool = False
                   ) -> Iterable[dict]:
    ctx = self.donor_context(train)
    for a, b in pairs:
      mask = a.get("mask", np.ones(a["label"].shape, np.float32))
      yield self.call(P.donor_pass, self.a.variables, self.b.variables,
                      self.place(a["image"]), self.place(b["image"]),
                      self.place(a["label"]), self.place(np.asarray(mask, np.float32)),
                      ctx=ctx)

  def donor_args_abstract(self, batch: int) -> tuple:
    shard = (sharding.split(self.mesh) if batch % self.n_dev == 0
             else sharding.replicated(self.mesh))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
    return (self.a.variables, self.b.variables,
            sds((batch,) + self.train.image_shape, np.float32),
            sds((batch,) + self.train_b.image_shape, np.float32),
            sds((batch,), np.int32), sds((batch,), np.float32))

  def train_stream(self, num_steps: int) -> Iterable[tuple[dict, dict]]:
    kw = dict(seed=self.science.seed, num_steps=num_steps,
              process_index=jax.process_index(), process_count=jax.process_count())
    return zip(self.train.train_batches(self.batch, **kw),
               self.train_b.train_batches(self.batch, **kw))

  def eval_stream(self, name: str) -> Iterable[tuple[dict, dict]]:
    return self.test_views[name].batches()

  def end_correct(self, out: Mapping[str, jax.Array]) -> float:
    logits = np.asarray(out["logits_b"])
    return float(np.sum(np.asarray(out["mask"]) *
                        (np.argmax(logits, -1) == np.asarray(out["label"]))))

  def call(self, fn, *args, ctx) -> Any:
    if self.profile is not None:
      rec = self.profile.setdefault(compiling.profile_key(fn, args, ctx),
                                    {"flops": 0.0, "calls": 0})
      rec["calls"] += 1
    out = fn(*args, ctx=ctx)
    if self.sync and ctx.split:
      jax.block_until_ready(out)
    return out


def build(model_a, vars_a, model_b, vars_b, train, test, cfg, workdir, *, train_b,
          test_b, name_a, name_b, mesh, keep_params, profile, eval_sets) -> SweepContext:
  """The context of one sweep (see `api.run_sweep` for the arguments): settings split
  and checked, donors placed on the mesh, their shapes traced, the evaluation views
  the active measures read, every input checked against the others."""
  science, cells, ex = settings.split(cfg)
  if ex.compilation_cache not in ("", "off"):  # asked for by name
    sharding.use_compilation_cache(ex.compilation_cache)
  mesh = mesh or sharding.line_mesh(DEVICES, sharding.devices(ex.num_devices or None))
  rep = sharding.replicated(mesh)
  train_b = train_b or train
  donors = []
  for name, model, variables, split in ((name_a, model_a, vars_a, train),
                                        (name_b, model_b, vars_b, train_b)):
    host = jax.tree_util.tree_map(np.asarray, variables)
    shapes = point_shapes(model, host, split.image_shape)
    donors.append((Donor(name, model, sharding.put_tree(host, rep),
                         tuple(model.point_names),
                         {p: tuple(s.shape) for p, s in shapes.items()},
                         dict(getattr(model, "prefix_tokens", {}) or {})), host))
  (a, host_a), (b, host_b) = donors
  sources = _check_eval_sets(eval_sets)
  n_fit = int(ex.fit_gap_examples)
  measures = measures_lib.active(
      [p for p, on in ((measures_lib.PGD, science.pgd.enabled),
                       (measures_lib.OOD, ex.ood_examples > 0),
                       (measures_lib.FIT, n_fit > 0)) if on], list(sources))
  limits = {}
  if n_fit:
    sources[measures_lib.FIT] = (train, train_b)
    limits[measures_lib.FIT] = n_fit
  n_train = len(train)
  batch = min(science.batch_size, n_train)
  steps_per_epoch = max(1, n_train // batch)
  n_dev = mesh.size
  eval_batch = -(-min(ex.eval_batch_size, len(test)) // n_dev) * n_dev
  views = {"": View(test, test_b or test, eval_batch)}
  for name in measures_lib.eval_sets(measures):
    views[name] = View(*sources[name], eval_batch, limit=limits.get(name))
  _check_views(train, train_b, views)
  bn_train = science.donor_bn == "train"
  if bn_train:
    _check_train_mode(model_a, host_a, train.image_shape, "model_a")
    _check_train_mode(model_b, host_b, train_b.image_shape, "model_b")
  identity = dict(
      model_a=[name_a, type(model_a).__name__, a.points, store_lib.tree_digest(host_a)],
      model_b=[name_b, type(model_b).__name__, b.points, store_lib.tree_digest(host_b)],
      data={k: [v.a.name, v.a.fingerprint(), v.b.fingerprint()] + (
          [v.limit] if v.limit is not None else []) for k, v in views.items()},
      train=[train.name, train.fingerprint(), train_b.fingerprint()])
  return SweepContext(
      science, cells, ex, None if workdir is None else fio.resolve(workdir), a, b, mesh,
      train, train_b, views, measures, batch, steps_per_epoch,
      science.steps or max(1, science.min_steps, round(science.epochs * steps_per_epoch)),
      eval_batch, host_b.get("batch_stats") if bn_train else None, identity,
      keep_params, profile)


def _check_train_mode(model: Any, variables: Any, image_shape: tuple, role: str) -> None:
  """donor_bn='train' needs a donor whose apply runs its BatchNorms in train mode with
  Flax's mutable batch_stats (the zoo's models); a clear error for one that cannot."""
  if "batch_stats" not in variables:
    return
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.float32)
  try:
    jax.eval_shape(lambda v, x: P.capture(model, v, x, True), variables, x)
  except Exception as e:  # noqa: BLE001 (any failure: the model cannot do it)
    raise ConfigError(
        f"stitch.donor_bn='train' runs the donors' BatchNorms in train mode, which "
        f"{role} ({type(model).__name__}) cannot: {e} Use donor_bn='eval'.") from None


def _check_eval_sets(eval_sets: Mapping[str, Any] | None) -> dict[str, tuple[Any, Any]]:
  """``{name: (set, set as the end model sees it)}`` from ``{name: set}`` or
  ``{name: (set, set_b)}``; names become the measures ``accuracy@<name>``."""
  out = {}
  for name, v in (eval_sets or {}).items():
    if not name or plan_lib.safe_name(name) != name:
      raise ConfigError(f"Evaluation set names must be non-empty and use only letters, "
                        f"digits, '.', '_' or '-'; got {name!r}.")
    a, b = (v if isinstance(v, (tuple, list)) else (v, None))
    out[name] = (a, b or a)
  return out


def _check_views(train, train_b, views: Mapping[str, View]) -> None:
  pairs = [(train, train_b)] + [(v.a, v.b) for v in views.values()]
  for a, b in pairs:
    same = len(a) == len(b) and (a is b or not (
        hasattr(a, "images") and hasattr(b, "images")) or np.array_equal(a.labels, b.labels))
    if not same:
      raise ConfigError("The end model's data must hold the same examples, in the same "
                        "order, as the front model's.")
  test = views[""]
  for name, v in views.items():
    for s, ref in ((v.a, test.a), (v.b, test.b)):
      if s.image_shape != ref.image_shape:
        raise ConfigError(f"Evaluation set {name!r} has images of shape {s.image_shape}; "
                          f"the test split's are {ref.image_shape}.")

