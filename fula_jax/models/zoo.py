"""The zoo: every registered Flax architecture by name (`get_model`)."""

from __future__ import annotations

from typing import Any, Callable

from fula_jax import registry
from fula_jax.models import imagenet
from fula_jax.models.base import StagedModel
from fula_jax.models.resnet import ResNet18, ResNet20
from fula_jax.models.small import MLP, SmallCNN
from fula_jax.models.vgg import VGG11, VGG16
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
