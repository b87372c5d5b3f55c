"""The README's Python examples run as written (so a renamed function breaks a test,
not a reader)."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
  text = README.read_text()
  section = text[text.index(heading):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_your_own_model_example_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  exec(compile(_block("## Your own model"), "README.md", "exec"), scope)
  cka, fits = scope["cka"], scope["fits"]
  m = cka["cka_linear_debiased"]
  assert m.rows == ["conv_a", "conv_b"] and m.cols == ["conv1", "conv2", "pool"]
  assert np.isfinite(m.matrix).all()
  fula = fits["stitch_fula/accuracy"].matrix
  assert np.isfinite(fula[:, :2]).all() and np.isnan(fula[:, 2]).all()  # map -> vector
  assert fits["stitch_dm/accuracy"].matrix[1, 1] > 0.5  # conv_b -> conv2 stitches well
  assert "conv_a" not in capsys.readouterr().err
