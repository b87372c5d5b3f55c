"""The quickstart: train two different architectures, compare them layer by layer.

  python -m fula_jax.main --config=configs/quickstart.py:runlocal --workdir=workdirs/quickstart

Trains model A and model B on the same data (each into <workdir>/models/<name>), then
computes their CKA matrices and all four stitching matrices (TLM, SLM, DM, FuLA), writes
every matrix with a heatmap under <workdir>/results, an overview figure
(<workdir>/results/overview.png: CKA next to the four stitching accuracy matrices on one
colour scale) and <workdir>/report.md, and prints a summary table.

Expected time: runlocal (embedded digits, small CNN and small ResNet-20) a few minutes on
2 CPU cores; tiny (8x8 digits, two small CNNs, a few training steps) well under a
minute; full (CIFAR-10, the default CNN vs ResNet-20) about an hour on one GPU.

Args (comma separated): runlocal, tiny, model_a=<name>, model_b=<name>, seed_a=<int>
(default 0), seed_b=<int> (default 1).
"""

import pathlib

import ml_collections

from fula_jax import defaults


def get_config(arg=None):
  arg = defaults.parse_arg(arg, runlocal=False, tiny=False, model_a="cnn",
                           model_b="resnet20", seed_a=0, seed_b=1)
  train = defaults.config_module(pathlib.Path(__file__).with_name("train.py"))

  config = ml_collections.ConfigDict()
  config.job = "quickstart"
  suffix = ",runlocal" if arg.runlocal or arg.tiny else ""
  config.model_a = train.get_config(f"model={arg.model_a},seed={arg.seed_a}{suffix}")
  config.model_b = train.get_config(f"model={arg.model_b},seed={arg.seed_b}{suffix}")

  config.similarity = ml_collections.ConfigDict(dict(
      measures=("cka_linear_debiased", "cka_linear", "procrustes"),
      batch_size=256 if arg.runlocal or arg.tiny else 1000,
  ))

  from fula_jax import stitching
  config.stitch = stitching.default_config()
  config.stitch.objectives = ("tlm", "slm", "dm", "fula")
  config.stitch.pairs = "all"
  # Start trained stitches from the least-squares (DM) map: a few epochs from a random
  # map leave TLM/SLM/FuLA far from converged at runlocal scale.
  config.stitch.init = "lstsq"
  if arg.runlocal:
    config.stitch.batch_size = 128
    config.stitch.epochs = 2.0
    config.stitch.progress_every_s = 15.0
  if arg.tiny:  # two small CNNs of different widths (seconds to compile and train)
    config.model_b = train.get_config(f"model=cnn,seed={arg.seed_b},runlocal")
    for cfg, widths in ((config.model_a, (8, 16)), (config.model_b, (12, 24))):
      cfg.data.image_size = None  # the native 8x8 digits
      if cfg.model.name == "cnn":
        cfg.model.kwargs = dict(widths=widths)
      cfg.train.num_epochs, cfg.train.num_steps = 0.0, 40
      cfg.train.batch_size, cfg.train.warmup_epochs = 64, 0.0
      cfg.train.progress_every_s = 1e9
    config.stitch.batch_size = 128
    config.stitch.steps = 32  # 8 left a TLM self-stitch of the weak tiny models at 0.84x
    config.stitch.lstsq_examples = 256
    config.stitch.progress_every_s = 1e9
  return config
