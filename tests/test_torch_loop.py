"""The stitching benchmark's PyTorch baseline does the sweep's work: a least-squares
start, training, and scoring every stitch (experiments/torch_loop.py)."""

import numpy as np
import torch

from experiments import torch_loop

WIDTHS, STAGES = (4, 8, 8, 8), (1, 1, 1, 1)
POINTS = ["block1.0", "block2.0"]


def _own_cross_entropy(images, labels) -> float:
  """The donor's own test loss: the same seeded random ResNet, run straight through."""
  torch.manual_seed(0)
  stages, head, _ = torch_loop.build(WIDTHS, STAGES)
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    for st in stages:
      x = st(x)
    return float(torch.nn.functional.cross_entropy(
        head(x), torch.from_numpy(labels.astype(np.int64))))


def test_self_stitch_starts_at_the_identity_and_scores_the_model_itself():
  """From the least-squares start, untrained, a point stitched into itself is the
  identity: the stitched model is the model (its cross-entropy under TLM) and matches
  every later latent exactly (FuLA loss 0). From PyTorch's random start it is not."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(160, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 10, 160)
  kw = dict(widths=WIDTHS, stage_sizes=STAGES, rows=POINTS, cols=POINTS, steps=0,
            eval_images=images[:96], eval_labels=labels[:96], eval_batch=40,
            lstsq_examples=64)
  tlm = torch_loop.run(images, labels, "tlm", **kw)
  own = _own_cross_entropy(images[:96], labels[:96])
  np.testing.assert_allclose(np.diag(tlm["eval_loss"]), [own, own], rtol=1e-4)
  fula = torch_loop.run(images, labels, "fula", **kw)
  np.testing.assert_allclose(np.diag(fula["eval_loss"]), 0.0, atol=1e-3)
  assert np.all(fula["eval_loss"][[0, 1], [1, 0]] > 1e-2)  # other points: not identity
  random = torch_loop.run(images, labels, "fula", **dict(kw, init="random"))
  assert np.all(np.diag(random["eval_loss"]) > 1e-2) and random["init_seconds"] == 0.0
