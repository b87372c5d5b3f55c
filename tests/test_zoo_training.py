"""Issue contract: the small ResNet, VGG and ViT learn the embedded digits at :runlocal."""

from __future__ import annotations

from pathlib import Path

import pytest

import shared_runs
from fula_jax import defaults
from fula_jax.train import checkpoint, loop

REPO = Path(__file__).resolve().parents[1]


def train_runlocal(model: str, workdir: str) -> dict:
  """configs/train.py:model=<model>,runlocal as shipped, trained into `workdir`: its test
  accuracy and the trained model's stitch points."""
  config = defaults.load_config(REPO / "configs" / "train.py", f"model={model},runlocal")
  config.train.progress_every_s = 1e9
  out = loop.run(config, workdir)
  return {"test_accuracy": out["test_accuracy"],
          "point_names": tuple(out["model_obj"].point_names)}


@pytest.mark.parametrize("model", ["resnet18", "vgg11", "vit_tiny"])
def test_small_zoo_model_reaches_85_percent_on_digits(model, tmp_path):
  """Trained in a process of its own on one device, as on a CPU machine (here, on the
  test worker's 8 devices, a quarter slower)."""
  out = shared_runs.in_own_process("test_zoo_training", "train_runlocal", model,
                                   str(tmp_path))
  assert out["test_accuracy"] >= 0.85, (model, out["test_accuracy"])
  loaded, _, _ = checkpoint.load_trained(tmp_path)
  assert loaded.point_names == out["point_names"]
