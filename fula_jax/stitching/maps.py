"""Stitch maps: an affine map over the channel/feature axis, after a layout change.

A stitch from point i of model A (activation shape ``src``) to point j of model B
(activation shape ``dst``) is, per example,

  * NHWC map -> NHWC map: bilinear resize to B's spatial size, then a 1x1 conv (affine
    over channels);
  * tokens (T, D) -> tokens (T', D'): when T != T', the tokens are read as a
    sqrt(T) x sqrt(T) grid and resized bilinearly to sqrt(T') x sqrt(T'); then a
    token-wise linear map;
  * vector (D,) -> vector (D',): a dense map;
  * NHWC map -> tokens: resize the map to the sqrt(T') x sqrt(T') grid, flatten it
    row-major into tokens, then the token-wise linear map;
  * tokens -> NHWC map: reshape the (square) token grid into a map, resize, 1x1 conv.

Bilinear resizing is linear with weights that sum to one, so it commutes with the affine
map; :func:`apply` runs the affine map at whichever resolution is smaller (the cheaper
order) and the result is the same map. Vector <-> map combinations make no sense and
raise :class:`UnstitchableError`, naming both points and shapes.

Token sequences may start with prefix tokens (a ViT's CLS or register tokens; the
model declares them per point). Only the grid tokens are resampled; prefix tokens go
through the token-wise map like any token:

* tokens -> tokens: the source's prefix tokens become the target's (the first ones
  when the source has more; 'pool' or 'learned' fill any missing, as below);
* map (or prefix-less tokens) -> tokens with prefix, option ``c2t``: 'pool' (default)
  makes each prefix token the mean of the source positions, 'learned' uses a token the
  stitch learns (parameter 'cls'; least squares leaves it at zero);
* tokens with prefix -> map, option ``t2c``: 'drop' (default) uses the grid tokens only,
  'cls' broadcasts the first prefix token over the target grid.

Parameters are a plain pytree ``{'kernel': (C_in, C_out), 'bias': (C_out,)}``, plus
``'cls': (P, C_out)`` for learned prefix tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import registry
from fula_jax.errors import UserError
from fula_jax.stitching import ladder

KINDS = ("conv", "tokens", "dense", "conv_to_tokens", "tokens_to_conv")
C2T = ("pool", "learned")  # prefix tokens of a target that the source lacks
T2C = ("drop", "cls")      # a source's prefix tokens, stitched into a map
_LAYOUT_NAMES = {1: "vector (B, D)", 2: "tokens (B, T, D)", 3: "NHWC map (B, H, W, C)"}

Params = dict[str, jax.Array]


class UnstitchableError(UserError, ValueError):
  """Two stitch points whose activation layouts no stitch map can connect."""


def _square_side(t: int) -> int | None:
  side = math.isqrt(t)
  return side if side * side == t else None


def describe(point: str, shape: Sequence[int]) -> str:
  """``'conv2' (B, 16, 16, 64) [NHWC map (B, H, W, C)]`` for error messages."""
  shape = tuple(int(s) for s in shape)
  layout = _LAYOUT_NAMES.get(len(shape), f"rank-{len(shape) + 1} array")
  return f"{point!r} {('B',) + shape} [{layout}]".replace("'B'", "B")


@dataclasses.dataclass(frozen=True)
class MapSpec:
  """How one stitch maps point `src_point` of A onto point `dst_point` of B.

  Shapes are per example (no batch axis).
  """

  src_point: str
  dst_point: str
  src_shape: tuple[int, ...]
  dst_shape: tuple[int, ...]
  kind: str
  src_prefix: int = 0   # prefix tokens (CLS, registers) before the source's grid tokens
  dst_prefix: int = 0
  c2t: str = "pool"
  t2c: str = "drop"

  @property
  def learned_prefix(self) -> int:
    """Target prefix tokens the stitch learns (0 unless c2t='learned' needs them)."""
    return max(0, self.dst_prefix - self.src_prefix) if self.c2t == "learned" else 0

  @property
  def in_features(self) -> int:
    return self.src_shape[-1]

  @property
  def out_features(self) -> int:
    return self.dst_shape[-1]

  @property
  def num_params(self) -> int:
    return (self.in_features + 1) * self.out_features

  def describe(self) -> str:
    return (f"{describe(self.src_point, self.src_shape)} -> "
            f"{describe(self.dst_point, self.dst_shape)}")


def plan(src_point: str, src_shape: Sequence[int], dst_point: str,
         dst_shape: Sequence[int], *, src_prefix: int = 0, dst_prefix: int = 0,
         c2t: str = "pool", t2c: str = "drop") -> MapSpec:
  """The map from `src_point` (per-example shape `src_shape`) to `dst_point`;
  `src_prefix` / `dst_prefix` count the prefix tokens of token points.

  Raises:
    UnstitchableError: the layouts cannot be connected (vector <-> map, a grid token
      count that is not a square where a grid is needed, ranks other than 1-3).
  """
  registry.lookup("c2t option (prefix tokens from a map)", c2t, dict.fromkeys(C2T))
  registry.lookup("t2c option (prefix tokens into a map)", t2c, dict.fromkeys(T2C))
  src = tuple(int(s) for s in src_shape)
  dst = tuple(int(s) for s in dst_shape)
  src_prefix = int(src_prefix) if len(src) == 2 else 0
  dst_prefix = int(dst_prefix) if len(dst) == 2 else 0

  def fail(why: str) -> UnstitchableError:
    return UnstitchableError(
        f"Cannot stitch {describe(src_point, src)} into {describe(dst_point, dst)}: "
        f"{why}")

  ranks = (len(src), len(dst))
  if any(r not in (1, 2, 3) for r in ranks):
    raise fail("only vectors (B, D), tokens (B, T, D) and NHWC maps (B, H, W, C) "
               "can be stitched.")
  if ranks == (1, 1):
    kind = "dense"
  if 1 in ranks and ranks != (1, 1):
    raise fail("a stitch maps vectors to vectors and maps/tokens to maps/tokens; a "
               "vector cannot be stitched to or from a spatial map or token sequence "
               "(pick pooled points on both sides, or spatial points on both sides).")
  if ranks == (3, 3):
    kind = "conv"
  grid_src = src[0] - src_prefix if len(src) == 2 else None
  grid_dst = dst[0] - dst_prefix if len(dst) == 2 else None
  hint = (" (declare a model's class/register tokens with prefix_tokens)")
  if ranks == (2, 2):
    kind = "tokens"
    if grid_src != grid_dst and (_square_side(grid_src) is None
                                 or _square_side(grid_dst) is None):
      raise fail(f"the grid token counts differ ({grid_src} vs {grid_dst}) and "
                 f"resampling needs both to be square grids{hint}.")
  elif ranks == (3, 2):
    kind = "conv_to_tokens"
    if _square_side(grid_dst) is None:
      raise fail(f"the target has {grid_dst} grid tokens, not a square grid to resize "
                 f"the map onto{hint}.")
  elif ranks == (2, 3):
    kind = "tokens_to_conv"
    if _square_side(grid_src) is None:
      raise fail(f"the source has {grid_src} grid tokens, not a square grid to reshape "
                 f"into a map{hint}.")
  return MapSpec(src_point, dst_point, src, dst, kind, src_prefix, dst_prefix, c2t, t2c)


def target_grid(spec: MapSpec) -> tuple[int, ...]:
  """Spatial (H, W) or token (T,) layout the stitch produces; () for vectors."""
  return spec.dst_shape[:-1]


def _grid(shape: tuple[int, ...], is_map: bool, prefix: int = 0
          ) -> tuple[int, int] | None:
  """A map's (H, W), or a token sequence's grid tokens as a square (None: not square)."""
  if is_map:
    return shape[0], shape[1]
  side = _square_side(shape[0] - prefix)
  return (side, side) if side is not None else None


def _src_grid(spec: MapSpec) -> tuple[int, int] | None:
  """Source as an (H, W) grid (grid tokens as a square), or None for vectors."""
  if spec.kind == "dense":
    return None
  return _grid(spec.src_shape, spec.kind in ("conv", "conv_to_tokens"), spec.src_prefix)


def _dst_grid(spec: MapSpec) -> tuple[int, int] | None:
  """Destination as an (H, W) grid (grid tokens as a square), or None for vectors."""
  if spec.kind == "dense":
    return None
  return _grid(spec.dst_shape, spec.kind in ("conv", "tokens_to_conv"), spec.dst_prefix)


def _needs_resample(spec: MapSpec) -> bool:
  if spec.kind == "dense":
    return False
  if spec.kind == "tokens":
    return spec.src_shape[0] - spec.src_prefix != spec.dst_shape[0] - spec.dst_prefix
  return _src_grid(spec) != _dst_grid(spec)


def relayout(spec: MapSpec, x: jax.Array) -> jax.Array:
  """The parameter-free part: `x` (B, *src layout, C) -> (B, *target layout, C).

  C may differ from ``spec.in_features`` (the channel axis is carried through), so the
  same function runs before or after the affine map. Learned prefix tokens come out as
  zeros here; `apply` puts the stitch's own in their place.
  """
  if spec.kind == "dense":
    return x
  batch, channels = x.shape[0], x.shape[-1]
  prefix = x[:, :spec.src_prefix] if spec.src_prefix else None
  if spec.kind in ("tokens", "tokens_to_conv"):
    x = x[:, spec.src_prefix:]
  if spec.kind == "tokens_to_conv" and spec.t2c == "cls" and prefix is not None:
    dh, dw = _dst_grid(spec)
    return jnp.broadcast_to(prefix[:, :1, None, :], (batch, dh, dw, channels))
  if _needs_resample(spec) or spec.kind in ("conv_to_tokens", "tokens_to_conv"):
    sh, sw = _src_grid(spec)
    dh, dw = _dst_grid(spec)
    grid = x.reshape(batch, sh, sw, channels)
    if (sh, sw) != (dh, dw):
      grid = jax.image.resize(grid, (batch, dh, dw, channels), method="bilinear")
    x = grid.reshape((batch, dh, dw, channels) if spec.kind in ("conv", "tokens_to_conv")
                     else (batch, dh * dw, channels))
  if spec.kind in ("tokens", "conv_to_tokens") and spec.dst_prefix:
    have = prefix[:, :spec.dst_prefix] if prefix is not None else x[:, :0]
    missing = spec.dst_prefix - have.shape[1]
    if missing:
      fill = (jnp.zeros((batch, missing, channels), x.dtype) if spec.c2t == "learned"
              else jnp.broadcast_to(x.reshape(batch, -1, channels).mean(1, keepdims=True),
                                    (batch, missing, channels)))
      have = jnp.concatenate([have, fill], axis=1)
    x = jnp.concatenate([have.astype(x.dtype), x], axis=1)
  return x


def affine(params: Params, x: jax.Array) -> jax.Array:
  """Affine map over the last axis, float32 accumulation."""
  y = jnp.einsum("...c,cd->...d", x, params["kernel"],
                 preferred_element_type=jnp.float32)
  return y + params["bias"]


def affine_first(spec: MapSpec) -> bool:
  """True when the affine map is cheaper before the resize (upsampling)."""
  if not _needs_resample(spec):
    return True
  return math.prod(_src_grid(spec)) < math.prod(_dst_grid(spec))


def apply(spec: MapSpec, params: Params, x: jax.Array, form: str = "affine"
          ) -> jax.Array:
  """The stitch ``T_theta``: (B, *src_shape) -> (B, *dst_shape), its feature map one
  of :mod:`.ladder`'s forms (a linear one runs at the cheaper resolution)."""
  if x.shape[1:] != spec.src_shape:
    raise ValueError(f"Stitch {spec.describe()} got an input of shape {x.shape}.")
  feature = affine if form == "affine" else functools.partial(ladder.apply, form)
  if form in ladder.LINEAR and affine_first(spec):
    z = relayout(spec, feature(params, x))
  else:
    z = feature(params, relayout(spec, x))
  learned = spec.learned_prefix
  if learned:
    first = spec.dst_prefix - learned
    cls = jnp.broadcast_to(params["cls"][:learned][None], (z.shape[0], learned, z.shape[-1]))
    z = jnp.concatenate([z[:, :first], cls.astype(z.dtype), z[:, spec.dst_prefix:]], 1)
  return z


def init_random(spec: MapSpec, key: jax.Array) -> Params:
  """Fan-in (LeCun normal) kernel, zero bias: the usual init of a 1x1 conv / dense."""
  kernel = jax.nn.initializers.lecun_normal()(
      key, (spec.in_features, spec.out_features), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((spec.out_features,), jnp.float32)}


def identity_params(features: int) -> Params:
  return {"kernel": jnp.eye(features, dtype=jnp.float32),
          "bias": jnp.zeros((features,), jnp.float32)}


def param_shapes(spec: MapSpec) -> dict[str, jax.ShapeDtypeStruct]:
  return {"kernel": jax.ShapeDtypeStruct((spec.in_features, spec.out_features),
                                         jnp.float32),
          "bias": jax.ShapeDtypeStruct((spec.out_features,), jnp.float32)}


def as_numpy(params: Any) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in params.items()}
