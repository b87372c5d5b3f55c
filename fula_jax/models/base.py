"""The model protocol every job uses, and `StagedModel`, the zoo's way to follow it.

The protocol (duck-typed: nothing checks a class, any object with these two members
works -- a zoo model, or a model from elsewhere behind an adapter):

* ``point_names``: the stitch points, in execution order;
* ``apply(variables, x, *, start=None, end=None, capture=False, train=False)``:

  * the whole net:             ``apply(v, x)`` -> logits
  * input -> point i:          ``apply(v, x, end=i)``
  * point j -> point l:        ``apply(v, h, start=j, end=l)``
  * point j -> logits:         ``apply(v, h, start=j)``
  * every point in one pass:   ``apply(v, x, capture=True)`` -> ``(out, {point: act})``,
    the points after `start` up to `end`.

Inputs are images in [0, 1] (a model standardises them itself). Activations are NHWC
for conv maps, (B, T, D) for tokens and (B, D) for vectors. Running input -> i and then
i -> logits equals the whole net. ``train=False`` runs BatchNorm (and the like) in
inference mode; variables are a frozen pytree (``{'params': ..., 'batch_stats': ...}``).
The front model of a stitch and every similarity measure only need activations at the
points; the end model of a stitch must also run from a point. Models are used as static
arguments of jitted programs, so they must be hashable (Flax modules are).

`StagedModel` subclasses implement :meth:`StagedModel.stages` (a list of ``(point_name,
fn)`` where ``fn(h, train)`` builds its submodules lazily, so the list itself can be
inspected without binding the module) and :meth:`StagedModel.head`; Flax's own
``Module.apply`` then follows the protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fula_jax import registry

INPUT = "input"
LOGITS = "logits"

StageFn = Callable[[jax.Array, bool], jax.Array]


class Model(Protocol):
  """The model protocol (see the module docstring); for type hints only."""

  @property
  def point_names(self) -> Sequence[str]: ...

  def apply(self, variables: Any, x: jax.Array, *, start: str | None = None,
            end: str | None = None, capture: bool = False, train: bool = False
            ) -> Any: ...


def check_points(model: Any, points: Sequence[str], role: str = "model",
                 extra: Sequence[str] = ()) -> list[str]:
  """`points` if every one is a stitch point of `model` (or in `extra`); otherwise an
  error naming the valid points."""
  valid = list(model.point_names) + list(extra)
  for p in points:
    if p not in valid:
      raise registry.unknown(f"stitch point of the {role}", p, valid)
  return list(points)


def module_name(point: str) -> str:
  """Flax submodule name for a stitch point (``block1.0`` -> ``block1_0``)."""
  return point.replace(".", "_")


class StagedModel(nn.Module):
  """Base class for every model in the zoo."""

  num_classes: int = 10
  # Inputs are images in [0, 1]; the model standardises them itself so that attacks and
  # inversion can work (and clip) in pixel space.
  input_mean: float | tuple[float, ...] = 0.5  # a scalar, or one per channel
  input_std: float | tuple[float, ...] = 0.25

  def stages(self) -> Sequence[tuple[str, StageFn]]:
    raise NotImplementedError

  def head(self, h: jax.Array, train: bool) -> jax.Array:
    return nn.Dense(self.num_classes, name="head")(h)

  @property
  def point_names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.stages())

  def point_index(self, point: str | None, *, default: int) -> int:
    """Position of `point` in the stage list; INPUT is -1, LOGITS is len(points)."""
    if point is None:
      return default
    names = self.point_names
    if point == INPUT:
      return -1
    if point == LOGITS:
      return len(names)
    if point not in names:
      raise registry.unknown(
          f"stitch point of {type(self).__name__}", point, names)
    return names.index(point)

  @nn.compact
  def __call__(self, x: jax.Array, *, start: str | None = None,
               end: str | None = None, train: bool = False,
               capture: bool = False):
    specs = self.stages()
    first = self.point_index(start, default=-1) + 1
    last = self.point_index(end, default=len(specs))
    if last < first - 1 or (start == LOGITS):
      raise ValueError(
          f"Cannot run {type(self).__name__} from {start or INPUT!r} to "
          f"{end or LOGITS!r}: the end comes before the start. "
          f"Points in order: {', '.join(self.point_names)}.")
    acts: dict[str, jax.Array] = {}
    if first == 0:  # per-channel statistics may be tuples
      h = (x - jnp.asarray(self.input_mean, x.dtype)) / jnp.asarray(self.input_std, x.dtype)
    else:
      h = x
    for name, fn in specs[first:min(last, len(specs) - 1) + 1]:
      h = fn(h, train)
      if capture:
        acts[name] = h
    if last == len(specs):
      h = self.head(h, train)
    return (h, acts) if capture else h


# ----------------------------------------------------------------------------
# Functional helpers used by training, similarity and stitching.
# ----------------------------------------------------------------------------


def _init(model: StagedModel, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
  return model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)


# The initialisers' random-number code runs once, and XLA's CPU optimisation passes over
# it took 9 of the 12 s ResNet-20's initialisation took (2 s without; the values agree
# to float32 rounding).
_init_jit = jax.jit(_init, static_argnums=(0, 2))
_init_jit_cpu = jax.jit(_init, static_argnums=(0, 2),
                        compiler_options={"xla_backend_optimization_level": 0})


def init(model: StagedModel, rng: jax.Array, input_shape: Sequence[int]) -> dict:
  """Initial variables for an input of `input_shape` (batch axis included), as one
  compiled program per model and shape (on the CPU, compiled without optimisation)."""
  shape = tuple(int(d) for d in input_shape)
  if isinstance(rng, jax.core.Tracer):  # inside the caller's own traced function
    return _init(model, rng, shape)
  run = _init_jit_cpu if jax.default_backend() == "cpu" else _init_jit
  return run(model, rng, shape)


def forward(model: StagedModel, variables: Mapping[str, Any], x: jax.Array, *,
            start: str | None = None, end: str | None = None) -> jax.Array:
  """Frozen-donor forward pass: BatchNorm in inference mode, nothing mutated."""
  return model.apply(variables, x, start=start, end=end, train=False)


@dataclasses.dataclass(frozen=True)
class Forward:
  """:func:`forward` of `model` as a hashable ``(variables, x) -> logits``: a program
  keyed by it (e.g. the PGD evaluation of `attacks.robust_accuracy`) serves every set
  of weights of the model."""
  model: Any

  def __call__(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    return forward(self.model, variables, x)


def capture(model: StagedModel, variables: Mapping[str, Any], x: jax.Array
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits and every stitch point's activation, in one inference pass."""
  return model.apply(variables, x, train=False, capture=True)


def point_shapes(model: StagedModel, input_shape: Sequence[int] | None = None,
                 variables: Mapping[str, Any] | None = None
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shape of every stitch point (and 'logits'), without running.

  `input_shape` is a batch's shape (B, H, W, C) or one example's (H, W, C), the
  convention of `from_flax`; an adapted model knows its own, so it may be left out.
  `variables` are the model's (needed for an adapted model, which has no `init`; a zoo
  model's are made up from its init)."""
  if input_shape is None:
    if not hasattr(model, "input_shape"):
      raise ValueError("point_shapes needs input_shape, e.g. (1, 32, 32, 3).")
    input_shape = model.input_shape
  input_shape = tuple(input_shape)
  if len(input_shape) == 3:  # one example: add the batch axis
    input_shape = (1,) + input_shape
  x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  if variables is None:
    if not hasattr(model, "init"):
      raise ValueError(f"{type(model).__name__} has no init: pass its variables, "
                       "point_shapes(model, input_shape, variables).")
    variables = jax.eval_shape(lambda: init(model, jax.random.PRNGKey(0), input_shape))
  logits, acts = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture=True), variables, x)
  # pytrees sort dict keys; give them back in stitch-point order.
  return {**{p: acts[p] for p in model.point_names}, LOGITS: logits}


def count_params(params: Any) -> int:
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
