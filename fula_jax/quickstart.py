"""`job=quickstart`: train two models, then compare them layer by layer."""

from __future__ import annotations

from typing import Any

import ml_collections
from etils import epath

from fula_jax.train import checkpoint, loop


def train_or_load(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, Any]:
  """Train into `workdir` unless a finished run is already there (then just load it)."""
  summary = workdir / "summary.json"
  if summary.exists():
    print(f"{config.model.name}: already trained in {workdir}", flush=True)
    from fula_jax import io
    return io.read_json(summary)
  out = loop.run(config, str(workdir))
  return {k: v for k, v in out.items() if k not in ("state", "model_obj")}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  workdir = epath.Path(workdir)
  trained = {}
  for key in ("model_a", "model_b"):
    cfg = config[key]
    trained[key] = train_or_load(cfg, workdir / "models" / f"{key}_{cfg.model.name}")
  print("\nmodel   arch       test accuracy")
  for key, s in trained.items():
    print(f"{key:7s} {s['model']:10s} {s['test_accuracy']:.4f}")
  return trained
