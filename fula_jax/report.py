"""The report every matrix job ends with: ``<workdir>/report.md`` and
``<workdir>/results/overview.png`` (the quickstart's, for any set of matrices).

A report names the models, shows the overview (similarities and stitching accuracies on
one colour scale), the baselines a stitching cell is read against, and a table of every
matrix: mean, depth-matched mean, NaN and unconverged cells, and what it says.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fula_jax import analysis, io, reporting, results

REPORT_FILE = "report.md"
OVERVIEW_FILE = "overview.png"

# What the quickstart's matrices say, one line each; other measures use their own
# registered description (meta['description']).
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
CKA_NAMES = ("cka_linear_debiased", "cka_linear")


def _is_stitch(key: str) -> bool:
  return key.startswith("stitch_")


def table_rows(saved: Mapping[str, results.Matrix]) -> list[dict[str, Any]]:
  """One summary row per matrix (for a stitching objective: its accuracy matrices)."""
  rows = []
  for key, m in sorted(saved.items()):
    if _is_stitch(key) and not key.endswith(("/accuracy", "/relative_accuracy")):
      continue
    finite = m.matrix[np.isfinite(m.matrix)]
    rows.append({"matrix": key, "mean": float(finite.mean()) if finite.size else None,
                 "depth_matched_mean": (analysis.depth_matched_mean(m)
                                        if m.meta.get("axes") != "models" else None),
                 "nan_cells": int(np.isnan(m.matrix).sum()),
                 "unconverged_cells": (len(m.meta.get("unconverged") or {})
                                       if _is_stitch(key) else None),
                 "shape": list(m.matrix.shape)})
  return rows


def overview_panels(saved: Mapping[str, results.Matrix]
                    ) -> tuple[list[results.Matrix], list[str]]:
  """One CKA matrix (or, without one, every similarity in [0, 1]), then each stitching
  objective's accuracy: the matrices that share the [0, 1] scale."""
  panels, titles = [], []
  cka = next((k for k in CKA_NAMES if k in saved), None)
  for key in ([cka] if cka else sorted(
      k for k, m in saved.items() if not _is_stitch(k) and m.meta.get("kind") !=
      "distance" and tuple(m.meta.get("value_range") or (0.0, 1.0)) == (0.0, 1.0))):
    panels.append(saved[key])
    titles.append({"cka_linear_debiased": "linear CKA (debiased)",
                   "cka_linear": "linear CKA"}.get(key, key))
  order = list(OBJECTIVE_TITLES)  # TLM, SLM, DM, FuLA, then any other objective

  def rank(key):
    base = key[len("stitch_"):].partition("/")[0].partition("@")[0]
    return (order.index(base) if base in order else len(order), key)

  for key in sorted((k for k in saved if _is_stitch(k) and k.endswith("/accuracy")),
                    key=rank):
    obj, _, _ = key[len("stitch_"):].partition("/")
    base, _, form = obj.partition("@")
    label = OBJECTIVE_TITLES.get(base, base) + (f" ({form})" if form else "")
    panels.append(saved[key])
    titles.append(f"{label} stitching accuracy")
  return panels, titles


def write_overview(workdir, saved: Mapping[str, results.Matrix], name_a: str,
                   name_b: str):
  """`<workdir>/results/overview.png`: the overview panels on one [0, 1] colour scale;
  its path, or None when no matrix shares that scale."""
  panels, titles = overview_panels(saved)
  if not panels:
    return None
  axes = ("rows and columns: models" if panels[0].meta.get("axes") == "models" else
          f"rows: layers of A = {results.display_name(name_a)}    columns: layers of "
          f"B = {results.display_name(name_b)}")
  fig = results.overview(panels, titles, vmin=0.0, vmax=1.0,
                         label="similarity / stitched test accuracy", suptitle=axes)
  path = io.path(workdir) / results.RESULTS_DIR / OVERVIEW_FILE
  io.write_bytes(path, reporting.png_bytes(fig))
  return path


def meaning(key: str, m: results.Matrix | None = None) -> str:
  """What one matrix says, in a line."""
  if _is_stitch(key):
    obj, _, measure = key[len("stitch_"):].partition("/")
    base = obj.partition("@")[0]
    if measure == "relative_accuracy":
      return f"{OBJECTIVE_TITLES.get(base, base)} accuracy divided by B's own accuracy"
    return MEANINGS.get(base, base)
  if key in MEANINGS:
    return MEANINGS[key]
  text = str((m.meta.get("description") if m is not None else "") or key)
  return text.split(". ")[0].rstrip(".")


def baseline_lines(saved: Mapping[str, results.Matrix]) -> list[str]:
  """How to read the stitching cells: B's own accuracy, chance, and per objective the
  mean of B's self-stitch at its points (the ceiling) and of the cells relative to it."""
  rows = []
  for key, m in sorted(saved.items()):
    if not (_is_stitch(key) and key.endswith("/accuracy")) or not m.meta.get("baseline"):
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


def write(workdir, title: str, model_lines: Sequence[str],
          saved: Mapping[str, results.Matrix], *, name_a: str = "", name_b: str = "",
          notes: Sequence[str] = ()) -> list[dict[str, Any]]:
  """`<workdir>/report.md` (and the overview figure): the title, the models, the
  overview, the baselines, the table of every matrix and `notes`. Returns the table's
  rows (for the job's summary)."""
  rows = table_rows(saved)
  if not io.is_writer():
    return rows
  overview = write_overview(workdir, saved, name_a, name_b)
  lines = [f"# {title}", ""] + [f"- {line}" for line in model_lines] + [""]
  if overview is not None:
    lines += [f"![overview]({results.RESULTS_DIR}/{OVERVIEW_FILE})", "",
              "Similarities in [0, 1] and, for each stitching objective, the test "
              "accuracy of A's layer i stitched into B's layer j, on one colour scale "
              "(hatched cells are NaN: see each matrix's reasons).", ""]
  lines += baseline_lines(saved)
  lines += ["## Matrices", ""]
  lines += reporting.md_table(
      ["matrix", "shape", "mean", "depth-matched mean", "NaN", "not converged",
       "what it says"],
      [[f"`{r['matrix']}`", "x".join(map(str, r["shape"])), reporting.fmt(r["mean"], ".3f"),
        reporting.fmt(r["depth_matched_mean"], ".3f"), str(r["nan_cells"]),
        "" if r["unconverged_cells"] is None else str(r["unconverged_cells"]),
        meaning(r["matrix"], saved[r["matrix"]])] for r in rows])
  lines += ["", "Not converged: trained stitches whose loss still fell at the end of "
            "training (`stitch_<objective>/converged`, framed in red in the figures); "
            "their accuracy understates the stitch. Depth-matched mean: the mean over "
            "cells at the same relative depth in both models. Every matrix is in "
            "`results/` as `.npz`, `.csv` and `.png`; load them with "
            "`fula_jax.results.load(workdir)`.", ""]
  lines += list(notes)
  io.write_text(io.path(workdir) / REPORT_FILE, "\n".join(lines))
  return rows


def print_table(rows: Sequence[Mapping[str, Any]], *, convergence: bool = True) -> None:
  """`table_rows` as a table on stdout, then (`convergence`) one line on convergence
  when the rows hold stitching matrices."""
  print(f"{'matrix':40s} {'shape':>7s} {'mean':>7s} {'depth-matched':>14s} {'NaN':>4s} "
        f"{'not converged':>13s}")
  late, stitched = 0, False
  for r in rows:
    shape = "x".join(map(str, r["shape"]))
    count = r.get("unconverged_cells")
    if r["matrix"].endswith("/accuracy") and count is not None:  # once per objective
      late += count
      stitched = True
    print(f"{r['matrix']:40s} {shape:>7s} {reporting.fmt(r['mean'], '.3f'):>7s} "
          f"{reporting.fmt(r['depth_matched_mean'], '.3f'):>14s} {r['nan_cells']:4d} "
          f"{'' if count is None else count:>13}")
  if stitched and convergence:
    print("\nEvery trained stitch converged." if not late else
          f"\n{late} trained stitches did not converge (framed in red in the figures; "
          "their accuracy understates the stitch): raise stitch.epochs or "
          "stitch.min_steps.")
