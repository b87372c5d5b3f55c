"""Train one model of the zoo.

  python -m fula_jax.main --config=configs/train.py:model=cnn,runlocal --workdir=/tmp/cnn

Args (comma separated): model=<name> (cnn, mlp, resnet18, resnet20, vgg11, vgg16,
vit_tiny), dataset=<name> (digits, cifar10, ...), seed=<int>, runlocal, tiny.
Expected time: runlocal (embedded digits at 16x16, small widths) 15 s to a few minutes
on 2 CPU cores depending on the model; tiny (the runlocal job on the native 8x8 digits,
narrower models, 40 steps: a check that the command works, not a trained model) seconds;
full (CIFAR-10, 200 epochs ResNet-18) about 1 hour on one modern GPU.
"""

import ml_collections

from fula_jax import defaults

# Small widths that train on a CPU in about a minute.
RUNLOCAL_MODEL_KWARGS = {
    "cnn": dict(widths=(16, 32, 64)),
    "mlp": dict(widths=(256, 128)),
    "resnet18": dict(width_multiplier=0.125),
    "resnet20": dict(width_multiplier=0.5),
    "vgg11": dict(width_multiplier=0.125),
    "vgg16": dict(width_multiplier=0.125),
    "vit_tiny": dict(depth=4, width=64, num_heads=2, mlp_dim=128),
}
TINY_MODEL_KWARGS = {
    "cnn": dict(widths=(8, 16)),
    "mlp": dict(widths=(64, 32)),
    "resnet20": dict(width_multiplier=0.25),
    "vit_tiny": dict(depth=2, width=32, num_heads=2, mlp_dim=64, patch=2),
}


def get_config(arg=None):
  arg = defaults.parse_arg(arg, model="cnn", dataset="cifar10", seed=0, runlocal=False,
                           tiny=False)
  config = ml_collections.ConfigDict()
  config.job = "train"
  config.seed = arg.seed
  small = arg.runlocal or arg.tiny
  config.data = defaults.data_block("digits" if small else arg.dataset)
  config.model = defaults.model_block(arg.model)
  config.train = defaults.train_block()
  config.eval_batch_size = 500
  if arg.model == "vit_tiny":
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 5e-5
  if small:
    config.model.kwargs = RUNLOCAL_MODEL_KWARGS.get(arg.model, {})
    # 16x16 is 4x cheaper than 32x32; VGG's five 2x2 max-pools need 32x32.
    config.data.image_size = 32 if arg.model.startswith("vgg") else 16
    config.train.num_epochs = 20.0
    config.train.augment.flip = False  # digits are not mirror-symmetric
    config.train.augment.crop_padding = 0  # crops hurt 8x8-native digits
    config.train.checkpoint_every_steps = 50
    config.train.log_every_steps = 10
  else:
    config.train.num_epochs = 200.0
  if arg.tiny:
    config.model.kwargs = TINY_MODEL_KWARGS.get(arg.model, config.model.kwargs)
    if not arg.model.startswith("vgg"):
      config.data.image_size = None  # the native 8x8 digits
    config.train.num_epochs, config.train.num_steps = 0.0, 40
    config.train.batch_size, config.train.warmup_epochs = 64, 0.0
    config.train.checkpoint_every_steps = 20
  return config
