"""PGD on stitched models, inside the engine: one program per unit attacks every
stitched model of the unit on a batch, split over the devices like the unit's training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fula_jax import attacks
from fula_jax.stitching import maps
from fula_jax.stitching.programs import BATCH, UnitContext, on_mesh, with_bn
from fula_jax.stitching.stacks import own_params


@dataclasses.dataclass(frozen=True)
class PGDContext:
  """A unit's stitched models under attack: f to the deepest front, the front chosen
  per stitch, the stitch, g to the logits (`unit` without its objective, which the
  stitched model does not depend on)."""
  unit: UnitContext
  model_a: Any
  points: tuple[str, ...]          # the unit's distinct front points, in f's order
  point_shapes: tuple[tuple[int, ...], ...]
  norm: str
  steps: int
  random_start: bool
  point_prefix: tuple[int, ...] = ()

  @property
  def split(self) -> bool:
    return self.unit.split


@functools.partial(jax.jit, static_argnames=("ctx",))
def pgd_correct(params, bn, which, keys, vars_a, vars_b, x, y, mask, offset, eps,
                step_size, *, ctx: PGDContext) -> jax.Array:
  """Correct answers of each stitched model on PGD examples of one batch, (S,); `bn`:
  the stitches' own BatchNorm averages of g (donor_bn='train'), or {}.

  Stitch s attacks its own model (front point ``ctx.points[which[s]]``) from a random
  start drawn example by example from ``fold_in(keys[s], offset + e)``, so the numbers
  do not depend on how examples are split over devices. Stitches are processed one
  after another (`lax.map`) inside the program, each picking its front with
  `lax.switch`: under `vmap` every stitch would compute every front.
  """
  u = ctx.unit
  deepest = ctx.points[-1]
  specs = [maps.plan("front", s, "end", u.end_shape, src_prefix=p, dst_prefix=u.end_prefix,
                     c2t=u.c2t, t2c=u.t2c)
           for s, p in zip(ctx.point_shapes, ctx.point_prefix or (0,) * len(ctx.points))]

  def local(params, bn, which, keys, vars_a, vars_b, x, y, mask, offset, eps, step_size):
    shard = jax.lax.axis_index(BATCH) if u.split else 0
    index = offset + shard * x.shape[0] + jnp.arange(x.shape[0])

    def logits_of(p, k, bs, images):
      acts = ctx.model_a.apply(vars_a, images, end=deepest, train=False,
                               capture=True)[1]
      branches = [functools.partial(_stitched_front, spec=spec, point=pt, p=p,
                                    form=u.form)
                  for spec, pt in zip(specs, ctx.points)]
      z = jax.lax.switch(k, branches, acts)
      return u.model_b.apply(with_bn(vars_b, bs), z, start=u.end, train=False)

    def one(args):
      p, k, key, bs = args
      fn = functools.partial(logits_of, p, k, bs)
      start = (attacks.random_starts(key, x, eps, ctx.norm, index)
               if ctx.random_start else None)
      adv = attacks.pgd(fn, x, y, None, eps=eps, step_size=step_size, steps=ctx.steps,
                        norm=ctx.norm, random_start=False, start=start)
      return jnp.sum(mask * (jnp.argmax(fn(adv), -1) == y))

    correct = jax.lax.map(one, (params, which, keys, bn))
    return jax.lax.psum(correct, BATCH) if u.split else correct

  rep, bt = P(), P(BATCH)
  return on_mesh(local, u, (rep, rep, rep, rep, rep, rep, bt, bt, bt, rep, rep, rep), rep)(
      params, bn, which, keys, vars_a, vars_b, x, y, mask, offset, eps, step_size)


def _stitched_front(acts, *, spec, point, p, form):
  return maps.apply(spec, own_params(p, spec), acts[point], form)
