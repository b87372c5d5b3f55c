"""The models a job compares, from what the user names in its config.

A donor is either a trained workdir of this project (``model_a.workdir``, or the older
``model_a_workdir``) or an architecture with a weights file (``model_a.arch`` and
``model_a.weights``, e.g. ``imagenet_resnet50`` and a robust ImageNet checkpoint):

  --config.model_a.arch=imagenet_resnet50 --config.model_a.weights=PATH/resnet50_l2_eps3.ckpt
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
  """`config.model_a` / `config.model_b`: a trained workdir, or arch + weights."""
  return ml_collections.ConfigDict(dict(
      workdir=config_dict.placeholder(str),   # a `job=train` workdir
      arch=config_dict.placeholder(str),      # a registered architecture ...
      weights=config_dict.placeholder(str),   # ... and its weights file
      kwargs={},                              # architecture arguments (e.g. image_size)
  ))


def describe(config: ml_collections.ConfigDict, which: str) -> dict[str, Any]:
  """What config names as model `which` ('a' or 'b'): {'workdir'} or {'arch', ...}."""
  spec = config.get(f"model_{which}")
  spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec or {})
  workdir = config.get(f"model_{which}_workdir") or spec.get("workdir")
  if workdir:
    return {"workdir": str(workdir)}
  if spec.get("arch"):
    return {"arch": spec["arch"], "weights": spec.get("weights"),
            "kwargs": dict(spec.get("kwargs") or {})}
  return {}


def load(config: ml_collections.ConfigDict, which: str, *, required: bool = True
         ) -> Donor | None:
  """Model `which` of a job config, loaded; None when it is optional and not named."""
  spec = describe(config, which)
  if not spec:
    if required:
      raise ConfigError(
          f"config.model_{which} is required: a trained workdir "
          f"(--config.model_{which}.workdir=DIR) or an architecture and its weights "
          f"(--config.model_{which}.arch=NAME --config.model_{which}.weights=FILE).")
    return None
  if "workdir" in spec:
    from fula_jax.train.checkpoint import load_trained
    model, variables, cfg = load_trained(spec["workdir"])
    return Donor(model, variables, spec["workdir"], cfg.data)
  if not spec.get("weights"):
    raise ConfigError(f"config.model_{which}.arch={spec['arch']!r} needs "
                      f"config.model_{which}.weights: a .safetensors, .npz or PyTorch "
                      "file.")
  from fula_jax.models.weights import load_weights
  weights = io.resolve(spec["weights"])
  model, variables = load_weights(spec["arch"], weights, **spec["kwargs"])
  return Donor(model, variables, f"{spec['arch']}:{os.path.basename(weights)}", None)
