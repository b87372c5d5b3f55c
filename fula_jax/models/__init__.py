"""The model protocol (`base.Model`) and the zoo: Flax models with named stitch points,
looked up by name."""

from __future__ import annotations

from typing import Any, Callable

from fula_jax import registry
from fula_jax.models.base import (INPUT, LOGITS, Model, StagedModel, capture,
                                  check_points, count_params, forward, init,
                                  point_shapes)
from fula_jax.models import imagenet
from fula_jax.models.adapters import from_flax, from_nnx
from fula_jax.models.torch_adapter import from_torch
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
    **imagenet.MODELS,  # torchvision / timm layouts for weight import
}


def get_model(name: str, **kwargs: Any) -> StagedModel:
  """Instantiate a registered model; unknown names list the valid ones."""
  return registry.lookup("model", name, MODELS)(**kwargs)


def load_weights(name: str, path: Any, **kwargs: Any):
  """``(model, variables)``: architecture `name` with a weights file's parameters
  (safetensors, .npz, PyTorch; see `fula_jax.models.weights`)."""
  from fula_jax.models import weights
  return weights.load_weights(name, path, **kwargs)


__all__ = ["INPUT", "LOGITS", "MLP", "MODELS", "Model", "ResNet", "ResNet18", "ResNet20",
           "SmallCNN", "StagedModel", "VGG", "VGG11", "VGG16", "ViT", "ViTTiny", "capture",
           "check_points", "count_params", "forward", "from_flax", "from_nnx", "from_torch",
           "get_model", "init", "load_weights", "point_shapes"]
