"""Vision Transformer (Dosovitskiy et al. 2021) for small images, with a point per block.

No class token: the head is a final LayerNorm, a mean over tokens and a Dense layer, so
every point before ``pool`` is a clean (B, T, D) token grid. Blocks are pre-LN. The
learned position embedding takes its length from the input at initialisation (T = H*W /
patch**2); later calls must use the same image size.

Points: ``embed`` (patch embedding + position embedding), ``encoder.0`` ..
``encoder.{depth-1}`` (B, T, D) and ``pool`` (B, D).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from fula_jax.models.base import StagedModel, module_name


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> linear tokens (B, T, D), plus a learned position embedding."""

  width: int
  patch: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    height, width = x.shape[1:3]
    if height % self.patch or width % self.patch:
      raise ValueError(f"Image size {height}x{width} is not divisible by the patch "
                       f"size {self.patch}.")
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch,
                padding="VALID", name="patch")(x)
    batch, h, w, d = x.shape
    x = x.reshape(batch, h * w, d)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, h * w, d), x.dtype)
    return x + pos


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    y = nn.LayerNorm(name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_features=width, out_features=width,
        kernel_init=nn.initializers.xavier_uniform(), name="attn")(y, y)
    x = x + y
    y = nn.LayerNorm(name="ln2")(x)
    y = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6), name="mlp1")(y)
    y = nn.Dense(width, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6),
                 name="mlp2")(nn.gelu(y, approximate=False))
    return x + y


class TokenPool(nn.Module):
  """Final LayerNorm, then the mean over tokens: (B, T, D) -> (B, D)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.LayerNorm(name="ln")(x).mean(axis=1)


class ViT(StagedModel):
  """A ViT without class token; every field settable (defaults: ViT-Tiny, patch 4).

  Attributes:
    patch: patch side in pixels (4 gives 64 tokens on 32x32 images).
    width: token dimension D.
    depth: number of encoder blocks.
    num_heads: attention heads (must divide `width`).
    mlp_dim: hidden size of each block's MLP.
  """

  patch: int = 4
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768

  def stages(self):
    if self.width % self.num_heads:
      raise ValueError(f"{type(self).__name__}: width {self.width} is not divisible by "
                       f"num_heads {self.num_heads}.")

    def embed(h, train):
      del train
      return PatchEmbed(self.width, self.patch, name=module_name("embed"))(h)

    specs = [("embed", embed)]
    for i in range(self.depth):
      point = f"encoder.{i}"

      def block(h, train, point=point):
        del train
        return EncoderBlock(self.num_heads, self.mlp_dim, name=module_name(point))(h)

      specs.append((point, block))

    def pool(h, train):
      del train
      return TokenPool(name=module_name("pool"))(h)

    specs.append(("pool", pool))
    return specs


class ViTTiny(ViT):
  """ViT-Tiny (D=192, depth 12, 3 heads, MLP 768) with 4x4 patches for 32x32 images."""

  patch: int = 4
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
