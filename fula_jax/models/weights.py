"""Pretrained weights from files: safetensors, .npz and PyTorch checkpoints.

``load_weights(name, path)`` builds the zoo architecture `name` (the ImageNet ones use
torchvision's and timm's parameter names) and fills it from a state dict:

* ``.safetensors`` (safetensors' NumPy reader), ``.npz`` (no pickles);
* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` through ``torch.load(weights_only=True)``
  (install the extra: ``pip install -e .[torch]``); arbitrary objects are never
  unpickled. A dict nested under 'state_dict' or 'model' is found, a 'module.' prefix
  (DataParallel) is stripped, and a checkpoint of the robustness library (Madry lab:
  ``module.model.*``, ``module.attacker.*``, ``module.normalizer.new_mean/new_std``)
  gives the model and its own input normaliser.

PyTorch names map onto Flax paths by rule: ``layer1.0.conv1.weight`` ->
``params/layer1_0/conv1/kernel`` (conv kernels OIHW -> HWIO, linear weights
transposed, 1-D weights are norm scales, running statistics go to ``batch_stats``).
A file that does not fit the architecture fails with the first parameter that does not
fit, by its name in the file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

from fula_jax import io
from fula_jax.errors import UserError
from fula_jax.models import base, zoo

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
SKIP = ("num_batches_tracked",)


class WeightsError(UserError, ValueError):
  """A weights file that is missing, unreadable, or does not fit the architecture."""


def _to_numpy(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if hasattr(v, "detach"):  # a torch tensor
      v = v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
    out[str(k)] = np.asarray(v)
  return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Name -> array of a weights file (see the module docstring for the formats)."""
  path = io.resolve(path)
  if not os.path.exists(path):
    raise WeightsError(f"Weights file {path} does not exist.")
  suffix = os.path.splitext(path)[1].lower()
  try:
    if suffix == ".safetensors":
      from safetensors.numpy import load_file
      tree = load_file(path)
    elif suffix == ".npz":
      with np.load(path, allow_pickle=False) as z:
        tree = {k: z[k] for k in z.files}
    elif suffix in TORCH_SUFFIXES:
      try:
        import torch
      except ImportError as e:
        raise WeightsError(f"Reading {path} needs PyTorch: pip install -e .[torch] "
                           "(or convert the file to .safetensors).") from e
      tree = torch.load(path, map_location="cpu", weights_only=True)
    else:
      raise WeightsError(f"Unknown weights format {suffix!r} of {path}; use "
                         f".safetensors, .npz or one of {', '.join(TORCH_SUFFIXES)}.")
  except WeightsError:
    raise
  except Exception as e:  # damaged files raise many types
    raise WeightsError(f"Could not read weights file {path} ({type(e).__name__}: "
                       f"{e}).") from e
  while isinstance(tree, Mapping):
    nested = [k for k in ("state_dict", "model", "model_state_dict")
              if isinstance(tree.get(k), Mapping)]
    if not nested:
      break
    tree = tree[nested[0]]
  if not isinstance(tree, Mapping):
    raise WeightsError(f"{path} holds no state dict (name -> array).")
  return _to_numpy({k: v for k, v in tree.items() if hasattr(v, "shape")})


def split_normaliser(state: Mapping[str, np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, ...]]]:
  """The model's own parameters, and input statistics the checkpoint carries.

  Strips 'module.' (DataParallel); from a robustness-library checkpoint keeps
  ``model.*``, drops the attacker's copy and reads ``normalizer.new_mean/new_std``.
  """
  state = {k[len("module."):] if k.startswith("module.") else k: v
           for k, v in state.items()}
  stats = {}
  if any(k.startswith("model.") for k in state) and any(
      k.startswith(("attacker.", "normalizer.")) for k in state):
    for key, field in (("normalizer.new_mean", "input_mean"),
                       ("normalizer.new_std", "input_std")):
      if key in state:
        stats[field] = tuple(float(v) for v in np.asarray(state[key]).reshape(-1))
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
  return state, stats


def flax_path(name: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray]:
  """(collection, path, value) of one PyTorch parameter in the zoo's Flax layout."""
  parts: list[str] = []
  for part in name.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part)
  *module, leaf = parts
  if leaf == "weight":
    if value.ndim == 4:
      return "params", (*module, "kernel"), value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return "params", (*module, "kernel"), value.T
    return "params", (*module, "scale"), value
  if leaf == "running_mean":
    return "batch_stats", (*module, "mean"), value
  if leaf == "running_var":
    return "batch_stats", (*module, "var"), value
  return "params", (*module, leaf), value


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _torch_name(path: tuple[str, ...]) -> str:
  """The PyTorch-style name of a Flax path, for messages."""
  leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
          "var": "running_var"}.get(path[-1], path[-1])
  return ".".join(p.replace("_", ".") if p.split("_")[-1].isdigit() else p
                  for p in path[1:-1]) + ("." if len(path) > 2 else "") + leaf


def load_weights(name: str, path: str | os.PathLike, **model_kwargs: Any
                 ) -> tuple[Any, dict]:
  """``(model, variables)``: zoo architecture `name` with the weights in `path`.

  The number of classes comes from the file's classifier; `model_kwargs` go to the
  architecture (e.g. ``image_size`` of a ViT).
  """
  state, stats = split_normaliser(read_state_dict(path))
  converted = {}
  for key, value in state.items():
    if key.split(".")[-1] in SKIP:
      continue
    col, fpath, v = flax_path(key, value)
    converted[(col,) + fpath] = (key, np.asarray(v, np.float32))
  heads = [v for (col, *p), (k, v) in converted.items()
           if col == "params" and p[-1] == "bias" and p[0] in ("fc", "head")]
  kwargs = dict(model_kwargs)
  if heads and "num_classes" not in kwargs:
    kwargs["num_classes"] = int(heads[0].shape[0])
  kwargs.update({k: v for k, v in stats.items() if k not in model_kwargs})
  model = zoo.get_model(name, **kwargs)
  shape = (1,) + _input_shape(model)
  expected = _in_call_order(model, shape, _flatten(jax.eval_shape(
      lambda: base.init(model, jax.random.PRNGKey(0), shape))))
  # The model's own order (its forward pass), so the first misfit is the earliest layer.
  for fpath, want in expected.items():
    if fpath not in converted:
      raise WeightsError(f"{path} does not fit {name}: it lacks parameter "
                         f"{_torch_name(fpath)!r} ({'/'.join(fpath)}, shape "
                         f"{tuple(want.shape)}).")
    key, value = converted[fpath]
    if tuple(want.shape) != value.shape:
      raise WeightsError(f"{path} does not fit {name}: parameter {key!r} has shape "
                         f"{value.shape} in the file but {name} expects "
                         f"{tuple(want.shape)} (in Flax layout).")
  for fpath, (key, value) in converted.items():
    if fpath not in expected:
      raise WeightsError(f"{path} does not fit {name}: it has parameter {key!r} "
                         f"{value.shape}, which {name} has no place for (looked for "
                         f"{'/'.join(fpath)}).")
  variables = _nest({p: v for p, (_, v) in converted.items()})
  return model, jax.tree_util.tree_map(np.asarray, variables)


def _in_call_order(model: Any, shape: tuple[int, ...], flat: Mapping) -> dict:
  """`flat` ({(collection, *module path, leaf): value}) ordered as the forward pass
  reaches the modules (JAX sorts dict keys; messages should name the earliest layer)."""
  import flax.linen as nn
  seen: dict[tuple[str, ...], int] = {}

  def record(next_fun, args, kwargs, ctx):
    seen.setdefault(tuple(ctx.module.path), len(seen))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: base.init(model, jax.random.PRNGKey(0), shape))
  leaf = {"kernel": 0, "scale": 1, "bias": 2, "mean": 3, "var": 4}
  return dict(sorted(flat.items(), key=lambda kv: (
      seen.get(tuple(kv[0][1:-1]), len(seen)), kv[0][0] != "params",
      leaf.get(kv[0][-1], 5))))


def _input_shape(model: Any) -> tuple[int, int, int]:
  size = getattr(model, "image_size", 224)
  return (size, size, 3)


def save_npz(path: str | os.PathLike, state: Mapping[str, np.ndarray]) -> None:
  """A state dict as ``.npz`` (atomically), e.g. to convert a checkpoint once."""
  io.write_npz(path, **{k: np.asarray(v) for k, v in state.items()})
