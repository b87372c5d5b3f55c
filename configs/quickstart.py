"""The quickstart: train two different architectures, compare them layer by layer.

  python -m fula_jax.main --config=configs/quickstart.py:runlocal --workdir=workdirs/quickstart

Trains model A and model B on the same data (each into <workdir>/models/<name>), then
computes their CKA matrices and all four stitching matrices (TLM, SLM, DM, FuLA), writes
every matrix with a heatmap under <workdir>/results and prints a summary table.
Expected time: runlocal (embedded digits, small CNN and small ResNet-20) a few minutes on
2 CPU cores; full (CIFAR-10, ResNet-18 vs VGG-16) a few hours on one GPU.
"""

import ml_collections

from fula_jax import defaults


def get_config(arg=None):
  arg = defaults.parse_arg(arg, runlocal=False, model_a="cnn", model_b="resnet20")
  import pathlib
  train = defaults.config_module(pathlib.Path(__file__).with_name("train.py"))

  config = ml_collections.ConfigDict()
  config.job = "quickstart"
  suffix = ",runlocal" if arg.runlocal else ""
  config.model_a = train.get_config(f"model={arg.model_a},seed=0{suffix}")
  config.model_b = train.get_config(f"model={arg.model_b},seed=1{suffix}")

  config.similarity = ml_collections.ConfigDict(dict(
      measures=("cka_linear_debiased", "cka_linear", "procrustes"),
      batch_size=256 if arg.runlocal else 1000,
  ))

  from fula_jax.stitching import sweeper
  config.stitch = sweeper.default_config()
  config.stitch.objectives = ("tlm", "slm", "dm", "fula")
  config.stitch.pairs = "all"
  # Start trained stitches from the least-squares (DM) map: a few epochs from a random
  # map leave TLM/SLM/FuLA far from converged at runlocal scale.
  config.stitch.init = "lstsq"
  if arg.runlocal:
    config.stitch.batch_size = 128
    config.stitch.epochs = 2.0
    config.stitch.progress_every_s = 15.0
  return config
