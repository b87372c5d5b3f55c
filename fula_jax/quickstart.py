"""`job=quickstart`: train two architectures, then compare them layer by layer.

1. train (or reuse) model A and model B on the same data;
2. representational similarity: streaming CKA matrices over the test split;
3. functional similarity: the four stitching objectives over the full L_A x L_B matrix;
4. every matrix saved under ``<workdir>/results`` with a heatmap; a summary printed.
"""

from __future__ import annotations

import warnings
from typing import Any

import ml_collections
from etils import epath

from fula_jax import data, errors, io, report, results
from fula_jax.train import checkpoint, loop


def train_or_load(config: ml_collections.ConfigDict, workdir: epath.Path):
  """Train into `workdir` unless a finished run is there; then (model, variables, summary)."""
  summary_path = workdir / "summary.json"
  if summary_path.exists():
    print(f"{config.model.name}: reusing the finished run in {workdir}", flush=True)
  else:
    loop.run(config, str(workdir), closing=False)
  model, variables, _ = checkpoint.load_trained(workdir)
  return model, variables, io.read_json(summary_path)


def _check_same_inputs(cfg_a: ml_collections.ConfigDict, cfg_b: ml_collections.ConfigDict):
  if data.image_shape(cfg_a.data) != data.image_shape(cfg_b.data):
    raise errors.ConfigError(
        f"Model A ({cfg_a.model.name}) sees images of shape {data.image_shape(cfg_a.data)} "
        f"but model B ({cfg_b.model.name}) sees {data.image_shape(cfg_b.data)}; stitching "
        f"needs both to run on the same inputs: set the same data.image_size/channels.")


def model_names(cfg_a: ml_collections.ConfigDict, cfg_b: ml_collections.ConfigDict
                ) -> tuple[str, str]:
  """Names for the results: the architectures, with seeds when they are the same."""
  a, b = cfg_a.model.name, cfg_b.model.name
  if a == b:
    return f"{a} (seed {cfg_a.seed})", f"{b} (seed {cfg_b.seed})"
  return a, b


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from fula_jax.similarity import layers
  from fula_jax import stitching

  workdir = io.path(workdir)
  cfg_a, cfg_b = config.model_a, config.model_b
  _check_same_inputs(cfg_a, cfg_b)
  name_a, name_b = model_names(cfg_a, cfg_b)
  model_a, vars_a, sum_a = train_or_load(cfg_a, workdir / "models" / f"a_{cfg_a.model.name}")
  model_b, vars_b, sum_b = train_or_load(cfg_b, workdir / "models" / f"b_{cfg_b.model.name}")

  train_split = data.source(cfg_a.data, "train")
  test_split = data.source(cfg_a.data, "test")

  print("\n== Representational similarity (CKA over the test split)", flush=True)
  sim = layers.matrices(
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
  with warnings.catch_warnings():  # the summary below counts the unconverged cells
    warnings.simplefilter("ignore", stitching.ConvergenceWarning)
    stitched = stitching.sweep(model_a, vars_a, model_b, vars_b, train_split, test_split,
                               config.stitch, workdir=str(workdir / "stitch"),
                               name_a=name_a, name_b=name_b)
  for key, m in stitched.items():
    results.save(workdir, key, m)
    saved[key] = m

  model_a_info = {"name": name_a, "test_accuracy": sum_a["test_accuracy"]}
  model_b_info = {"name": name_b, "test_accuracy": sum_b["test_accuracy"]}
  rows = report.write(
      workdir, "Quickstart: how alike are A and B, layer by layer?",
      [f"A (rows): **{name_a}**, test accuracy {sum_a['test_accuracy']:.4f}",
       f"B (columns): **{name_b}**, test accuracy {sum_b['test_accuracy']:.4f}"],
      saved, name_a=name_a, name_b=name_b)
  summary = {"model_a": model_a_info, "model_b": model_b_info, "matrices": rows}
  _print_summary(summary)
  print()
  results.finish_job(workdir, summary, report=workdir / report.REPORT_FILE)
  return summary


def _print_summary(summary: dict[str, Any]) -> None:
  a, b = summary["model_a"], summary["model_b"]
  print(f"\nModel A: {a['name']:16s} test accuracy {a['test_accuracy']:.4f}")
  print(f"Model B: {b['name']:16s} test accuracy {b['test_accuracy']:.4f}\n")
  report.print_table(summary["matrices"])
