"""ImageNet architectures in the layouts pretrained weights come in, for weight import.

* `TorchResNet`: torchvision's ResNet-18/50 and Wide ResNet-50-2 (v1.5: the stride in
  the 3x3 conv of a bottleneck). Points ``stem`` (after the max-pool), ``layer1.0`` ..
  ``layer4.{n-1}`` (NHWC) and ``pool`` (B, D).
* `TimmViT`: timm's ViT-S/16 and ViT-B/16 with a class token. Points ``embed`` (patch
  + position embedding, CLS first), ``blocks.0`` .. ``blocks.{depth-1}`` ((B, 1 + N, D),
  one prefix token) and ``pool`` (the CLS token after the final LayerNorm).

Submodules and parameters are named after the PyTorch ones (``layer1.0.conv1`` becomes
``layer1_0/conv1``), so `fula_jax.models.weights` maps a state dict onto them by name.
Inputs are images in [0, 1]; each model standardises them with its weights' statistics
(ImageNet mean/std for torchvision, 0.5/0.5 for timm's ViTs; a checkpoint that carries
its own normaliser, like the robustness library's, overrides them).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fula_jax.models.base import StagedModel, module_name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _bn(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      name=name)


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad),) * 2,
                 use_bias=False, name=name)


class TorchBlock(nn.Module):
  """torchvision's BasicBlock or Bottleneck."""
  planes: int
  stride: int
  bottleneck: bool
  width_per_group: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.bottleneck:
      width = self.planes * self.width_per_group // 64
      out_planes = self.planes * 4
      y = nn.relu(_bn(train, "bn1")(_conv(width, 1, 1, "conv1")(x)))
      y = nn.relu(_bn(train, "bn2")(_conv(width, 3, self.stride, "conv2")(y)))
      y = _bn(train, "bn3")(_conv(out_planes, 1, 1, "conv3")(y))
    else:
      out_planes = self.planes
      y = nn.relu(_bn(train, "bn1")(_conv(self.planes, 3, self.stride, "conv1")(x)))
      y = _bn(train, "bn2")(_conv(self.planes, 3, 1, "conv2")(y))
    if self.stride != 1 or x.shape[-1] != out_planes:
      x = _bn(train, "downsample_1")(_conv(out_planes, 1, self.stride, "downsample_0")(x))
    return nn.relu(x + y)


class TorchResNet(StagedModel):
  """torchvision's ResNet layout (224x224 ImageNet images, 1000 classes by default)."""

  layers: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  width_per_group: int = 64
  base_width: int = 64     # planes of the first stage (64 in torchvision)
  num_classes: int = 1000
  input_mean: tuple[float, ...] = IMAGENET_MEAN
  input_std: tuple[float, ...] = IMAGENET_STD

  def stages(self):
    def stem(h, train):
      h = nn.relu(_bn(train, "bn1")(_conv(self.base_width, 7, 2, "conv1")(h)))
      return nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    specs = [("stem", stem)]
    for s, n in enumerate(self.layers):
      for b in range(n):
        point = f"layer{s + 1}.{b}"

        def block(h, train, planes=self.base_width * 2 ** s, stride=(2 if s and not b else 1),
                  point=point):
          return TorchBlock(planes, stride, self.bottleneck, self.width_per_group,
                            name=module_name(point))(h, train)

        specs.append((point, block))
    specs.append(("pool", lambda h, train: jnp.mean(h, axis=(1, 2))))
    return specs

  def head(self, h: jax.Array, train: bool) -> jax.Array:
    return nn.Dense(self.num_classes, name="fc")(h)


class TimmAttention(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    hd = d // self.num_heads
    qkv = nn.Dense(3 * d, name="qkv")(x).reshape(b, n, 3, self.num_heads, hd)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    attn = jax.nn.softmax((q * hd ** -0.5) @ k.transpose(0, 1, 3, 2), axis=-1)
    out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return nn.Dense(d, name="proj")(out)


class TimmBlock(nn.Module):
  num_heads: int
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = x + TimmAttention(self.num_heads, name="attn")(
        nn.LayerNorm(epsilon=1e-6, name="norm1")(x))
    y = nn.LayerNorm(epsilon=1e-6, name="norm2")(x)
    return x + TimmMlp(int(d * self.mlp_ratio), name="mlp")(y)


class TimmMlp(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
    return nn.Dense(x.shape[-1], name="fc2")(y)


class TimmPatchEmbed(nn.Module):
  width: int
  patch: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                padding="VALID", name="proj")(x)
    return x.reshape(x.shape[0], -1, self.width)


class TimmViT(StagedModel):
  """timm's VisionTransformer layout with a class token (ViT-S/16 by default)."""

  patch: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  num_classes: int = 1000
  image_size: int = 224
  input_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  input_std: tuple[float, ...] = (0.5, 0.5, 0.5)

  @property
  def prefix_tokens(self) -> dict[str, int]:
    """One class token in front of every token point."""
    return {p: 1 for p in self.point_names if p != "pool"}

  def stages(self):
    tokens = (self.image_size // self.patch) ** 2

    def embed(h, train):
      del train
      x = TimmPatchEmbed(self.width, self.patch, name="patch_embed")(h)
      cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
      pos = self.param("pos_embed", nn.initializers.normal(0.02),
                       (1, 1 + tokens, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], 1)
      return x + pos

    specs = [("embed", embed)]
    for i in range(self.depth):
      point = f"blocks.{i}"
      specs.append((point, lambda h, train, point=point: TimmBlock(
          self.num_heads, name=module_name(point))(h)))
    specs.append(("pool", lambda h, train: nn.LayerNorm(epsilon=1e-6, name="norm")(h)[:, 0]))
    return specs

  def head(self, h: jax.Array, train: bool) -> jax.Array:
    return nn.Dense(self.num_classes, name="head")(h)


def resnet18(**kw) -> TorchResNet:
  return TorchResNet(**{**dict(layers=(2, 2, 2, 2)), **kw})


def resnet50(**kw) -> TorchResNet:
  return TorchResNet(**{**dict(layers=(3, 4, 6, 3), bottleneck=True), **kw})


def wide_resnet50_2(**kw) -> TorchResNet:
  return TorchResNet(**{**dict(layers=(3, 4, 6, 3), bottleneck=True,
                               width_per_group=128), **kw})


def vit_small_patch16_224(**kw) -> TimmViT:
  return TimmViT(**{**dict(width=384, depth=12, num_heads=6), **kw})


def vit_base_patch16_224(**kw) -> TimmViT:
  return TimmViT(**{**dict(width=768, depth=12, num_heads=12), **kw})


MODELS = {
    "imagenet_resnet18": resnet18,
    "imagenet_resnet50": resnet50,
    "imagenet_wide_resnet50_2": wide_resnet50_2,
    "vit_small_patch16_224": vit_small_patch16_224,
    "vit_base_patch16_224": vit_base_patch16_224,
}
