"""The passes a sweep runs beyond training and evaluation, as functions of its frozen
context (`context.SweepContext`): the end model's OOD reference and the PGD attack on
every stitched model. A pass runs only when an active measure needs it
(`measures.Measure.needs`), and its settings join the sweep's fingerprint
(`fingerprint`) only then.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fula_jax import sharding
from fula_jax.progress import Progress
from fula_jax.stitching import measures as measures_lib, ood as ood_lib, pgd as pgd_lib
from fula_jax.stitching import plan as plan_lib, programs as P
from fula_jax.stitching.context import SweepContext, View

Reference = dict[str, dict[str, jax.Array]]  # g's point -> threshold, mean, prec
OOD, PGD = measures_lib.OOD, measures_lib.PGD


def fingerprint(sw: SweepContext) -> dict[str, Any]:
  """The settings of the passes `sw` runs that change its results and are not part of
  its science: they join the fingerprint of every unit it writes."""
  ex = sw.execution
  if sw.needs(OOD):
    return {"ood": [ex.ood_examples, ex.ood_quantile, ex.ood_ridge]}
  return {}


def ood_reference(sw: SweepContext) -> Reference | None:
  """g's own reference for the OOD scores (None when they are off), from the first
  `ood_examples` examples of the fitting split: the `ood_quantile` of its energies, and
  per stitch point of g the mean and precision of a Gaussian of its channel vectors.
  Replicated over the mesh, as the warm-up declares it: host arrays would make every
  evaluation program compile a second time, for uncommitted inputs."""
  ex = sw.execution
  if not sw.needs(OOD):
    return None
  view = View(sw.train, sw.train_b, sw.eval_batch, limit=ex.ood_examples)
  gauss = {p: ood_lib.gaussian_zeros(sw.b.shapes[p][-1]) for p in sw.b.points}
  energies = []
  for out in sw.donor_stream(view.batches()):
    real = np.asarray(out["mask"]) > 0
    energies.append(np.asarray(ood_lib.energy(out["logits_b"]))[real])
    gauss = _gaussians(gauss, {p: out["acts_b"][p] for p in gauss}, out["mask"])
  threshold = np.float32(np.quantile(np.concatenate(energies), ex.ood_quantile))
  ood = {}
  for p, g in gauss.items():
    mean, prec = ood_lib.precision_matrix(g, ex.ood_ridge)
    ood[p] = {"threshold": threshold, "mean": np.asarray(mean, np.float32),
              "prec": np.asarray(prec, np.float32)}
  return sharding.put_tree(ood, sharding.replicated(sw.mesh))


@jax.jit
def _gaussians(gauss, acts, mask):
  return {p: ood_lib.gaussian_update(g, acts[p], mask) for p, g in gauss.items()}


def attacked(u: plan_lib.Unit) -> list[int]:
  """The (padded) stitches of `u` that PGD attacks: all but the end model's
  self-stitches, the baselines, of which only the clean accuracy is read."""
  return [s for s, f in enumerate(u.padded_fronts) if not plan_lib.is_self(f)]


def pgd_context(sw: SweepContext, u: plan_lib.Unit, ctx: P.UnitContext
                ) -> pgd_lib.PGDContext:
  points = tuple(p for p in sw.a.points if p in u.fronts)
  pgd = sw.science.pgd
  # The stitched model does not depend on the objective that trained it, so the units
  # of every objective share one PGD program.
  slots = attacked(u)
  unit = dataclasses.replace(
      ctx, objective=None, front_shapes=tuple(ctx.front_shapes[s] for s in slots),
      front_prefix=tuple(ctx.front_prefix[s] for s in slots) if ctx.front_prefix else ())
  return pgd_lib.PGDContext(unit, sw.a.model, points,
                            tuple(sw.a.shapes[p] for p in points), pgd.norm,
                            pgd.steps, pgd.random_start,
                            tuple(sw.a.prefix.get(p, 0) for p in points))


def pgd_args_abstract(sw: SweepContext, u: plan_lib.Unit, ctx: P.UnitContext,
                      params: Any, bn: Any) -> tuple:
  """`pgd_correct`'s arguments as abstract arrays, for the warm-up (`params` and `bn`
  those of the whole unit)."""
  view = sw.test_views[""]
  shard = sharding.split(sw.mesh)
  b = sw.eval_batch
  sds = lambda shape, dtype, s=shard: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  scalar = jax.ShapeDtypeStruct((), np.float32)
  stitches = P.stitch_sharding(ctx.mesh)
  n = len(attacked(u))
  params, bn = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct((n,) + a.shape[1:], a.dtype, sharding=a.sharding),
      (params, bn))
  return (params, bn, sds((n,), np.int32, stitches),
          sds((n, 2), np.uint32, stitches), sw.a.variables, sw.b.variables,
          sds((b,) + view.a.image_shape, np.float32), sds((b,), np.int32),
          sds((b,), np.float32), jax.ShapeDtypeStruct((), np.int32), scalar, scalar)


def pgd_accuracy(sw: SweepContext, u: plan_lib.Unit, unit_ctx: P.UnitContext,
                 state: P.StitchState) -> np.ndarray:
  """Accuracy of each stitched model of unit `u` (trained to `state`) under PGD on
  the first test examples; NaN for the end model's self-stitches (not attacked)."""
  slots = attacked(u)
  out = np.full((u.size,), np.nan)
  if not slots:
    return out
  pgd = sw.science.pgd
  view = View(sw.test_views[""].a, sw.test_views[""].a, sw.eval_batch, pgd.num_examples)
  ctx = pgd_context(sw, u, unit_ctx)
  fronts = [u.padded_fronts[s] for s in slots]
  which = np.array([ctx.points.index(f) for f in fronts], np.int32)
  base = [plan_lib.cell_rng(sw.science.seed + 1, f, u.end) for f in fronts]
  stitches = P.stitch_sharding(unit_ctx.mesh)
  which = sharding.put(which, stitches)
  params, bn = state.params, state.bn
  if len(slots) < u.size:  # on the host: a gather on the devices would compile late
    params, bn = sharding.put_tree(
        jax.tree_util.tree_map(lambda a: a[slots], sharding.fetch((params, bn))), stitches)
  correct = np.zeros((len(slots),))
  bar = Progress(f"stitch PGD ({u.arm} -> {u.end})", view.num_batches,
                 unit="batch", every_s=sw.execution.progress_every_s,
                 enabled=sw.execution.progress and jax.process_index() == 0)
  for b, (batch, _) in enumerate(view.batches()):
    keys = np.stack([np.asarray(jax.random.fold_in(k, b)) for k in base])
    mask = batch.get("mask", np.ones(batch["label"].shape, np.float32))
    hits = sw.call(pgd_lib.pgd_correct, params, bn, which,
                   sharding.put(keys.astype(np.uint32), stitches), sw.a.variables,
                   sw.b.variables, sw.place(batch["image"]), sw.place(batch["label"]),
                   sw.place(np.asarray(mask, np.float32)), np.int32(b * sw.eval_batch),
                   np.float32(pgd.eps), np.float32(pgd.step_size), ctx=ctx)
    correct += sharding.fetch(hits)
    bar.update(b + 1)
  out[slots] = correct / view.n
  return out
