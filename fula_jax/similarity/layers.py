"""The layer-by-layer engine: every requested measure between every point of model A
and every point of model B (or A with itself), from one pass over batches.

  from fula_jax.similarity import layers
  mats = layers.matrices(model_a, vars_a, model_b, vars_b, batches,
                         ("cka_linear_debiased", "procrustes"),
                         points=layers.Points(a=["block1", "block3"]),
                         estimator=layers.Estimator(linear_cka="exact"),
                         uncertainty=layers.Uncertainty(permutations=200))

Per batch, one jitted pass of each model captures every requested point. Linear CKA
(biased and/or debiased) is accumulated by the streaming engine (:mod:`minibatch`:
minibatch CKA, or the exact feature-space estimator); the other measures are computed
at the end on the first `Estimator.max_examples` real examples, kept on the host, and
so are the permutation nulls and bootstrap intervals of `Uncertainty`. With a mesh the
batch axis is sharded over its devices (and hosts).

`fula_jax.similarity.matrices` is the same call on images, a split or batches; the
similarity job (:mod:`job`) runs it on trained workdirs.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import errors
from fula_jax import progress as progress_lib
from fula_jax import registry
from fula_jax import results
from fula_jax import sharding
from fula_jax.similarity import checks
from fula_jax.similarity import measures as measures_lib
from fula_jax.similarity import minibatch

ESTIMATORS = ("minibatch", "exact")


@dataclasses.dataclass(frozen=True)
class Points:
  """Which points to compare: names of the model's stitch points (and/or 'logits');
  None takes every point. `b` None within one model is `a`."""
  a: Sequence[str] | None = None
  b: Sequence[str] | None = None


@dataclasses.dataclass(frozen=True)
class Estimator:
  """How the values are estimated.

  linear_cka: 'minibatch' (Nguyen et al. 2021; streams every batch, any width) or
    'exact' (full-dataset feature-space linear CKA; memory (sum d_a) x (sum d_b),
    refused above `exact_max_bytes`).
  shard_mode: with a mesh, 'global' (the sharded result equals one device's) or
    'local' (each device's shard is its own minibatch); see :mod:`minibatch`.
  max_examples: the first this many real examples feed every measure that is not
    streamed (RBF CKA, Procrustes, the CCA family, neighbours, RSA, ...) and the
    uncertainty.
  rbf_sigma_frac, svcca_keep: the options of RBF CKA and SVCCA.
  """
  linear_cka: str = "minibatch"
  shard_mode: str = "global"
  max_examples: int = 2000
  exact_max_bytes: int = 4 << 30
  rbf_sigma_frac: float = 1.0
  svcca_keep: float | int = 0.99

  def __post_init__(self):
    registry.lookup("similarity estimator", self.linear_cka, dict.fromkeys(ESTIMATORS))


@dataclasses.dataclass(frozen=True)
class Uncertainty:
  """What each value is judged against, on the kept examples with PRNG key `seed`.

  permutations: shuffles per cell for a null-calibrated matrix of each measure,
    ``<measure>_calibrated`` (0: none); see :mod:`calibration`.
  resamples: bootstrap resamples per cell for a percentile interval at `level` on
    each matrix (0: none); see :mod:`intervals`.
  """
  permutations: int = 0
  resamples: int = 0
  level: float = 0.9
  seed: int = 0


# The flat keywords `matrices` also takes (the similarity job's config names), and the
# typed value and field each one sets.
FLAT = {"points_a": ("points", "a"), "points_b": ("points", "b"),
        "estimator": ("estimator", "linear_cka"), "shard_mode": ("estimator", "shard_mode"),
        "max_examples": ("estimator", "max_examples"),
        "exact_max_bytes": ("estimator", "exact_max_bytes"),
        "sigma_frac": ("estimator", "rbf_sigma_frac"),
        "svcca_keep": ("estimator", "svcca_keep"),
        "calibrate": ("uncertainty", "permutations"),
        "bootstrap": ("uncertainty", "resamples"),
        "interval_level": ("uncertainty", "level"), "seed": ("uncertainty", "seed")}
_TYPES = {"points": Points, "estimator": Estimator, "uncertainty": Uncertainty}


def options(points: Points | None = None, estimator: Estimator | str | None = None,
            uncertainty: Uncertainty | None = None, **flat: Any) -> dict[str, Any]:
  """{'points', 'estimator', 'uncertainty'} as typed values, from typed values and/or
  the flat keywords of :data:`FLAT` (``points_a=[...]``, ``estimator='exact'``,
  ``calibrate=200``, ...); a flat keyword overrides the field it names."""
  if isinstance(estimator, str):
    flat["estimator"], estimator = estimator, None
  given = {"points": points, "estimator": estimator, "uncertainty": uncertainty}
  fields: dict[str, dict[str, Any]] = {k: {} for k in _TYPES}
  for key, value in flat.items():
    group, field = registry.lookup(
        "option of similarity matrices", key, FLAT,
        "or the typed values points=Points(...), estimator=Estimator(...), "
        "uncertainty=Uncertainty(...), and mesh, progress, left_out")
    fields[group][field] = value
  return {group: dataclasses.replace(given[group] or cls(), **fields[group])
          for group, cls in _TYPES.items()}


def _capture(model, points: tuple[str, ...], variables, images):
  from fula_jax import models
  logits, acts = models.capture(model, variables, images)
  acts = {**acts, models.LOGITS: logits}
  return [acts[p] for p in points]


_capture_jit = jax.jit(_capture, static_argnums=(0, 1))


def capture_fn(model, points: Sequence[str]):
  """A jitted ``(variables, images) -> [activation at each point]`` of `model`.

  Equal models (two seeds of one architecture, or one model on both sides) share one
  compiled program: a hashable model is a static argument of one jitted function."""
  points = tuple(points)
  try:
    hash(model)
  except TypeError:  # an unhashable model: a program of its own
    return jax.jit(functools.partial(_capture, model, points))
  return functools.partial(_capture_jit, model, points)


def _points(model, points: Sequence[str] | None) -> list[str]:
  from fula_jax import models
  if points is None:
    return list(model.point_names)
  return models.base.check_points(model, points, extra=(models.LOGITS,))


def _place(mesh, axis: str | None, arr: np.ndarray) -> jax.Array:
  if mesh is None:
    return jnp.asarray(arr)
  return sharding.put_local(arr, sharding.split(mesh, axis))


def _check_exact_size(acts_a, acts_b, rows, cols, limit: int) -> None:
  dims_a = [int(np.prod(a.shape[1:])) for a in acts_a]
  dims_b = [int(np.prod(b.shape[1:])) for b in acts_b]
  need = 4 * (sum(dims_a) * sum(dims_b) + sum(d * d for d in dims_a + dims_b))
  if need > limit:
    widest = sorted(zip(dims_a + dims_b, rows + cols), reverse=True)[:3]
    raise errors.ConfigError(
        f"The exact estimator would hold {need / 2**30:.1f} GiB of statistics (widest "
        f"layers: {', '.join(f'{n}={d}' for d, n in widest)}); use "
        "estimator='minibatch', fewer points, or raise exact_max_bytes.")


def _measure_options(name: str, est: Estimator) -> dict:
  m = measures_lib.get(name)
  opts = {}
  if "sigma_frac" in m.defaults:
    opts["sigma_frac"] = est.rbf_sigma_frac
  if "keep" in m.defaults:
    opts["keep"] = est.svcca_keep
  return opts


def _into_regime(m: measures_lib.Measure, n: int, dims: Mapping[str, int],
                 opts: dict) -> tuple[dict, dict, str]:
  """(options to add, metadata saying so, '') that keep measure `m` inside its declared
  valid regime at n examples for every layer, or ({}, {}, why) when nothing does."""
  bad = m.invalid_layers(n, dims, **opts)
  if not bad:
    return {}, {}, ""
  layer, why = next(iter(bad.items()))
  if m.reduce_for is not None:
    extra = m.reduce_for(n)
    if not m.invalid_layers(n, dims, **opts, **extra):
      return extra, {"regime": f"reduced to {extra} at n = {n}: as computed by default, "
                               f"layer {layer} had {why}"}, ""
  return {}, {}, f"left out: layer {layer}: {why}"


def _describe(m: measures_lib.Measure) -> dict:
  return dict(kind=m.kind, symmetric=m.symmetric, invariances=sorted(m.invariances),
              ideal=m.ideal, value_range=m.value_range, description=m.description)


def matrices(
    model_a, vars_a: Mapping[str, Any], model_b=None, vars_b: Mapping[str, Any] | None = None,
    batches: Iterable[Mapping[str, np.ndarray]] | None = None,
    measures: Sequence[str] = ("cka_linear_debiased",), *,
    points: Points | None = None, estimator: Estimator | str | None = None,
    uncertainty: Uncertainty | None = None, mesh: jax.sharding.Mesh | None = None,
    model_a_name: str = "model_a", model_b_name: str | None = None,
    num_batches: int | None = None, progress: bool = True,
    progress_every_s: float = 10.0, left_out: dict[str, str] | None = None,
    **flat: Any) -> list[results.Matrix]:
  """Every requested measure as an ``L_A x L_B`` :class:`results.Matrix`.

  Args:
    model_a, vars_a: front model (rows) and its variables.
    model_b, vars_b: end model (columns); None compares model A with itself.
    batches: dicts with 'image' (B, H, W, C) in [0, 1] and optional 'mask' (B,); every
      batch the same B (pad the last one, with mask 0 on padding).
    measures: names from :data:`measures.MEASURES`. 'cka_linear' and
      'cka_linear_debiased' stream over all batches; the others use the kept examples.
    points, estimator, uncertainty: see :class:`Points`, :class:`Estimator`,
      :class:`Uncertainty`; or their flat keywords (:data:`FLAT`: ``points_a``,
      ``estimator='exact'``, ``max_examples``, ``calibrate``, ``bootstrap``, ...).
    mesh: shard the batch axis over this mesh's first axis (None: one device).
    left_out: filled with {measure: why} for each in-memory measure outside its
      declared valid regime at the kept n (`Measure.invalid_at`) that no option brings
      back (the CCA family with layers as wide as the examples); a measure that an
      option brings back (SVCCA's max_dims) is computed so reduced, said in its meta.
  """
  chosen = options(points, estimator, uncertainty, **flat)
  sel, est, unc = chosen["points"], chosen["estimator"], chosen["uncertainty"]
  if batches is None:
    raise ValueError("The similarity matrices need `batches`: an iterable of dicts with "
                     "'image' (and optionally 'mask').")
  measure_objs = [measures_lib.get(m) for m in measures]
  if len(set(measures)) != len(measures):
    raise ValueError(f"Duplicate measures in {list(measures)}.")
  rows = _points(model_a, sel.a)
  within = model_b is None and (sel.b is None or list(sel.b) == rows)
  if model_b is None:
    model_b, vars_b = model_a, vars_a
    model_b_name = model_b_name or model_a_name
  cols = rows if within else _points(model_b, sel.b)
  model_b_name = model_b_name or "model_b"
  streaming = [m for m in measure_objs if m.streaming]
  collected = [m for m in measure_objs if not m.streaming]
  ests = tuple("debiased" if m.name.endswith("_debiased") else "biased"
               for m in streaming)

  capture_a = capture_fn(model_a, rows)
  capture_b = None if within else capture_fn(model_b, cols)
  axis = mesh.axis_names[0] if mesh is not None else None
  update = minibatch.make_update(mesh, exact=est.linear_cka == "exact",
                                 mode=est.shard_mode)
  acc = None
  if streaming and est.linear_cka == "minibatch":
    acc = minibatch.init(len(rows), None if within else len(cols), estimators=ests)
  keep_examples = bool(collected) or unc.permutations > 0 or unc.resamples > 0
  max_examples = est.max_examples
  kept_a: dict[str, list[np.ndarray]] = {r: [] for r in rows}
  kept_b: dict[str, list[np.ndarray]] = {c: [] for c in cols}
  kept = 0
  batch_size = None
  count = 0
  bar = progress_lib.Progress("similarity", num_batches or 0, unit="batch",
                              every_s=progress_every_s,
                              enabled=progress and jax.process_index() == 0)
  for batch in batches:
    images = np.asarray(batch["image"], np.float32)
    mask = np.asarray(batch.get("mask", np.ones(images.shape[0])), np.float32)
    if batch_size is None:
      batch_size = images.shape[0]
      if mesh is not None and (batch_size * jax.process_count()) % mesh.shape[axis]:
        raise ValueError(
            f"Global batch size {batch_size * jax.process_count()} is not a multiple of "
            f"the {mesh.shape[axis]} devices of the mesh; choose a batch size that is.")
    elif images.shape[0] != batch_size:
      raise ValueError(f"Batch {count} has {images.shape[0]} rows, the first had "
                       f"{batch_size}; pad the last batch (mask 0 on padding).")
    x, m = _place(mesh, axis, images), _place(mesh, axis, mask)
    acts_a = capture_a(vars_a, x)
    acts_b = None if within else capture_b(vars_b, x)
    if streaming:
      if acc is None:
        _check_exact_size(acts_a, acts_a if acts_b is None else acts_b, rows, cols,
                          est.exact_max_bytes)
        acc = minibatch.init_exact(acts_a, acts_b, m)
      acc = update(acc, acts_a, acts_b, m)
    if keep_examples and kept < max_examples:
      real = sharding.fetch(m) > 0
      take = min(int(real.sum()), max_examples - kept)
      idx = np.flatnonzero(real)[:take]
      for r, a in zip(rows, acts_a):
        kept_a[r].append(sharding.fetch(a)[idx])
      if not within:
        for c, b in zip(cols, acts_b):
          kept_b[c].append(sharding.fetch(b)[idx])
      kept += take
    count += 1
    bar.update(count, extra=f"{kept} examples kept" if keep_examples else "")
    if not streaming and kept >= max_examples:
      break  # nothing streams: the remaining batches would change no number
  if count == 0:
    raise ValueError("No batches: the data iterator was empty.")
  bar.update(count, force=True)

  base_meta = dict(points_a=rows, points_b=cols, within_model=within,
                   batch_size=int(batch_size * jax.process_count()),
                   num_batches=count, num_devices=1 if mesh is None else mesh.size)
  out: list[results.Matrix] = []
  if streaming:
    finals = minibatch.finalize(acc, rows, cols, label_a=model_a_name,
                                label_b=model_b_name)
    for m, hsic in zip(streaming, ests):
      mat, info = finals[hsic]
      meta = dict(base_meta, **_describe(m), estimator=est.linear_cka, hsic=hsic,
                  n=info["n"], nan_reasons=info["nan_reasons"])
      if est.linear_cka == "minibatch":
        meta.update(num_batches_used=info["num_batches"], shard_mode=est.shard_mode,
                    skipped_examples=info["skipped_examples"])
        if hsic == "biased":
          meta["note"] = ("minibatch biased CKA averages per-batch biased HSIC; it "
                          "depends on the batch size and is not the full-data biased "
                          "CKA (use estimator='exact' for that).")
      out.append(results.Matrix(mat, rows, cols, m.name, model_a_name, model_b_name,
                                meta))
  if keep_examples:  # the kept examples, for the in-memory measures and uncertainty
    acts_a = {r: np.concatenate(v) for r, v in kept_a.items()}
    acts_b = None if within else {c: np.concatenate(v) for c, v in kept_b.items()}
  if collected:
    n_kept = len(next(iter(acts_a.values())))
    dims = {f"{k} of {name}": int(np.prod(v.shape[1:]))
            for acts, name in ((acts_a, model_a_name), (acts_b or {}, model_b_name))
            for k, v in acts.items()}
    for m in collected:
      opts = _measure_options(m.name, est)
      extra, regime, reason = _into_regime(m, n_kept, dims, opts)
      if reason:
        warnings.warn(f"{m.name} {reason}.", checks.SimilarityWarning)
        if left_out is not None:
          left_out[m.name] = reason
        continue
      opts.update(extra)
      mat, info = measures_lib.matrix(m.name, acts_a, acts_b, label_a=model_a_name,
                                      label_b=model_b_name, **opts)
      meta = dict(base_meta, **_describe(m), estimator="in_memory", n=info["n"],
                  options=info["options"], nan_reasons=info["nan_reasons"],
                  max_examples=max_examples, **regime)
      out.append(results.Matrix(mat, rows, cols, m.name, model_a_name, model_b_name,
                                meta))
  order = {name: i for i, name in enumerate(measures)}
  out = sorted(out, key=lambda mtx: order[mtx.measure])
  if unc.permutations > 0 or unc.resamples > 0:
    bar = progress_lib.Progress("uncertainty", len(out), unit="matrix",
                                every_s=progress_every_s,
                                enabled=progress and jax.process_index() == 0)
    out = _with_uncertainty(out, acts_a, acts_b, unc, est, bar)
  return out


def _with_uncertainty(mats, acts_a, acts_b, unc: Uncertainty, est: Estimator,
                      bar) -> list[results.Matrix]:
  """Bootstrap intervals on every matrix, and a calibrated matrix after each (both on
  the kept examples, with the in-memory estimator of each measure)."""
  from fula_jax.similarity import calibration
  from fula_jax.similarity import intervals
  key = jax.random.PRNGKey(unc.seed)
  n = len(next(iter(acts_a.values())))
  out = []
  for done, mtx in enumerate(mats):
    opts = _measure_options(mtx.measure, est)
    if unc.resamples > 0:
      mtx.low, mtx.high = intervals.bootstrap_matrix(
          mtx.measure, acts_a, acts_b, unc.resamples, level=unc.level, key=key, **opts)
      mtx.meta["interval"] = dict(kind="percentile bootstrap over examples",
                                  level=unc.level, resamples=unc.resamples, n=n,
                                  max_examples=est.max_examples)
    out.append(mtx)
    if unc.permutations > 0:
      cal = calibration.calibrated_matrix(mtx.measure, acts_a, acts_b, unc.permutations,
                                          key=key, **opts)
      meta = {k: v for k, v in mtx.meta.items() if k != "interval"}
      meta.update(calibrated_from=mtx.measure, permutations=unc.permutations, n=n,
                  estimator="in_memory", raw=cal["raw"], z=cal["z"],
                  p_value=cal["p_value"], null_mean=cal["null_mean"],
                  null_sd=cal["null_sd"], kind="similarity",
                  description="(raw - null mean) / (ideal - null mean): 0 at chance, "
                              "1 for identical representations")
      out.append(results.Matrix(cal["score"], mtx.rows, mtx.cols,
                                f"{mtx.measure}_calibrated", mtx.model_a, mtx.model_b,
                                meta))
    bar.update(done + 1, extra=mtx.measure, force=done + 1 == len(mats))
  return out
