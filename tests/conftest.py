"""Test set-up: 8 fake CPU devices (so sharding is exercised), quiet TensorFlow, the
repository root on sys.path so tests import `experiments.*` and `configs.*` as the
study jobs do, and shared fixtures (a model workdir factory, a notebook runner, runs
computed once per test session and shared by the test files that read them)."""

import os
import pathlib
import sys

from fula_jax import cpu_flags  # imports no JAX, so it may come before XLA_FLAGS is set

# The jobs' CPU flag too, so that numbers computed here and by a job's process agree.
os.environ.setdefault("XLA_FLAGS", cpu_flags.with_ynn_convolutions_off(
    "--xla_force_host_platform_device_count=8"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TFDS_DATA_DIR", "/nonexistent-fula-jax-tfds")  # never download


def _one_compilation_cache_for_subprocesses() -> None:
  """One persistent XLA compilation cache for the jobs and notebook kernels that tests
  start as processes of their own (`shared_runs.cli_env`, `run_notebook`): they compile
  the same one-device programs (the quickstart's, then the notebook that explores its
  results), and each reads back what an earlier one compiled. Set up here, before
  pytest-xdist starts its workers, so both workers inherit the same directory. The
  workers themselves do not use it: their programs are mostly their own, and writing
  each one to disk (ImageNet-sized torch models included) cost more than it saved."""
  if os.environ.get(XLA_CACHE_ENV):
    return
  import atexit
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix="fula-jax-tests-xla-cache-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ[XLA_CACHE_ENV] = path


XLA_CACHE_ENV = "FULA_JAX_TESTS_XLA_CACHE"
_one_compilation_cache_for_subprocesses()


def subprocess_cache_env() -> dict[str, str]:
  """The environment variables that point a job's process at the run's shared cache."""
  return {"JAX_COMPILATION_CACHE_DIR": os.environ[XLA_CACHE_ENV],
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

_REPO = str(pathlib.Path(__file__).resolve().parents[1])
NOTEBOOKS = pathlib.Path(_REPO) / "notebooks"
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)


import pytest  # noqa: E402

# Training jobs load TensorFlow (clu's TensorBoard writer), and triton, which
# torch.optim loads, segfaults when it is loaded after TensorFlow. A test worker runs
# both kinds of test (the README walk in one process), so torch's part loads first.
try:
  import torch._dynamo  # noqa: E402,F401
except ImportError:  # the suite without the torch extra
  pass


@pytest.fixture(scope="session")
def model_workdir():
  """Factory: a `job=train`-style workdir (config.json and one orbax checkpoint) of a
  randomly initialised zoo model on native 8x8 digits, without training it."""

  def make(path, name, kwargs, channels=1, seed=0):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from fula_jax import defaults, io, models
    from fula_jax.train import checkpoint
    cfg = defaults.load_config(pathlib.Path(_REPO) / "configs" / "train.py",
                               f"model={name},runlocal,seed={seed}")
    cfg.model.kwargs = kwargs
    cfg.data.image_size = None  # native 8x8 digits
    cfg.data.channels = channels
    io.write_json(path / checkpoint.CONFIG_FILE, cfg.to_dict())
    model = models.get_model(name, num_classes=10, **kwargs)
    variables = models.init(model, jax.random.PRNGKey(seed), (1, 8, 8, channels))
    tree = {"step": np.int32(1), **jax.tree_util.tree_map(np.asarray, variables)}
    mngr = checkpoint.manager(path)
    mngr.save(1, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
    return str(path)

  return make


@pytest.fixture(scope="session")
def computed_once(tmp_path_factory):
  """Factory: `computed_once(name, make)` is a directory that `make(path)` filled, made
  once per test session even across pytest-xdist's worker processes (a file lock; a
  worker that asks while another computes waits for it). For runs that several test
  files read, such as the tiny quickstart or a study, so the suite pays for each once.

  The directory is shared: read it, or copy it before changing anything in it."""
  import fcntl
  import shutil
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the run's directory, above each worker's own
  def get(name: str, make) -> pathlib.Path:
    path = base / f"computed-once-{name}"
    with open(base / f"computed-once-{name}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)  # what a failed attempt left
        path.mkdir()
        make(path)
        (path / ".complete").touch()
    return path

  return get


@pytest.fixture(scope="session")
def run_notebook():
  """Factory: execute ``notebooks/<name>.ipynb`` top to bottom in a fresh kernel whose
  working directory is `cwd`, as a user would, after appending `params` to its cell
  tagged 'parameters' (papermill's convention; only names that cell assigns). Any cell
  error fails the test with that cell's traceback. Returns the executed notebook.

  The kernel sees one CPU device, as on a Colab CPU runtime."""

  def run(name, cwd, *, timeout=600, **params):
    import ast

    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    declared = {t.id for node in ast.parse(cell.source).body
                if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    unknown = sorted(set(params) - declared)
    if unknown:
      raise KeyError(f"{name}.ipynb has no parameter {unknown}; it has {sorted(declared)}.")
    if params:
      cell.source += "\n# set by the test\n" + "\n".join(
          f"{k} = {v!r}" for k, v in params.items())
    env = dict(os.environ, XLA_FLAGS=cpu_flags.with_ynn_convolutions_off(
        "--xla_force_host_platform_device_count=1"), **subprocess_cache_env())
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb

  return run


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """After each test file, drop JAX's compiled programs (and the code memory they map).

  A pytest worker lives for the whole run and compiles thousands of XLA programs. Each
  one maps about 15 memory regions of JIT code that stay mapped while JAX caches it, and
  Linux allows a process 65,530 by default (vm.max_map_count). At that limit LLVM cannot
  map the next program's code and the worker dies inside an XLA compile (an abort in
  RuntimeDyld's emitSection in one core dump, a segmentation fault in other runs), in
  whichever test happens to compile next."""
  yield
  if "jax" not in sys.modules:
    return
  import gc

  import jax
  jax.clear_caches()
  gc.collect()
  try:
    limit = int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    mapped = len(pathlib.Path("/proc/self/maps").read_text().splitlines())
  except OSError:  # not Linux
    return
  if mapped > limit // 2:
    raise RuntimeError(
        f"This test worker still maps {mapped} memory regions after its compiled programs "
        f"were released (the kernel allows {limit}); something this file created holds "
        f"compiled programs alive (a jax.stages.Compiled kept in a session fixture or a "
        f"module global). The worker would abort inside a later compile.")
