"""Representational similarity matrices between two trained models (or one with itself).

  python -m fula_jax.main --config=configs/similarity.py --workdir=/tmp/sim \
      --config.model_a_workdir=/tmp/cnn_s0 --config.model_b_workdir=/tmp/cnn_s1

  # laptop scale (embedded digits test split, 360 images):
  python -m fula_jax.main --config=configs/similarity.py:runlocal --workdir=/tmp/sim \
      --config.model_a_workdir=/tmp/cnn --config.model_b_workdir=/tmp/cnn_s1

Leave model_b_workdir unset to compare model A with itself (a symmetric matrix). Each
measure goes to <workdir>/results/<measure>.{npz,json,csv,png}; load them in Colab with
`fula_jax.results.load(workdir)`.

Expected time: runlocal (digits, small CNNs, all measures) under a minute on 2 CPU cores.
Full (CIFAR-10 test, 10,000 images, two ResNet-18s, minibatch CKA over every stitch
point plus the in-memory measures on 2,000 images): a few minutes on one modern GPU,
dominated by the forward passes and the per-pair SVDs of the CCA family.

ImageNet scale (the validation set streamed at 224; e.g. a standard and an L2 eps=3
robust ResNet-50 from the robustness library):

  python -m fula_jax.main --config=configs/similarity.py:imagenet --workdir=/tmp/sim_in \
      --config.model_a.weights=resnet50_l2_eps0.ckpt \
      --config.model_b.weights=resnet50_l2_eps3.ckpt --config.data.data_dir=/data/tfds

Args (comma separated): runlocal, tiny (128 examples: a check that the command works),
imagenet.
"""

import ml_collections
from ml_collections import config_dict

from fula_jax import defaults, donors


def get_config(arg=None):
  arg = defaults.parse_arg(arg, runlocal=False, tiny=False, imagenet=False)
  config = ml_collections.ConfigDict()
  config.job = "similarity"
  config.model_a_workdir = config_dict.placeholder(str)  # required: a `job=train` workdir
  config.model_b_workdir = config_dict.placeholder(str)  # None = model A with itself
  # Or either model from an architecture and a weights file (fula_jax/donors.py):
  # --config.model_a.arch=imagenet_resnet50 --config.model_a.weights=FILE
  config.model_a = donors.block()
  config.model_b = donors.block()
  # 'model_a': measure on model A's training data settings (dataset, size, channels);
  # 'config': on config.data below.
  config.data_from = "model_a"
  config.data = defaults.data_block("digits")
  config.split = "test"
  config.batch_size = 256          # examples per minibatch (sets minibatch CKA's n)
  config.num_examples = config_dict.placeholder(int)  # None = the whole split, in order
  # Any of fula_jax.similarity.names(). A measure outside its declared valid regime at
  # the kept n (Measure.invalid_at: 'cca' and 'pwcca' when a layer has as many features
  # as examples, as flattened conv maps usually do) is left out, and the job says so;
  # 'svcca' is then limited to (n - 1) // 2 directions per layer (its max_dims).
  config.measures = ("cka_linear_debiased", "cka_linear", "cka_rbf_debiased",
                     "procrustes", "svcca")
  # Linear CKA: 'minibatch' (Nguyen et al. 2021, any layer width) or 'exact' (full-data
  # feature-space statistics; for layers up to a few thousand features).
  config.estimator = "minibatch"
  config.exact_max_gib = 4.0
  config.max_examples = 2000       # examples kept in memory for the other measures
  config.points_a = config_dict.placeholder(tuple)  # None = every stitch point
  config.points_b = config_dict.placeholder(tuple)
  config.shard = True              # batch axis over all devices when there are several
  config.shard_mode = "global"     # 'global': same numbers as one device; 'local'
  config.rbf_sigma_frac = 1.0      # RBF bandwidth = this x median pairwise distance
  config.svcca_keep = 0.99         # variance fraction (float) or number of directions
  # Uncertainty, on the first max_examples examples (PRNG seed below):
  config.calibrate = 0             # permutations per cell: <measure>_calibrated matrices
  config.bootstrap = 0             # resamples per cell: a percentile interval per cell
  config.interval_level = 0.9
  config.seed = 0
  config.png = True
  config.progress_every_s = 10.0
  if arg.imagenet:
    # Jones et al.'s robust ImageNet zoo on the ImageNet validation set, streamed at 224.
    defaults.imagenet_pair(config, "imagenet_resnet50", "imagenet2012")
    config.measures = ("cka_linear_debiased", "cka_linear")
  if arg.runlocal or arg.tiny:
    config.batch_size = 64
    config.max_examples = 400
    config.progress_every_s = 2.0
  if arg.tiny:
    config.num_examples = config.max_examples = 128
  return config
