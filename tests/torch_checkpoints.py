"""Checkpoints written as PyTorch training libraries write them, for the tests that
load them (imports torch: only for test files that already do)."""

import torch


def robustness_checkpoint(path, state, *, mean, std, attacker=True):
  """A checkpoint as the robustness library writes it: the model under 'module.model.',
  the attacker's copy, and the normaliser's statistics."""
  ckpt = {f"module.model.{k}": v for k, v in state.items()}
  if attacker:
    ckpt.update({f"module.attacker.model.{k}": v for k, v in state.items()})
  ckpt["module.normalizer.new_mean"] = torch.tensor(mean)[:, None, None]
  ckpt["module.normalizer.new_std"] = torch.tensor(std)[:, None, None]
  torch.save({"model": ckpt, "optimizer": {}, "epoch": 90}, path)
