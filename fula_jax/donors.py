"""The models a job compares, from what the user names in its config.

A donor is a trained workdir of this project (``model_a.workdir``, or the older
``model_a_workdir``), a Flax architecture of the zoo with a weights file (``model_a.arch``
and ``model_a.weights``), or a PyTorch architecture with a weights file
(``model_a.torch``, run through torchax; needs ``pip install -e '.[torch]'``):

  --config.model_a.arch=imagenet_resnet50 --config.model_a.weights=PATH/resnet50_l2_eps3.ckpt
  --config.model_a.torch=torchvision:densenet161 --config.model_a.weights=PATH/densenet.ckpt
  --config.model_a.torch=timm:vit_small_patch16_224 --config.model_a.weights=PATH/vit.pth

A PyTorch donor's points default to its stages and its classifier's input
(`fula_jax.models.torch_zoo`); ``model_a.points`` names others (submodule names, glob
patterns, ``'<name>:input'``). It runs at ``model_a.image_size`` (default: the data's).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from ml_collections import config_dict

from fula_jax import io
from fula_jax.errors import ConfigError


@dataclasses.dataclass
class Donor:
  model: Any
  variables: Any
  name: str                                   # identity in results and fingerprints
  data: ml_collections.ConfigDict | None      # the data it was trained on, if known


def block() -> ml_collections.ConfigDict:
  """`config.model_a` / `config.model_b`: a trained workdir, or arch/torch + weights."""
  return ml_collections.ConfigDict(dict(
      workdir=config_dict.placeholder(str),   # a `job=train` workdir
      arch=config_dict.placeholder(str),      # a registered Flax architecture, or ...
      torch=config_dict.placeholder(str),     # ... 'torchvision:<name>' / 'timm:<name>'
      weights=config_dict.placeholder(str),   # ... and its weights file
      kwargs={},                              # architecture arguments (e.g. image_size)
      points=config_dict.placeholder(tuple),  # torch: points (default: its stages)
      image_size=config_dict.placeholder(int),  # torch: input size (default: the data's)
  ))


def describe(config: ml_collections.ConfigDict, which: str) -> dict[str, Any]:
  """What config names as model `which` ('a' or 'b'): {'workdir'} or {'arch', ...}."""
  spec = config.get(f"model_{which}")
  spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec or {})
  workdir = config.get(f"model_{which}_workdir") or spec.get("workdir")
  if workdir:
    return {"workdir": str(workdir)}
  if spec.get("arch") and spec.get("torch"):
    raise ConfigError(f"config.model_{which} names both arch={spec['arch']!r} and "
                      f"torch={spec['torch']!r}; name one of them.")
  if spec.get("torch"):
    size = spec.get("image_size") or _data_size(config.get("data"))
    return {"torch": spec["torch"], "weights": spec.get("weights"),
            "kwargs": dict(spec.get("kwargs") or {}), "image_size": int(size),
            "points": tuple(spec.get("points") or ())}
  if spec.get("arch"):
    return {"arch": spec["arch"], "weights": spec.get("weights"),
            "kwargs": dict(spec.get("kwargs") or {})}
  return {}


def _data_size(data: ml_collections.ConfigDict | None) -> int:
  """The side of the images config.data yields (its native size when unset)."""
  if data is None:
    return 224
  if data.get("image_size"):
    return int(data.image_size)
  from fula_jax.data.pipeline import DATASETS
  spec = DATASETS.get(data.get("name"))
  return int(spec.native_size) if spec is not None else 224


def load(config: ml_collections.ConfigDict, which: str, *, required: bool = True
         ) -> Donor | None:
  """Model `which` of a job config, loaded; None when it is optional and not named."""
  spec = describe(config, which)
  if not spec:
    if required:
      raise ConfigError(
          f"config.model_{which} is required: a trained workdir "
          f"(--config.model_{which}.workdir=DIR) or an architecture and its weights "
          f"(--config.model_{which}.arch=NAME or --config.model_{which}.torch="
          f"torchvision:NAME, with --config.model_{which}.weights=FILE).")
    return None
  if "workdir" in spec:
    from fula_jax.train.checkpoint import load_trained
    model, variables, cfg = load_trained(spec["workdir"])
    return Donor(model, variables, spec["workdir"], cfg.data)
  kind = "torch" if "torch" in spec else "arch"
  if not spec.get("weights"):
    raise ConfigError(f"config.model_{which}.{kind}={spec[kind]!r} needs "
                      f"config.model_{which}.weights: a .safetensors, .npz or PyTorch "
                      "file (weights are never downloaded).")
  weights = io.resolve(spec["weights"])
  if kind == "torch":
    from fula_jax.models import torch_zoo
    model, variables = torch_zoo.load(spec["torch"], weights, points=spec["points"] or None,
                                      image_size=spec["image_size"], **spec["kwargs"])
    return Donor(model, variables, f"{spec['torch']}:{os.path.basename(weights)}", None)
  from fula_jax.models.weights import load_weights
  model, variables = load_weights(spec["arch"], weights, **spec["kwargs"])
  return Donor(model, variables, f"{spec['arch']}:{os.path.basename(weights)}", None)
