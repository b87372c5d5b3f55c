"""The package's shape: no import cycle among fula_jax's modules, counting the imports
made inside functions (a lazy import hides a cycle from Python, not from a reader)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package's modules it imports, anywhere in its file."""
  files = {}
  for path in (root / "fula_jax").rglob("*.py"):
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    files[name.removesuffix(".__init__")] = path

  def owner(name: str) -> str:
    while name and name not in files:
      name = name.rpartition(".")[0]
    return name

  graph = {m: set() for m in files}
  for module, path in files.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parts + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                   for a in node.names]
      else:
        continue
      graph[module].update(owner(t) for t in targets
                           if t.startswith("fula_jax") and owner(t) not in ("", module))
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a path (first module repeated at the end), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(v: str) -> list[str] | None:
    state[v] = 1
    path.append(v)
    for w in sorted(graph[v]):
      if state.get(w) == 1:
        return path[path.index(w):] + [w]
      if w not in state and (found := visit(w)):
        return found
    path.pop()
    state[v] = 2
    return None

  for v in sorted(graph):
    if v not in state and (found := visit(v)):
      return found
  return None


def test_the_cycle_finder_finds_a_planted_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c",
                                                                          "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_with_function_level_imports_counted():
  graph = import_graph(ROOT)
  assert "fula_jax.stitching.api" in graph and graph["fula_jax.stitching.api"]
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


CONFIG_PROBE = """
import json, sys
import jax
from fula_jax import models, stitching
from fula_jax.stitching import testing
KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes", "jax_enable_x64")
before = {k: getattr(jax.config, k) for k in KEYS}
a = models.get_model("mlp", widths=(8,))
va = models.init(a, jax.random.PRNGKey(0), (1, 8, 8, 1))
train, test = testing.synthetic_splits(64, 32)
stitching.run_sweep(a, va, a, va, train, test,
                    dict(objectives=["dm"], progress=False, baselines=False),
                    workdir=sys.argv[1])
print(json.dumps({"before": before, "after": {k: getattr(jax.config, k) for k in KEYS}}))
"""


def test_a_sweep_into_a_workdir_leaves_jax_configuration_as_it_found_it(tmp_path):
  """A library call changes no process-wide JAX setting (the persistent compilation
  cache included); the command-line jobs turn the cache on themselves."""
  import json
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  out = subprocess.run([sys.executable, "-c", CONFIG_PROBE, str(tmp_path / "sweep")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  seen = json.loads(out.stdout.strip().splitlines()[-1])
  assert seen["after"] == seen["before"]
  assert not seen["before"]["jax_compilation_cache_dir"]
  assert (tmp_path / "sweep").is_dir() and not (tmp_path / "sweep" /
                                                "compilation_cache").exists()
