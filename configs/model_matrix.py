"""Model x model similarity at one point: every pair of a zoo of models, one matrix per
measure (the matrix Jones et al. 2022 and platonic-rep show).

  python -m fula_jax.main --config=configs/model_matrix.py --workdir=/tmp/zoo_matrix \
      --config.models="('/tmp/cnn_s0', '/tmp/cnn_s1', '/tmp/resnet20_s0')"

Models are trained workdirs (`job=train`) or 'ARCH=FILE' for an architecture and its
weights file (e.g. 'imagenet_resnet50=/ckpt/resnet50_l2_eps3.ckpt'). Each matrix goes
to <workdir>/results/models_<measure>.{npz,json,csv,png}; in Colab:
`fula_jax.results.load(workdir)["models_mutual_knn"].plot()`.

Expected time: runlocal (digits, a few small CNNs): seconds per model on 2 CPU cores.
Full (CIFAR-10 test, 2,000 examples): one forward pass per model plus the measures,
whose cost is quadratic in max_examples (kNN, RSA, CKA Grams).

Args (comma separated): runlocal, tiny (128 examples: a check that the command works).
"""

import ml_collections

from fula_jax import defaults


def get_config(arg=None):
  arg = defaults.parse_arg(arg, runlocal=False, tiny=False)
  config = ml_collections.ConfigDict()
  config.job = "model_matrix"
  config.models = ()               # required: 2+ workdirs or 'ARCH=FILE' weights
  # One point for every model: 'penultimate' (each model's last stitch point, the
  # features its head reads), 'logits', or a point name all models have.
  config.point = "penultimate"
  config.measures = ("cka_linear_debiased", "mutual_knn", "cknna", "rsa")
  config.options = {}              # measure options shared by all, e.g. {'k': 10}
  config.data_from = "model_a"     # the first trained workdir's data, or 'config'
  config.data = defaults.data_block("digits")
  config.split = "test"
  config.batch_size = 256
  config.max_examples = 2000       # every measure uses the first max_examples examples
  config.png = True
  if arg.runlocal or arg.tiny:
    config.batch_size = 64
    config.max_examples = 360
  if arg.tiny:
    config.max_examples = 128
  return config
