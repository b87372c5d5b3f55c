"""The model zoo: Flax models with named stitch points, looked up by name."""

from __future__ import annotations

import functools
from typing import Any, Callable

from fula_jax import registry
from fula_jax.models.base import (INPUT, LOGITS, StagedModel, capture,
                                  count_params, forward, init, point_shapes)
from fula_jax.models.small import MLP, SmallCNN

MODELS: dict[str, Callable[..., StagedModel]] = {
    "cnn": SmallCNN,
    "mlp": MLP,
}


def get_model(name: str, **kwargs: Any) -> StagedModel:
  """Instantiate a registered model; unknown names list the valid ones."""
  return registry.lookup("model", name, MODELS)(**kwargs)


__all__ = ["INPUT", "LOGITS", "MODELS", "StagedModel", "capture", "count_params",
           "forward", "get_model", "init", "point_shapes"]
