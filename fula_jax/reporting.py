"""Small pieces the study reports share: markdown tables, number formatting, PNG bytes
of a matplotlib figure (no pyplot state, so it is safe in threads and in Colab), and
the rule for when a study's models are too weak to carry a finding."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  """Lines of a GitHub-flavoured markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(r) + " |" for r in rows]


def fmt(v: float | None, spec: str = ".4f") -> str:
  """`v` formatted, or an em dash for None / NaN / inf."""
  return "—" if v is None or not np.isfinite(v) else format(v, spec)


def figure(figsize: tuple[float, float], layout: str | None = None):
  """A matplotlib Figure with an Agg canvas, outside pyplot's global state."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, layout=layout)
  FigureCanvasAgg(fig)
  return fig


def png_bytes(fig, dpi: int = 110) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  return buf.getvalue()


def model_problem(name: str, accuracy: float, robust: float | None,
                  num_classes: int) -> str:
  """Why model `name` cannot carry a study's finding ('' when it can): an accuracy
  under twice chance means it learned nothing; an accuracy under its own attack
  (`robust`, None for a standard model) under 1.5x chance means it is not robust."""
  chance = 1.0 / num_classes
  if accuracy < 2 * chance:
    return f"{name}: accuracy {accuracy:.3f} (chance {chance:.2f})"
  if robust is not None and robust < 1.5 * chance:
    return f"{name}: accuracy {robust:.3f} under its own attack (chance {chance:.2f}): " \
           "not robust"
  return ""


def no_finding(problems: Sequence[str], what: str) -> str:
  """The sentence a report gives instead of `what` when its models are too weak."""
  return (f"No {what}: the models are near chance, so the matrices say nothing about how "
          "they differ (" + "; ".join(problems) + "). Train them longer "
          "(config.models.<arch>.train) or use a smaller eps.")
