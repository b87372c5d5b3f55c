"""Any PyTorch module as a protocol model, run as JAX through torchax.

``from_torch(module, points, input_shape=...)`` wraps a ``torch.nn.Module`` (torchvision,
timm or your own): torchax turns its forward pass into a pure JAX function of its
parameters and buffers, which become the model's variables (a dict of arrays), so the
sweep engine jits, vmaps and differentiates it like a Flax model. Points are submodule
names as ``module.named_modules()`` gives them (``"layer2"``, ``"blocks.3"``; glob
patterns segment by segment, ``"layer*"``), each naming the submodule's output, or
``"<name>:input"`` for the activation entering it (``"fc:input"``: a ResNet's pooled
features, wherever the forward pass computes them with functional ops).

How the pieces run, without rewriting the model: a forward hook on each point records
its output (up to point i, the pass stops there) or, from point j, returns the given
activation in place of j's output; a forward pre-hook does the same for an input point.
The layers before j still trace on zeros, but nothing reads them, so XLA removes them
from the compiled program. As with
`from_flax`, a point must cut the network.

Layouts: the engine's images are NHWC in [0, 1]; `input_transform` (e.g. ImageNet
mean/std) applies to them, then they go to torch as NCHW. 4-D activations are exposed
NHWC (so stitch maps and resizing work unchanged) and handed back to torch as NCHW;
tokens stay (B, T, D). The module runs in eval mode (BatchNorm from its running
averages): the donor is frozen.

Needs the ``torch`` extra (``pip install -e .[torch]``: torch and torchax); importing
fula_jax never imports torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from fula_jax import errors
from fula_jax.models.adapters import (INPUT_SUFFIX, _expand, _Hashable, _Points,
                                      _prefix_table, _split_point, _Stop)
from fula_jax.models.base import INPUT, LOGITS

EXTRA = ("PyTorch models need the torch extra: pip install -e '.[torch]' (torch, "
         "torchvision, timm and torchax).")


def _torch():
  try:
    import torch
    import torchax
  except ImportError as e:
    raise errors.ConfigError(f"{EXTRA} ({e})") from None
  return torch, torchax


def _to_nhwc(a: jax.Array) -> jax.Array:
  return jnp.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def _to_nchw(a: jax.Array) -> jax.Array:
  return jnp.transpose(a, (0, 3, 1, 2)) if a.ndim == 4 else a


@dataclasses.dataclass(frozen=True)
class TorchModel(_Points):
  """A torch module behind the model protocol; build it with `from_torch`."""
  module: _Hashable        # torchax's JittableModule around the eval-mode module
  points: tuple[str, ...]
  input_shape: tuple[int, ...]
  input_transform: _Hashable | None = None
  output: _Hashable | None = None
  prefix: tuple[tuple[str, int], ...] = ()

  def _kind(self) -> str:
    return type(self.module.value._model).__name__

  def apply(self, variables: Any, x: jax.Array, *, start: str | None = None,
            end: str | None = None, capture: bool = False, train: bool = False):
    """The model protocol's apply (see `fula_jax.models.base`)."""
    torch, torchax = _torch()
    from torchax import interop
    if train:
      raise errors.ConfigError(
          "A PyTorch model is a frozen donor: it runs with train=False (BatchNorm from "
          "its running averages; stitch.donor_bn='train' needs a Flax model).")
    first, last = self._index(start, -1), self._index(end, len(self.points))
    if last < first or start == LOGITS:
      raise ValueError(f"Cannot run from {start or INPUT!r} to {end or LOGITS!r}: the "
                       f"end comes before the start. Points: {', '.join(self.points)}.")
    jm = self.module.value
    env = torchax.default_env()
    acts: dict[str, jax.Array] = {}
    seen: set[str] = set()

    def at_point(path: str, k: int, value: Any) -> Any:
      """What point k passes on: the given activation at the start, else its own."""
      if path in seen:  # a module called twice: only its first call is the point
        return None
      seen.add(path)
      if k == first:
        return interop.torch_view(_to_nchw(x))
      value = _to_nhwc(interop.jax_view(value))
      if capture and first < k <= last:
        acts[path] = value
      if k == last:
        raise _Stop(value)
      return None

    def hook_for(path: str, k: int):
      if _split_point(path)[1]:
        def pre_hook(_module, inputs):
          given = at_point(path, k, inputs[0])
          return None if given is None else (given,) + tuple(inputs[1:])
        return pre_hook
      return lambda _module, _inputs, out: at_point(path, k, out)

    if first >= 0:
      inputs = jnp.zeros((x.shape[0],) + self.input_shape, jnp.float32)
    else:
      inputs = x if self.input_transform is None else self.input_transform.value(x)
    params = {k: variables[k] for k in jm.params}
    buffers = {k: variables[k] for k in jm.buffers}
    modules = dict(jm._model.named_modules())
    handles = []
    for k, p in enumerate(self.points):
      if first <= k <= last:
        name, is_input = _split_point(p)
        register = (modules[name].register_forward_pre_hook if is_input
                    else modules[name].register_forward_hook)
        handles.append(register(hook_for(p, k)))
    try:
      p_t, b_t, x_t = env.j2t_iso((params, buffers, _to_nchw(inputs)))
      with env:
        out = jm.functional_call("forward", p_t, b_t, x_t)
      out = env.t2j_iso(out)
      if self.output is not None:
        out = self.output.value(out)
    except _Stop as stop:
      out = stop.value
    finally:
      for h in handles:
        h.remove()
    return (out, acts) if capture else out


def module_paths(module: Any, input_shape: Sequence[int]) -> list[str]:
  """Every point of `module` in the order a forward pass on zeros of one example's
  `input_shape` (H, W, C) reaches it: ``"<name>:input"`` when submodule `name` is
  entered, ``"<name>"`` when it finishes (modules it never calls are left out)."""
  torch, _ = _torch()
  order: list[str] = []

  def record(point: str) -> None:
    if point not in order:
      order.append(point)

  handles = []
  for name, sub in module.named_modules():
    if name:
      handles.append(sub.register_forward_pre_hook(
          lambda m, i, name=name: record(name + INPUT_SUFFIX)))
      handles.append(sub.register_forward_hook(lambda m, i, o, name=name: record(name)))
  h, w, c = tuple(input_shape)
  try:
    with torch.no_grad():
      module(torch.zeros(1, c, h, w))
  finally:
    for hd in handles:
      hd.remove()
  return order


def from_torch(module: Any, points: Sequence[str] | str, *, input_shape: Sequence[int],
               input_transform: Callable[[jax.Array], jax.Array] | None = None,
               output: Callable[[Any], jax.Array] | None = None,
               prefix_tokens: int | Mapping[str, int] = 0) -> tuple[TorchModel, dict]:
  """Any ``torch.nn.Module`` as a protocol model: ``(model, variables)``.

  Args:
    module: the torch module, with its weights loaded (put in eval mode here).
    points: submodule names in execution order (``"layer2"``, ``"blocks.3"``) or glob
      patterns (``"layer*"``); each names the submodule's output, or with ``":input"``
      the activation entering it (``"fc:input"``). An unknown name lists the valid
      ones.
    input_shape: one example's input shape (H, W, C).
    input_transform: applied to the [0, 1] NHWC images before the module (e.g. the
      ImageNet mean and std), so attacks and inversion work in pixel space.
    output: picks the logits from the module's output (default: the output itself).
    prefix_tokens: class/register tokens in front of the token sequences, one number
      for every point or ``{pattern: n}`` (e.g. 1 for a ViT's CLS token).

  Returns the model and its variables: the module's parameters and buffers as JAX
  arrays, by their torch names.
  """
  _, torchax = _torch()
  from torchax import interop
  if isinstance(points, str):
    points = [points]
  module = module.eval()
  paths = module_paths(module, input_shape)
  slash = [p.replace(".", "/") for p in paths]
  chosen = [p.replace("/", ".") for p in _expand(
      [p.replace(".", "/") for p in points], slash, type(module).__name__)]
  jm = interop.JittableModule(module, dedup_parameters=False)
  env = torchax.default_env()
  variables = env.t2j_copy({**dict(jm.buffers), **dict(jm.params)})
  variables = {k: jnp.asarray(v) for k, v in variables.items()}
  model = TorchModel(
      _Hashable(jm), tuple(chosen), tuple(int(d) for d in input_shape),
      None if input_transform is None else _Hashable(input_transform),
      None if output is None else _Hashable(output), _prefix_table(prefix_tokens, chosen))
  return model, variables

