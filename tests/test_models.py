"""The model zoo against its contract and against independent references.

Small instances (width multipliers, a 2-block ViT) check everything that does not depend
on size; full sizes are only used for parameter counts, through `jax.eval_shape`.
References written here: layer-by-layer parameter formulas, the published counts, the
expected point lists and shapes, and NumPy forward passes of one block of each family.
"""

from __future__ import annotations

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from fula_jax import models, registry
from fula_jax.models import LOGITS

B = 3
INPUT_SHAPE = (B, 32, 32, 3)

# Small variants of every registered model (the registry must not grow untested).
SMALL = {
    "cnn": dict(widths=(8, 16)),
    "mlp": dict(widths=(32, 16)),
    "resnet18": dict(width_multiplier=1 / 8),
    "resnet20": dict(width_multiplier=1 / 4),
    "vgg11": dict(width_multiplier=1 / 8),
    "vgg16": dict(width_multiplier=1 / 8),
    "vit": dict(patch=8, width=32, depth=2, num_heads=2, mlp_dim=64),
    "vit_tiny": dict(width=32, depth=2, num_heads=2, mlp_dim=64),
    # The ImageNet layouts (their full sizes are checked against PyTorch in
    # test_weights.py): a narrow first stage, one block per stage, small ViTs.
    "imagenet_resnet18": dict(base_width=8, num_classes=10),
    "imagenet_resnet50": dict(base_width=8, layers=(1, 1, 1, 1), num_classes=10),
    "imagenet_wide_resnet50_2": dict(base_width=8, layers=(1, 1, 1, 1), num_classes=10),
    "vit_small_patch16_224": dict(image_size=32, patch=8, width=32, depth=2,
                                  num_heads=2, num_classes=10),
    "vit_base_patch16_224": dict(image_size=32, patch=16, width=48, depth=2,
                                 num_heads=3, num_classes=10),
}
BN_MODELS = ("cnn", "resnet18", "resnet20", "vgg11", "vgg16", "imagenet_resnet18",
             "imagenet_resnet50", "imagenet_wide_resnet50_2")


def _expected_points(name: str) -> dict[str, tuple[int, ...]]:
  """Point -> shape of the SMALL instance on INPUT_SHAPE, written out from the spec."""
  if name == "cnn":
    return {"conv1": (B, 32, 32, 8), "conv2": (B, 16, 16, 16), "pool": (B, 16)}
  if name == "mlp":
    return {"fc1": (B, 32), "fc2": (B, 16)}
  if name == "resnet18":
    out = {"stem": (B, 32, 32, 8)}
    for s, (size, width) in enumerate([(32, 8), (16, 16), (8, 32), (4, 64)]):
      for b in range(2):
        out[f"block{s + 1}.{b}"] = (B, size, size, width)
    return {**out, "pool": (B, 64)}
  if name == "resnet20":
    out = {"stem": (B, 32, 32, 4)}
    for s, (size, width) in enumerate([(32, 4), (16, 8), (8, 16)]):
      for b in range(3):
        out[f"block{s + 1}.{b}"] = (B, size, size, width)
    return {**out, "pool": (B, 16)}
  if name in ("vgg11", "vgg16"):
    return {"stage1": (B, 16, 16, 8), "stage2": (B, 8, 8, 16), "stage3": (B, 4, 4, 32),
            "stage4": (B, 2, 2, 64), "stage5": (B, 1, 1, 64), "pool": (B, 64)}
  if name in ("vit", "vit_tiny"):
    tokens = 16 if name == "vit" else 64
    return {"embed": (B, tokens, 32), "encoder.0": (B, tokens, 32),
            "encoder.1": (B, tokens, 32), "pool": (B, 32)}
  if name == "imagenet_resnet18":  # 32 -> 16 (7x7 conv, stride 2) -> 8 (max-pool)
    out = {"stem": (B, 8, 8, 8)}
    for s, (size, width) in enumerate([(8, 8), (4, 16), (2, 32), (1, 64)]):
      for b in range(2):
        out[f"layer{s + 1}.{b}"] = (B, size, size, width)
    return {**out, "pool": (B, 64)}
  if name in ("imagenet_resnet50", "imagenet_wide_resnet50_2"):  # bottlenecks: 4x planes
    out = {"stem": (B, 8, 8, 8)}
    for s, (size, width) in enumerate([(8, 32), (4, 64), (2, 128), (1, 256)]):
      out[f"layer{s + 1}.0"] = (B, size, size, width)
    return {**out, "pool": (B, 256)}
  if name.startswith("vit_") and name.endswith("patch16_224"):
    tokens, width = (1 + 16, 32) if "small" in name else (1 + 4, 48)  # CLS + grid
    return {"embed": (B, tokens, width), "blocks.0": (B, tokens, width),
            "blocks.1": (B, tokens, width), "pool": (B, width)}
  raise AssertionError(name)


def _random_variables(model, seed: int) -> dict:
  """Trained-like variables drawn with NumPy on `jax.eval_shape(init)`'s structure.

  Kernels ~ N(0, 1/fan_in), non-trivial scales and biases, random BN running statistics
  (so BN is not the identity). NumPy, not jax.random: compiling jax's PRNG for every
  kernel shape takes seconds per shape on a CPU.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: models.init(model, jax.random.PRNGKey(0), INPUT_SHAPE))

  def leaf(path, s):
    key = jax.tree_util.keystr(path)
    shape = s.shape
    if key.endswith("['mean']"):
      x = rng.normal(0.0, 0.5, shape)
    elif key.endswith("['var']"):
      x = rng.uniform(0.5, 2.0, shape)
    elif key.endswith("['scale']"):
      x = 1.0 + rng.normal(0.0, 0.2, shape)
    elif key.endswith("['bias']"):
      x = rng.normal(0.0, 0.1, shape)
    elif key.endswith("['kernel']"):
      x = rng.normal(0.0, 1.0, shape) / np.sqrt(np.prod(shape[:-1]))
    else:
      x = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  model = models.get_model(name, **SMALL[name])
  variables = _random_variables(model, seed=sorted(SMALL).index(name))
  x = jax.random.uniform(jax.random.PRNGKey(1), INPUT_SHAPE)
  return model, variables, x


def _close(actual, desired, rtol=1e-5):
  desired = np.asarray(desired)
  scale = max(float(np.max(np.abs(desired))), 1e-6)
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=rtol * scale)


def test_every_registered_model_is_tested():
  assert set(models.MODELS) == set(SMALL)


@functools.lru_cache(maxsize=None)
def _pieces(name: str):
  """Whole net, capture, every prefix input->p and every piece p->q (eager)."""
  model, v, x = _setup(name)
  points = list(model.point_names)

  def run(v, x):
    whole = models.forward(model, v, x)
    explicit = models.forward(model, v, x, start=models.INPUT, end=models.LOGITS)
    logits, acts = models.capture(model, v, x)
    prefix = {p: models.forward(model, v, x, end=p) for p in points}
    order = points + [LOGITS]
    pieces = {(p, q): models.forward(model, v, prefix[p], start=p, end=q)
              for i, p in enumerate(points) for q in order[i + 1:]}
    return whole, explicit, logits, acts, prefix, pieces

  return jax.device_get(run(v, x))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_pieces_compose_to_the_whole_net(name):
  model, v, x = _setup(name)
  points = list(_expected_points(name))
  assert list(model.point_names) == points
  whole, explicit, logits, acts, prefix, pieces = _pieces(name)
  assert set(acts) == set(points)
  _close(logits, whole)
  _close(explicit, whole)
  for p in points:
    _close(prefix[p], acts[p])
  targets = {**prefix, LOGITS: whole}
  order = points + [LOGITS]
  expected_pairs = [(p, q) for i, p in enumerate(points) for q in order[i + 1:]]
  assert sorted(pieces) == sorted(expected_pairs)
  for p, q in expected_pairs:
    _close(pieces[p, q], targets[q])
  # The perturbed BN statistics matter.
  if name in BN_MODELS:
    stats = jax.tree_util.tree_map_with_path(
        lambda path, a: (jnp.zeros_like(a) if "mean" in jax.tree_util.keystr(path)
                         else jnp.ones_like(a)), v["batch_stats"])
    other = models.forward(model, {**v, "batch_stats": stats}, x)
    assert not np.allclose(other, whole, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_point_shapes_match_real_shapes_and_layout(name):
  model, _, _ = _setup(name)
  shapes = models.point_shapes(model, INPUT_SHAPE)
  expected = {**_expected_points(name), LOGITS: (B, 10)}
  assert set(shapes) == set(expected)
  _, _, logits, acts, _, _ = _pieces(name)
  real = {**acts, LOGITS: logits}
  for p, shape in expected.items():
    assert shapes[p].shape == shape, p
    assert real[p].shape == shape, p
    assert shapes[p].dtype == real[p].dtype == jnp.float32, p


# ----------------------------------------------------------------------------
# Parameter counts: layer-by-layer formulas and the published figures.
# ----------------------------------------------------------------------------


def _conv(k, cin, cout, bias=False):
  return k * k * cin * cout + (cout if bias else 0)


def _bn(c):
  return 2 * c  # scale and bias; running mean/var are not parameters.


def _dense(i, o):
  return i * o + o


def _ln(d):
  return 2 * d


def _resnet_count(stage_sizes, widths, classes=10):
  total = _conv(3, 3, widths[0]) + _bn(widths[0])
  cin = widths[0]
  for s, (blocks, w) in enumerate(zip(stage_sizes, widths)):
    for b in range(blocks):
      total += _conv(3, cin, w) + _bn(w) + _conv(3, w, w) + _bn(w)
      if (s > 0 and b == 0) or cin != w:
        total += _conv(1, cin, w) + _bn(w)
      cin = w
  return total + _dense(cin, classes)


def _vgg_count(stage_widths, classes=10):
  total, cin = 0, 3
  for widths in stage_widths:
    for w in widths:
      total += _conv(3, cin, w, bias=True) + _bn(w)
      cin = w
  return total + _dense(cin, classes)


def _vit_count(image, patch, width, depth, mlp, classes=10):
  tokens = (image // patch) ** 2
  embed = _conv(patch, 3, width, bias=True) + tokens * width
  attention = 4 * (width * width + width)  # q, k, v and output projections
  block = _ln(width) + attention + _ln(width) + _dense(width, mlp) + _dense(mlp, width)
  return embed + depth * block + _ln(width) + _dense(width, classes)


def _count(name, input_shape=(1, 32, 32, 3), **kw):
  model = models.get_model(name, **kw)
  shapes = jax.eval_shape(
      lambda: models.init(model, jax.random.PRNGKey(0), input_shape))
  return models.count_params(shapes["params"]), shapes


VGG11 = ((64,), (128,), (256, 256), (512, 512), (512, 512))
VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def test_standard_parameter_counts():
  r18, shapes = _count("resnet18")
  assert r18 == _resnet_count((2, 2, 2, 2), (64, 128, 256, 512)) == 11_173_962
  # BN running statistics: a mean and a variance per BN channel, and not in 'params'.
  bn_channels = 64 + 4 * 64 + 4 * 128 + 4 * 256 + 4 * 512 + 128 + 256 + 512
  assert models.count_params(shapes["batch_stats"]) == 2 * bn_channels

  r20, _ = _count("resnet20")
  assert r20 == _resnet_count((3, 3, 3), (16, 32, 64))
  # Published 0.27M is 269,722 with option-A (zero-pad) shortcuts; ours adds two
  # 1x1 conv + BN projections.
  assert r20 - 269_722 == _conv(1, 16, 32) + _bn(32) + _conv(1, 32, 64) + _bn(64)

  v16, _ = _count("vgg16")
  assert v16 == _vgg_count(VGG16) == 14_728_266
  v11, _ = _count("vgg11")
  assert v11 == _vgg_count(VGG11)

  vt, _ = _count("vit_tiny")
  assert vt == _vit_count(32, 4, 192, 12, 768) == 5_362_378
  assert 5.3e6 < vt < 5.45e6


def test_small_and_class_count_variants_follow_the_formulas():
  assert _count("resnet18", width_multiplier=1 / 8)[0] == _resnet_count(
      (2, 2, 2, 2), (8, 16, 32, 64))
  assert _count("resnet20", num_classes=100)[0] == _resnet_count(
      (3, 3, 3), (16, 32, 64), classes=100)
  assert _count("vgg11", width_multiplier=1 / 8)[0] == _vgg_count(
      tuple(tuple(w // 8 for w in ws) for ws in VGG11))
  assert _count("vit", (1, 16, 16, 3), patch=4, width=32, depth=3, num_heads=4,
                mlp_dim=48)[0] == _vit_count(16, 4, 32, 3, 48)


# ----------------------------------------------------------------------------
# NumPy references of one block per family (architecture, not just shapes).
# ----------------------------------------------------------------------------


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _np_conv(x, kernel, stride=1, pad=1, bias=None):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  h = (x.shape[1] - kh) // stride + 1
  w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + stride * (h - 1) + 1:stride,
               j:j + stride * (w - 1) + 1:stride] @ kernel[i, j]
  return out if bias is None else out + bias


def _np_bn(x, p, s, eps=1e-5):
  return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _relu(x):
  return np.maximum(x, 0.0)


def test_resnet_block_with_projection_matches_numpy():
  _, v, x = _setup("resnet18")
  _, _, _, acts, _, _ = _pieces("resnet18")
  p, s = _np(v["params"]["block2_0"]), _np(v["batch_stats"]["block2_0"])
  h = np.asarray(acts["block1.1"], np.float64)
  y = _relu(_np_bn(_np_conv(h, p["conv1"]["kernel"], stride=2), p["bn1"], s["bn1"]))
  y = _np_bn(_np_conv(y, p["conv2"]["kernel"]), p["bn2"], s["bn2"])
  short = _np_bn(_np_conv(h, p["proj_conv"]["kernel"], stride=2, pad=0),
                 p["proj_bn"], s["proj_bn"])
  _close(acts["block2.0"], _relu(y + short), rtol=1e-4)
  # An identity block (no projection parameters) and the stem on standardised pixels.
  assert "proj_conv" not in v["params"]["block2_1"]
  p, s = _np(v["params"]["stem"]), _np(v["batch_stats"]["stem"])
  pixels = (np.asarray(x, np.float64) - 0.5) / 0.25
  stem = _relu(_np_bn(_np_conv(pixels, p["conv"]["kernel"]), p["bn"], s["bn"]))
  _close(acts["stem"], stem, rtol=1e-4)


def test_vgg_stage_and_head_match_numpy():
  _, v, _ = _setup("vgg11")
  _, _, logits, acts, _, _ = _pieces("vgg11")
  p, s = _np(v["params"]["stage3"]), _np(v["batch_stats"]["stage3"])
  h = np.asarray(acts["stage2"], np.float64)
  for i in range(2):
    h = _np_conv(h, p[f"conv{i}"]["kernel"], bias=p[f"conv{i}"]["bias"])
    h = _relu(_np_bn(h, p[f"bn{i}"], s[f"bn{i}"]))
  b, hh, ww, c = h.shape
  pooled = h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
  _close(acts["stage3"], pooled, rtol=1e-4)
  flat = np.asarray(acts["stage5"], np.float64).reshape(B, -1)  # the 1x1 grid, flattened
  _close(acts["pool"], flat)
  head = _np(v["params"]["head"])
  _close(logits, flat @ head["kernel"] + head["bias"], rtol=1e-4)


def _np_ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_vit_embed_block_and_pool_match_numpy():
  _, v, x = _setup("vit_tiny")
  _, _, logits, acts, _, _ = _pieces("vit_tiny")
  params = _np(v["params"])
  # Patch embedding: 4x4 patches in raster order, flattened (row, col, channel).
  pixels = (np.asarray(x, np.float64) - 0.5) / 0.25
  patches = pixels.reshape(B, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, 64, -1)
  e = params["embed"]
  tokens = (patches @ e["patch"]["kernel"].reshape(48, 32) + e["patch"]["bias"]
            + e["pos_embedding"])
  _close(acts["embed"], tokens, rtol=1e-4)
  # A pre-LN block with 2 heads of 16 and an exact-GELU MLP.
  p = params["encoder_1"]
  h = np.asarray(acts["encoder.0"], np.float64)
  y = _np_ln(h, p["ln1"])
  a = p["attn"]
  q, k, val = (np.einsum("btd,dhk->bthk", y, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
  scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(16)
  weights = special.softmax(scores, axis=-1)
  o = np.einsum("bhqs,bshk->bqhk", weights, val)
  h = h + np.einsum("bqhk,hkd->bqd", o, a["out"]["kernel"]) + a["out"]["bias"]
  y = _np_ln(h, p["ln2"]) @ p["mlp1"]["kernel"] + p["mlp1"]["bias"]
  y = 0.5 * y * (1 + special.erf(y / math.sqrt(2)))
  h = h + y @ p["mlp2"]["kernel"] + p["mlp2"]["bias"]
  _close(acts["encoder.1"], h, rtol=1e-4)
  pooled = _np_ln(h, params["pool"]["ln"]).mean(axis=1)
  _close(acts["pool"], pooled, rtol=1e-4)
  _close(logits, pooled @ params["head"]["kernel"] + params["head"]["bias"], rtol=1e-4)


def test_vit_position_embedding_follows_the_input_size():
  model = models.get_model("vit", **SMALL["vit_tiny"])
  for size in (16, 32):
    shapes = jax.eval_shape(
        lambda s=size: models.init(model, jax.random.PRNGKey(0), (1, s, s, 3)))
    assert shapes["params"]["embed"]["pos_embedding"].shape == (1, (size // 4) ** 2, 32)
  with pytest.raises(ValueError, match="not divisible"):
    models.point_shapes(model, (1, 30, 30, 3))


# ----------------------------------------------------------------------------
# Errors, recompilation, BatchNorm state.
# ----------------------------------------------------------------------------


def _choices(message: str) -> list[str]:
  return re.search(r"Valid choices: (.*)\.$", message).group(1).split(", ")


def test_unknown_model_lists_valid_names_closest_first():
  with pytest.raises(registry.UnknownNameError) as err:
    models.get_model("resnet19")
  listed = _choices(str(err.value))
  assert sorted(listed) == sorted(models.MODELS)
  assert listed[0] == "resnet18"
  with pytest.raises(KeyError):
    models.get_model("vit_tni")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_unknown_point_lists_valid_points_closest_first(name):
  model, v, x = _setup(name)
  points = list(model.point_names)
  bad = points[1] + "_"
  for kw in (dict(end=bad), dict(start=bad)):
    with pytest.raises(registry.UnknownNameError) as err:
      models.forward(model, v, x, **kw)
    listed = _choices(str(err.value))
    assert sorted(listed) == sorted(points)
    assert listed[0] == points[1]
  with pytest.raises(ValueError, match="end comes before the start"):
    models.forward(model, v, x, start=points[1], end=points[0])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_jitted_forward_traces_once(name):
  model, v, x = _setup(name)
  chex.clear_trace_counter()
  traces = []

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fwd(variables, images):
    traces.append(None)
    return models.forward(model, variables, images)

  outs = [fwd(v, jnp.clip(x + 0.05 * k, 0.0, 1.0)) for k in range(3)]
  assert len(traces) == 1
  _close(outs[0], _pieces(name)[0], rtol=1e-4)
  assert not np.allclose(outs[0], outs[2])


def _same_tree(a, b) -> bool:
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  return ta == tb and all(np.array_equal(p, q) for p, q in zip(la, lb))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_train_mode_updates_batch_stats_and_inference_mutates_nothing(name):
  model, v, x = _setup(name)
  _, state = model.apply(v, x, train=False, mutable=True)
  assert _same_tree(state, v)
  _, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
  if name not in BN_MODELS:
    assert not updates.get("batch_stats")
    return
  new, old = updates["batch_stats"], v["batch_stats"]
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
  for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)):
    assert not np.allclose(a, b)


@pytest.mark.parametrize("name,first", [("resnet20", ("stem", "conv", "bn")),
                                        ("vgg16", ("stage1", "conv0", "bn0"))])
def test_batch_norm_momentum_on_the_first_layer(name, first):
  """Running stats move 10% towards the batch's (biased) mean and variance."""
  model, v, x = _setup(name)
  point, conv, bn = first
  _, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
  p = _np(v["params"][point][conv])
  pixels = (np.asarray(x, np.float64) - 0.5) / 0.25
  pre = _np_conv(pixels, p["kernel"], bias=p.get("bias")).reshape(-1, p["kernel"].shape[-1])
  old = _np(v["batch_stats"][point][bn])
  new = updates["batch_stats"][point][bn]
  _close(new["mean"], 0.9 * old["mean"] + 0.1 * pre.mean(0), rtol=1e-4)
  _close(new["var"], 0.9 * old["var"] + 0.1 * pre.var(0), rtol=1e-4)


def test_init_gives_flax_own_initial_variables_eagerly_and_inside_a_trace():
  """`models.init` compiles the initialisers without XLA's optimisation passes on the
  CPU (they run once); the variables are Flax's own `Module.init` values (to float32
  rounding: unfused arithmetic may differ in the last place), and the same call works
  inside a caller's jit (where the compiler options cannot apply)."""
  model = models.get_model("mlp")
  key = jax.random.PRNGKey(5)
  flax_own = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)), train=False))(key)
  ours = models.init(model, key, (1, 8, 8, 1))
  traced = jax.jit(lambda k: models.init(model, k, (1, 8, 8, 1)))(key)
  chex.assert_trees_all_close(ours, flax_own, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(traced, flax_own)
  other = models.init(model, jax.random.PRNGKey(6), [1, 8, 8, 1])
  kernel = lambda v: np.asarray(v["params"]["fc1"]["kernel"])
  assert not np.allclose(kernel(other), kernel(ours))  # the key, not the shape, decides
