"""The FuLA testbeds study's figures, drawn from the same tidy records and facts as its
report (experiments/fula_report.py): stitched accuracy by depth, the cross-seed
heatmaps, each objective's rating of the pairs, and FuLA vs TLM across stitch maps."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from experiments.fula_report import display, ladder_order
from fula_jax import reporting


def _depth_lines(ax, records, objective, pair, measure, style, label, points):
  ys = []
  for p in points:
    v = [r["value"] for r in records if r["objective"] == objective and r["pair"] == pair
         and r["measure"] == measure and r["end_point"] == p]
    ys.append(v[0] if v else np.nan)
  ax.plot(np.arange(len(points)), ys, style, label=label)


def depth_figure(arch: str, testbed: str, records: Sequence[dict],
                 objectives: Sequence[str], panels: Sequence[tuple[str, str]],
                 lines: Sequence[tuple[str, str, str]], points: Sequence[str],
                 end_levels: Mapping[str, Mapping[str, float]]) -> bytes:
  """Rows = panels (measure, title), columns = objectives, lines = (pair, style, label)
  by the end point's depth; dotted grey lines mark the end models' own accuracy."""
  rec = [r for r in records if r["architecture"] == arch and r["testbed"] == testbed]
  fig = reporting.figure((3.4 * len(objectives), 2.9 * len(panels) + 0.5))
  for i, (measure, title) in enumerate(panels):
    for j, obj in enumerate(objectives):
      ax = fig.add_subplot(len(panels), len(objectives), i * len(objectives) + j + 1)
      for pair, style, label in lines:
        _depth_lines(ax, rec, obj, pair, measure, style, label, points)
      for name, level in end_levels.get(measure, {}).items():
        ax.axhline(level, color="grey", ls=":", lw=1)
        ax.text(len(points) - 1, level, name, fontsize=6, color="grey", ha="right",
                va="bottom")
      ax.set_ylim(0.0, 1.02)
      ax.set_xticks(np.arange(len(points)), points, rotation=45, ha="right", fontsize=7)
      ax.grid(alpha=0.3)
      ax.set_title(f"{display(obj)}: {title}", fontsize=9)
      if j == 0:
        ax.set_ylabel("accuracy")
      if i == 0 and j == len(objectives) - 1:
        ax.legend(fontsize=6)
  fig.suptitle(f"{arch}: {testbed} testbed, stitched accuracy by depth", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def cross_figure(arch: str, res: Any, objectives: Sequence[str], form: str = "affine"
                 ) -> bytes:
  """Accuracy heatmaps of every objective at map `form`, two per row, sized so values
  stay legible."""
  mats = res.matrices()
  n = max(len(res.rows), len(res.cols))
  ncols = min(2, len(objectives))
  nrows = -(-len(objectives) // ncols)
  fig = reporting.figure(((2.4 + 0.55 * n) * ncols, (1.9 + 0.45 * n) * nrows + 0.4))
  for j, obj in enumerate(objectives):
    ax = fig.add_subplot(nrows, ncols, j + 1)
    key = next(k for k in res.values if res.objective_map(k) == (obj, form))
    mats[f"stitch_{key}/accuracy"].plot(ax=ax, vmin=0.0, vmax=1.0, fmt=".2f")
    ax.set_title(f"{display(obj)} stitched accuracy", fontsize=9)
    ax.set_xlabel("end model (standard), point")
    ax.set_ylabel("front model (second seed), point" if j % ncols == 0 else "")
  fig.suptitle(f"{arch}: cross-layer stitching, two seeds", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def summary_figure(arch: str, facts: Mapping[str, Any], objectives: Sequence[str]
                   ) -> bytes | None:
  """Bars per objective: each testbed pair's mean stitched accuracy next to the
  control's."""
  panels = []
  if "robust" in facts:
    f = facts["robust"]
    panels += [("robust vs standard: clean", {"robust->standard": f["clean"],
                                              "control": f["control"]}),
               ("robust vs standard: under PGD", {"robust->standard": f["pgd"],
                                                  "control": f["pgd_control"]})]
  if "shortcut" in facts:
    f = facts["shortcut"]
    bars = {"shortcut->standard, cue present": f["present"], "control": f["control"]}
    if "absent" in f:
      bars["shortcut->standard, cue absent"] = f["absent"]
    panels.append(("shortcut vs clean", bars))
  if not panels:
    return None
  fig = reporting.figure((4.2 * len(panels), 3.4))
  x = np.arange(len(objectives))
  for k, (title, bars) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    width = 0.8 / len(bars)
    for b, (label, vals) in enumerate(bars.items()):
      ax.bar(x + (b - (len(bars) - 1) / 2) * width, [vals[o] for o in objectives],
             width, label=label)
    ax.set_xticks(x, [display(o) for o in objectives])
    ax.set_ylim(0.0, 1.3)
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("mean stitched accuracy over depth")
    ax.legend(fontsize=6, loc="upper center", ncol=2)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle(f"{arch}: how each objective rates the pairs", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def capacity_figure(arch: str, facts: Mapping[str, Any], maps: Sequence[str]
                    ) -> bytes | None:
  """FuLA and TLM against the stitch map (ladder order): each testbed's differing pair
  (solid) and the control (dashed); cross_seed's diagonal contrast. None for one map."""
  maps = ladder_order(maps)
  panels = [t for t in ("robust", "shortcut", "cross_seed") if t in facts]
  if len(maps) < 2 or not panels:
    return None
  fig = reporting.figure((3.8 * len(panels), 3.3))
  x = np.arange(len(maps))
  for k, testbed in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    rows = facts[testbed]
    for obj, color in (("fula", "C0"), ("tlm", "C1")):
      if testbed == "cross_seed":
        ax.plot(x, [rows[m][obj] for m in maps], "o-", color=color, label=display(obj))
        ax.set_ylabel("diagonal minus off-diagonal accuracy")
      else:
        ax.plot(x, [rows[m][obj] for m in maps], "o-", color=color,
                label=f"{display(obj)}, {testbed}->standard")
        ax.plot(x, [rows[m][f"{obj}_control"] for m in maps], "s--", color=color,
                alpha=0.6, label=f"{display(obj)}, control")
        ax.set_ylim(0.0, 1.02)
        ax.set_ylabel("mean stitched accuracy over depth")
    ax.set_xticks(x, maps, rotation=30, ha="right", fontsize=7)
    ax.set_title(testbed, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.suptitle(f"{arch}: FuLA vs TLM across stitch capacities", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)
