"""Issue contract: the small ResNet, VGG and ViT learn the embedded digits at :runlocal."""

from __future__ import annotations

from pathlib import Path

import pytest

from fula_jax import defaults
from fula_jax.train import checkpoint, loop

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["resnet18", "vgg11", "vit_tiny"])
def test_small_zoo_model_reaches_85_percent_on_digits(model, tmp_path):
  config = defaults.load_config(REPO / "configs" / "train.py", f"model={model},runlocal")
  config.train.progress_every_s = 1e9
  out = loop.run(config, str(tmp_path))
  assert out["test_accuracy"] >= 0.85, (model, out["test_accuracy"])
  loaded, _, _ = checkpoint.load_trained(tmp_path)
  assert loaded.point_names == out["model_obj"].point_names
