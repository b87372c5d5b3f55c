"""Compiling a wave's programs before they run: from the shapes and shardings of their
calls, each distinct program once, in a thread pool (XLA releases the GIL), optionally
recording each program's FLOPs for the profile."""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Callable, MutableMapping, Sequence

import jax

from fula_jax import progress as progress_lib
from fula_jax import sharding

Call = tuple[Callable, tuple, dict]  # a jitted function, abstract args, kwargs with ctx


def distinct(calls: Sequence[Call]) -> list[Call]:
  """`calls` without repeats of one program (same function, ctx and argument types),
  which would otherwise compile twice in parallel threads."""
  unique = {}
  for fn, args, kwargs in calls:
    leaves, tree = jax.tree_util.tree_flatten(args)
    sig = tuple((getattr(a, "shape", None), str(getattr(a, "dtype", type(a))),
                 str(getattr(a, "sharding", None))) for a in leaves)
    unique.setdefault((fn, kwargs["ctx"], tree, sig), (fn, args, kwargs))
  return list(unique.values())


def profile_key(fn: Callable, args: tuple, ctx: Any) -> tuple:
  """A program's key in a sweep's profile: function, ctx and argument shapes (one ctx
  may serve programs of several shapes, e.g. the donor pass of waves of other points)."""
  leaves = jax.tree_util.tree_leaves(args)
  return (fn.__name__, ctx, tuple((tuple(getattr(a, "shape", ())),
                                   str(getattr(a, "dtype", type(a)))) for a in leaves))


def compile_all(calls: Sequence[Call], *, parallel: bool, message: str, done: str,
                announce: bool, profile: MutableMapping[Any, dict] | None = None) -> None:
  """Compile every distinct program of `calls` (in this thread's compile scope)."""
  scope = sharding.current_compile_scope()

  def one(call: Call) -> None:
    fn, args, kwargs = call
    with sharding.compile_scope(scope):
      compiled = fn.lower(*args, **kwargs).compile()
    if profile is not None:
      cost = compiled.cost_analysis()
      cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
      profile.setdefault(profile_key(fn, args, kwargs["ctx"]),
                         {"flops": float(cost.get("flops", 0.0)), "calls": 0})

  calls = distinct(calls)
  workers = max(1, min(len(calls), os.cpu_count() or 1)) if parallel else 1
  with progress_lib.phase(message.format(n=len(calls)), done, enabled=announce
                          ), concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for f in [pool.submit(one, c) for c in calls]:
      f.result()


def wait_for(ahead: concurrent.futures.Future, label: str, ends: str, *,
             announce: bool) -> sharding.CompileCount:
  """The count of a wave's programs compiling in the background (`Wave.compile_ahead`),
  once they are done, saying how long the sweep waited for them."""
  t0 = time.perf_counter()
  if announce:
    print(f"{label}compiling programs (end points: {ends}) in the background ...",
          flush=True)
  count = ahead.result()
  if announce:
    print(f"{label}compiled in {time.perf_counter() - t0:.1f} s of waiting "
          f"({count.requests} programs, {count.seconds:.1f} s of compiling while the wave "
          "before ran)", flush=True)
  return count
