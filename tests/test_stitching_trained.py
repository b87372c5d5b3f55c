"""Issue contract: TLM stitching between two trained models is accurate on the diagonal,
and the matrices load back through `fula_jax.results.load` with the right names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fula_jax import data, defaults, results
from fula_jax import stitching
from fula_jax.train import checkpoint, loop

REPO = Path(__file__).resolve().parents[1]


def _train(seed, workdir):
  config = defaults.load_config(REPO / "configs" / "train.py", f"model=mlp,seed={seed},runlocal")
  config.data.image_size = None  # native 8x8x1
  config.data.channels = None
  config.model.kwargs = dict(widths=(128, 64, 32))
  config.train.update(dict(num_epochs=20.0, optimizer="adam", learning_rate=3e-3,
                           weight_decay=0.0, batch_size=64, progress_every_s=1e9))
  loop.run(config, str(workdir))
  return checkpoint.load_trained(workdir)


def test_tlm_between_two_trained_models_is_high_on_the_diagonal(tmp_path):
  model_a, vars_a, cfg = _train(0, tmp_path / "a")
  model_b, vars_b, _ = _train(1, tmp_path / "b")
  train, test = data.load(cfg.data, "train"), data.load(cfg.data, "test")
  mats = stitching.sweep(model_a, vars_a, model_b, vars_b, train, test,
                       dict(objectives=["tlm"], pairs="diagonal", epochs=2.0, init="lstsq",
                            batch_size=64, progress=False),
                       workdir=str(tmp_path / "sweep"), name_a="A:mlp", name_b="B:mlp")
  for name, m in mats.items():
    results.save(tmp_path, name, m)
  loaded = results.load(tmp_path)["stitch_tlm/accuracy"]
  assert loaded.rows == list(model_a.point_names) == ["fc1", "fc2", "fc3"]
  assert loaded.cols == list(model_b.point_names)
  diag = np.diag(loaded.matrix)
  assert np.all(diag > 0.9), diag
  assert np.isnan(loaded.matrix[0, 1])  # off-diagonal cells were not requested
  np.testing.assert_array_equal(loaded.matrix, mats["stitch_tlm/accuracy"].matrix)
