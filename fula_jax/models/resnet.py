"""CIFAR-style ResNets (He et al. 2016) with a stitch point after every block.

The CIFAR variant: a 3x3 stem conv + BN + ReLU at full resolution (no 7x7 conv, no
max-pool), BasicBlocks, a 1x1 conv + BN projection shortcut wherever the shape changes,
global average pooling and one Dense classifier. BatchNorm uses momentum 0.9 (PyTorch's
0.1) and epsilon 1e-5, in inference mode unless ``train=True``.

Points (ResNet-18): ``stem``, ``block1.0``, ``block1.1``, ..., ``block4.1`` (NHWC) and
``pool`` (B, D).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fula_jax.models.base import StagedModel, module_name

# He-normal over the fan-out, untruncated (PyTorch's kaiming_normal_, mode="fan_out").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled_width(width: int, multiplier: float) -> int:
  """`width * multiplier`, rounded, at least 1 (small widths for CPU runs)."""
  return max(1, int(round(width * multiplier)))


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      name=name)


def conv3x3(features: int, strides: int, name: str) -> nn.Conv:
  """3x3 conv with PyTorch-style symmetric padding 1 (also for stride 2)."""
  return nn.Conv(features, (3, 3), strides=strides, padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=conv_init, name=name)


class Stem(nn.Module):
  """3x3 conv, BN, ReLU at the input resolution."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = conv3x3(self.features, 1, "conv")(x)
    return nn.relu(batch_norm(train, "bn")(x))


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers and a residual; a 1x1 conv-BN projection on shape change."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = conv3x3(self.features, self.strides, "conv1")(x)
    y = nn.relu(batch_norm(train, "bn1")(y))
    y = conv3x3(self.features, 1, "conv2")(y)
    y = batch_norm(train, "bn2")(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.strides, padding="VALID",
                         use_bias=False, kernel_init=conv_init, name="proj_conv")(x)
      shortcut = batch_norm(train, "proj_bn")(shortcut)
    return nn.relu(y + shortcut)


def global_average_pool(h: jax.Array, train: bool) -> jax.Array:
  del train
  return jnp.mean(h, axis=(1, 2))


class ResNet(StagedModel):
  """A CIFAR ResNet of BasicBlocks; every stage but the first halves the resolution.

  Attributes:
    stage_sizes: blocks per stage.
    widths: channels per stage before `width_multiplier`; the stem has ``widths[0]``.
    width_multiplier: scales every width (e.g. 1/8 for a ResNet that trains on a CPU).
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  width_multiplier: float = 1.0

  def stages(self):
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"{type(self).__name__}: stage_sizes {tuple(self.stage_sizes)} "
                       f"and widths {tuple(self.widths)} differ in length.")
    widths = [scaled_width(w, self.width_multiplier) for w in self.widths]

    def stem(h, train):
      return Stem(widths[0], name=module_name("stem"))(h, train)

    specs = [("stem", stem)]
    for s, (num_blocks, width) in enumerate(zip(self.stage_sizes, widths)):
      for b in range(num_blocks):
        point = f"block{s + 1}.{b}"

        def block(h, train, width=width, strides=(2 if s > 0 and b == 0 else 1),
                  point=point):
          return BasicBlock(width, strides, name=module_name(point))(h, train)

        specs.append((point, block))
    specs.append(("pool", global_average_pool))
    return specs


class ResNet18(ResNet):
  """CIFAR ResNet-18: 4 stages of 2 BasicBlocks, widths 64-128-256-512."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)


class ResNet20(ResNet):
  """ResNet-20-style (He et al. 2016, CIFAR): 3 stages of 3 blocks, widths 16-32-64.

  Uses projection shortcuts (option B) where the original used zero-padded identities.
  """

  stage_sizes: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
