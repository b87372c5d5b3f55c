"""A sweep's run state: donors placed on the devices, data views, settings, the store,
and what the waves call (donor passes, PGD) and count (programs compiled).

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

from fula_jax import io as fio
from fula_jax import sharding
from fula_jax.errors import ConfigError
from fula_jax.models.base import LOGITS
from fula_jax.progress import Progress
from fula_jax.stitching import plan as plan_lib, programs as P, settings
from fula_jax.stitching import measures as measures_lib, pgd as pgd_lib, store as store_lib
from fula_jax.stitching import ood as ood_lib

DEVICES = "devices"


@dataclasses.dataclass
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


class Sweep:
  """One sweep run: donors, data, settings, the store; see `run_sweep`."""

  def __init__(self, model_a, vars_a, model_b, vars_b, train, test, cfg, workdir, *,
               train_b, test_b, name_a, name_b, mesh, keep_params, profile, eval_sets):
    self.science, self.cells, self.execution = settings.split(cfg)
    ex, sci = self.execution, self.science
    self.workdir = None if workdir is None else fio.resolve(workdir)
    if ex.compilation_cache not in ("", "off"):  # asked for by name
      sharding.use_compilation_cache(ex.compilation_cache)
    self.model_a, self.model_b = model_a, model_b
    self.mesh = mesh or sharding.line_mesh(DEVICES, sharding.devices(ex.num_devices or None))
    self.n_dev = self.mesh.size
    self.sync = sharding.needs_sync(self.mesh)
    rep = sharding.replicated(self.mesh)
    host_a = jax.tree_util.tree_map(np.asarray, vars_a)
    host_b = jax.tree_util.tree_map(np.asarray, vars_b)
    self.vars_a, self.vars_b = sharding.put_tree(host_a, rep), sharding.put_tree(host_b, rep)
    self.points_a, self.points_b = tuple(model_a.point_names), tuple(model_b.point_names)
    self.train, self.train_b = train, train_b or train
    self.eval_sets = _check_eval_sets(eval_sets)
    n_fit = int(ex.fit_gap_examples)
    if n_fit:
      if measures_lib.FIT in self.eval_sets:
        raise ConfigError(f"The evaluation set name {measures_lib.FIT!r} is the fitting "
                          "split's when fit_gap_examples > 0; give yours another name.")
      self.eval_sets[measures_lib.FIT] = (train, train_b or train)
    self.prefix_a = dict(getattr(model_a, "prefix_tokens", {}) or {})
    self.prefix_b = dict(getattr(model_b, "prefix_tokens", {}) or {})
    self.shapes_a = {p: tuple(s.shape) for p, s in
                     point_shapes(model_a, host_a, train.image_shape).items()}
    self.shapes_b = {p: tuple(s.shape) for p, s in
                     point_shapes(model_b, host_b, self.train_b.image_shape).items()}
    self.num_classes = int(self.shapes_b[LOGITS][-1])
    n_train = len(train)
    self.batch = min(sci.batch_size, n_train)
    self.steps_per_epoch = max(1, n_train // self.batch)
    self.steps = sci.steps or max(1, sci.min_steps,
                                  round(sci.epochs * self.steps_per_epoch))
    n_test = len(test)
    self.eval_batch = -(-min(ex.eval_batch_size, n_test) // self.n_dev) * self.n_dev
    self.test_views = {"": View(test, test_b or test, self.eval_batch)}
    for name, (a, b) in self.eval_sets.items():
      self.test_views[name] = View(a, b, self.eval_batch,
                                   limit=n_fit if name == measures_lib.FIT else None)
    _check_views(self.train, self.train_b, self.test_views)
    self.measures = measures_lib.active(
        [p for p, on in ((measures_lib.PGD, sci.pgd.enabled),
                         (measures_lib.OOD, ex.ood_examples > 0)) if on])
    self._ood: dict[str, dict[str, jax.Array]] | None = None
    self.donor_ctx = P.DonorContext(model_a, model_b, self.mesh)
    # donor_bn='train': the donors' BatchNorms by batch statistics while stitches train
    # (f's and g's passes on the fitting split), and per-stitch averages of g's.
    self.bn_train = sci.donor_bn == "train"
    self.host_bn_b = host_b.get("batch_stats") if self.bn_train else None
    if self.bn_train:
      _check_train_mode(model_a, host_a, train.image_shape, "model_a")
      _check_train_mode(model_b, host_b, self.train_b.image_shape, "model_b")
    self.store = store_lib.Store(self.workdir, sci, dict(
        model_a=[name_a, type(model_a).__name__, self.points_a,
                 store_lib.tree_digest(host_a)],
        model_b=[name_b, type(model_b).__name__, self.points_b,
                 store_lib.tree_digest(host_b)],
        data={k: [v.a.name, v.a.fingerprint(), v.b.fingerprint()] + (
            [v.limit] if v.limit is not None else []) for k, v in self.test_views.items()},
        train=[train.name, train.fingerprint(), self.train_b.fingerprint()],
        **({"ood": [ex.ood_examples, ex.ood_quantile, ex.ood_ridge]}
           if ex.ood_examples else {})))
    self.keep_params, self.profile = keep_params, profile
    self._bytes: dict[tuple[str, int], int] = {}

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
    return P.UnitContext(self.model_b, self.points_b, u.end, u.end_shape,
                         u.padded_shapes, u.width, arm.objective, arm.fmap, mesh,
                         sci.adam, u.padded_prefix, u.end_prefix, sci.c2t, sci.t2c,
                         bn_train=bool(self.host_bn_b))

  def bytes_per_stitch(self, end: str, width: int) -> int:
    """Memory of one stitch in a train step: params + Adam + activations of g's tail
    (`jax.eval_shape`; backward keeps about the residuals and their cotangents)."""
    key = (end, width)
    if key not in self._bytes:
      grid = self.shapes_b[end][:-1]
      z = jax.ShapeDtypeStruct((self.batch,) + grid + (self.shapes_b[end][-1],), np.float32)
      outs = jax.eval_shape(lambda v, z: P.tail(self.model_b, v, z, end, LOGITS),
                            self.vars_b, z)
      acts = sum(int(np.prod(o.shape)) for o in jax.tree_util.tree_leaves(outs))
      acts += self.batch * int(np.prod(grid)) * width
      params = (width + 1) * self.shapes_b[end][-1]
      self._bytes[key] = 4 * (3 * acts + 4 * params)
    return self._bytes[key]

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
    return dataclasses.replace(self.donor_ctx, train=train and self.bn_train)

  def donor_stream(self, pairs: Iterable[tuple[dict, dict]], train: bool = False
                   ) -> Iterable[dict]:
    ctx = self.donor_context(train)
    for a, b in pairs:
      mask = a.get("mask", np.ones(a["label"].shape, np.float32))
      yield self.call(P.donor_pass, self.vars_a, self.vars_b, self.place(a["image"]),
                      self.place(b["image"]), self.place(a["label"]),
                      self.place(np.asarray(mask, np.float32)), ctx=ctx)

  def donor_args_abstract(self, batch: int) -> tuple:
    shard = (sharding.split(self.mesh) if batch % self.n_dev == 0
             else sharding.replicated(self.mesh))
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
    return (self.vars_a, self.vars_b,
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

  def ood_reference(self) -> dict[str, dict[str, jax.Array]] | None:
    """g's own reference for the OOD scores (None when they are off), from the first
    `ood_examples` examples of the fitting split: the `ood_quantile` of its energies, and
    per stitch point of g the mean and precision of a Gaussian of its channel vectors.
    Replicated over the mesh, as the warm-up declares it: host arrays would make every
    evaluation program compile a second time, for uncommitted inputs."""
    ex = self.execution
    if not self.needs(measures_lib.OOD) or self._ood is not None:
      return self._ood
    view = View(self.train, self.train_b, self.eval_batch, limit=ex.ood_examples)
    gauss = {p: ood_lib.gaussian_zeros(self.shapes_b[p][-1]) for p in self.points_b}
    energies = []
    for out in self.donor_stream(view.batches()):
      real = np.asarray(out["mask"]) > 0
      energies.append(np.asarray(ood_lib.energy(out["logits_b"]))[real])
      gauss = _gaussians(gauss, {p: out["acts_b"][p] for p in gauss}, out["mask"])
    threshold = np.float32(np.quantile(np.concatenate(energies), ex.ood_quantile))
    ood = {}
    for p, g in gauss.items():
      mean, prec = ood_lib.precision_matrix(g, ex.ood_ridge)
      ood[p] = {"threshold": threshold, "mean": np.asarray(mean, np.float32),
                "prec": np.asarray(prec, np.float32)}
    self._ood = sharding.put_tree(ood, sharding.replicated(self.mesh))
    return self._ood

  def end_correct(self, out: Mapping[str, jax.Array]) -> float:
    logits = np.asarray(out["logits_b"])
    return float(np.sum(np.asarray(out["mask"]) *
                        (np.argmax(logits, -1) == np.asarray(out["label"]))))

  def call(self, fn, *args, ctx) -> Any:
    if self.profile is not None:
      rec = self.profile.setdefault((fn.__name__, ctx), {"flops": 0.0, "calls": 0})
      rec["calls"] += 1
    out = fn(*args, ctx=ctx)
    if self.sync and ctx.split:
      jax.block_until_ready(out)
    return out

  # -- PGD on the stitched models

  def pgd_context(self, u: plan_lib.Unit, ctx: P.UnitContext) -> pgd_lib.PGDContext:
    points = tuple(p for p in self.points_a if p in u.fronts)
    pgd = self.science.pgd
    # The stitched model does not depend on the objective that trained it, so the units
    # of every objective share one PGD program.
    unit = dataclasses.replace(ctx, objective=None)
    return pgd_lib.PGDContext(unit, self.model_a, points,
                              tuple(self.shapes_a[p] for p in points), pgd.norm,
                              pgd.steps, pgd.random_start,
                              tuple(self.prefix_a.get(p, 0) for p in points))

  def _pgd_static(self, u: plan_lib.Unit, unit_ctx: P.UnitContext):
    ctx = self.pgd_context(u, unit_ctx)
    which = np.array([ctx.points.index(f) for f in u.padded_fronts], np.int32)
    base = [plan_lib.cell_rng(self.science.seed + 1, f, u.end) for f in u.padded_fronts]
    return ctx, which, base

  def pgd_args_abstract(self, u: plan_lib.Unit, ctx: P.UnitContext, params: Any,
                        bn: Any) -> tuple:
    view = self.test_views[""]
    shard = sharding.split(self.mesh)
    b = self.eval_batch
    sds = lambda shape, dtype, s=shard: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    scalar = jax.ShapeDtypeStruct((), np.float32)
    stitches = P.stitch_sharding(ctx.mesh)
    return (params, bn, sds((u.size,), np.int32, stitches),
            sds((u.size, 2), np.uint32, stitches), self.vars_a, self.vars_b,
            sds((b,) + view.a.image_shape, np.float32), sds((b,), np.int32),
            sds((b,), np.float32), jax.ShapeDtypeStruct((), np.int32), scalar, scalar)

  def pgd(self, u: plan_lib.Unit, unit_ctx: P.UnitContext, state: P.StitchState
          ) -> np.ndarray:
    """Accuracy of each stitched model of unit `u` (trained to `state`) under PGD on
    the first test examples."""
    pgd = self.science.pgd
    view = View(self.test_views[""].a, self.test_views[""].a, self.eval_batch,
                pgd.num_examples)
    ctx, which, base = self._pgd_static(u, unit_ctx)
    stitches = P.stitch_sharding(unit_ctx.mesh)
    which = sharding.put(which, stitches)
    correct = np.zeros((u.size,))
    bar = Progress(f"stitch PGD ({u.arm} -> {u.end})", view.num_batches,
                   unit="batch", every_s=self.execution.progress_every_s,
                   enabled=self.execution.progress and jax.process_index() == 0)
    for b, (batch, _) in enumerate(view.batches()):
      keys = np.stack([np.asarray(jax.random.fold_in(k, b)) for k in base])
      mask = batch.get("mask", np.ones(batch["label"].shape, np.float32))
      out = self.call(pgd_lib.pgd_correct, state.params, state.bn, which,
                      sharding.put(keys.astype(np.uint32), stitches), self.vars_a,
                      self.vars_b, self.place(batch["image"]), self.place(batch["label"]),
                      self.place(np.asarray(mask, np.float32)), np.int32(b * self.eval_batch),
                      np.float32(pgd.eps), np.float32(pgd.step_size), ctx=ctx)
      correct += sharding.fetch(out)
      bar.update(b + 1)
    return correct / view.n


@jax.jit
def _gaussians(gauss, acts, mask):
  return {p: ood_lib.gaussian_update(g, acts[p], mask) for p, g in gauss.items()}


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

