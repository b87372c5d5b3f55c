"""A unit's stitch parameters as stacks: every leaf has the stitch axis first, and the
leaves that read the front's features (:data:`.ladder.IN_AXIS`) are padded with zero
rows to the unit's widest front. Here are their initial values (random per cell, or a
closed form written in) and one stitch's own slice of them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from fula_jax.stitching import ladder, maps


def random_init(c_ins: Sequence[int], c_out: int, width: int, seed: int,
                salts: Sequence[int], learned_prefix: int = 0) -> dict[str, np.ndarray]:
  """Stacked fan-in inits (LeCun normal: a normal truncated at two standard deviations,
  rescaled to variance 1 / fan_in; zero bias), rows beyond each front's width zero.

  Stitch s draws from ``np.random.default_rng([seed, salts[s]])`` whatever else is
  stacked with it, so an init depends on its cell alone, not on grouping or devices.
  Learned prefix tokens (`learned_prefix` rows of 'cls') start at zero.
  """
  kernels = np.zeros((len(salts), width, c_out), np.float32)
  for k, (c_in, salt) in enumerate(zip(c_ins, salts)):
    std = np.sqrt(1.0 / c_in) / 0.87962566103423978  # std of N(0,1) cut at +-2
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, int(salt)])
    draw = rng.standard_normal((c_in, c_out))
    bad = np.abs(draw) > 2.0
    while bad.any():
      draw[bad] = rng.standard_normal(int(bad.sum()))
      bad = np.abs(draw) > 2.0
    kernels[k, :c_in] = draw * std
  out = {"kernel": kernels, "bias": np.zeros((len(salts), c_out), np.float32)}
  if learned_prefix:  # learned class tokens start at zero
    out["cls"] = np.zeros((len(salts), learned_prefix, c_out), np.float32)
  return out


def init_params(form: str, options: Mapping[str, Any], c_ins: Sequence[int], c_out: int,
                width: int, seed: int, salts: Sequence[int], learned_prefix: int = 0
                ) -> dict[str, np.ndarray]:
  """Stacked random initial parameters of map `form` (:func:`random_init` for the
  affine map), input rows beyond each front's width zero; stitch s draws from
  ``fold_in(PRNGKey(seed), salts[s])`` alone. Fronts without a width (`c_ins` shorter
  than `salts`) get zeros of the right shapes."""
  if form == "affine":
    return random_init(c_ins, c_out, width, seed, salts, learned_prefix)
  shapes = jax.eval_shape(lambda k: ladder.init(form, k, width, c_out, options),
                          jax.random.PRNGKey(0))
  out = {k: np.zeros((len(salts),) + v.shape, np.float32) for k, v in shapes.items()}
  for s, (c_in, salt) in enumerate(zip(c_ins, salts)):
    key = jax.random.fold_in(jax.random.PRNGKey(int(seed) & 0x7FFFFFFF), int(salt))
    place(out, s, ladder.init(form, key, c_in, c_out, options))
  if learned_prefix:
    out["cls"] = np.zeros((len(salts), learned_prefix, c_out), np.float32)
  return out


def place(stack: dict[str, np.ndarray], s: int, params: Mapping[str, Any]) -> None:
  """Write one stitch's parameters into row `s` of a padded stack, zero beyond its own
  extent on every axis: input rows past its front's width, and an mlp's hidden units
  past its own hidden width (zero in and out weights: they add nothing and, with ReLU's
  zero gradient at zero, stay zero)."""
  for k, v in params.items():
    v = np.asarray(v, np.float32)
    stack[k][s] = 0.0
    stack[k][(s,) + tuple(slice(0, n) for n in v.shape)] = v


def own_params(p: Mapping[str, jax.Array], spec: maps.MapSpec) -> dict[str, jax.Array]:
  """One stitch's map out of its padded parameters: the input rows of its front's
  features, and the learned prefix tokens it uses."""
  c = spec.in_features
  out = {k: v[..., :c, :] if k in ladder.IN_ROWS else v[..., :c] if k in ladder.IN_AXIS
         else v for k, v in p.items() if k != "cls"}
  if spec.learned_prefix:
    out["cls"] = p["cls"][..., :spec.learned_prefix, :]
  return out


def stitch_params(params: dict[str, jax.Array], index: Any, spec: maps.MapSpec
                  ) -> dict[str, jax.Array]:
  """The maps of stitches `index` out of the padded stack (see :func:`own_params`)."""
  return own_params({k: v[index] for k, v in params.items()}, spec)
