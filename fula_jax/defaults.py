"""Building blocks for config files: argument parsing and the shared default blocks.

A config file's `get_config(arg)` parses `arg` (e.g. ``"runlocal,model=vgg16"``) with
:func:`parse_arg` and assembles its ConfigDict from these blocks.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types
from typing import Any, Sequence

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``"runlocal,model=vgg16,seed=1"`` -> ConfigDict(runlocal=True, model='vgg16', seed=1).

  Only keys present in `defaults` are accepted; values are cast to the default's type.
  """
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      from fula_jax import registry
      raise registry.unknown("config argument", key, defaults.keys())
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return ml_collections.ConfigDict(out)


def config_module(path: str | os.PathLike) -> types.ModuleType:
  """The config file at `path`, imported as a module (configs/ is not a package)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"_fula_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str | os.PathLike, arg: str | None = None
                ) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`."""
  return config_module(path).get_config(arg)


def train_block() -> ml_collections.ConfigDict:
  """`config.train`: optimiser, schedule, augmentation, checkpoints, logging."""
  return ml_collections.ConfigDict(dict(
      num_epochs=30.0,
      num_steps=0,  # > 0 overrides num_epochs.
      batch_size=128,
      optimizer="sgd",  # sgd | adam
      learning_rate=0.1,
      momentum=0.9,
      weight_decay=5e-4,
      warmup_epochs=1.0,
      schedule="cosine",  # cosine | constant
      augment=dict(crop_padding=4, flip=True),
      # PGD inner maximisation (fula_jax.attacks); eval_steps for the final robust eval.
      adversarial=dict(enabled=False, norm="linf", eps=8 / 255, step_size=2 / 255,
                       steps=7, eval_steps=20, random_start=True),
      log_every_steps=20,
      eval_every_steps=0,
      checkpoint_every_steps=100,
      max_checkpoints=2,
      progress_every_s=10.0,
  ))


def model_block(name: str, **kwargs: Any) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name=name, kwargs=kwargs))


def data_block(name: str = "digits", **overrides: Any) -> ml_collections.ConfigDict:
  from fula_jax import data
  cfg = data.default_config()
  cfg.name = name
  cfg.update(overrides)
  return cfg


def imagenet_pair(config: ml_collections.ConfigDict, arch: str, dataset: str,
                  **data_overrides: Any) -> None:
  """Sets `config` to compare two `arch` models from weights files (the user gives
  ``model_a.weights`` and ``model_b.weights``) on `dataset`, streamed with the ImageNet
  evaluation crop (resize 256, centre crop 224)."""
  for block in (config.model_a, config.model_b):
    block.arch = arch
  config.data_from = "config"
  config.data = data_block(dataset, image_size=224, crop="imagenet_eval", **data_overrides)


def study_models(train_configs: types.ModuleType, names: Sequence[str], *,
                 data: ml_collections.ConfigDict, seed: int, scale: str,
                 eval_batch_size: int, tiny_steps: int = 25,
                 tiny_kwargs: dict[str, dict[str, Any]] | None = None
                 ) -> ml_collections.ConfigDict:
  """`config.models` of a study: the train config (configs/train.py) of each name,
  on the study's data.

  scale 'paper' keeps the full configs. 'runlocal' and 'tiny' start from the runlocal
  ones, keep one checkpoint, train 15 epochs and use a quarter-width ResNet-20; 'tiny'
  then trains `tiny_steps` steps of batch 64 with `tiny_kwargs[name]` as model kwargs.
  """
  if scale not in ("paper", "runlocal", "tiny"):
    raise ValueError(f"scale must be 'paper', 'runlocal' or 'tiny', got {scale!r}.")
  small = scale != "paper"
  models = ml_collections.ConfigDict()
  for name in names:
    cfg = train_configs.get_config(f"model={name},seed={seed}" +
                                   (",runlocal" if small else ""))
    cfg.data = ml_collections.ConfigDict(data.to_dict())
    if small:
      cfg.eval_batch_size = eval_batch_size
      cfg.train.checkpoint_every_steps = 1000
      cfg.train.max_checkpoints = 1
      cfg.train.progress_every_s = 30.0
      cfg.train.num_epochs = 15.0
      if name == "resnet20":
        cfg.model.kwargs = dict(width_multiplier=0.25)
    if scale == "tiny":
      cfg.train.num_epochs = 0.0
      cfg.train.num_steps = tiny_steps
      cfg.train.batch_size = 64
      cfg.train.warmup_epochs = 0.0
      cfg.train.log_every_steps = tiny_steps
      cfg.train.progress_every_s = 1e9
      cfg.model.kwargs = (tiny_kwargs or {}).get(name, cfg.model.kwargs)
    models[name] = cfg
  return models
