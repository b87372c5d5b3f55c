"""The similarity job: full ``L_A x L_B`` matrices of every requested measure between
two trained models.

``run(config, workdir)`` (config: ``configs/similarity.py``) loads the models by workdir
or by architecture and weights, streams the evaluation split once through the engine
(:func:`fula_jax.similarity.layers.matrices`), and writes each matrix with
:func:`fula_jax.results.save`, a report, `summary.json` and its closing lines.
"""

from __future__ import annotations

import warnings

import jax
import ml_collections
import numpy as np

from fula_jax import errors
from fula_jax import registry
from fula_jax import results
from fula_jax.similarity import checks
from fula_jax.similarity import layers
from fula_jax.similarity import minibatch

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
  mats = layers.matrices(
      model_a, vars_a, model_b, vars_b,
      batches=_eval_batches(split, config.batch_size), measures=tuple(config.measures),
      points=layers.Points(config.get("points_a"), config.get("points_b")),
      estimator=layers.Estimator(
          linear_cka=config.get("estimator", "minibatch"),
          shard_mode=config.get("shard_mode", "global"),
          max_examples=int(config.get("max_examples", 2000)),
          exact_max_bytes=int(config.get("exact_max_gib", 4.0) * 2**30),
          rbf_sigma_frac=float(config.get("rbf_sigma_frac", 1.0)),
          svcca_keep=config.get("svcca_keep", 0.99)),
      uncertainty=layers.Uncertainty(
          permutations=int(config.get("calibrate", 0)),
          resamples=int(config.get("bootstrap", 0)),
          level=float(config.get("interval_level", 0.9)), seed=int(config.get("seed", 0))),
      mesh=mesh, model_a_name=a.name, model_b_name=(b or a).name,
      num_batches=num_batches, progress_every_s=float(config.get("progress_every_s", 10.)),
      left_out=(left_out := {}))
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
