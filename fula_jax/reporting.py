"""Small pieces the study reports share: markdown tables, number formatting, PNG bytes
of a matplotlib figure (no pyplot state, so it is safe in threads and in Colab)."""

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
