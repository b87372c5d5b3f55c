"""The model protocol (`base.Model`), the zoo of Flax models with named stitch points
(`zoo`, looked up by name), adapters for Flax, NNX and PyTorch models, and weights
from files (`weights`, `torch_zoo`)."""

from __future__ import annotations

from fula_jax.models.base import (INPUT, LOGITS, Forward, Model, StagedModel, capture,
                                  check_points, count_params, forward, init,
                                  point_shapes)
from fula_jax.models.adapters import from_flax, from_nnx
from fula_jax.models.torch_adapter import from_torch
from fula_jax.models.resnet import ResNet, ResNet18, ResNet20
from fula_jax.models.small import MLP, SmallCNN
from fula_jax.models.vgg import VGG, VGG11, VGG16
from fula_jax.models.vit import ViT, ViTTiny
from fula_jax.models.weights import load_weights
from fula_jax.models.zoo import MODELS, get_model

__all__ = ["INPUT", "LOGITS", "MLP", "MODELS", "Forward", "Model", "ResNet", "ResNet18", "ResNet20",
           "SmallCNN", "StagedModel", "VGG", "VGG11", "VGG16", "ViT", "ViTTiny", "capture",
           "check_points", "count_params", "forward", "from_flax", "from_nnx", "from_torch",
           "get_model", "init", "load_weights", "point_shapes"]
