"""Any Flax model as a protocol model, with stitch points named by submodule path.

``from_flax(module, variables, points)`` wraps a Linen module written anywhere: points
are submodule paths such as ``"encoder/encoderblock_3"`` (glob patterns allowed), in
the order the forward pass finishes them. ``from_nnx(module, points)`` does the same for
a Flax NNX module. The result follows the model protocol (`fula_jax.models.base`), so
similarity, stitching, inversion, PGD and the studies take it unchanged.

How the pieces run, without rewriting the model:

* up to point i: `flax.linen.intercept_methods` records i's output and stops the
  forward pass there (nothing after i is traced);
* from point j: the same interceptor returns the given activation in place of j's
  output. The layers before j still trace on a zero input of the model's input shape,
  but nothing reads their results, so XLA removes them from the compiled program.

A point must cut the network: everything after it may depend on the input only
through the point's output (true of every sequential backbone; not of a model that
reads the raw input again after the point). Only a module's first call counts.

Where a point sits. ``"conv_a"`` is the submodule's *output*: for an ``nn.Conv``
followed by ``nn.relu`` in the parent's code, that is before the ReLU. ``"conv_b:input"``
is the activation *entering* submodule conv_b (its first argument): everything before
it, activation functions and pooling included, so after conv_a's ReLU. The zoo's points
are after their activations (``models.get_model('cnn')``'s conv1 is a ReLU output), so
compare a zoo model with ``":input"`` points of the modules that follow the activations.
Running from an input point hands the given activation to that submodule: exact for any
activation, no assumption about what came before.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import errors, registry
from fula_jax.errors import ConfigError
from fula_jax.models.base import INPUT, LOGITS


class _Stop(Exception):
  """Carries the activation at the requested end point out of the forward pass."""

  def __init__(self, value):
    super().__init__("end point reached")
    self.value = value


def glob_match(pattern: str, path: str) -> bool:
  """Whether `path` matches `pattern` segment by segment ('*' stays within one '/')."""
  a, b = pattern.split("/"), path.split("/")
  return len(a) == len(b) and all(fnmatch.fnmatchcase(p, q) for q, p in zip(a, b))


INPUT_SUFFIX = ":input"


def _split_point(point: str) -> tuple[str, bool]:
  """(submodule path, whether the point is that submodule's input)."""
  if point.endswith(INPUT_SUFFIX):
    return point[:-len(INPUT_SUFFIX)], True
  return point, False


def _expand(patterns: Sequence[str], paths: Sequence[str], what: str) -> list[str]:
  """Points from names or glob patterns, in the order of `paths` (execution order); a
  pattern ending in ':input' matches only input points, any other only outputs."""
  chosen = set()
  for pat in patterns:
    base, is_input = _split_point(pat)
    hits = [p for p in paths if _split_point(p)[1] == is_input
            and glob_match(base, _split_point(p)[0])]
    if not hits:
      raise registry.unknown(f"submodule path of {what}", pat, paths)
    chosen.update(hits)
  return [p for p in paths if p in chosen]


def _prefix_table(prefix_tokens: int | Mapping[str, int], points: Sequence[str]
                  ) -> tuple[tuple[str, int], ...]:
  if isinstance(prefix_tokens, int):
    return tuple((p, int(prefix_tokens)) for p in points)
  table = {p: 0 for p in points}
  for pat, n in prefix_tokens.items():
    for p in _expand([pat], points, "the points (prefix_tokens)"):
      table[p] = int(n)
  return tuple(table.items())


@dataclasses.dataclass(frozen=True, eq=False)
class _Hashable:
  """Hashed by identity: a function or graph the adapter holds (jit's cache key)."""
  value: Any


def _at_point(path: str, k: int, compute: Callable[[], Any], first: int, last: int,
              given: Any, acts: dict | None) -> Any:
  """What point `k` of a run from point `first` to point `last` outputs: the given
  activation at the start, else its own output (captured into `acts` when given);
  at the end the run stops."""
  out = given if k == first else compute()
  if acts is not None and first < k <= last:
    acts[path] = out
  if k == last:
    raise _Stop(out)
  return out


class _Points:
  """Point names, prefix tokens and point indices of an adapted model (`points`,
  `prefix` and `_kind` come from the adapter)."""

  @property
  def point_names(self) -> tuple[str, ...]:
    return self.points

  @property
  def prefix_tokens(self) -> dict[str, int]:
    """Class/register tokens in front of each point's token sequence (0: none)."""
    return dict(self.prefix)

  def _index(self, point: str | None, default: int) -> int:
    if point is None:
      return default
    if point == INPUT:
      return -1
    if point == LOGITS:
      return len(self.points)
    if point not in self.points:
      raise registry.unknown(f"stitch point of {self._kind()}", point, self.points)
    return self.points.index(point)


@dataclasses.dataclass(frozen=True)
class FlaxModel(_Points):
  """A Linen module behind the model protocol; build it with `from_flax`."""
  module: Any
  points: tuple[str, ...]
  input_shape: tuple[int, ...]
  call_kwargs: tuple[tuple[str, Any], ...] = ()
  input_transform: _Hashable | None = None
  output: _Hashable | None = None
  prefix: tuple[tuple[str, int], ...] = ()

  def _kind(self) -> str:
    return type(self.module).__name__

  def apply(self, variables: Any, x: jax.Array, *, start: str | None = None,
            end: str | None = None, capture: bool = False, train: bool = False):
    """The model protocol's apply (see `fula_jax.models.base`)."""
    import flax.linen as nn
    if train:
      raise ConfigError("An adapted model is a frozen donor: it runs with train=False.")
    first = self._index(start, -1)
    last = self._index(end, len(self.points))
    if last < first or start == LOGITS:
      raise ValueError(f"Cannot run from {start or INPUT!r} to {end or LOGITS!r}: the "
                       f"end comes before the start. Points: {', '.join(self.points)}.")
    order = {p: k for k, p in enumerate(self.points)}
    acts: dict[str, jax.Array] = {}
    seen: set[str] = set()
    given = x

    def interceptor(next_fun, args, kwargs, ctx):
      if ctx.method_name != "__call__":
        return next_fun(*args, **kwargs)
      path = "/".join(ctx.module.path)
      entry = path + INPUT_SUFFIX
      if entry in order and entry not in seen and args:
        seen.add(entry)
        args = (_at_point(entry, order[entry], lambda: args[0], first, last, given,
                          acts if capture else None), *args[1:])
      if path not in order or path in seen:
        return next_fun(*args, **kwargs)
      seen.add(path)
      return _at_point(path, order[path], lambda: next_fun(*args, **kwargs), first,
                       last, given, acts if capture else None)

    if first >= 0:
      inputs = jnp.zeros((x.shape[0],) + self.input_shape, jnp.float32)
    else:
      inputs = x if self.input_transform is None else self.input_transform.value(x)
    try:
      with nn.intercept_methods(interceptor):
        out = self.module.apply(variables, inputs, **dict(self.call_kwargs))
      if self.output is not None:
        out = self.output.value(out)
    except _Stop as stop:
      out = stop.value
    return (out, acts) if capture else out


def module_paths(module: Any, variables: Any, input_shape: Sequence[int],
                 call_kwargs: Mapping[str, Any] | None = None,
                 inputs: bool = False) -> list[str]:
  """Every submodule path of a Linen module, in the order its forward pass finishes
  them (a probe with `jax.eval_shape`, nothing computed); with `inputs`, each
  submodule's input point ('<path>:input') too, where the submodule is entered."""
  import flax.linen as nn
  done: list[str] = []

  def record(next_fun, args, kwargs, ctx):
    path = "/".join(ctx.module.path)
    call = ctx.method_name == "__call__" and path
    if call and inputs and args and path + INPUT_SUFFIX not in done:
      done.append(path + INPUT_SUFFIX)
    out = next_fun(*args, **kwargs)
    if call and path not in done:
      done.append(path)
    return out

  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)

  def probe(v, x):
    with nn.intercept_methods(record):
      return module.apply(v, x, **dict(call_kwargs or {}))

  try:
    jax.eval_shape(probe, variables, x)
  except Exception as e:  # the user's module rejected the probe input: say which
    raise ConfigError(
        f"Tracing {type(module).__name__} on an input of shape {x.shape} failed "
        f"({type(e).__name__}: {errors.one_line(str(e))[:300]}). Pass input_shape=(H, W, "
        "C), the shape of one of its examples, e.g. input_shape=(8, 8, 1).") from e
  return done


def _automatic(kind: str, chosen: Sequence[str]) -> list[str]:
  """The points taken when none are named, said out loud (the user did not choose)."""
  print(f"{kind}: no points named; took its {len(chosen)} top-level submodules in "
        f"execution order: {', '.join(chosen)} (name others with points=...).",
        flush=True)
  return list(chosen)


def from_flax(module: Any, variables: Any, points: Sequence[str] | str | None = None, *,
              input_shape: Sequence[int] = (224, 224, 3),
              input_transform: Callable[[jax.Array], jax.Array] | None = None,
              call_kwargs: Mapping[str, Any] | None = None,
              output: Callable[[Any], jax.Array] | None = None,
              prefix_tokens: int | Mapping[str, int] = 0) -> tuple[FlaxModel, Any]:
  """Any Flax Linen module as a protocol model: ``(model, variables)``.

  Args:
    module: the Linen module (not from the zoo).
    variables: its variables (``{'params': ...}`` and any collections).
    points: submodule paths in execution order (``"encoder/encoderblock_3"``), or glob
      patterns (``"encoder/encoderblock_*"``): each names the submodule's output; add
      ``":input"`` for the activation entering it (``"conv_b:input"``: after the
      activation function between conv_a and conv_b; see the module docstring). An
      unknown path lists the valid ones. None: the module's top-level submodules in
      execution order (printed).
    input_shape: one example's input shape (H, W, C); the forward pass from a point
      traces the layers before it on zeros of this shape (then XLA drops them).
    input_transform: applied to the [0, 1] images before the module (e.g. ImageNet
      mean/std normalisation), so attacks and inversion work in pixel space.
    call_kwargs: keyword arguments of the module's inference call (e.g.
      ``{"train": False}``).
    output: picks the logits from the module's output (default: the output itself).
    prefix_tokens: class/register tokens in front of the token sequences, one number
      for every point or ``{pattern: n}`` (e.g. 1 for a ViT's CLS token).
  """
  if isinstance(points, str):
    points = [points]
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  paths = module_paths(module, variables, input_shape, call_kwargs, inputs=True)
  if points is None:
    chosen = _automatic(f"from_flax({type(module).__name__})",
                        [p for p in paths if "/" not in p and not _split_point(p)[1]])
  else:
    chosen = _expand(points, paths, type(module).__name__)
  model = FlaxModel(
      module, tuple(chosen), tuple(int(d) for d in input_shape),
      tuple(sorted((call_kwargs or {}).items())),
      None if input_transform is None else _Hashable(input_transform),
      None if output is None else _Hashable(output), _prefix_table(prefix_tokens, chosen))
  return model, variables


# ----------------------------------------------------------------------------- NNX


@dataclasses.dataclass(frozen=True)
class NNXModel(_Points):
  """A Flax NNX module behind the model protocol; build it with `from_nnx`.

  The variables are the module's `nnx.State`; each call rebuilds the module from its
  graph definition and the given state, so it stays a pure function of them.
  """
  graphdef: _Hashable
  points: tuple[str, ...]
  input_shape: tuple[int, ...]
  input_transform: _Hashable | None = None
  prefix: tuple[tuple[str, int], ...] = ()

  def _kind(self) -> str:
    return "the NNX model"

  def apply(self, variables: Any, x: jax.Array, *, start: str | None = None,
            end: str | None = None, capture: bool = False, train: bool = False):
    """The model protocol's apply (see `fula_jax.models.base`)."""
    from flax import nnx
    if train:
      raise ConfigError("An adapted model is a frozen donor: it runs with train=False.")
    index = {p: k for k, p in enumerate(self.points)}
    first, last = self._index(start, -1), self._index(end, len(self.points))
    if last < first or start == LOGITS:
      raise ValueError(f"Cannot run from {start or INPUT!r} to {end or LOGITS!r}: the "
                       f"end comes before the start. Points: {', '.join(self.points)}.")
    module = nnx.merge(self.graphdef.value, variables)
    module.eval()
    acts: dict[str, jax.Array] = {}
    given = x

    def wrap(point: str, fn):
      k, is_input = index[point], _split_point(point)[1]
      state = {"done": False}

      def call(*args, **kwargs):
        if state["done"]:
          return fn(*args, **kwargs)
        state["done"] = True
        keep = acts if capture else None
        if is_input:
          args = (_at_point(point, k, lambda: args[0], first, last, given, keep),
                  *args[1:])
          return fn(*args, **kwargs)
        return _at_point(point, k, lambda: fn(*args, **kwargs), first, last, given, keep)
      return call

    for point in self.points:
      _replace(module, _split_point(point)[0],
               lambda sub, point=point: _Proxy(sub, wrap(point, sub)))
    if first >= 0:
      inputs = jnp.zeros((x.shape[0],) + self.input_shape, jnp.float32)
    else:
      inputs = x if self.input_transform is None else self.input_transform.value(x)
    try:
      out = module(inputs)
    except _Stop as stop:
      out = stop.value
    return (out, acts) if capture else out


class _Proxy:
  """Stands in for a submodule of a rebuilt NNX module: calls go through `call`."""

  def __init__(self, sub, call):
    self._sub, self._call = sub, call

  def __call__(self, *args, **kwargs):
    return self._call(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._sub, name)


def _parts(path: str) -> list[Any]:
  return [int(p) if p.isdigit() else p for p in path.split("/")]


def _replace(module: Any, path: str, make: Callable[[Any], Any]) -> None:
  *parents, leaf = _parts(path)
  node = module
  for p in parents:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  if isinstance(leaf, int):
    node[leaf] = make(node[leaf])
  else:
    object.__setattr__(node, leaf, make(getattr(node, leaf)))


def nnx_paths(module: Any, *, nodes: bool = False) -> list:
  """Every submodule path of an NNX module (graph order), e.g. ``blocks/3``; with
  `nodes`, (path, submodule) pairs."""
  from flax import nnx
  out = []
  for path, node in nnx.iter_graph(module):
    if path and isinstance(node, nnx.Module):
      name = "/".join(str(p) for p in path)
      out.append((name, node) if nodes else name)
  return out


def _nnx_call_order(module: Any, paths: Sequence[str], input_shape: Sequence[int]
                    ) -> list[str]:
  """Those of `paths` a forward pass on zeros calls, in the order it first calls them."""
  from flax import nnx
  graphdef, state = nnx.split(module)
  order: list[str] = []

  def record(path: str, sub: Any) -> Callable:
    def call(*args, **kwargs):
      if path not in order:
        order.append(path)
      return sub(*args, **kwargs)
    return call

  def run(state):
    m = nnx.merge(graphdef, state)
    m.eval()
    for p in paths:
      _replace(m, p, lambda sub, p=p: _Proxy(sub, record(p, sub)))
    return m(jnp.zeros((1,) + tuple(input_shape), jnp.float32))

  jax.eval_shape(run, state)
  return order


def from_nnx(module: Any, points: Sequence[str] | str | None = None, *,
             input_shape: Sequence[int] = (224, 224, 3),
             input_transform: Callable[[jax.Array], jax.Array] | None = None,
             prefix_tokens: int | Mapping[str, int] = 0) -> tuple[NNXModel, Any]:
  """Any Flax NNX module as a protocol model: ``(model, variables)``, the variables
  being the module's state. Points are attribute paths (``"blocks/3"``, glob patterns
  allowed; ``"blocks/3:input"`` for the activation entering a submodule, as in
  `from_flax`), listed in the order the forward pass runs them. None: its top-level
  submodules (attributes, and the items of list attributes) in the order a forward pass
  on zeros of `input_shape` calls them (printed)."""
  from flax import nnx
  if points is None:
    top = [p for p, node in nnx_paths(module, nodes=True)
           if callable(node) and all(q.isdigit() for q in p.split("/")[1:])]
    points = _automatic(f"from_nnx({type(module).__name__})",
                        _nnx_call_order(module, top, input_shape))
  if isinstance(points, str):
    points = [points]
  paths = [q for p in nnx_paths(module) for q in (p + INPUT_SUFFIX, p)]
  chosen = []
  for pat in points:
    hits = _expand([pat], paths, type(module).__name__)
    chosen += [h for h in hits if h not in chosen]
  graphdef, state = nnx.split(module)
  model = NNXModel(_Hashable(graphdef), tuple(chosen),
                   tuple(int(d) for d in input_shape),
                   None if input_transform is None else _Hashable(input_transform),
                   _prefix_table(prefix_tokens, chosen))
  return model, jax.tree_util.tree_map(jnp.asarray, state)


def point_order_check(model: Any, variables: Any) -> None:
  """Raise if the model's points are not in execution order (probed with eval_shape)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), np.float32)
  _, acts = jax.eval_shape(lambda v, x: model.apply(v, x, capture=True), variables, x)
  missing = [p for p in model.point_names if p not in acts]
  if missing:
    raise ConfigError(f"Points {missing} never ran in the forward pass.")
