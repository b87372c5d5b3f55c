"""A zoo model and its input shape from a training config (`configs/train.py`).

Shared by training and by loading a trained workdir, so neither imports the other.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from fula_jax import models


def _tuples(v: Any) -> Any:
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def build_model(config: ml_collections.ConfigDict) -> models.StagedModel:
  """The model `config.model` names. List-valued kwargs (a JSON round trip turns tuples
  into lists) become tuples, so the module stays hashable for `jax.jit` static args."""
  kwargs = {k: _tuples(v) for k, v in dict(config.model.get("kwargs", {}) or {}).items()}
  kwargs.setdefault("num_classes", num_classes(config))
  return models.get_model(config.model.name, **kwargs)


def num_classes(config: ml_collections.ConfigDict) -> int:
  from fula_jax import data
  return data.num_classes(config.data)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """(1, H, W, C) of the model input for this config's data settings."""
  from fula_jax import data
  return (1, *data.image_shape(config.data))
