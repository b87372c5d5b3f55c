"""PyTorch models through torchax (`models.from_torch`): every point and the logits equal
torch eager (forward hooks) on torchvision and timm architectures; running from a point
equals torch and compiles without the prefix; a DM self-stitch recovers a torch model;
torch <-> Flax sweeps fill every stitchable cell; PGD's input gradient equals torch
autograd's."""

import pathlib
import re

import jax
import numpy as np
import pytest
import torch

from fula_jax import models, stitching
from fula_jax.models import torch_zoo
from fula_jax.models.weights import WeightsError
from fula_jax.registry import UnknownNameError
from fula_jax.stitching import testing

import torch_checkpoints

_REPO = pathlib.Path(__file__).resolve().parents[1]


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

  def keep_input(p):
    def pre_hook(module, inputs):
      acts.setdefault(p, inputs[0].detach().numpy())
    return pre_hook

  for p in points:
    name, is_input = p[:-len(":input")] if p.endswith(":input") else p, p.endswith(":input")
    handles.append(subs[name].register_forward_pre_hook(keep_input(p)) if is_input
                   else subs[name].register_forward_hook(keep(p)))
  with torch.no_grad():
    logits = module.eval()(torch.tensor(x_nhwc).permute(0, 3, 1, 2)).numpy()
  for h in handles:
    h.remove()
  return logits, {p: a.transpose(0, 2, 3, 1) if a.ndim == 4 else a
                  for p, a in acts.items()}


def _check_against_eager(module, points, shape, prefix_tokens=0, atol=1e-4, model=None,
                         normalise=lambda x: x):
  """`model` (default: `from_torch(module, points)`) against torch eager, every point and
  the logits, and run from a middle point; `normalise` is the model's input transform."""
  if model is None:
    model, v = models.from_torch(module, points, input_shape=shape,
                                 prefix_tokens=prefix_tokens)
  else:
    model, v = model
  x = np.random.default_rng(0).uniform(size=(2,) + shape).astype(np.float32)
  want_logits, want = _eager(module, normalise(x), model.point_names)
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


# Bottleneck ResNets whose every op ResNeXt-50's gradient check covers (at other widths).
SAME_OPS_AS_RESNEXT = ("torchvision:resnet50", "torchvision:wide_resnet50_2",
                       "torchvision:wide_resnet50_4")


@pytest.mark.parametrize("spec", torch_zoo.JONES_ZOO)
def test_jones_zoo_loads_robustness_checkpoints_and_equals_torch(tmp_path, spec):
  """Each of the nine architectures of configs/study_jones.py:imagenet, from a checkpoint
  in the robustness library's layout with its own normaliser: the classes come from the
  file, every point (the last one the penultimate features) and the logits equal torch
  eager at 32 px, and (for each distinct set of ops) so does the input gradient of the
  penultimate features that the study's inversion and PGD follow (its pipeline runs on
  two of them in test_streaming)."""
  torch.manual_seed(0)
  net = _random_bn(torch_zoo.build(spec, num_classes=7))
  mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
  path = tmp_path / "robust.ckpt"
  big = sum(p.numel() for p in net.parameters()) > 50e6  # the attacker's copy: 0.3-0.9 GB
  torch_checkpoints.robustness_checkpoint(path, net.state_dict(), mean=mean, std=std,
                                          attacker=not big)
  model = torch_zoo.load(spec, path, image_size=32)
  assert model[0].point_names[-1].endswith(":input")  # the classifier's input
  _check_against_eager(net, None, (32, 32, 3), model=model,  # logits: 7 classes
                       normalise=lambda x: (x - np.float32(mean)) / np.float32(std))
  if spec in SAME_OPS_AS_RESNEXT:
    return
  # What inversion and PGD differentiate: the penultimate features' input gradient
  # (through the checkpoint's normaliser), against torch autograd.
  m, v = model
  point = m.point_names[-1]
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  width = jax.eval_shape(lambda x: m.apply(v, x, end=point), x[:1]).shape[-1]  # no run
  w = np.random.default_rng(2).normal(size=(2, width)).astype(np.float32)
  got = jax.jit(jax.grad(lambda x: (m.apply(v, x, end=point) * w).sum()))(x)
  xt = torch.tensor(x).requires_grad_(True)
  feats = {}
  hook = net.get_submodule(point[:-len(":input")]).register_forward_pre_hook(
      lambda mod, inputs: feats.setdefault("x", inputs[0]))
  net.eval()(((xt - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2))
  hook.remove()
  (feats["x"] * torch.tensor(w)).sum().backward()
  want = xt.grad.numpy()
  # Not elementwise: a max-pool routes each window's gradient to its largest input, and
  # XLA's fused float rounding (normaliser included) can flip a near-tie that torch
  # breaks the other way; eager JAX equals torch elementwise. A wrong gradient misses
  # by far more than this.
  err = np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)
  assert err < 0.03, err


def test_a_checkpoint_of_another_architecture_names_the_first_misfit(tmp_path):
  torch.manual_seed(0)
  path = tmp_path / "resnet18_l2_eps3.ckpt"
  torch_checkpoints.robustness_checkpoint(
      path, torch_zoo.build("torchvision:resnet18").state_dict(), mean=(0.5,) * 3,
      std=(0.5,) * 3, attacker=False)
  with pytest.raises(WeightsError, match=r"'layer1\.0\.conv1\.weight' has shape "
                     r"\(64, 64, 3, 3\) in the file but torchvision:resnet50 expects "
                     r"\(64, 64, 1, 1\)"):
    torch_zoo.load("torchvision:resnet50", path, image_size=32)
  with pytest.raises(UnknownNameError, match="resnet50"):
    torch_zoo.build("torchvision:resnet5O")
  with pytest.raises(UnknownNameError, match="torchvision"):
    torch_zoo.build("pytorch:resnet50")


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


def _linear_cka(x, y):
  """Biased linear CKA in NumPy (Kornblith et al. 2019, feature-space form)."""
  x = x.reshape(len(x), -1).astype(np.float64)
  y = y.reshape(len(y), -1).astype(np.float64)
  x, y = x - x.mean(0), y - y.mean(0)
  return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_jobs_take_a_torch_donor_by_name_and_weights_file(tmp_path, model_workdir):
  """``model_a.torch`` and ``model_a.weights`` (a DataParallel-style .pth) in the stitch and
  similarity jobs, against a Flax zoo workdir, on the embedded digits: the stitch job
  fills every cell both models' shapes allow, and each CKA cell equals a NumPy CKA of
  the two models' own activations."""
  import torchvision

  from fula_jax import data, defaults, donors, results
  from fula_jax.similarity import job as similarity_job
  from fula_jax.stitching import job as stitch_job
  torch.manual_seed(0)
  net = _random_bn(torchvision.models.resnet18(num_classes=10))
  torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
             tmp_path / "resnet18.pth")
  flax_dir = model_workdir(tmp_path / "cnn", "cnn", {"widths": (4, 6)}, channels=3)

  def donor_flags(cfg):
    cfg.model_a.torch = "torchvision:resnet18"
    cfg.model_a.weights = str(tmp_path / "resnet18.pth")
    cfg.model_a.points = ("layer1", "layer2:input", "fc:input")
    cfg.model_b.workdir = flax_dir
    cfg.data.image_size, cfg.data.channels = None, 3  # native 8x8, as the cnn
    cfg.png = False

  cfg = defaults.load_config(_REPO / "configs" / "stitch.py", "objectives=dm")
  donor_flags(cfg)
  cfg.num_train, cfg.num_test = 300, 100
  cfg.stitch.update(dict(baselines=False, progress=False))
  stitch_job.run(cfg, str(tmp_path / "stitch"))
  acc = results.load(tmp_path / "stitch")["stitch_dm/accuracy"]
  assert acc.rows == ["layer1", "layer2:input", "fc:input"]
  vector = np.array([[r == "fc:input" for _ in acc.cols] for r in acc.rows])
  vector_b = np.array([[c == "pool" for c in acc.cols] for _ in acc.rows])
  stitchable = vector == vector_b  # maps into maps, vectors into vectors
  assert np.isfinite(acc.matrix[stitchable]).all()
  assert np.isnan(acc.matrix[~stitchable]).all()
  assert len(acc.meta["reasons"]) == (~stitchable).sum()

  cfg = defaults.load_config(_REPO / "configs" / "similarity.py")
  donor_flags(cfg)
  cfg.measures, cfg.estimator, cfg.num_examples = ("cka_linear",), "exact", 120
  similarity_job.run(cfg, str(tmp_path / "similarity"))
  cka = results.load(tmp_path / "similarity")["cka_linear"]
  a, b = donors.load(cfg, "a"), donors.load(cfg, "b")
  images = data.source(cfg.data, "test").take(120)
  images = np.concatenate([batch["image"] for batch in images.eval_batches(120)])[:120]
  _, acts_a = a.model.apply(a.variables, images, capture=True)
  _, acts_b = models.capture(b.model, b.variables, images)
  for i, p in enumerate(cka.rows):
    for j, q in enumerate(cka.cols):
      np.testing.assert_allclose(cka.matrix[i, j],
                                 _linear_cka(np.asarray(acts_a[p]), np.asarray(acts_b[q])),
                                 atol=1e-4, err_msg=(p, q))


def test_default_points_are_the_stages_then_the_classifier_input():
  """Without named points: timm's feature_info stages (a ViT's blocks, with its CLS
  token declared), then the input of the last linear layer."""
  vit, _ = torch_zoo.load("timm:vit_tiny_patch16_224", None, image_size=32, img_size=32,
                          patch_size=8, depth=3)
  assert vit.point_names == ("blocks.0", "blocks.1", "blocks.2", "head:input")
  assert vit.prefix_tokens == {"blocks.0": 1, "blocks.1": 1, "blocks.2": 1,
                               "head:input": 0}
  convnext, _ = torch_zoo.load("timm:convnext_atto", None, image_size=32)
  assert convnext.point_names == ("stages.0", "stages.1", "stages.2", "stages.3",
                                  "head.fc:input")
