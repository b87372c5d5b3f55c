"""Stitching matrices between two trained models, for TLM, SLM, DM and FuLA at once.

Variants (the `variant=` argument):

  cross_seed   same architecture, different seeds: the full L x L matrix (default)
  cross_arch   two architectures: the full L_A x L_B matrix; cells whose points cannot
               be connected (a pooled vector and a spatial map) are NaN with the reason
  self         a model stitched into itself at the same point (model_b_workdir unset,
               pairs 'diagonal'): every objective should recover the model's accuracy
  offset       i -> i+-1 only (cheap cross-layer neighbours)

Launch (train the models first with configs/train.py):

  python -m fula_jax.main --config=configs/stitch.py:runlocal --workdir=/tmp/stitch \
      --config.model_a_workdir=/tmp/cnn_s0 --config.model_b_workdir=/tmp/cnn_s1

  python -m fula_jax.main --config=configs/stitch.py:variant=cross_arch,runlocal \
      --workdir=/tmp/stitch_x --config.model_a_workdir=/tmp/cnn \
      --config.model_b_workdir=/tmp/resnet20

  python -m fula_jax.main --config=configs/stitch.py:variant=self,runlocal \
      --workdir=/tmp/stitch_self --config.model_a_workdir=/tmp/cnn

  # only FuLA and DM, squared norms, per-batch normalisation:
  ... --config=configs/stitch.py:objectives=fula+dm --config.stitch.fula.squared=True \
      --config.stitch.fula.normalise=batch

  # accuracy against stitch capacity: one matrix per (objective, map), each resumable
  ... --config.stitch.map=identity,permutation,orthogonal,lowrank,affine,mlp \
      --config.stitch.map_options.rank=4

An interrupted sweep resumes from <workdir>/stitch and recomputes nothing finished.
Matrices go to <workdir>/results/stitch_<objective>_<measure>.{npz,json,csv,png}
(stitch_<objective>@<map>/<measure> for maps other than the default affine one);
load them in Colab with `fula_jax.results.load(workdir)`.

Expected time: runlocal (digits, two small CNNs, 4 objectives, ~16 cells) about a minute
on 2 CPU cores; a CNN into a ResNet-20 (variant=cross_arch, 4 x 11 cells) about 5
minutes. tiny (32 steps per stitch on 512 fitting and 128 test examples: a check
that the command works, not a converged matrix) well under a minute for two CNNs. Full
(CIFAR-10, two ResNet-18s, 10 x 10 cells, 4 objectives, 3 epochs per stitch): about an
hour on one modern GPU; the stitch axis is spread over every
device (and host), so 8 devices take roughly an eighth of that.

ImageNet scale (imagenette streamed at 224, two ImageNet ResNet-18s from weights files):

  python -m fula_jax.main --config=configs/stitch.py:imagenette --workdir=/tmp/stitch_in \
      --config.model_a.weights=r18_a.safetensors --config.model_b.weights=r18_b.pth \
      --config.data.data_dir=/data/tfds

Args (comma separated): variant=<cross_seed|cross_arch|self|offset>,
objectives=<names joined by '+'>, epochs=<float>, imagenette, runlocal, tiny.
"""

import ml_collections
from ml_collections import config_dict

from fula_jax import defaults, donors
from fula_jax import registry

VARIANTS = {"cross_seed": "all", "cross_arch": "all", "self": "diagonal",
            "offset": "offset:1"}


def stitch_block(pairs: str = "all") -> ml_collections.ConfigDict:
  """`config.stitch`: every setting of the sweep engine (fula_jax/stitching/settings.py:
  what it computes, which cells, how it runs)."""
  from fula_jax import stitching
  block = stitching.default_config()
  block.pairs = pairs
  return block


def get_config(arg=None):
  arg = defaults.parse_arg(arg, variant="cross_seed", objectives="tlm+slm+dm+fula",
                           epochs=0.0, runlocal=False, tiny=False, imagenette=False)
  pairs = registry.lookup("stitch config variant", arg.variant, VARIANTS)
  config = ml_collections.ConfigDict()
  config.job = "stitch"
  config.model_a_workdir = config_dict.placeholder(str)  # required: a `job=train` workdir
  config.model_b_workdir = config_dict.placeholder(str)  # None = model A itself
  # Or either model from an architecture and a weights file (fula_jax/donors.py):
  # --config.model_a.arch=imagenet_resnet50 --config.model_a.weights=FILE
  config.model_a = donors.block()
  config.model_b = donors.block()
  config.data_from = "model_a"     # 'model_a': A's data settings; 'config': config.data
  config.data = defaults.data_block("digits")
  # Applied on top of the data settings, e.g. {'shortcut': {'eval': 'absent'}}.
  config.data_overrides = config_dict.placeholder(dict)
  config.num_train = config_dict.placeholder(int)  # None = the whole training split
  config.num_test = config_dict.placeholder(int)
  config.png = True
  config.stitch = stitch_block(pairs)
  config.stitch.objectives = tuple(o for o in arg.objectives.split("+") if o)
  if arg.epochs:
    config.stitch.epochs = arg.epochs
  if arg.imagenette:
    # Two ImageNet ResNet-18s (e.g. two seeds or a standard and a robust one), streamed
    # imagenette at 224 with ImageNet labels, so TLM trains against their 1000-way heads.
    defaults.imagenet_pair(config, "imagenet_resnet18", "imagenette", imagenet_labels=True)
    config.stitch.batch_size = 128
    config.stitch.eval_batch_size = 250
    config.stitch.epochs = arg.epochs or 1.0
  if arg.runlocal or arg.tiny:
    config.stitch.batch_size = 128
    config.stitch.eval_batch_size = 360
    config.stitch.epochs = arg.epochs or 2.0
    config.stitch.lstsq_examples = 256
    config.stitch.progress_every_s = 5.0
  if arg.tiny:
    config.num_train, config.num_test = 512, 128
    config.stitch.steps = 32
    config.stitch.eval_batch_size = 128
    config.stitch.lstsq_examples = 128
  return config
