"""Shortcut-trained and adversarially trained models, through the real training loop."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from fula_jax import attacks, data, defaults, models
from fula_jax.train import loop

REPO = Path(__file__).resolve().parents[1]


def _config(**data_overrides):
  config = defaults.load_config(REPO / "configs" / "train.py", "model=mlp,runlocal")
  config.data.image_size = None  # native 8x8x1: an MLP trains in seconds
  config.data.channels = None
  config.data.update(data_overrides)
  config.model.kwargs = dict(widths=(128, 64))
  config.train.update(dict(num_epochs=25.0, optimizer="adam", learning_rate=3e-3,
                           weight_decay=0.0, batch_size=64))
  config.train.progress_every_s = 1e9
  return config


def _accuracy(model, variables, data_cfg, mode):
  cfg = data_cfg.copy_and_resolve_references()
  cfg.shortcut.eval = mode
  return loop.evaluate(model, variables, data.load(cfg, "test"), 128)["accuracy"]


def test_shortcut_model_loses_accuracy_without_its_cue(tmp_path):
  shortcut = dict(enabled=True, correlation=1.0, strength=1.0, patch_size=3, eval="present")
  results = {}
  for name, enabled in (("shortcut", True), ("clean", False)):
    config = _config(shortcut=dict(shortcut, enabled=enabled))
    out = loop.run(config, str(tmp_path / name))
    eval_cfg = config.data.copy_and_resolve_references()
    eval_cfg.shortcut.enabled = True
    results[name] = {mode: _accuracy(out["model_obj"], out["state"].variables, eval_cfg, mode)
                     for mode in ("present", "absent", "permuted")}
  s, c = results["shortcut"], results["clean"]
  assert s["present"] > 0.95
  # The shortcut model leans on the cue: removing or permuting it costs a lot.
  assert s["permuted"] < s["present"] - 0.2, s
  assert s["absent"] < s["present"] - 0.2, s
  # The clean model barely notices the cue either way.
  assert abs(c["permuted"] - c["absent"]) < 0.1, c
  assert c["absent"] > 0.9, c


def test_adversarial_training_resists_pgd_better_than_standard(tmp_path):
  attack = dict(norm="linf", eps=0.1, step_size=0.025, steps=7, eval_steps=10)
  robust = {}
  for name, enabled in (("standard", False), ("adversarial", True)):
    config = _config()
    config.train.adversarial.update(dict(attack, enabled=enabled))
    out = loop.run(config, str(tmp_path / name))
    model, variables = out["model_obj"], out["state"].variables
    test = data.load(config.data, "test")
    r = attacks.robust_accuracy(lambda x: models.forward(model, variables, x),
                                data.eval_batches(test, 128), jax.random.PRNGKey(0),
                                config.train.adversarial)
    robust[name] = r
    if enabled:
      assert out["test_robust_accuracy"] == pytest.approx(r["robust_accuracy"], abs=0.03)
  std, adv = robust["standard"], robust["adversarial"]
  drop_std = std["accuracy"] - std["robust_accuracy"]
  drop_adv = adv["accuracy"] - adv["robust_accuracy"]
  assert drop_std > 0.3, std
  assert drop_adv < 0.5 * drop_std, (std, adv)
  assert adv["robust_accuracy"] > std["robust_accuracy"] + 0.2
