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

from fula_jax import analysis, data, errors, io, results
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


# What each quickstart matrix says, one line each, for report.md.
MEANINGS = {
    "cka_linear_debiased": "representational similarity of A's layer i and B's layer j "
                           "(linear CKA, debiased; 1 = the same up to rotation and scale)",
    "cka_linear": "the same with the biased HSIC estimator, averaged over minibatches",
    "procrustes": "orthogonal Procrustes distance (0 = identical up to rotation; a "
                  "distance, lower is more similar)",
    "tlm": "task loss matching: a stitch trained on the labels; test accuracy of "
           "B's tail run on A's layer i mapped into B's layer j",
    "slm": "soft-label matching: the stitch trained to reproduce B's own softmax",
    "dm": "direct matching: the closed-form least-squares map of A's layer i onto B's "
          "layer j; test accuracy of B run from there",
    "fula": "functional latent alignment: the stitch trained to match B's latents at j "
            "and at every later layer",
}
OBJECTIVE_TITLES = {"tlm": "TLM", "slm": "SLM", "dm": "DM", "fula": "FuLA"}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from fula_jax.similarity import job as similarity_job
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
  stitched = stitching.sweep(model_a, vars_a, model_b, vars_b, train_split, test_split,
                           config.stitch, workdir=str(workdir / "stitch"),
                           name_a=name_a, name_b=name_b)
  for key, m in stitched.items():
    results.save(workdir, key, m)
    saved[key] = m

  summary = _summary(saved, sum_a, sum_b, name_a, name_b)
  if io.is_writer():
    io.write_json(workdir / "summary.json", summary)
    overview = write_overview(workdir, saved, name_a, name_b)
    write_report(workdir, summary, saved, overview)
  _print_summary(summary)
  print(f"\nResults: {workdir}/results  (load with fula_jax.results.load({str(workdir)!r}))"
        f"\nReport:  {workdir / REPORT_FILE}", flush=True)
  return summary


REPORT_FILE = "report.md"
OVERVIEW_FILE = "overview.png"


def _overview_panels(saved: dict[str, results.Matrix]
                     ) -> tuple[list[results.Matrix], list[str]]:
  """The CKA matrix, then each objective's stitching accuracy, in a fixed order."""
  panels, titles = [], []
  for name in ("cka_linear_debiased", "cka_linear"):
    if name in saved:
      panels.append(saved[name])
      titles.append("linear CKA (debiased)" if name.endswith("debiased") else "linear CKA")
      break
  for obj, label in OBJECTIVE_TITLES.items():
    key = f"stitch_{obj}/accuracy"
    if key in saved:
      panels.append(saved[key])
      titles.append(f"{label} stitching accuracy")
  return panels, titles


def write_overview(workdir, saved: dict[str, results.Matrix], name_a: str, name_b: str):
  """`<workdir>/results/overview.png`: CKA and the stitching accuracies side by side on
  one [0, 1] colour scale (both are in [0, 1]); the path, or None without matrices."""
  from fula_jax import reporting
  panels, titles = _overview_panels(saved)
  if not panels:
    return None
  fig = results.overview(panels, titles, vmin=0.0, vmax=1.0,
                         label="CKA / stitched test accuracy",
                         suptitle=f"rows: layers of A = {name_a}    columns: layers of "
                                  f"B = {name_b}")
  path = workdir / results.RESULTS_DIR / OVERVIEW_FILE
  io.write_bytes(path, reporting.png_bytes(fig))
  return path


def _meaning(key: str) -> str:
  if key.startswith("stitch_"):
    obj, _, measure = key[len("stitch_"):].partition("/")
    base = MEANINGS.get(obj, obj)
    if measure == "relative_accuracy":
      return f"{OBJECTIVE_TITLES.get(obj, obj)} accuracy divided by B's own accuracy"
    return base
  return MEANINGS.get(key, key)


def write_report(workdir, summary: dict[str, Any], saved: dict[str, results.Matrix],
                 overview) -> None:
  """`<workdir>/report.md`: the models, the summary table, what each matrix means."""
  from fula_jax import reporting
  a, b = summary["model_a"], summary["model_b"]
  lines = ["# Quickstart: how alike are A and B, layer by layer?", "",
           f"- A (rows): **{a['name']}**, test accuracy {a['test_accuracy']:.4f}",
           f"- B (columns): **{b['name']}**, test accuracy {b['test_accuracy']:.4f}", ""]
  if overview is not None:
    lines += [f"![overview]({results.RESULTS_DIR}/{OVERVIEW_FILE})", "",
              "Left: representational similarity (CKA). Then, for each stitching "
              "objective, the test accuracy of A's layer i stitched into B's layer j "
              "(hatched cells cannot be stitched: a pooled vector and a spatial map).",
              ""]
  rows = [[f"`{r['matrix']}`", "x".join(map(str, r["shape"])), reporting.fmt(r["mean"], ".3f"),
           reporting.fmt(r["depth_matched_mean"], ".3f"), str(r["nan_cells"]),
           "" if r.get("unconverged_cells") is None else str(r["unconverged_cells"]),
           _meaning(r["matrix"])] for r in summary["matrices"]]
  lines += _baseline_lines(saved)
  lines += ["## Matrices", ""]
  lines += reporting.md_table(["matrix", "shape", "mean", "depth-matched mean", "NaN",
                               "not converged", "what it says"], rows)
  lines += ["", "Not converged: trained stitches whose loss still fell at the end of "
            "training (`stitch_<objective>/converged`, framed in red in the figures); "
            "their accuracy understates the stitch. Depth-matched mean: the mean over "
            "cells at the same relative depth in "
            "both models. Every matrix is in `results/` as `.npz`, `.csv` and `.png`; "
            "load them with `fula_jax.results.load(workdir)`.", ""]
  io.write_text(workdir / REPORT_FILE, "\n".join(lines))


def _baseline_lines(saved: dict[str, results.Matrix]) -> list[str]:
  """How to read the stitching cells: B's own accuracy, chance, and per objective the
  mean of B's self-stitch at its points (the ceiling) and of the cells relative to it."""
  from fula_jax import reporting
  rows = []
  for key, m in sorted(saved.items()):
    if not (key.startswith("stitch_") and key.endswith("/accuracy")) or not (
        m.meta.get("baseline")):
      continue
    rel = analysis.relative_to_baseline(m).matrix
    rows.append([f"`{key}`", reporting.fmt(m.meta.get("end_accuracy"), ".3f"),
                 reporting.fmt(m.meta.get("chance"), ".2f"),
                 reporting.fmt(float(np.mean(list(m.meta["baseline"].values()))), ".3f"),
                 reporting.fmt(float(np.nanmean(rel)), ".3f")])
  if not rows:
    return []
  return (["## Baselines", "", "Read a stitching cell against B's own accuracy, chance, "
           "and B stitched into itself at that column's point (the ceiling; "
           "`analysis.relative_to_baseline`).", ""]
          + reporting.md_table(["matrix", "B's accuracy", "chance",
                                "mean self-stitch of B", "mean cell / self-stitch"], rows)
          + [""])


def _summary(saved, sum_a, sum_b, name_a, name_b) -> dict[str, Any]:
  rows = []
  for key, m in sorted(saved.items()):
    if key.startswith("stitch_") and not key.endswith(("/accuracy", "/relative_accuracy")):
      continue
    rows.append({"matrix": key, "mean": float(np.nanmean(m.matrix)),
                 "depth_matched_mean": analysis.depth_matched_mean(m),
                 "nan_cells": int(np.isnan(m.matrix).sum()),
                 "unconverged_cells": (len(m.meta.get("unconverged") or {})
                                       if key.startswith("stitch_") else None),
                 "shape": list(m.matrix.shape)})
  return {"model_a": {"name": name_a, "test_accuracy": sum_a["test_accuracy"]},
          "model_b": {"name": name_b, "test_accuracy": sum_b["test_accuracy"]},
          "matrices": rows}


def _print_summary(summary: dict[str, Any]) -> None:
  a, b = summary["model_a"], summary["model_b"]
  print(f"\nModel A: {a['name']:16s} test accuracy {a['test_accuracy']:.4f}")
  print(f"Model B: {b['name']:16s} test accuracy {b['test_accuracy']:.4f}\n")
  print(f"{'matrix':40s} {'shape':>7s} {'mean':>7s} {'depth-matched':>14s} {'NaN':>4s} "
        f"{'not converged':>13s}")
  late = 0
  for r in summary["matrices"]:
    shape = "x".join(map(str, r["shape"]))
    count = r.get("unconverged_cells")
    if r["matrix"].endswith("/accuracy"):  # one count per objective
      late += count or 0
    print(f"{r['matrix']:40s} {shape:>7s} {r['mean']:7.3f} {r['depth_matched_mean']:14.3f} "
          f"{r['nan_cells']:4d} {'' if count is None else count:>13}")
  print("\nEvery trained stitch converged." if not late else
        f"\n{late} trained stitches did not converge (framed in red in the figures; "
        "their accuracy understates the stitch): raise stitch.epochs or stitch.min_steps.")
