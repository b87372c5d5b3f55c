"""The notebooks in notebooks/ as shipped: valid, outputs cleared, each one installable
on Colab and executed end to end by a test (this file runs compare_your_models; the
others run beside the fixtures they read: explore_results in test_cli.py on two
quickstart runs, reproduce_jones in test_study_jones.py on the tiny study)."""

from __future__ import annotations

import ast
import pathlib
import re

import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = {"explore_results", "compare_your_models", "reproduce_jones"}


def test_every_notebook_is_clean_valid_and_executed_by_a_test():
  assert {p.stem for p in NOTEBOOKS} == EXPECTED
  tests = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
      assert not c.outputs and c.execution_count is None, f"{path.name}: outputs not cleared"
      ast.parse("\n".join(l for l in c.source.splitlines() if not l.startswith("%")))
    assert "find_spec(\"fula_jax\")" in code[0].source and "pip" in code[0].source, (
        f"{path.name}: the first code cell must install fula_jax on Colab")
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: one cell tagged 'parameters'"
    assert f'run_notebook("{path.stem}"' in tests, f"no test executes {path.name}"


def test_compare_your_models_notebook(tmp_path, run_notebook):
  """Runs at its smallest setting and shows what it promises."""
  nb = run_notebook("compare_your_models", tmp_path, TRAIN_STEPS=100, STITCH_EPOCHS=0.25)
  text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   for c in nb.cells for o in c.get("outputs", []))
  for name in ("models/cka_linear", "models/mutual_knn", "stitch_dm/accuracy",
               "stitch_fula/accuracy", "cka_linear_debiased"):
    assert f"'{name}'" in text, name  # the results saved and loaded back
  assert "points ('conv_a', 'conv_b', 'hidden')" in text
  assert "points ('block0', 'block1', 'block2', 'hidden')" in text
  figures = sum("image/png" in o.get("data", {}) for c in nb.cells
                for o in c.get("outputs", []))
  assert figures == 3  # CKA heatmap, CKA + stitching overview, model x model

  # Trained for seconds, both models are far above chance (0.1) on the held-out digits.
  accuracies = [float(a) for a in re.findall(r"test accuracy ([0-9.]+)", text)]
  assert len(accuracies) == 2 and min(accuracies) > 0.4, accuracies
  # And so is the FuLA panel: every row has a cell far above chance, and every trained
  # cell converged under the default protocol.
  best = ast.literal_eval(re.search(r"FuLA best cell per row: (\{.*?\})", text).group(1))
  assert set(best) == {"conv_a", "conv_b", "hidden"} and min(best.values()) > 0.5, best
  assert "cells that did not converge: none" in text


def test_install_cell_says_what_to_set_instead_of_failing_in_git(tmp_path, monkeypatch):
  """On a fresh runtime with the placeholder REPO_URL, the first cell stops with one
  line naming REPO_URL, not git's exit status 128."""
  import importlib.util
  import pytest
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    with pytest.raises(SystemExit, match="Set REPO_URL"):
      exec(compile(first, path.name, "exec"), {})
