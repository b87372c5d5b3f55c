"""`job=quickstart`: train two architectures, then compare them layer by layer.

1. train (or reuse) model A and model B on the same data;
2. representational similarity: streaming CKA matrices over the test split;
3. functional similarity: the four stitching objectives over the full L_A x L_B matrix;
4. every matrix saved under ``<workdir>/results`` with a heatmap; a summary printed.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from etils import epath

from fula_jax import data, io, results
from fula_jax.train import checkpoint, loop


def train_or_load(config: ml_collections.ConfigDict, workdir: epath.Path):
  """Train into `workdir` unless a finished run is there; then (model, variables, summary)."""
  summary_path = workdir / "summary.json"
  if summary_path.exists():
    print(f"{config.model.name}: reusing the finished run in {workdir}", flush=True)
  else:
    loop.run(config, str(workdir))
  model, variables, _ = checkpoint.load_trained(workdir)
  return model, variables, io.read_json(summary_path)


def _check_same_inputs(cfg_a: ml_collections.ConfigDict, cfg_b: ml_collections.ConfigDict):
  if data.image_shape(cfg_a.data) != data.image_shape(cfg_b.data):
    raise ValueError(
        f"Model A ({cfg_a.model.name}) sees images of shape {data.image_shape(cfg_a.data)} "
        f"but model B ({cfg_b.model.name}) sees {data.image_shape(cfg_b.data)}; stitching "
        f"needs both to run on the same inputs: set the same data.image_size/channels.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from fula_jax.similarity import job as similarity_job
  from fula_jax.stitching import sweeper

  workdir = epath.Path(workdir)
  cfg_a, cfg_b = config.model_a, config.model_b
  _check_same_inputs(cfg_a, cfg_b)
  name_a = f"A:{cfg_a.model.name}"
  name_b = f"B:{cfg_b.model.name}"
  model_a, vars_a, sum_a = train_or_load(cfg_a, workdir / "models" / f"a_{cfg_a.model.name}")
  model_b, vars_b, sum_b = train_or_load(cfg_b, workdir / "models" / f"b_{cfg_b.model.name}")

  train_split = data.load(cfg_a.data, "train")
  test_split = data.load(cfg_a.data, "test")

  print("\n== Representational similarity (CKA over the test split)", flush=True)
  sim = similarity_job.similarity_matrices(
      model_a, vars_a, model_b, vars_b,
      data.eval_batches(test_split, config.similarity.batch_size),
      measures=tuple(config.similarity.measures),
      model_a_name=name_a, model_b_name=name_b,
      num_batches=data.num_eval_batches(test_split, config.similarity.batch_size))
  saved: dict[str, results.Matrix] = {}
  for m in sim:
    results.save(workdir, m.measure, m)
    saved[m.measure] = m

  print("\n== Functional similarity (stitching A -> B, all four objectives)", flush=True)
  stitched = sweeper.sweep(model_a, vars_a, model_b, vars_b, train_split, test_split,
                           config.stitch, workdir=str(workdir / "stitch"),
                           name_a=name_a, name_b=name_b)
  for key, m in stitched.items():
    results.save(workdir, key, m)
    saved[key] = m

  summary = _summary(saved, sum_a, sum_b, cfg_a.model.name, cfg_b.model.name)
  if io.is_writer():
    io.write_json(workdir / "summary.json", summary)
  _print_summary(summary)
  print(f"\nResults: {workdir}/results  (load with fula_jax.results.load({str(workdir)!r}))",
        flush=True)
  return summary


def _diag_mean(m: results.Matrix) -> float:
  """Mean over matching relative depths: row i against col round(i * (L_B-1)/(L_A-1))."""
  la, lb = m.matrix.shape
  idx = np.round(np.linspace(0, lb - 1, la)).astype(int)
  return float(np.nanmean(m.matrix[np.arange(la), idx]))


def _summary(saved, sum_a, sum_b, arch_a, arch_b) -> dict[str, Any]:
  rows = []
  for key, m in sorted(saved.items()):
    if key.startswith("stitch_") and not key.endswith(("/accuracy", "/relative_accuracy")):
      continue
    rows.append({"matrix": key, "mean": float(np.nanmean(m.matrix)),
                 "depth_matched_mean": _diag_mean(m),
                 "nan_cells": int(np.isnan(m.matrix).sum()),
                 "shape": list(m.matrix.shape)})
  return {"model_a": {"arch": arch_a, "test_accuracy": sum_a["test_accuracy"]},
          "model_b": {"arch": arch_b, "test_accuracy": sum_b["test_accuracy"]},
          "matrices": rows}


def _print_summary(summary: dict[str, Any]) -> None:
  a, b = summary["model_a"], summary["model_b"]
  print(f"\nModel A: {a['arch']:10s} test accuracy {a['test_accuracy']:.4f}")
  print(f"Model B: {b['arch']:10s} test accuracy {b['test_accuracy']:.4f}\n")
  print(f"{'matrix':40s} {'shape':>7s} {'mean':>7s} {'depth-matched':>14s} {'NaN':>4s}")
  for r in summary["matrices"]:
    shape = "x".join(map(str, r["shape"]))
    print(f"{r['matrix']:40s} {shape:>7s} {r['mean']:7.3f} {r['depth_matched_mean']:14.3f} "
          f"{r['nan_cells']:4d}")
