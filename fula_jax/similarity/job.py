"""The similarity job: full ``L_A x L_B`` matrices of every requested measure.

``run(config, workdir)`` (config: ``configs/similarity.py``) loads the trained models by
workdir, streams the evaluation split once, and writes each matrix with
:func:`fula_jax.results.save`. The work happens in :func:`similarity_matrices`, which a
Colab can call with in-memory models and any iterable of batches.

Per batch: one inference pass of each model captures every requested point; linear CKA
(biased and/or debiased) is accumulated by the streaming engine (minibatch CKA, or the
exact feature-space estimator); the other measures (RBF CKA, Procrustes, CCA family) are
computed at the end on the first `max_examples` real examples, kept on the host.
With a mesh, the batch axis is sharded over its devices (and hosts).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
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


def _points(model, points: Sequence[str] | None) -> list[str]:
  from fula_jax import models
  if points is None:
    return list(model.point_names)
  return models.base.check_points(model, points, extra=(models.LOGITS,))


def _capture_fn(model, points: Sequence[str]):
  from fula_jax import models

  @jax.jit
  def capture(variables, images):
    logits, acts = models.capture(model, variables, images)
    acts = {**acts, models.LOGITS: logits}
    return [acts[p] for p in points]

  return capture


def _to_host(x: jax.Array) -> np.ndarray:
  return sharding.fetch(x)


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


def _measure_options(name: str, sigma_frac: float, svcca_keep: float | int) -> dict:
  m = measures_lib.get(name)
  opts = {}
  if "sigma_frac" in m.defaults:
    opts["sigma_frac"] = sigma_frac
  if "keep" in m.defaults:
    opts["keep"] = svcca_keep
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


def similarity_matrices(
    model_a, vars_a: Mapping[str, Any], model_b=None, vars_b: Mapping[str, Any] | None = None,
    batches: Iterable[Mapping[str, np.ndarray]] | None = None,
    measures: Sequence[str] = ("cka_linear_debiased",), *,
    points_a: Sequence[str] | None = None, points_b: Sequence[str] | None = None,
    estimator: str = "minibatch", max_examples: int = 2000,
    mesh: jax.sharding.Mesh | None = None, shard_mode: str = "global",
    sigma_frac: float = 1.0, svcca_keep: float | int = 0.99,
    model_a_name: str = "model_a", model_b_name: str | None = None,
    num_batches: int | None = None, progress: bool = True,
    progress_every_s: float = 10.0, exact_max_bytes: int = 4 << 30,
    calibrate: int = 0, bootstrap: int = 0, interval_level: float = 0.9, seed: int = 0,
    left_out: dict[str, str] | None = None) -> list[results.Matrix]:
  """Every requested measure as an ``L_A x L_B`` :class:`results.Matrix`.

  Args:
    model_a, vars_a: front model (rows) and its variables.
    model_b, vars_b: end model (columns); None compares model A with itself.
    batches: dicts with 'image' (B, H, W, C) in [0, 1] and optional 'mask' (B,); every
      batch the same B (pad the last one, with mask 0 on padding).
    measures: names from :data:`measures.MEASURES`. 'cka_linear' and
      'cka_linear_debiased' stream over all batches; the others use the first
      `max_examples` real examples.
    points_a, points_b: stitch points (and/or 'logits') to compare; None = all points.
    estimator: 'minibatch' (Nguyen et al. 2021; any width) or 'exact' (full-dataset
      feature-space linear CKA; memory (sum d_a) x (sum d_b)).
    mesh: shard the batch axis over this mesh's first axis (None: one device).
    shard_mode: 'global' (the sharded result equals one device's) or 'local' (each
      device's shard is its own minibatch); see :mod:`minibatch`.
    exact_max_bytes: refuse the exact estimator when its statistics would need more.
    calibrate: permutations per cell for a null-calibrated matrix of each measure,
      ``<measure>_calibrated`` (0: none); see :mod:`calibration`.
    bootstrap: resamples per cell for a percentile interval at `interval_level` on
      each matrix (0: none); see :mod:`intervals`.
    Both use the first `max_examples` examples and PRNG key `seed`.
    left_out: filled with {measure: why} for each in-memory measure outside its
      declared valid regime at the kept n (`Measure.invalid_at`) that no option brings
      back (the CCA family with layers as wide as the examples); a measure that an
      option brings back (SVCCA's max_dims) is computed so reduced, said in its meta.
  """
  if batches is None:
    raise ValueError("similarity_matrices needs `batches`: an iterable of dicts with "
                     "'image' (and optionally 'mask').")
  registry.lookup("similarity estimator", estimator, dict.fromkeys(ESTIMATORS))
  measure_objs = [measures_lib.get(m) for m in measures]
  if len(set(measures)) != len(measures):
    raise ValueError(f"Duplicate measures in {list(measures)}.")
  rows = _points(model_a, points_a)
  within = model_b is None and (points_b is None or list(points_b) == rows)
  if model_b is None:
    model_b, vars_b = model_a, vars_a
    model_b_name = model_b_name or model_a_name
  cols = rows if within else _points(model_b, points_b)
  model_b_name = model_b_name or "model_b"
  streaming = [m for m in measure_objs if m.streaming]
  collected = [m for m in measure_objs if not m.streaming]
  ests = tuple("debiased" if m.name.endswith("_debiased") else "biased"
               for m in streaming)

  capture_a = _capture_fn(model_a, rows)
  capture_b = None if within else _capture_fn(model_b, cols)
  axis = mesh.axis_names[0] if mesh is not None else None
  update = minibatch.make_update(mesh, exact=estimator == "exact", mode=shard_mode)
  acc = None
  if streaming and estimator == "minibatch":
    acc = minibatch.init(len(rows), None if within else len(cols), estimators=ests)
  keep_examples = bool(collected) or calibrate > 0 or bootstrap > 0
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
                          exact_max_bytes)
        acc = minibatch.init_exact(acts_a, acts_b, m)
      acc = update(acc, acts_a, acts_b, m)
    if keep_examples and kept < max_examples:
      real = _to_host(m) > 0
      take = min(int(real.sum()), max_examples - kept)
      idx = np.flatnonzero(real)[:take]
      for r, a in zip(rows, acts_a):
        kept_a[r].append(_to_host(a)[idx])
      if not within:
        for c, b in zip(cols, acts_b):
          kept_b[c].append(_to_host(b)[idx])
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

  def describe(m: measures_lib.Measure) -> dict:
    return dict(kind=m.kind, symmetric=m.symmetric, invariances=sorted(m.invariances),
                ideal=m.ideal, value_range=m.value_range, description=m.description)

  if streaming:
    finals = minibatch.finalize(acc, rows, cols, label_a=model_a_name,
                                label_b=model_b_name)
    for m, est in zip(streaming, ests):
      mat, info = finals[est]
      meta = dict(base_meta, **describe(m), estimator=estimator, hsic=est,
                  n=info["n"], nan_reasons=info["nan_reasons"])
      if estimator == "minibatch":
        meta.update(num_batches_used=info["num_batches"], shard_mode=shard_mode,
                    skipped_examples=info["skipped_examples"])
        if est == "biased":
          meta["note"] = ("minibatch biased CKA averages per-batch biased HSIC; it "
                          "depends on the batch size and is not the full-data biased "
                          "CKA (use estimator='exact' for that).")
      out.append(results.Matrix(mat, rows, cols, m.name, model_a_name, model_b_name,
                                meta))
  if collected:
    acts_a = {r: np.concatenate(v) for r, v in kept_a.items()}
    acts_b = None if within else {c: np.concatenate(v) for c, v in kept_b.items()}
    n_kept = len(next(iter(acts_a.values())))
    dims = {f"{k} of {name}": int(np.prod(v.shape[1:]))
            for acts, name in ((acts_a, model_a_name), (acts_b or {}, model_b_name))
            for k, v in acts.items()}
    for m in collected:
      opts = _measure_options(m.name, sigma_frac, svcca_keep)
      extra, regime, reason = _into_regime(m, n_kept, dims, opts)
      if reason:
        warnings.warn(f"{m.name} {reason}.", checks.SimilarityWarning)
        if left_out is not None:
          left_out[m.name] = reason
        continue
      opts.update(extra)
      mat, info = measures_lib.matrix(m.name, acts_a, acts_b, label_a=model_a_name,
                                      label_b=model_b_name, **opts)
      meta = dict(base_meta, **describe(m), estimator="in_memory", n=info["n"],
                  options=info["options"], nan_reasons=info["nan_reasons"],
                  max_examples=max_examples, **regime)
      out.append(results.Matrix(mat, rows, cols, m.name, model_a_name, model_b_name,
                                meta))
  order = {name: i for i, name in enumerate(measures)}
  out = sorted(out, key=lambda mtx: order[mtx.measure])
  if calibrate > 0 or bootstrap > 0:
    acts_a = {r: np.concatenate(v) for r, v in kept_a.items()}
    acts_b = None if within else {c: np.concatenate(v) for c, v in kept_b.items()}
    bar = progress_lib.Progress("uncertainty", len(out), unit="matrix",
                                every_s=progress_every_s,
                                enabled=progress and jax.process_index() == 0)
    out = _with_uncertainty(out, acts_a, acts_b, calibrate, bootstrap, interval_level,
                            seed, sigma_frac, svcca_keep, max_examples, bar)
  return out


def _with_uncertainty(mats, acts_a, acts_b, calibrate, bootstrap, level, seed,
                      sigma_frac, svcca_keep, max_examples, bar) -> list[results.Matrix]:
  """Bootstrap intervals on every matrix, and a calibrated matrix after each (both on
  the kept examples, with the in-memory estimator of each measure)."""
  from fula_jax.similarity import calibration
  from fula_jax.similarity import intervals
  key = jax.random.PRNGKey(seed)
  n = len(next(iter(acts_a.values())))
  out = []
  for done, mtx in enumerate(mats):
    opts = _measure_options(mtx.measure, sigma_frac, svcca_keep)
    if bootstrap > 0:
      mtx.low, mtx.high = intervals.bootstrap_matrix(
          mtx.measure, acts_a, acts_b, bootstrap, level=level, key=key, **opts)
      mtx.meta["interval"] = dict(kind="percentile bootstrap over examples",
                                  level=level, resamples=bootstrap, n=n,
                                  max_examples=max_examples)
    out.append(mtx)
    if calibrate > 0:
      cal = calibration.calibrated_matrix(mtx.measure, acts_a, acts_b, calibrate,
                                          key=key, **opts)
      meta = {k: v for k, v in mtx.meta.items() if k != "interval"}
      meta.update(calibrated_from=mtx.measure, permutations=calibrate, n=n,
                  estimator="in_memory", raw=cal["raw"], z=cal["z"], p_value=cal["p_value"], null_mean=cal["null_mean"],
                  null_sd=cal["null_sd"], kind="similarity",
                  description="(raw - null mean) / (ideal - null mean): 0 at chance, "
                              "1 for identical representations")
      out.append(results.Matrix(cal["score"], mtx.rows, mtx.cols,
                                f"{mtx.measure}_calibrated", mtx.model_a, mtx.model_b,
                                meta))
    bar.update(done + 1, extra=mtx.measure, force=done + 1 == len(mats))
  return out


# ----------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------


def _load_split(data_config: ml_collections.ConfigDict, split: str):
  from fula_jax import data
  return data.source(data_config, split)


def _eval_batches(split, batch_size: int):
  from fula_jax import data
  return data.eval_batches(split, batch_size, process_index=jax.process_index(),
                           process_count=jax.process_count())


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Load models and data as `config` says, write every matrix under `workdir`/results.

  Returns ``{measure: {'shape', 'n', 'nan_cells', 'estimator'}}``, and for a measure
  left out because it is degenerate at this n ``{measure: {'left_out': why}}``.
  """
  from fula_jax import donors, io, report
  a = donors.load(config, "a")
  b = donors.load(config, "b", required=False)
  model_a, vars_a = a.model, a.variables
  model_b, vars_b = (b.model, b.variables) if b is not None else (None, None)
  source = config.get("data_from", "model_a")
  registry.lookup("data source", source, {"model_a": 0, "config": 0})
  data_cfg = a.data if source == "model_a" and a.data is not None else config.data
  split = _load_split(data_cfg, config.split).take(config.get("num_examples"))
  n = len(split)
  mesh = None
  if config.get("shard", True) and jax.device_count() > 1:
    if config.batch_size % jax.device_count() == 0:
      mesh = minibatch.batch_mesh()
    elif jax.process_count() == 1:
      warnings.warn(f"batch_size {config.batch_size} is not a multiple of the "
                    f"{jax.device_count()} devices; running on one device.",
                    checks.SimilarityWarning)
    else:
      raise errors.ConfigError(f"batch_size {config.batch_size} must be a multiple of the "
                       f"{jax.device_count()} devices for a multi-host run.")
  num_batches = -(-n // config.batch_size)
  mats = similarity_matrices(
      model_a, vars_a, model_b, vars_b,
      batches=_eval_batches(split, config.batch_size), measures=tuple(config.measures),
      points_a=config.get("points_a"), points_b=config.get("points_b"),
      estimator=config.get("estimator", "minibatch"),
      max_examples=int(config.get("max_examples", 2000)), mesh=mesh,
      exact_max_bytes=int(config.get("exact_max_gib", 4.0) * 2**30),
      shard_mode=config.get("shard_mode", "global"),
      sigma_frac=float(config.get("rbf_sigma_frac", 1.0)),
      svcca_keep=config.get("svcca_keep", 0.99),
      model_a_name=a.name, model_b_name=(b or a).name,
      num_batches=num_batches, progress_every_s=float(config.get("progress_every_s", 10.)),
      calibrate=int(config.get("calibrate", 0)), bootstrap=int(config.get("bootstrap", 0)),
      interval_level=float(config.get("interval_level", 0.9)),
      seed=int(config.get("seed", 0)), left_out=(left_out := {}))
  summary: dict[str, dict] = {m: {"left_out": why} for m, why in left_out.items()}
  for name, why in left_out.items():
    print(f"similarity: {name} {why}", flush=True)
  for m in mats:
    m.meta.update(split=config.split, data=getattr(split, "name", ""))
    results.save(workdir, m.measure, m, png=bool(config.get("png", True)))
    summary[m.measure] = dict(shape=list(m.matrix.shape), n=m.meta.get("n"),
                              nan_cells=int(np.isnan(m.matrix).sum()),
                              estimator=m.meta.get("estimator"))
  from fula_jax import data
  data.note_skipped(summary, {config.split: split})
  name_a, name_b = a.name, (b or a).name
  n_used = max([int(m.meta["n"]) for m in mats if m.meta.get("n")] + [0])
  rows = report.write(
      workdir, "Representational similarity, layer by layer",
      [f"A (rows): **{name_a}**", f"B (columns): **{name_b}**",
       f"{n_used} examples of {getattr(split, 'name', config.split)}"],
      {m.measure: m for m in mats}, name_a=name_a, name_b=name_b,
      notes=[f"Left out: `{k}`: {why}" for k, why in left_out.items()])
  print()
  report.print_table(rows)
  print()
  results.finish_job(workdir, summary, report=io.path(workdir) / report.REPORT_FILE)
  return summary
