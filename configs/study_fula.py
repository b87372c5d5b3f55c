"""Study 1: the FuLA testbeds, for TLM, SLM, DM and FuLA in one harness.

  python -m fula_jax.main --config=configs/study_fula.py:runlocal --workdir=workdirs/fula
  python experiments/study_fula.py --config=configs/study_fula.py:runlocal \
      --workdir=workdirs/fula
  # paper scale (accelerator; CIFAR-10 read from data_dir, never downloaded):
  python -m fula_jax.main --config=configs/study_fula.py --workdir=gs://BUCKET/fula \
      --config.data.data_dir=gs://BUCKET/tfds
  # one architecture, two of the testbeds:
  ... --config=configs/study_fula.py --config.architectures='("resnet18",)' \
      --config.testbeds='("robust","shortcut")'

Per architecture, four models are trained into ``<workdir>/models/<arch>_<role>`` (or
reused when finished there, so a stopped study restarts where it was and the models can
be trained beforehand with job=train): `standard` and `second_seed` (standard training,
seeds `seed` and `seed + 1`), `robust` (PGD adversarial training at `robust.eps`) and
`shortcut` (trained with a class-coloured corner patch that predicts the label with
probability `shortcut.correlation`). Then, with all four objectives at once:

  robust      depth-matched stitches robust -> standard, standard -> robust and the
              control second_seed -> standard on clean data; clean accuracy and the
              stitched model's accuracy under PGD at `robust.eps`, by depth.
  shortcut    shortcut -> standard, standard -> shortcut and the control, trained on
              data with the cue; accuracy with the cue present, absent and permuted.
  cross_seed  the full L x L matrix second_seed -> standard on clean data.

Matrices go to ``<workdir>/results`` (Colab: ``fula_jax.results.load(workdir)``), a tidy
``by_depth.csv``, figures to ``<workdir>/figures`` and the tables and computed findings
(e.g. does FuLA rate the shortcut pair lower than TLM?) to ``<workdir>/report.md``.

Args (comma separated): runlocal, tiny (a seconds-scale smoke run for tests), seed=<int>.

Expected time: runlocal (embedded digits at their native 8x8; a small CNN with four
stitch points; PGD-3 adversarial training at eps 0.1; stitches trained for 10 epochs
from the least-squares init through three maps -- lowrank (rank 4), affine and mlp --
with OOD scores, PGD-10 on the stitched models) about 8 minutes on 2 CPU cores from
scratch, most of it compiling the 12 (objective, map) programs per end point; a rerun
that reuses models and stitches takes seconds. ``--config.stitch.map=affine`` brings it
back to about 2 minutes. Adding a half-width ResNet-20
(``--config.architectures='("cnn","resnet20")'``, 11 stitch points, a 121-cell
cross-seed matrix) multiplies it several times. tiny: about 2.5 minutes. Paper scale
(CIFAR-10; ResNet-18, VGG-16 and ViT-Tiny; 12 models, the 3 robust ones with PGD-7 at
8/255 for 200 epochs; stitches 3 epochs each through orthogonal, lowrank, affine and
mlp maps, PGD-20 on 1,000 test images per stitch) is dominated by adversarial
training: on the order of 30-60 GPU-hours on one modern GPU, then several GPU-hours of
stitching. The models are independent: train them in parallel with job=train into the
same ``models/`` folders, then run the study to reuse them.

Fields:
  architectures: zoo names; each needs an entry in `models`.
  testbeds: any of 'robust', 'shortcut', 'cross_seed'.
  robust: the robust model's PGD (norm, eps, training `steps` with step size
    ``step_size_factor * eps / steps``) and the attack on the stitched models
    (`eval_steps` on the first `eval_examples` test images).
  shortcut: the cue (see fula_jax/data: correlation, strength, patch_size, seed) and the
    evaluation modes every stitch is scored under.
  stitch: fula_jax.stitching settings shared by every sweep (objectives, epochs,
    batch size, learning rate, init, FuLA's C, k and norms, ...); `pairs` is set per
    testbed. `map` (a comma list) is the capacity ladder the report compares FuLA and
    TLM across; `ood_examples` > 0 adds the OOD scores of the stitched activations.
  depth_pairs: the cells of the robust and shortcut testbeds: 'diagonal', or
    'offset:+k' for i -> i+k.
  models: train configs (configs/train.py); their `data`, `seed` and
    `train.adversarial` are set per role by the study.
  data: the clean dataset every model and stitch uses (the shortcut role and testbed
    add the cue to it).
"""

import pathlib

import ml_collections

from fula_jax import defaults


def _config_module(name):
  return defaults.config_module(pathlib.Path(__file__).with_name(name))


def get_config(arg=None):
  arg = defaults.parse_arg(arg, runlocal=False, tiny=False, seed=0)
  train = _config_module("train.py")
  small = arg.runlocal or arg.tiny

  config = ml_collections.ConfigDict()
  config.job = "study_fula"
  config.seed = arg.seed
  config.architectures = ("resnet18", "vgg16", "vit_tiny")
  config.testbeds = ("robust", "shortcut", "cross_seed")
  config.data = defaults.data_block("digits" if small else "cifar10")
  config.eval_batch_size = 500
  config.robust = ml_collections.ConfigDict(dict(
      norm="linf", eps=8 / 255, steps=7, step_size_factor=2.5, eval_steps=20,
      eval_examples=1000, random_start=True))
  config.shortcut = ml_collections.ConfigDict(dict(
      correlation=1.0, strength=1.0, patch_size=4, seed=0,
      eval_modes=("present", "absent", "permuted")))
  config.stitch = _config_module("stitch.py").stitch_block()
  # The capacity ladder: does the FuLA vs TLM verdict survive at every map?
  config.stitch.map = "orthogonal,lowrank,affine,mlp"
  config.stitch.ood_examples = 1000
  config.depth_pairs = "diagonal"

  if small:
    config.architectures = ("cnn",)
    config.data.image_size = 8  # native digits: 4x cheaper than 16x16
    config.eval_batch_size = 512
    config.robust.eps = 0.1
    config.robust.steps = 3
    config.robust.eval_steps = 10
    config.robust.eval_examples = 360
    config.shortcut.patch_size = 2
    config.stitch.batch_size = 128
    config.stitch.eval_batch_size = 360
    config.stitch.epochs = 10.0
    config.stitch.init = "lstsq"
    config.stitch.lstsq_examples = 256
    config.stitch.progress_every_s = 15.0
    config.stitch.map = "lowrank,affine,mlp"
    config.stitch.map_options.rank = 4
    config.stitch.ood_examples = 256
  if arg.tiny:
    config.robust.steps = 2
    config.robust.eval_steps = 3
    config.robust.eval_examples = 128
    config.stitch.epochs = 0.0
    config.stitch.steps = 15
    config.stitch.progress = False
    config.stitch.map = "identity,affine"  # identity: a map no objective changes
    config.stitch.ood_examples = 128

  candidates = (("cnn", "mlp", "resnet20") if small else
                ("resnet18", "vgg16", "vit_tiny", "resnet20"))
  scale = "tiny" if arg.tiny else "runlocal" if arg.runlocal else "paper"
  config.models = defaults.study_models(
      train, candidates, data=config.data, seed=arg.seed, scale=scale,
      eval_batch_size=config.eval_batch_size, tiny_steps=200,
      tiny_kwargs={"cnn": dict(widths=(8, 16))})
  if arg.runlocal:
    # At quarter width the first stage has 4 channels, too few for two seeds to be
    # linearly alignable (DM between them is at chance there); half width is not.
    config.models.resnet20.model.kwargs = dict(width_multiplier=0.5)
  return config
