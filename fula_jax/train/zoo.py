"""Finished models as building blocks of a study: train once, reuse on every rerun.

A study names a folder per model; `train_or_reuse` trains into it unless a finished
model (its ``summary.json``) is there, and refuses to reuse one trained on other data,
another architecture or another attack radius. `robust_eval` caches clean and PGD
accuracy next to the study, keyed by the attack settings.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from fula_jax import attacks, data, errors, io, models
from fula_jax.train import checkpoint, loop


def _normalised(obj: Any) -> Any:
  return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _adversarial_eps(train_cfg: dict) -> tuple[float, str | None]:
  adv = dict(train_cfg.get("adversarial", {}) or {})
  if not adv.get("enabled"):
    return 0.0, None
  return float(adv.get("eps", 0.0)), adv.get("norm")


def check_existing(model_dir: epath.Path, cfg: ml_collections.ConfigDict) -> None:
  """Refuse to reuse a model trained on other data, architecture, seed or attack."""
  have = checkpoint.read_config(model_dir).to_dict()
  want = cfg.to_dict()
  diffs = [k for k in ("model", "data", "seed")
           if _normalised(have.get(k)) != _normalised(want.get(k))]
  have_eps, have_norm = _adversarial_eps(have.get("train", {}))
  want_eps, want_norm = _adversarial_eps(want.get("train", {}))
  if not math.isclose(have_eps, want_eps, rel_tol=1e-6, abs_tol=1e-12):
    diffs.append("train.adversarial.eps")
  elif want_eps > 0 and have_norm != want_norm:
    diffs.append("train.adversarial.norm")
  if diffs:
    raise errors.ConfigError(
        f"{model_dir} holds a finished model whose config differs from this study's in "
        f"{diffs}; use a fresh workdir or delete that model folder to retrain it.")


def train_or_reuse(cfg: ml_collections.ConfigDict, model_dir: str | epath.Path
                   ) -> tuple[dict[str, Any], bool]:
  """(summary, trained): train `cfg` into `model_dir` unless a finished model is there
  (an interrupted one resumes from its checkpoint)."""
  model_dir = io.path(model_dir)
  summary = model_dir / "summary.json"
  if summary.exists():
    check_existing(model_dir, cfg)
    return io.read_json(summary), False
  out = loop.run(cfg, str(model_dir), closing=False)
  return {k: v for k, v in out.items() if k not in ("state", "model_obj")}, True


def robust_eval(model: models.StagedModel, variables: Any, split: data.Split,
                attack_cfg: ml_collections.ConfigDict, key: jax.Array, batch_size: int,
                cache: epath.Path) -> dict[str, float]:
  """``{'accuracy', 'robust_accuracy'}`` on `split` under the PGD of `attack_cfg`
  (eps 0: both are the clean accuracy), cached in `cache` for the same settings."""
  settings = _normalised({"attack": attack_cfg.to_dict(), "split": split.name,
                          "n": int(len(split)),
                          "key": np.asarray(key).tolist()})
  if cache.exists():
    stored = io.read_json(cache)
    if stored.get("settings") == settings:
      return stored["metrics"]
  if attack_cfg.eps > 0:
    metrics = attacks.robust_accuracy(
        models.Forward(model),
        data.eval_batches(split, batch_size, process_index=jax.process_index(),
                          process_count=jax.process_count()),
        key, attack_cfg, params=variables)
  else:
    acc = loop.evaluate(model, variables, split, batch_size)["accuracy"]
    metrics = {"accuracy": acc, "robust_accuracy": acc}
  if io.is_writer():
    io.write_json(cache, {"settings": settings, "metrics": metrics})
  return metrics
