"""Small models that train in seconds on a CPU: a conv net and an MLP."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from fula_jax.models.base import StagedModel, module_name


class ConvBNReLU(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.relu(x)


class SmallCNN(StagedModel):
  """Conv-BN-ReLU stages (stride 2 after the first) then global average pooling.

  Points: ``conv1`` .. ``convN`` (NHWC) and ``pool`` (B, D).
  """

  widths: Sequence[int] = (32, 64, 128)

  def stages(self):
    specs = []
    for i, width in enumerate(self.widths):
      name = f"conv{i + 1}"
      specs.append((name, lambda h, train, w=width, n=name, s=(1 if i == 0 else 2):
                     ConvBNReLU(w, strides=s, name=module_name(n))(h, train)))
    specs.append(("pool", lambda h, train: jnp.mean(h, axis=(1, 2))))
    return specs


class MLP(StagedModel):
  """Flatten, then Dense-ReLU stages. Points: ``fc1`` .. ``fcN`` (B, D)."""

  widths: Sequence[int] = (256, 128)

  def stages(self):
    specs = []
    for i, width in enumerate(self.widths):
      name = f"fc{i + 1}"

      def fn(h, train, w=width, n=name, first=(i == 0)):
        if first:
          h = h.reshape(h.shape[0], -1)
        return nn.relu(nn.Dense(w, name=module_name(n))(h))

      specs.append((name, fn))
    return specs
