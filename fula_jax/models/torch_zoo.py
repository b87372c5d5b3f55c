"""PyTorch architectures by name, their weights from files: what ``model_a.torch`` names.

``load("torchvision:resnet50", "resnet50_l2_eps3.ckpt")`` builds the architecture with
no pretrained weights (nothing is downloaded), fills it from the file and wraps it with
`from_torch`. Names are ``"torchvision:<name>"`` or ``"timm:<name>"``, plus
``"torchvision:wide_resnet50_4"``, which the robustness library builds as torchvision's
ResNet-50 with ``width_per_group=256`` and torchvision does not ship.

Files are read by `fula_jax.models.weights.read_state_dict` (safetensors, .npz, or .pt /
.pth / .ckpt with ``weights_only=True``). A robustness-library checkpoint
(``module.model.*``, ``module.attacker.*``, ``module.normalizer.new_mean/new_std``) gives
the model and its own input normaliser. A file that does not fit names the first
parameter, in the module's order, that is missing, unexpected or of another shape.

Points: ``POINTS`` holds stage outputs and the penultimate features (the input of the
classifier, ``"fc:input"``) for the nine ImageNet architectures of Jones et al.'s robust
zoo; any other architecture gets timm's ``feature_info`` stages, or its ``blocks.*``, or
its top-level stages, each followed by its classifier's input. The last point is always
the penultimate one.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from fula_jax import registry
from fula_jax.errors import ConfigError
from fula_jax.models.imagenet import IMAGENET_MEAN, IMAGENET_STD
from fula_jax.models.weights import WeightsError, read_state_dict, split_normaliser

SOURCES = ("torchvision", "timm")
_RESNET = ("layer1", "layer2", "layer3", "layer4", "fc:input")
# Jones et al.'s nine robust ImageNet architectures (the robustness library's names).
POINTS: dict[str, tuple[str, ...]] = {
    "resnet18": _RESNET,
    "resnet50": _RESNET,
    "wide_resnet50_2": _RESNET,
    "wide_resnet50_4": _RESNET,
    "resnext50_32x4d": _RESNET,
    "densenet161": ("features.denseblock1", "features.denseblock2",
                    "features.denseblock3", "features.denseblock4", "classifier:input"),
    "mobilenet_v2": ("features.3", "features.6", "features.13", "features.18",
                     "classifier:input"),
    "shufflenet_v2_x1_0": ("stage2", "stage3", "stage4", "conv5", "fc:input"),
    "vgg16_bn": ("features.6", "features.13", "features.23", "features.33",
                 "features.43", "classifier.6:input"),
}
JONES_ZOO = tuple(f"torchvision:{name}" for name in POINTS)
_EXTRA = {"wide_resnet50_4": ("resnet50", {"width_per_group": 256})}


def split(spec: str) -> tuple[str, str]:
  """("torchvision", "resnet50") of "torchvision:resnet50", with a clear error."""
  source, sep, name = str(spec).partition(":")
  if not sep or not name:
    raise ConfigError(f"A PyTorch architecture is named '<source>:<name>' with source "
                      f"one of {', '.join(SOURCES)} (e.g. 'torchvision:resnet50', "
                      f"'timm:vit_small_patch16_224'); got {spec!r}.")
  if source not in SOURCES:
    raise registry.unknown("PyTorch model source", source, SOURCES)
  return source, name


def _names(source: str) -> list[str]:
  if source == "timm":
    import timm
    return timm.list_models()
  import torchvision
  return sorted(torchvision.models.list_models(module=torchvision.models)) + list(_EXTRA)


def build(spec: str, **kwargs: Any) -> Any:
  """The architecture `spec` (``"torchvision:resnet50"``) with random weights."""
  from fula_jax.models.torch_adapter import _torch
  _torch()
  source, name = split(spec)
  valid = _names(source)
  if name not in valid:
    close = registry.suggest(name, valid)
    more = f"... {len(close) - 10} more" if len(close) > 10 else ""
    raise registry.unknown(f"{source} architecture", name, close[:10], extra=more)
  if source == "timm":
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)
  import torchvision
  base, extra = _EXTRA.get(name, (name, {}))
  return torchvision.models.get_model(base, weights=None, **{**extra, **kwargs})


def _last_linear(module: Any) -> str | None:
  import torch
  names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
  return names[-1] if names else None


def default_points(spec: str, module: Any) -> tuple[str, ...]:
  """The points `load` uses when none are named (see the module docstring)."""
  name = split(spec)[1]
  if name in POINTS:
    return POINTS[name]
  info = getattr(module, "feature_info", None)
  children = dict(module.named_children())
  if info:
    stages = [f["module"] for f in info]
  elif "blocks" in children:
    stages = [f"blocks.{i}" for i in range(len(children["blocks"]))]
  else:
    stages = [n for n, m in children.items() if any(True for _ in m.children())]
  head = _last_linear(module)
  return tuple(stages) + ((f"{head}:input",) if head else ())


def fit_state(module: Any, state: dict[str, np.ndarray], spec: str, path: str) -> None:
  """Load `state` into `module`, or name the first parameter that does not fit."""
  import torch
  want = module.state_dict()
  for key, tensor in want.items():
    if key not in state:
      raise WeightsError(f"{path} does not fit {spec}: it lacks parameter {key!r} "
                         f"(shape {tuple(tensor.shape)}).")
    if tuple(state[key].shape) != tuple(tensor.shape):
      raise WeightsError(f"{path} does not fit {spec}: parameter {key!r} has shape "
                         f"{tuple(state[key].shape)} in the file but {spec} expects "
                         f"{tuple(tensor.shape)}.")
  for key in state:
    if key not in want:
      raise WeightsError(f"{path} does not fit {spec}: it has parameter {key!r} "
                         f"{tuple(state[key].shape)}, which {spec} has no place for.")
  module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).to(want[k].dtype)
                          for k, v in state.items()})


def _statistics(spec: str, module: Any, stats: dict) -> tuple[tuple, tuple]:
  """The input mean/std: the checkpoint's, else timm's config, else ImageNet's."""
  if "input_mean" in stats and "input_std" in stats:
    return stats["input_mean"], stats["input_std"]
  cfg = getattr(module, "pretrained_cfg", None) or {}
  if cfg.get("mean") and cfg.get("std"):
    return tuple(cfg["mean"]), tuple(cfg["std"])
  return IMAGENET_MEAN, IMAGENET_STD


class _Normalise:
  """(x - mean) / std on NHWC images in [0, 1]; a class, so models print it."""

  def __init__(self, mean: Sequence[float], std: Sequence[float]):
    self.mean, self.std = tuple(mean), tuple(std)

  def __call__(self, x):
    import jax.numpy as jnp
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)

  def __repr__(self) -> str:
    return f"normalise(mean={self.mean}, std={self.std})"


def load(spec: str, weights: str | os.PathLike | None, *,
         points: Sequence[str] | None = None, image_size: int = 224,
         input_mean: Sequence[float] | None = None,
         input_std: Sequence[float] | None = None, **kwargs: Any) -> tuple[Any, dict]:
  """``(model, variables)`` of the PyTorch architecture `spec` with `weights`.

  `weights` None keeps the random initialisation (for tests and smoke runs). The number
  of classes comes from the file's classifier; `kwargs` go to the constructor.
  `input_mean`/`input_std` override the checkpoint's normaliser (see `_statistics`).
  """
  from fula_jax.models.torch_adapter import from_torch
  stats: dict = {}
  state = None
  if weights is not None:
    state, stats = split_normaliser(read_state_dict(weights))
  module = build(spec, **kwargs)
  head = _last_linear(module)
  if state is not None and head and "num_classes" not in kwargs:
    rows = state.get(f"{head}.weight")
    if rows is not None and rows.shape[0] != module.get_submodule(head).out_features:
      module = build(spec, num_classes=int(rows.shape[0]), **kwargs)
  if state is not None:
    fit_state(module, state, spec, str(weights))
  mean, std = _statistics(spec, module, stats)
  mean, std = input_mean or mean, input_std or std
  chosen = tuple(points) if points else default_points(spec, module)
  prefix = int(getattr(module, "num_prefix_tokens", 0) or 0)
  return from_torch(module, chosen, input_shape=(image_size, image_size, 3),
                    input_transform=_Normalise(mean, std),
                    prefix_tokens={p: prefix for p in chosen if p.startswith("blocks")}
                    if prefix else 0)
