"""The model protocol (`base.Model`) and the zoo: Flax models with named stitch points,
looked up by name."""

from __future__ import annotations

from typing import Any, Callable

from fula_jax import registry
from fula_jax.models.base import (INPUT, LOGITS, Model, StagedModel, capture,
                                  check_points, count_params, forward, init,
                                  point_shapes)
from fula_jax.models.resnet import ResNet, ResNet18, ResNet20
from fula_jax.models.small import MLP, SmallCNN
from fula_jax.models.vgg import VGG, VGG11, VGG16
from fula_jax.models.vit import ViT, ViTTiny

MODELS: dict[str, Callable[..., StagedModel]] = {
    "cnn": SmallCNN,
    "mlp": MLP,
    "resnet18": ResNet18,
    "resnet20": ResNet20,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "vit": ViT,
    "vit_tiny": ViTTiny,
}


def get_model(name: str, **kwargs: Any) -> StagedModel:
  """Instantiate a registered model; unknown names list the valid ones."""
  return registry.lookup("model", name, MODELS)(**kwargs)


__all__ = ["INPUT", "LOGITS", "MLP", "MODELS", "Model", "ResNet", "ResNet18", "ResNet20",
           "SmallCNN", "StagedModel", "VGG", "VGG11", "VGG16", "ViT", "ViTTiny", "capture",
           "check_points", "count_params", "forward", "get_model", "init",
           "point_shapes"]
