"""Models from outside the zoo: Flax Linen and NNX modules written here, adapted with
`from_flax` / `from_nnx`, follow the model protocol exactly and work in the engine."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fula_jax import models, registry, sharding, stitching
from fula_jax.models import adapters
from fula_jax.stitching import testing


class LinenBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=self.width)(y)
    return x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x))))


class LinenViT(nn.Module):
  """A ViT with a CLS token: patch embedding, CLS + position embedding, blocks."""
  width: int = 16
  depth: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (2, 2), strides=2, name="embed")(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], 1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    for i in range(self.depth):
      x = LinenBlock(self.width, name=f"encoder_{i}")(x)
    return nn.Dense(10, name="head")(nn.LayerNorm(name="norm")(x)[:, 0])


class LinenResBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False)(x)
    y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
    y = nn.BatchNorm(use_running_average=not train)(
        nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x)
    return nn.relu(x + y)


class LinenResNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    for i, (f, s) in enumerate(((8, 1), (16, 2), (16, 1))):
      x = LinenResBlock(f, s, name=f"layer{i}")(x, train)
    return nn.Dense(10, name="fc")(x.mean((1, 2)))


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.fc = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.fc(x.mean((1, 2)))


@pytest.fixture(scope="module")
def digits():
  return testing.digits_splits(500, 200)


@pytest.fixture(scope="module")
def linen_vit(digits):
  module = LinenViT()
  variables = testing.train_donor(module, digits[0], steps=150, lr=3e-3)
  return adapters.from_flax(module, variables, "encoder_*", input_shape=(8, 8, 1),
                            prefix_tokens=1)


@pytest.fixture(scope="module")
def linen_resnet(digits):
  module = LinenResNet()
  variables = testing.train_donor(module, digits[0], steps=150, lr=1e-2)
  model, v = adapters.from_flax(module, variables, ["stem", "layer*"],
                                input_shape=(8, 8, 1), call_kwargs={"train": False})
  return model, v, module, variables


@pytest.fixture(scope="module")
def nnx_net():
  module = NNXNet(nnx.Rngs(0))
  return adapters.from_nnx(module, ["conv1", "conv2"], input_shape=(8, 8, 1)), module


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def _check_protocol(model, variables, full, x):
  """input -> i -> logits, input -> i -> l and one-pass capture, against the whole net."""
  _close(model.apply(variables, x), full)
  logits, acts = model.apply(variables, x, capture=True)
  _close(logits, full)
  assert list(acts) == list(model.point_names)
  for i, p in enumerate(model.point_names):
    h = model.apply(variables, x, end=p)
    _close(h, acts[p])
    _close(model.apply(variables, h, start=p), full)
    for q in model.point_names[i + 1:]:
      _close(model.apply(variables, h, start=p, end=q), acts[q])
    _, later = model.apply(variables, h, start=p, capture=True)
    assert list(later) == list(model.point_names[i + 1:])


def test_linen_vit_with_cls_token_follows_the_protocol(linen_vit, digits):
  model, v = linen_vit
  x = jnp.asarray(digits[1].images[:4])
  assert model.point_names == ("encoder_0", "encoder_1", "encoder_2")
  assert model.prefix_tokens == {p: 1 for p in model.point_names}
  _check_protocol(model, v, model.module.apply(v, x), x)


def test_linen_resnet_and_nnx_follow_the_protocol(linen_resnet, nnx_net, digits):
  model, v, module, raw = linen_resnet
  x = jnp.asarray(digits[1].images[:4])
  assert model.point_names == ("stem", "layer0", "layer1", "layer2")
  _check_protocol(model, v, module.apply(raw, x, train=False), x)
  (nmodel, nv), nmodule = nnx_net
  _check_protocol(nmodel, nv, nmodule(x), x)
  hash(model), hash(nmodel)  # static arguments of jitted programs


def test_input_points_sit_after_the_activation_and_follow_the_protocol(linen_resnet,
                                                                      nnx_net, digits):
  """'<path>:input' is the activation entering a submodule: the stem's ReLU output in
  the Linen net, conv1's ReLU output in the NNX one (a NumPy ReLU of the output point).
  Both follow the whole protocol beside output points, in execution order."""
  model, v, module, raw = linen_resnet
  x = jnp.asarray(digits[1].images[:4])
  both, bv = adapters.from_flax(module, raw, ["stem", "layer0:input", "layer1:input"],
                                input_shape=(8, 8, 1), call_kwargs={"train": False})
  assert both.point_names == ("stem", "layer0:input", "layer1:input")
  _check_protocol(both, bv, module.apply(raw, x, train=False), x)
  acts = both.apply(bv, x, capture=True)[1]
  _close(acts["layer0:input"], np.maximum(np.asarray(acts["stem"]), 0.0))
  _close(acts["layer1:input"], model.apply(v, x, end="layer0"))  # a block's output
  (_, _), nmodule = nnx_net
  nmodel, nv = adapters.from_nnx(nmodule, ["conv1", "conv2:input", "conv2"],
                                 input_shape=(8, 8, 1))
  _check_protocol(nmodel, nv, nmodule(x), x)
  nacts = nmodel.apply(nv, x, capture=True)[1]
  _close(nacts["conv2:input"], np.maximum(np.asarray(nacts["conv1"]), 0.0))
  with pytest.raises(registry.UnknownNameError, match="layer0:input"):
    adapters.from_flax(module, raw, ["layer9:input"], input_shape=(8, 8, 1),
                       call_kwargs={"train": False})


def _ops(fn, *args, op="convolution"):
  text = jax.jit(fn).lower(*args).compile().as_text()
  return len(re.findall(rf"= [^=\n]* {op}\(", text))


def test_running_from_a_point_compiles_no_operation_of_the_prefix(linen_resnet,
                                                                  linen_vit, digits):
  model, v, _, _ = linen_resnet
  x = jnp.asarray(digits[1].images[:2])
  acts = model.apply(v, x, capture=True)[1]
  counts = [_ops(lambda v, h, p=p: model.apply(v, h, start=p), v, acts[p])
            for p in model.point_names]
  # Convolutions after each point: layer0 2 (no projection), layer1 2 + 1, layer2 2.
  assert counts == [7, 5, 2, 0], counts
  assert _ops(lambda v, x: model.apply(v, x), v, x) == 8
  vit, vv = linen_vit
  h = vit.apply(vv, x, end="encoder_0")
  assert _ops(lambda v, x: vit.apply(v, x), vv, x) >= 1
  assert _ops(lambda v, h: vit.apply(v, h, start="encoder_0"), vv, h) == 0  # no embed


def test_unknown_paths_list_the_module_tree(linen_resnet):
  _, _, module, raw = linen_resnet
  with pytest.raises(registry.UnknownNameError) as e:
    adapters.from_flax(module, raw, ["layer4"], input_shape=(8, 8, 1),
                       call_kwargs={"train": False})
  for valid in ("Did you mean 'layer", "layer0", "layer1/Conv_0", "stem", "fc"):
    assert valid in str(e.value)


def test_dm_self_stitch_of_an_adapted_model_recovers_its_accuracy(linen_resnet, digits):
  model, v, _, _ = linen_resnet
  own = testing.accuracy(model, v, digits[1])
  assert own > 0.6
  res = stitching.run_sweep(model, v, model, v, *digits,
                            dict(objectives=["dm"], pairs="diagonal", progress=False,
                                 batch_size=100, eval_batch_size=100,
                                 compilation_cache="off"),
                            mesh=sharding.line_mesh("d", sharding.devices(1)))
  np.testing.assert_allclose(np.diag(res.values["dm"]["accuracy"]), own, atol=1.01 / 200)
  np.testing.assert_allclose(np.diag(res.values["dm"]["dm_error"]), 0.0, atol=1e-4)


def test_sweep_between_a_zoo_cnn_and_an_adapted_cls_vit_fills_every_stitchable_cell(
    linen_vit, digits):
  vit, vv = linen_vit
  cnn = models.get_model("cnn", widths=(8, 16))
  vc = testing.train_donor(cnn, digits[0], steps=100, lr=3e-3)
  cfg = dict(objectives=["dm", "fula"], steps=3, progress=False, batch_size=100,
             eval_batch_size=100, compilation_cache="off",
             baselines=False)  # checked in test_stitching_convergence
  mesh = sharding.line_mesh("d", sharding.devices(1))
  test = digits[1]
  for (ma, va), (mb, vb) in (((cnn, vc), (vit, vv)), ((vit, vv), (cnn, vc))):
    res = stitching.run_sweep(ma, va, mb, vb, *digits, cfg, mesh=mesh, keep_params=True)
    for obj in ("dm", "fula"):
      acc = res.values[obj]["accuracy"]
      why = res.reasons[obj]
      for a, r in enumerate(res.rows):
        for b, c in enumerate(res.cols):
          vector = "pool" in (r, c)  # the CNN's pooled vector has no token layout
          assert np.isfinite(acc[a, b]) != vector, (obj, r, c, why.get(f"{r}->{c}"))
          if vector:
            assert "cannot be stitched" in why[f"{r}->{c}"]
    # One cell rebuilt by hand: the CLS token is the mean of the map ('pool') going
    # into the ViT, and is dropped coming out of it ('drop').
    r, c = ("conv2", "encoder_1") if ma is cnn else ("encoder_1", "conv2")
    p = res.params[("dm", r, c)]
    x = np.asarray(ma.apply(va, test.images, end=r))
    if ma is cnn:  # (B, 4, 4, 16) -> CLS + 16 grid tokens
      tokens = np.concatenate([x.mean((1, 2))[:, None], x.reshape(len(x), 16, -1)], 1)
    else:  # (B, 1 + 16, D) -> 4 x 4 map without the CLS token
      tokens = x[:, 1:].reshape(len(x), 4, 4, -1)
    z = tokens @ p["kernel"] + p["bias"]
    logits = np.asarray(mb.apply(vb, jnp.asarray(z, jnp.float32), start=c))
    own = float(np.mean(np.argmax(logits, -1) == test.labels))
    got = res.values["dm"]["accuracy"][res.rows.index(r), res.cols.index(c)]
    assert got == pytest.approx(own, abs=1.01 / len(test.labels))


def test_a_wrong_input_shape_names_input_shape_and_point_shapes_takes_adapters(
    linen_resnet):
  """Without input_shape the probe runs on 224 x 224 x 3; a module that cannot take it
  fails with a message naming input_shape. point_shapes works on adapted and zoo models
  alike, with one example's shape or a batch's."""
  from fula_jax import errors, models
  model, v, module, raw = linen_resnet

  class Digits(nn.Module):  # reshapes to 8 x 8: fails on any other input
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name="fc")(x.reshape(x.shape[0], 4, 2, 4, 2, 1).mean((2, 4)))

  params = Digits().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(errors.ConfigError, match="input_shape"):
    adapters.from_flax(Digits(), params, ["fc"])
  shapes = models.point_shapes(model, variables=v)  # the adapter's own input shape
  _, acts = model.apply(v, jnp.zeros((1, 8, 8, 1)), capture=True)
  assert {p: s.shape for p, s in shapes.items() if p != "logits"} == {
      p: a.shape for p, a in acts.items()}
  zoo = models.get_model("cnn", widths=(4, 6))
  assert models.point_shapes(zoo, (8, 8, 1)) == models.point_shapes(zoo, (1, 8, 8, 1))
  assert models.point_shapes(zoo, (8, 8, 1))["pool"].shape == (1, 6)
  with pytest.raises(ValueError, match="variables"):
    models.point_shapes(model, (8, 8, 1))


class NNXDeclaredOutOfOrder(nnx.Module):
  """The head is declared first and a list of blocks second, but called last."""

  def __init__(self, rngs):
    self.head = nnx.Linear(8, 10, rngs=rngs)
    self.blocks = nnx.List([nnx.Conv(1, 8, (3, 3), rngs=rngs),
                            nnx.Conv(8, 8, (3, 3), strides=2, rngs=rngs)])

  def __call__(self, x):
    for block in self.blocks:
      x = nnx.relu(block(x))
    return self.head(x.mean((1, 2)))


def test_without_points_the_top_level_submodules_are_taken_in_execution_order(capsys):
  """As pytorch-cka picks layers: Linen's top-level submodules and NNX's (attributes and
  list items) in the order the forward pass calls them, printed; they capture like named
  points."""
  net = LinenResNet()
  v = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  model, v = models.from_flax(net, v, input_shape=(8, 8, 1))
  assert model.point_names == ("stem", "layer0", "layer1", "layer2", "fc")
  assert "stem, layer0, layer1, layer2, fc" in capsys.readouterr().out
  nnx_model, state = models.from_nnx(NNXDeclaredOutOfOrder(nnx.Rngs(0)),
                                     input_shape=(8, 8, 1))
  assert nnx_model.point_names == ("blocks/0", "blocks/1", "head")
  assert "blocks/0, blocks/1, head" in capsys.readouterr().out
  x = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
  named, _ = models.from_nnx(NNXDeclaredOutOfOrder(nnx.Rngs(0)), ["blocks/*", "head"],
                             input_shape=(8, 8, 1))
  _, auto_acts = nnx_model.apply(state, x, capture=True)
  _, named_acts = named.apply(state, x, capture=True)
  for p in nnx_model.point_names:
    np.testing.assert_array_equal(auto_acts[p], named_acts[p])
