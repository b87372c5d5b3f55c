"""The README, run as a reader runs it: every CPU example block in order, from a fresh
directory that holds what a clone holds (configs/, experiments/, notebooks/), so a
renamed function, a flag that no longer parses or an example that needs something no
earlier example made breaks a test, not a reader.

Each job's command runs at its config's `:tiny` twin and each benchmark with `--tiny`,
as the README says the suite does; Python blocks share one namespace, as if pasted into
one session. The quickstart and the two studies are the runs their own test files
compute (`computed_once`): the walk copies each into its workdir before running the
command, which then resumes it (reusing the models and stitches) and writes everything
a run writes. Blocks marked as needing an accelerator, and those for several hosts, are
checked to be marked, not run."""

import ast
import contextlib
import dataclasses
import io
import os
import pathlib
import re
import shlex
import shutil
import sys
import time
import traceback

import numpy as np
import pytest

import shared_runs

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent
# Commands whose tiny run other test files read too (tests/shared_runs.py).
SHARED = {"quickstart.py": "quickstart-tiny", "study_fula.py": "study_fula-tiny",
          "study_jones.py": "study_jones-tiny"}


@dataclasses.dataclass
class Step:
  """One README command or Python block, and what running it gave."""
  line: int
  heading: str
  kind: str             # cli | script | python | suite (this test suite) | accelerator
  text: str
  rc: int | None = None
  printed: str = ""
  values: list = dataclasses.field(default_factory=list)  # a Python block's expressions
  scope: dict | None = None                                # its namespace after it ran
  returned: object = None                                  # a benchmark's main()
  stderr: str = ""
  seconds: float = 0.0


def _blank_code(text: str) -> str:
  return re.sub(r"```.*?```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)


def readme_steps() -> list[Step]:
  """Every command of the README's bash blocks (continuation lines joined) and every
  Python block, in order, with the heading it sits under and what kind it is. A run of
  comment lines that says "accelerator" marks the commands after it."""
  text = README.read_text()
  prose = _blank_code(text)
  steps = []
  for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
    lang, body = block.group(1), block.group(2)
    line = text[:block.start()].count("\n") + 2
    headings = re.findall(r"^#+ (.+)$", prose[:block.start()], re.M)
    heading = headings[-1] if headings else ""
    if lang == "python":
      steps.append(Step(line, heading, "python", body))
      continue
    if lang != "bash":
      assert "python " not in body, f"README line {line}: a command outside a bash block"
      continue
    marked, in_comment = False, False
    for at, cmd in _logical_lines(body, line):
      if not cmd:
        continue
      if cmd.startswith("#"):
        marked = (marked and in_comment) or "accelerator" in cmd
        in_comment = True
        continue
      in_comment = False
      last = cmd.split("&&")[-1].strip()
      kind = ("accelerator" if marked or heading == "Several hosts" else
              "suite" if last.startswith("python -m pytest") else
              "cli" if last.startswith("python -m fula_jax.main") else
              "script" if last.startswith("python experiments/") else "unknown")
      steps.append(Step(at, heading, kind, last))
  return steps


def _logical_lines(body: str, first: int):
  """(README line, text) of each line of a shell block, continuation lines joined."""
  start, parts = None, []
  for k, raw in enumerate(body.splitlines()):
    start = first + k if start is None else start
    raw = raw.strip()
    if raw.endswith("\\"):
      parts.append(raw[:-1].strip())
      continue
    yield start, " ".join(parts + [raw])
    start, parts = None, []


def _tiny(argv: list[str]) -> list[str]:
  """The command at its config's `:tiny` twin (every CPU command is `:runlocal`)."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      path, _, args = a.partition(":")
      parts = args.split(",")
      assert "runlocal" in parts, f"{a}: a CPU example runs at :runlocal"
      a = f"{path}:{','.join('tiny' if p == 'runlocal' else p for p in parts)}"
    out.append(a)
  return out


def _flag(argv: list[str], name: str) -> str:
  return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def run_cli(argv: list[str]) -> int:
  """`python -m fula_jax.main ARGV` in this process (absl parses sys.argv; the config
  overrides it registered for the previous command are dropped first). XLA_FLAGS, which
  a job may extend for its own process (`fula_jax.cpu_flags`), is restored after it,
  as the next command's process would start without it."""
  from absl import flags

  from fula_jax import main
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  saved, sys.argv = sys.argv, ["fula_jax.main", *argv]
  xla_flags = os.environ.get("XLA_FLAGS")
  try:
    main.main(main.parse_flags(sys.argv))
    return 0
  except SystemExit as e:
    return int(e.code or 0)
  finally:
    sys.argv = saved
    if xla_flags is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = xla_flags


def _exec_block(code: str, scope: dict) -> list:
  """Run a Python block as a notebook cell would, keeping each top-level expression's
  value."""
  values: list = []
  scope["_readme_values"] = values
  for node in ast.parse(code).body:
    if isinstance(node, ast.Expr):
      keep = ast.Attribute(ast.Name("_readme_values", ast.Load()), "append", ast.Load())
      node = ast.copy_location(ast.Expr(ast.Call(keep, [node.value], [])), node)
    module = ast.fix_missing_locations(ast.Module([node], []))
    exec(compile(module, "README.md", "exec"), scope)
  return values


class Walk:
  """Runs the README's steps in order, once, in `root`."""

  def __init__(self, root: pathlib.Path, computed_once):
    self.root, self.computed_once = root, computed_once
    self.steps = readme_steps()
    self.done = 0
    self.scope: dict = {}
    for folder in ("configs", "experiments", "notebooks"):
      (root / folder).symlink_to(REPO / folder, target_is_directory=True)

  def run_to(self, index: int) -> None:
    while self.done <= index:
      step = self.steps[self.done]
      self.done += 1
      before = [s for s in self.steps[:self.done - 1] if s.rc not in (None, 0)]
      if before:
        step.rc, step.printed = 1, f"not reached: README line {before[0].line} failed"
        continue
      self._run(step)

  def _run(self, step: Step) -> None:
    if step.kind in ("suite", "accelerator"):
      return
    printed, errors = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    cwd = os.getcwd()
    os.chdir(self.root)
    try:
      with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        if step.kind == "cli":
          argv = _tiny(shlex.split(step.text)[3:])
          self._seed(argv)
          step.rc = run_cli(argv)
        elif step.kind == "script":
          argv = shlex.split(step.text)
          module = pathlib.Path(argv[1]).stem
          __import__(f"experiments.{module}")
          step.returned = sys.modules[f"experiments.{module}"].main(argv[2:] + ["--tiny"])
          step.rc = 0
        elif step.kind == "python":
          step.values = _exec_block(step.text, self.scope)
          step.scope, step.rc = dict(self.scope), 0
        else:
          raise AssertionError(f"README line {step.line}: cannot tell how to run "
                               f"{step.text!r}")
    except Exception:  # noqa: BLE001 -- recorded; the step's test shows it
      step.rc = 1
      printed.write(traceback.format_exc())
    finally:
      os.chdir(cwd)
    step.printed, step.stderr = printed.getvalue(), errors.getvalue()
    step.seconds = time.perf_counter() - start
    print(f"README line {step.line}: {step.seconds:.1f} s, rc {step.rc}: {step.text[:70]}")

  def _seed(self, argv: list[str]) -> None:
    config = pathlib.Path(_flag(argv, "config").partition(":")[0]).name
    if config in SHARED:
      name = SHARED[config]
      shared = self.computed_once(name, shared_runs.MAKERS[name])
      shutil.copytree(shared / shared_runs.WORKDIRS[name], self.root / _flag(argv, "workdir"))

  def step(self, heading: str, kind: str = "python", nth: int = 0) -> Step:
    """The nth step of `kind` under `heading`, run (with every step before it)."""
    found = [k for k, s in enumerate(self.steps) if s.heading == heading and s.kind == kind]
    index = found[nth]
    self.run_to(index)
    return self.steps[index]


@pytest.fixture(scope="module")
def walk(tmp_path_factory, computed_once):
  """The walk, in a fresh directory; afterwards JAX's persistent compilation cache,
  which the first job turned on for this process, is as it was."""
  import jax
  from jax._src import compilation_cache
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  before = {k: getattr(jax.config, k) for k in keys}
  yield Walk(tmp_path_factory.mktemp("fresh clone"), computed_once)
  for k, v in before.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def _ok(step: Step) -> Step:
  assert step.rc == 0, f"README line {step.line}: {step.text[:80]!r}\n{step.printed[-4000:]}"
  return step


def test_every_cpu_example_runs_in_order_and_each_job_ends_with_its_results(walk):
  """Each command exits 0; each job writes summary.json and report.md and ends with
  its results path and next step; every command not run is marked as an
  accelerator's."""
  walk.run_to(len(walk.steps) - 1)
  kinds = [s.kind for s in walk.steps]
  assert "unknown" not in kinds, [s.text for s in walk.steps if s.kind == "unknown"]
  assert kinds.count("cli") >= 10 and kinds.count("script") == 3 and kinds.count("suite") == 1
  for step in walk.steps:
    if step.kind in ("suite", "accelerator"):
      continue
    _ok(step)
    if step.kind != "cli":
      continue
    argv = shlex.split(step.text)[3:]
    workdir = walk.root / _flag(argv, "workdir")
    tail = step.printed.strip().splitlines()[-3:]
    if "configs/train.py" in step.text:
      assert tail[0].startswith("Report:  ") and tail[1].startswith(f"Model:   {workdir} ")
      assert tail[2].startswith("Next:    python -m fula_jax.main"), tail
      assert (workdir / "summary.json").exists()
    else:
      assert tail[0].startswith(f"Results: {workdir}/results"), (step.text, tail)
      assert tail[1].startswith("Report:  ") and tail[2].startswith("Next:    "), tail
      assert (workdir / "summary.json").exists() and (workdir / "results").is_dir()
  accelerator = [s for s in walk.steps if s.kind == "accelerator"]
  assert len(accelerator) == 4, [s.text for s in accelerator]
  assert all("gs://" in s.text or "PATH" in s.text or s.heading == "Several hosts"
             for s in accelerator)


def test_benchmarks_compare_like_with_like(walk):
  """Each benchmark's two ways of computing time the same numbers (a benchmark whose
  baseline computes something else times nothing); speed itself is never asserted."""
  stitching = _ok(walk.step("Running jobs", "script", 0)).returned
  entry = stitching["objectives"]["tlm"]
  assert entry["max_abs_diff"] < 1e-4
  assert entry["sweep"]["stitches"] == entry["loop"]["stitches"] > 0
  assert entry["sweep"]["compile_s"] <= entry["sweep"]["wall_s"]
  similarity = _ok(walk.step("Running jobs", "script", 1)).returned
  assert similarity["max_abs_diff"] < 1e-4 and similarity["ratio"] > 0
  # Against PyTorch: fula_jax and pytorch-cka on the same torch weights agree.
  peer = similarity["peer"]
  assert peer["max_abs_diff_peer"] < 1e-4 and peer["finite"], peer
  assert peer["ours_forward_s"] > 0 and peer["peer_s"] > 0 and peer["loop_s"] > 0
  data = _ok(walk.step("Running jobs", "script", 2))
  assert re.search(r"loader \(4 threads\): \d+ images/s over 64 PNGs", data.printed)


def test_your_own_model_example(walk):
  step = _ok(walk.step("Your own model"))
  scope = step.scope
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
  assert "conv_b:input" not in step.stderr  # named points are not listed


def test_your_pytorch_model_example(walk):
  """The torch net, trained for seconds in torch, compared with a Flax zoo CNN: every
  cell is finite where a map meets a map (or the vector the vector), and the best FuLA
  stitch of each of the torch net's points keeps most of the zoo model's accuracy."""
  scope = _ok(walk.step("Your PyTorch model")).scope
  cka, fits = scope["cka"], scope["fits"]
  assert cka["cka_linear_debiased"].rows == ["relu1", "relu2", "pool"]
  assert np.isfinite(cka["cka_linear_debiased"].matrix).all()
  fula = fits["stitch_fula/accuracy"].matrix
  assert np.isfinite(fula[:2, :2]).all() and np.isfinite(fula[2, 2])
  assert np.nanmax(fula, axis=1).min() >= 0.8, fula


def test_similarity_measures_example(walk):
  """On the pooled features of MyNet and a zoo CNN, both trained on the digits:
  calibrated kNN overlap far above its permutation null, a bootstrap interval around
  the debiased CKA, and a model x model CKNNA matrix with a unit diagonal."""
  calibrated, boot, matrices = _ok(walk.step("Similarity measures")).values
  assert calibrated.p_value < 0.05 and calibrated.z > 3, calibrated
  assert boot.low <= boot.value <= boot.high and boot.high - boot.low > 0, boot
  cknna = matrices["cknna"]
  assert cknna.rows == ["mine", "cnn"] and np.allclose(np.diag(cknna.matrix), 1.0)


def test_results_in_colab_example(walk):
  """The quickstart's matrices, loaded, tabled and diffed against the stitch job's run:
  one row per matrix of either run, and a difference wherever both hold it over the
  same layers."""
  step = _ok(walk.step("Results in Colab"))
  scope = step.scope
  assert scope["m"].measure == "cka_linear_debiased"
  from fula_jax import results
  mats, other = scope["mats"], results.load(walk.root / "workdirs/stitch")
  table = scope["analysis"].diff(mats, other)
  assert set(table["name"]) == set(mats) | set(other)
  same = [n for n in set(mats) & set(other) if mats[n].rows == other[n].rows
          and mats[n].cols == other[n].cols
          and np.isfinite(mats[n].matrix - other[n].matrix).any()]
  assert same and table.set_index("name").loc[same, "max_abs_difference"].notna().all()
  again = scope["analysis"].diff(mats, results.load(walk.root / "workdirs/quickstart"))
  assert (again["max_abs_difference"].dropna() == 0).all()  # a run against itself


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
  for step in readme_steps():
    if step.kind != "cli":
      continue
    line, argv = step.line, shlex.split(step.text)[3:]
    flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
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
