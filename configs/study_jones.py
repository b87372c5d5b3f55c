"""Study 2: inter-architecture inverted-image CKA (Jones et al., UAI 2022) as eps grows.

  python -m fula_jax.main --config=configs/study_jones.py:runlocal --workdir=workdirs/jones
  python experiments/study_jones.py --config=configs/study_jones.py:runlocal \
      --workdir=workdirs/jones
  # paper scale (accelerator; CIFAR-10 read from data_dir, never downloaded):
  python -m fula_jax.main --config=configs/study_jones.py --workdir=gs://BUCKET/jones \
      --config.data.data_dir=gs://BUCKET/tfds

(the first form needs ``"study_jones": "experiments.study_jones:run"`` in
fula_jax.main.JOBS.) Trains every (architecture, eps) model of the zoo into
``<workdir>/models/<arch>_eps<eps>`` (a finished model there is reused, so a stopped
study restarts where it was and models can be trained beforehand with job=train), then
per eps writes the asymmetric inverted-image CKA matrix and the plain CKA matrix on
natural images under ``<workdir>/results``, heatmaps and an eps curve under
``<workdir>/figures`` and a summary in ``<workdir>/report.md``.

Args (comma separated): runlocal, tiny (a seconds-scale smoke run for tests), seed=<int>,
imagenet (the robust ImageNet zoo from weights files, nothing trained):

  python -m fula_jax.main --config=configs/study_jones.py:imagenet --workdir=/tmp/jones_in \
      --config.weights='/models/robust/{arch}_l2_eps{eps}.ckpt' \
      --config.data.data_dir=/data/tfds

with the robustness library's checkpoints under their released names
(resnet18_l2_eps3.ckpt, wide_resnet50_4_l2_eps0.25.ckpt, ...: {arch} is the name after
'torchvision:', eps formatted like 0.25 and 3). They load as saved (``module.model.*``
and the checkpoint's own normaliser); needs ``pip install -e '.[torch]'``.

Expected time: runlocal (embedded digits at their native 8x8; a small CNN, an MLP and a
quarter-width ResNet-20; eps in {0, 0.05, 0.1, 0.2} with PGD-3 training; 160 pairs, 150
inversion steps) about 5 minutes on 2 CPU cores, most of it adversarial training; a
rerun that reuses the models takes about a minute. tiny: well under a minute. Paper scale
(CIFAR-10; ResNet-18, VGG-16, ViT-Tiny; 7 eps from 0 to 8/255; PGD-7 training for 200
epochs; 1,000 pairs, 2,000 inversion steps) is dominated by the 18 adversarially trained
models: on the order of 100-200 GPU-hours on one modern GPU. The models are independent:
train them in parallel with job=train into the same ``models/`` folders, then run the
study to reuse them (the inversion and CKA part takes about an hour).

Fields:
  architectures: zoo names; each needs an entry in `models`. With `weights`: PyTorch
    architectures ('torchvision:resnet18', 'timm:...') or Flax layouts of the zoo
    ('imagenet_resnet50').
  eps: L-inf radii in [0, 1] pixel units; 0 = standard training.
  attack: PGD settings shared by all models. Training uses `steps` with step size
    ``step_size_factor * eps / steps`` (Madry et al.'s 2.5 / steps convention);
    robust accuracy at every model's own eps and at `eval_eps` (None = the largest eps)
    uses `eval_steps`.
  models: train configs (configs/train.py) of the architectures and a few alternatives
    (runlocal: vit_tiny, a 2-block ViT on 2x2 patches that trains poorly adversarially
    at eps 0.2 on 8x8 digits). Their `data`, `seed` and `train.adversarial` are
    replaced by the study's `data`, `seed` and attack/eps.
  data: the one dataset every model is trained and compared on.
  n_pairs: (seed, target) test-image pairs with different labels, drawn once and reused
    for every reference model and every eps.
  inversion: fula_jax.similarity.inversion settings (steps, step_size, momentum,
    point None = 'pool' or the last stitch point, batch sizes, progress).
  natural: plain CKA images: 'seeds' (the n_pairs seed images; same n as the inverted
    measure, so the biased estimator's small-n offset is the same) or 'test' (the whole
    test split).
  save_inversions: keep every reference model's inverted images (and per-pair losses).
"""

import pathlib

import ml_collections
from ml_collections import config_dict

from fula_jax import defaults

PAPER_EPS = (0.0, 0.25 / 255, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255)


def _train_configs():
  return defaults.config_module(pathlib.Path(__file__).with_name("train.py"))


def get_config(arg=None):
  arg = defaults.parse_arg(arg, runlocal=False, tiny=False, seed=0, imagenet=False)
  train = _train_configs()
  small = arg.runlocal or arg.tiny

  config = ml_collections.ConfigDict()
  config.job = "study_jones"
  config.seed = arg.seed
  config.architectures = ("resnet18", "vgg16", "vit_tiny")
  config.eps = PAPER_EPS
  config.attack = ml_collections.ConfigDict(dict(
      norm="linf", steps=7, step_size_factor=2.5, eval_steps=20, random_start=True,
      eval_eps=config_dict.placeholder(float)))
  config.data = defaults.data_block("digits" if small else "cifar10")
  config.n_pairs = 1000
  config.inversion = ml_collections.ConfigDict(dict(
      steps=2000, step_size=1 / 8, momentum=0.9, point=config_dict.placeholder(str),
      batch_size=250, eval_batch_size=500, progress=True))
  config.natural = "seeds"
  # Inverted images and losses to <workdir>/inversions/eps<eps>/<arch>.npz (float32;
  # about 12 MB per model at paper scale).
  config.save_inversions = True
  config.eval_batch_size = 500

  # A pretrained zoo instead of training one: a path pattern with {arch} and {eps}.
  config.weights = config_dict.placeholder(str)
  config.eval_examples = config_dict.placeholder(int)  # clean/PGD accuracy on the first n
  if arg.imagenet:
    # Jones et al.'s zoo: the nine L2-robust ImageNet architectures of Salman et al.
    # (2020), the robustness library's checkpoints run through torchax (`pip install -e
    # '.[torch]'`), each compared at its penultimate features (its classifier's input),
    # on the ImageNet validation set streamed at 224 (resize 256, centre crop 224).
    # A Flax layout of the zoo ('imagenet_resnet50', ...) can stand in for any of them.
    config.architectures = tuple(f"torchvision:{a}" for a in (
        "resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_4", "densenet161",
        "mobilenet_v2", "resnext50_32x4d", "shufflenet_v2_x1_0", "vgg16_bn"))
    config.eps = (0.0, 0.01, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0)
    config.attack.norm = "l2"
    config.attack.eval_eps = 3.0
    config.data = defaults.data_block("imagenet2012")
    config.data.image_size = 224
    config.data.crop = "imagenet_eval"
    config.weights = "ROBUST_MODELS/{arch}_l2_eps{eps}.ckpt"  # set to your folder
    config.eval_examples = 1000
    config.eval_batch_size = 100
    config.inversion.batch_size = 50
    config.inversion.eval_batch_size = 100
  if arg.tiny:
    config.architectures = ("cnn", "mlp")
    config.eps = (0.0, 0.1)
    config.attack.steps = 2
    config.attack.eval_steps = 3
    config.n_pairs = 40
    config.inversion.steps = 20
    config.inversion.step_size = 0.05
    config.inversion.progress = False
  elif arg.runlocal:
    config.architectures = ("cnn", "mlp", "resnet20")
    config.eps = (0.0, 0.05, 0.1, 0.2)
    config.attack.steps = 3
    config.attack.eval_steps = 10
    config.n_pairs = 160
    config.inversion.steps = 150
    config.inversion.step_size = 0.05
  if small:
    config.data.image_size = 8  # native digits: 4x cheaper than 16x16 and sharper
    config.eval_batch_size = 512

  # Train configs for the study's architectures and a few alternatives, so that
  # --config.architectures can swap them without editing this file.
  candidates = (("cnn", "mlp") if arg.tiny else
                ("cnn", "mlp", "resnet20", "vit_tiny") if arg.runlocal else
                ("resnet18", "vgg16", "vit_tiny", "resnet20"))
  scale = "tiny" if arg.tiny else "runlocal" if arg.runlocal else "paper"
  config.models = defaults.study_models(
      train, candidates, data=config.data, seed=arg.seed, scale=scale,
      eval_batch_size=config.eval_batch_size, tiny_steps=200,
      tiny_kwargs={"cnn": dict(widths=(8, 16)), "mlp": dict(widths=(64, 32))})
  if arg.runlocal:  # 16 tokens of 2x2 patches on 8x8 images
    vit = config.models.vit_tiny
    vit.model.kwargs = dict(patch=2, depth=2, width=64, num_heads=2, mlp_dim=128)
    vit.train.learning_rate = 3e-3
    vit.train.num_epochs = 30.0
  return config
