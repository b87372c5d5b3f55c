"""Weight import checked against PyTorch itself: torchvision's ResNets and timm's ViT-S/16
with random weights, saved as safetensors and as PyTorch files, loaded into the zoo's
Flax layouts; logits and every stitch point's activation agree to 1e-4 relative."""

import pathlib

import jax
import numpy as np
import pytest
import timm  # test dependencies (requirements-test.txt), installed by the README
import torch
import torchvision
from safetensors.torch import save_file

from fula_jax.models import weights

RTOL = 1e-4


def _randomise(net):
  """Random weights, and BatchNorm statistics far from the identity."""
  torch.manual_seed(0)
  for mod in net.modules():
    if isinstance(mod, torch.nn.BatchNorm2d):
      mod.running_mean.uniform_(-0.5, 0.5)
      mod.running_var.uniform_(0.5, 2.0)
      mod.weight.data.uniform_(0.5, 1.5)
      mod.bias.data.uniform_(-0.5, 0.5)
  return net.eval()


def _torch_points(net, arch):
  """{point: the module whose output is that stitch point, how to read it}."""
  if arch.startswith("vit"):
    out = {"embed": (net.norm_pre, None), "pool": (net.fc_norm, None)}
    out.update({f"blocks.{i}": (b, None) for i, b in enumerate(net.blocks)})
    return out
  nchw = lambda t: t.permute(0, 2, 3, 1)
  out = {"stem": (net.maxpool, nchw), "pool": (net.avgpool, lambda t: t.flatten(1))}
  for s in range(1, 5):
    for b, block in enumerate(getattr(net, f"layer{s}")):
      out[f"layer{s}.{b}"] = (block, nchw)
  return out


def _compare(name, path, net, size):
  model, variables = weights.load_weights(name, path)
  x = np.random.default_rng(1).uniform(size=(2, size, size, 3)).astype(np.float32)
  mean = np.asarray(model.input_mean, np.float32)
  std = np.asarray(model.input_std, np.float32)
  got = {}
  hooks = [mod.register_forward_hook(
      lambda m, i, o, p=p, f=f: got.__setitem__(p, (f(o) if f else o).detach().numpy()))
      for p, (mod, f) in _torch_points(net, name).items()]
  with torch.no_grad():
    ref = net(torch.from_numpy(((x - mean) / std).transpose(0, 3, 1, 2))).numpy()
  for h in hooks:
    h.remove()
  logits, acts = jax.jit(lambda v, x: model.apply(v, x, capture=True))(variables, x)
  assert set(acts) == set(got) == set(model.point_names)
  for point, want in list(got.items()) + [("logits", ref)]:
    have = np.asarray(logits if point == "logits" else acts[point])
    assert have.shape == want.shape, (point, have.shape, want.shape)
    err = np.abs(have - want).max() / np.abs(want).max()
    assert err < RTOL, (name, point, err)
  return model


@pytest.mark.parametrize("name,make,size", [
    ("imagenet_resnet18", lambda: torchvision.models.resnet18(), 64),
    ("imagenet_resnet50", lambda: torchvision.models.resnet50(), 64),
    ("imagenet_wide_resnet50_2", lambda: torchvision.models.wide_resnet50_2(), 64),
    ("vit_small_patch16_224", lambda: timm.create_model("vit_small_patch16_224"), 224),
])
def test_zoo_layout_matches_pytorch_logits_and_every_point(tmp_path, name, make, size):
  net = _randomise(make())
  state = {k: v.contiguous() for k, v in net.state_dict().items()}
  save_file(state, str(tmp_path / "w.safetensors"))
  model = _compare(name, tmp_path / "w.safetensors", net, size)
  if name == "vit_small_patch16_224":
    assert model.prefix_tokens["blocks.0"] == 1
  if name == "imagenet_resnet18":  # the same through torch.load(weights_only=True)
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    _compare(name, tmp_path / "w.pt", net, size)


def test_robustness_library_checkpoint_with_its_normaliser(tmp_path):
  """module.model.* weights, an attacker copy, and the normaliser's statistics."""
  net = _randomise(torchvision.models.resnet18(num_classes=10))
  state = {}
  for k, v in net.state_dict().items():
    state[f"module.model.{k}"] = v
    state[f"module.attacker.model.{k}"] = v
  mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
  state["module.normalizer.new_mean"] = mean.reshape(3, 1, 1)
  state["module.normalizer.new_std"] = std.reshape(3, 1, 1)
  torch.save({"model": state, "epoch": 90}, tmp_path / "robust.pt")
  model = _compare("imagenet_resnet18", tmp_path / "robust.pt", net, 64)
  np.testing.assert_allclose(model.input_mean, mean.numpy(), rtol=1e-6)
  np.testing.assert_allclose(model.input_std, std.numpy(), rtol=1e-6)
  assert model.num_classes == 10


def test_a_file_that_does_not_fit_names_the_first_mismatching_parameter(tmp_path):
  net = torchvision.models.resnet18()
  save_file({k: v.contiguous() for k, v in net.state_dict().items()},
            str(tmp_path / "r18.safetensors"))
  with pytest.raises(weights.WeightsError, match=r"'layer1\.0\.conv1\.weight' has shape "
                     r"\(3, 3, 64, 64\) in the file but imagenet_resnet50 expects "
                     r"\(1, 1, 64, 64\)"):
    weights.load_weights("imagenet_resnet50", tmp_path / "r18.safetensors")
  state = {k: v.contiguous() for k, v in net.state_dict().items() if k != "fc.bias"}
  save_file(state, str(tmp_path / "nobias.safetensors"))
  with pytest.raises(weights.WeightsError, match=r"lacks parameter 'fc\.bias'"):
    weights.load_weights("imagenet_resnet18", tmp_path / "nobias.safetensors")
  with pytest.raises(weights.WeightsError, match="does not exist"):
    weights.load_weights("imagenet_resnet18", tmp_path / "missing.safetensors")
  (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
  with pytest.raises(weights.WeightsError, match="Could not read"):
    weights.load_weights("imagenet_resnet18", tmp_path / "bad.safetensors")


def test_jobs_take_a_model_from_a_weights_file(tmp_path, model_workdir):
  """The similarity job with model A given as arch + weights, model B as a workdir."""
  from fula_jax import defaults, results
  from fula_jax.similarity import job
  net = _randomise(torchvision.models.resnet18(num_classes=10))
  save_file({k: v.contiguous() for k, v in net.state_dict().items()},
            str(tmp_path / "r18.safetensors"))
  b = model_workdir(tmp_path / "cnn", "cnn", {"widths": (4, 8)}, channels=3)
  config = defaults.load_config(pathlib.Path(__file__).parents[1] / "configs" /
                                "similarity.py", "runlocal")
  config.model_a.arch = "imagenet_resnet18"
  config.model_a.weights = str(tmp_path / "r18.safetensors")
  config.model_b_workdir = b
  config.data.image_size = 32
  config.num_examples, config.measures, config.png = 64, ("cka_linear",), False
  job.run(config, str(tmp_path / "out"))
  m = results.load(tmp_path / "out")["cka_linear"]
  assert m.model_a == "imagenet_resnet18:r18.safetensors" and m.model_b == b
  assert m.rows[0] == "stem" and m.rows[-1] == "pool" and len(m.rows) == 10
  assert np.isfinite(m.matrix).all()
