"""PyTorch models through torchax (`models.from_torch`): every point and the logits equal
torch eager (forward hooks) on torchvision and timm architectures; running from a point
equals torch and compiles without the prefix; a DM self-stitch recovers a torch model;
torch <-> Flax sweeps fill every stitchable cell; PGD's input gradient equals torch
autograd's."""

import re

import jax
import numpy as np
import pytest
import torch

from fula_jax import models, stitching
from fula_jax.stitching import testing


class SmallNet(torch.nn.Module):
  """Conv-BN-ReLU, a strided conv, pooling to a vector and a linear head (8x8x3)."""

  def __init__(self):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
    self.bn1 = torch.nn.BatchNorm2d(16)
    self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
    self.pool = torch.nn.AdaptiveAvgPool2d(1)
    self.flatten = torch.nn.Flatten()
    self.fc = torch.nn.Linear(32, 10)

  def forward(self, x):
    x = torch.relu(self.bn1(self.conv1(x)))
    x = torch.relu(self.conv2(x))
    return self.fc(self.flatten(self.pool(x)))


def _eager(module, x_nhwc, points):
  """torch's own logits and point outputs (forward hooks), NHWC like the protocol."""
  acts, handles = {}, []
  subs = dict(module.named_modules())
  def keep(p):
    def hook(module, inputs, out):
      acts.setdefault(p, out.detach().numpy())  # returns None: the output stays
    return hook

  for p in points:
    handles.append(subs[p].register_forward_hook(keep(p)))
  with torch.no_grad():
    logits = module.eval()(torch.tensor(x_nhwc).permute(0, 3, 1, 2)).numpy()
  for h in handles:
    h.remove()
  return logits, {p: a.transpose(0, 2, 3, 1) if a.ndim == 4 else a
                  for p, a in acts.items()}


def _check_against_eager(module, points, shape, prefix_tokens=0, atol=1e-4):
  model, v = models.from_torch(module, points, input_shape=shape,
                               prefix_tokens=prefix_tokens)
  x = np.random.default_rng(0).uniform(size=(2,) + shape).astype(np.float32)
  want_logits, want = _eager(module, x, model.point_names)
  logits, acts = jax.jit(lambda v, x: model.apply(v, x, capture=True))(v, x)
  scale = np.abs(want_logits).max()
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=atol * max(1, scale))
  for p in model.point_names:
    np.testing.assert_allclose(np.asarray(acts[p]), want[p],
                               atol=atol * max(1.0, np.abs(want[p]).max()), err_msg=p)
  # Run from a middle point, fed torch's own activation there.
  mid = model.point_names[len(model.point_names) // 2]
  rest = jax.jit(lambda v, h: model.apply(v, h, start=mid))(v, want[mid])
  np.testing.assert_allclose(np.asarray(rest), want_logits, atol=atol * max(1, scale))
  return model, v


def _random_bn(module):
  torch.manual_seed(1)
  for m in module.modules():
    if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
      m.running_mean.uniform_(-0.3, 0.3)
      m.running_var.uniform_(0.5, 2.0)
  return module


def test_small_net_points_logits_and_prefix_removed():
  torch.manual_seed(0)
  net = _random_bn(SmallNet())
  model, v = _check_against_eager(net, ["bn1", "conv2", "flatten"], (8, 8, 3))
  assert model.point_names == ("bn1", "conv2", "flatten")
  h = np.zeros((2, 8, 8, 16), np.float32)
  for start, convs in (("bn1", 1), ("conv2", 0)):
    hlo = jax.jit(lambda v, h, s=start: model.apply(v, h, start=s)).lower(
        v, h if start == "bn1" else np.zeros((2, 4, 4, 32), np.float32)).compile().as_text()
    assert len(re.findall(r"= \S+ convolution\(", hlo)) == convs, (start, hlo[:2000])
  with pytest.raises(Exception, match="conv3"):
    models.from_torch(net, ["conv3"], input_shape=(8, 8, 3))


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2",
                                  "torchvision:shufflenet_v2_x0_5", "timm:vit_tiny"])
def test_zoo_architectures_equal_torch_eager(name):
  """A ResNet, a depthwise-separable net, channel shuffle and a ViT with a CLS token,
  random weights, at 32 px."""
  torch.manual_seed(0)
  if name.startswith("timm:"):
    import timm
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, num_classes=10)
    points, prefix = ["blocks.0", "blocks.5", "blocks.11"], 1
  else:
    import torchvision
    net = getattr(torchvision.models, name.split(":")[1])(weights=None, num_classes=10)
    points = {"resnet18": ["layer1", "layer2", "layer3", "layer4"],
              "mobilenet_v2": ["features.3", "features.7", "features.14"],
              "shufflenet_v2_x0_5": ["stage2", "stage3", "stage4"]}[name.split(":")[1]]
    prefix = 0
  _check_against_eager(_random_bn(net), points, (32, 32, 3), prefix_tokens=prefix)


@pytest.fixture(scope="module")
def trained_torch_net():
  """SmallNet trained for a few seconds in torch on the embedded digits (8x8x3)."""
  from fula_jax import data
  train, test = data.digits_splits(channels=3)
  torch.manual_seed(0)
  net = SmallNet()
  opt = torch.optim.Adam(net.parameters(), lr=1e-2)
  x = torch.tensor(train.images).permute(0, 3, 1, 2)
  y = torch.tensor(train.labels).long()
  gen = torch.Generator().manual_seed(0)
  net.train()
  for _ in range(150):
    idx = torch.randint(0, len(y), (128,), generator=gen)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
    opt.step()
  model, v = models.from_torch(net, ["bn1", "conv2", "flatten"], input_shape=(8, 8, 3))
  return net.eval(), model, v, train, test


def test_dm_self_stitch_recovers_a_torch_model(trained_torch_net):
  _, model, v, train, test = trained_torch_net
  own = testing.accuracy(model, v, test)
  assert own > 0.85
  mats = stitching.sweep(model, v, model, v, train, test,
                         dict(objectives=["dm"], pairs="diagonal", progress=False))
  np.testing.assert_allclose(np.diag(mats["stitch_dm/accuracy"].matrix), own, atol=0.01)


def test_torch_and_flax_stitch_both_ways(trained_torch_net):
  _, tmodel, tv, train, test = trained_torch_net
  zoo = models.get_model("cnn", widths=(8, 16))
  zv = testing.train_donor(zoo, train, steps=150, lr=1e-2)
  cfg = dict(objectives=["dm"], progress=False, baselines=False)
  for a, va, b, vb in ((tmodel, tv, zoo, zv), (zoo, zv, tmodel, tv)):
    m = stitching.sweep(a, va, b, vb, train, test, cfg)["stitch_dm/accuracy"]
    vector = ("pool", "flatten")  # the rest are maps: maps into maps, vector into vector
    maps = [(i, j) for i, r in enumerate(m.rows) for j, c in enumerate(m.cols)
            if (r in vector) == (c in vector)]
    assert all(np.isfinite(m.matrix[i, j]) for i, j in maps), m.matrix
    assert np.nanmax(m.matrix) > 0.5


def test_pgd_input_gradient_equals_torch_autograd(trained_torch_net):
  net, model, v, _, test = trained_torch_net
  x, y = test.images[:16], test.labels[:16]

  def loss(x):
    logits = model.apply(v, x)
    return -jax.numpy.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).sum()

  got = np.asarray(jax.grad(loss)(x))
  xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_(True)
  torch.nn.functional.cross_entropy(net(xt), torch.tensor(y).long(),
                                    reduction="sum").backward()
  want = xt.grad.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()))


def test_fula_jax_never_imports_torch_and_names_the_extra(monkeypatch):
  import subprocess
  import sys
  code = ("import sys, fula_jax, fula_jax.models, fula_jax.stitching, fula_jax.similarity;"
          "print('torch' in sys.modules, 'torchax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["False", "False"], out
  monkeypatch.setitem(sys.modules, "torchax", None)  # as if the extra were missing
  with pytest.raises(Exception, match=r"pip install -e '\.\[torch\]'"):
    models.from_torch(SmallNet(), ["conv1"], input_shape=(8, 8, 3))
