"""Meshes, putting host data on devices, fetching it back, and the compilation cache.

The one place for them: training, similarity and stitching build their meshes here.
Every mesh uses `jax.sharding.Mesh`, whose axes are Auto (``jax.make_mesh`` defaults to
Explicit axes, and `shard_map` then rejects unsharded inputs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def devices(num: int | None = None) -> list[Any]:
  """The first `num` devices of every process (all of them by default)."""
  devs = jax.devices()
  if num:
    if num > len(devs):
      raise ValueError(f"Asked for {num} devices but there are only {len(devs)}.")
    devs = devs[:num]
  return list(devs)


def line_mesh(axis: str, devs: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh named `axis` over `devs` (default: every device of every process)."""
  return Mesh(np.asarray(list(devs) if devs is not None else jax.devices()), (axis,))


def grid_mesh(devs: Sequence[Any], ways: int, axes: tuple[str, str]) -> Mesh:
  """A (ways x rest) mesh over `devs` in their order, so arrays replicated on the 1-D
  mesh of the same devices are valid inputs without a copy."""
  return Mesh(np.asarray(list(devs)).reshape(ways, -1), axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def split(mesh: Mesh, axis: str | None = None) -> NamedSharding:
  """Leading axis split over mesh axis `axis` (default: the mesh's first)."""
  return NamedSharding(mesh, P(axis or mesh.axis_names[0]))


def put(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_tree(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree_util.tree_map(lambda a: put(a, sharding), tree)


def put_local(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array whose leading axis is split over processes: each process passes
  its own contiguous slice (its shard of a batch)."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, x)


def fetch(tree: Any) -> Any:
  """Host NumPy copy of a (possibly multi-host) pytree, on every process."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree_util.tree_map(one, tree)


def needs_sync(mesh: Mesh) -> bool:
  """Whether to wait for each collective program before dispatching the next.

  On the CPU backend, back-to-back asynchronous executions of programs with collectives
  over several (fake) devices can starve each other's rendezvous and abort after 40 s
  (seen with jax 0.10.2 on a 2-core machine); accelerators need no such wait.
  """
  return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


# ------------------------------------------------------------------ compilation


def use_compilation_cache(path: str | os.PathLike | None) -> str | None:
  """Keep every compiled program in JAX's persistent cache at `path`, so a rerun or a
  resumed job compiles nothing. A cache the user already set up (``JAX_COMPILATION_
  CACHE_DIR`` or ``jax.config``) wins. Returns the directory in use, or None.

  JAX's cache is process-wide by design, so this sets JAX's config; programs that
  compile in under a second are cached too (JAX's default skips them, and on a CPU
  most programs do). The command-line jobs call it with ``<workdir>/compilation_cache``;
  library calls never do unless given a path (``stitch.compilation_cache=PATH``). In a
  notebook, call it once, before the first sweep:

    from fula_jax import sharding
    sharding.use_compilation_cache("/content/drive/MyDrive/xla_cache")
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if not path:
    return None
  from fula_jax import io
  path = io.resolve(path)
  if not io.is_remote(path):
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


@dataclasses.dataclass
class CompileCount:
  """Programs XLA compiled (not read back from the persistent cache) and their time."""
  requests: int = 0     # backend compilations asked for, cache hits included
  from_cache: int = 0   # of those, read back from the persistent cache
  seconds: float = 0.0  # time in backend compilation (and cache retrieval)

  @property
  def compiled(self) -> int:
    return self.requests - self.from_cache


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_LOCK = threading.Lock()
_SCOPE = threading.local()


def current_compile_scope() -> str | None:
  return getattr(_SCOPE, "name", None)


@contextlib.contextmanager
def compile_scope(name: str | None) -> Iterator[None]:
  """Compilations in this thread inside the block count only for
  ``count_compiles(scope=name)`` (e.g. a background thread compiling ahead)."""
  before = current_compile_scope()
  _SCOPE.name = name
  try:
    yield
  finally:
    _SCOPE.name = before


@contextlib.contextmanager
def count_compiles(scope: str | None = None) -> Iterator[CompileCount]:
  """Counts the programs this process compiles inside the ``with`` block, in threads
  of compile scope `scope` (see `compile_scope`; None: threads outside any scope).

  A program read back from the persistent cache counts in `from_cache`, not in
  `compiled`; its (short) retrieval time still counts in `seconds`.
  """
  count = CompileCount()

  def mine() -> bool:
    return current_compile_scope() == scope

  def on_duration(event: str, duration: float, **_: Any) -> None:
    if event == _COMPILE_EVENT and mine():
      with _LOCK:
        count.requests += 1
        count.seconds += duration

  def on_event(event: str, **_: Any) -> None:
    if event == _CACHE_HIT_EVENT and mine():
      with _LOCK:
        count.from_cache += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
    jax.monitoring.unregister_event_listener(on_event)
