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
  assert m.rows == ["conv_b:input", "head:input"] and m.cols == ["conv1", "conv2", "pool"]
  assert np.isfinite(m.matrix).all()
  # Like with like: conv_a after its ReLU is non-negative, as the zoo's conv1 is.
  acts = scope["models"].capture(scope["mine"], scope["my_vars"], scope["test"].images[:8])
  assert float(acts[1]["conv_b:input"].min()) == 0.0
  fula = fits["stitch_fula/accuracy"].matrix
  assert np.isfinite(fula[0, :2]).all() and np.isnan(fula[0, 2])  # a map -> the vector
  assert np.isnan(fula[1, :2]).all() and np.isfinite(fula[1, 2])  # the vector -> maps
  assert fula[1, 2] > 0.9  # pooled features stitch into the zoo's pool almost losslessly
  # The donors reach about 0.98; under the default protocol the best stitch of each of
  # my points keeps most of it (chance is 0.1).
  assert np.nanmax(fula, axis=1).min() >= 0.8
  converged = fits["stitch_fula/converged"].matrix
  assert np.array_equal(np.isfinite(converged), np.isfinite(fula))  # every trained cell
  assert "conv_b:input" not in capsys.readouterr().err


def test_your_pytorch_model_example_runs(tmp_path, monkeypatch):
  """The torch net, trained for seconds in torch, compared with a Flax zoo CNN: every
  cell is finite where a map meets a map (or the vector the vector), and the best FuLA
  stitch of each of the torch net's points keeps most of the zoo model's accuracy."""
  monkeypatch.chdir(tmp_path)
  scope: dict = {}
  exec(compile(_block("### Your PyTorch model"), "README.md", "exec"), scope)
  cka, fits = scope["cka"], scope["fits"]
  assert cka["cka_linear_debiased"].rows == ["relu1", "relu2", "pool"]
  assert np.isfinite(cka["cka_linear_debiased"].matrix).all()
  fula = fits["stitch_fula/accuracy"].matrix
  assert np.isfinite(fula[:2, :2]).all() and np.isfinite(fula[2, 2])
  assert np.nanmax(fula, axis=1).min() >= 0.8, fula


def test_similarity_measures_example_runs():
  """The example with small x, y, images and two MLPs defined first."""
  import jax

  from fula_jax import models
  rng = np.random.default_rng(0)
  x = rng.normal(size=(60, 6)).astype(np.float32)
  m_a = m_b = models.get_model("mlp", widths=(8, 8))
  v_a, v_b = (models.init(m_a, jax.random.PRNGKey(s), (1, 8, 8, 1)) for s in (0, 1))
  scope = {"x": x, "y": x + rng.normal(size=x.shape).astype(np.float32),
           "images": rng.uniform(size=(40, 8, 8, 1)).astype(np.float32),
           "m_a": m_a, "v_a": v_a, "m_b": m_b, "v_b": v_b}
  code = _block("### Similarity measures")
  last = code.strip().splitlines()[-1]
  exec(compile(code.replace(last, "out = " + last), "README.md", "exec"), scope)
  assert scope["out"]["cknna"].matrix.shape == (2, 2)
  assert np.isclose(scope["out"]["cknna"].matrix[0, 0], 1.0)


def _commands() -> list[tuple[int, list[str]]]:
  """(line, argv) of every `python -m fula_jax.main` command in the README's bash
  blocks, in order, continuation lines joined."""
  import shlex
  text = README.read_text()
  out = []
  for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
    start = text[:block.start()].count("\n") + 2
    joined = re.sub(r"\\\n\s*", " ", block.group(1))
    for k, line in enumerate(joined.splitlines()):
      cmd = line.split("&&")[-1].strip()
      if cmd.startswith("python -m fula_jax.main") and "gcloud" not in line:
        out.append((start + k, shlex.split(cmd)[3:]))
  return out


def test_every_readme_command_parses_and_reads_only_what_an_earlier_one_made():
  """Each CPU command of the README (those on gs:// or several hosts are the
  accelerator's) names a config that loads with its arguments, overrides only keys the
  config has, and reads only workdirs an earlier README command wrote: no dead end for
  a reader who runs them in order."""
  import ast

  from fula_jax import defaults
  root = README.parent
  made: set[str] = set()
  checked = 0
  for line, argv in _commands():
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if "gs://" in " ".join(argv) or "coordinator_address" in flags or "--multihost" in argv:
      continue
    path, _, arg = flags["config"].partition(":")
    config = defaults.load_config(root / path, arg or None)
    for key, value in flags.items():
      if not key.startswith("config."):
        continue
      node = config
      for part in key.split(".")[1:]:
        assert part in node, f"README line {line}: {key} is not a config key"
        node = node[part]
      reads = ([value] if key.endswith("_workdir") else
               list(ast.literal_eval(value)) if key == "config.models" else [])
      for wd in reads:
        assert wd in made, f"README line {line} reads {wd}, which no earlier command makes"
    made.add(flags["workdir"])
    checked += 1
  assert checked >= 9 and "workdirs/cnn" in made
