"""CIFAR VGG with BatchNorm (Simonyan & Zisserman 2015; the common CIFAR variant).

Each stage is a run of 3x3 conv (with bias) + BN + ReLU layers followed by a 2x2 max-pool;
the classifier is a single Dense on the pooled 512-d (times the multiplier) feature.

Points: ``stage1`` .. ``stage5`` (NHWC, each after that stage's max-pool) and ``pool``
(B, D). ``pool`` averages the last stage's spatial grid; on 32x32 inputs that grid is 1x1,
so this is exactly the flatten of the common CIFAR VGG, and D stays 512 (times the
multiplier) at other image sizes.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from fula_jax.models.base import StagedModel, module_name
from fula_jax.models.resnet import batch_norm, conv_init, global_average_pool, scaled_width

VGG11_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGGStage(nn.Module):
  """Conv3x3(+bias)-BN-ReLU for each width, then a 2x2 stride-2 max-pool."""

  widths: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                  kernel_init=conv_init, name=f"conv{i}")(x)
      x = nn.relu(batch_norm(train, f"bn{i}")(x))
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG(StagedModel):
  """VGG-BN for small images; one point per pooled stage, then ``pool``.

  Attributes:
    stage_widths: conv widths of each stage (before `width_multiplier`).
    width_multiplier: scales every width (e.g. 1/8 for a VGG that trains on a CPU).
  """

  stage_widths: Sequence[Sequence[int]] = VGG16_STAGES
  width_multiplier: float = 1.0

  def stages(self):
    specs = []
    for s, widths in enumerate(self.stage_widths):
      point = f"stage{s + 1}"
      scaled = tuple(scaled_width(w, self.width_multiplier) for w in widths)

      def stage(h, train, scaled=scaled, point=point):
        if min(h.shape[1:3]) < 2:
          raise ValueError(
              f"{type(self).__name__}: {point} needs a spatial size of at least 2 to "
              f"max-pool, got {h.shape[1:3]}; use larger images (32x32 for 5 stages).")
        return VGGStage(scaled, name=module_name(point))(h, train)

      specs.append((point, stage))
    specs.append(("pool", global_average_pool))
    return specs


class VGG11(VGG):
  """VGG-11-BN (configuration A): 8 conv layers in 5 stages."""

  stage_widths: Sequence[Sequence[int]] = VGG11_STAGES


class VGG16(VGG):
  """VGG-16-BN (configuration D): 13 conv layers in 5 stages."""

  stage_widths: Sequence[Sequence[int]] = VGG16_STAGES
