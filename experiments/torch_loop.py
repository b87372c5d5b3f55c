"""The baseline a researcher with PyTorch would write: stitch one pair at a time.

A CIFAR ResNet with the same layout as the zoo's (`fula_jax.models.ResNet`: 3x3 stem,
BasicBlocks, projection shortcuts, the same widths), in PyTorch, with random weights: the
timing depends on shapes, not values. For every (front point i, end point j) pair, a
fresh 1x1-conv stitch (bilinear resize to j's grid first) starts from the least-squares
map of i's activations onto j's on `lstsq_examples` images (`init='lstsq'`, the sweep's
default start; 'random': PyTorch's own init) and is trained with Adam for `steps` steps
on batches of `batch` images; per step both donors run again (in eval mode, without
gradients): f up to i, and for FuLA g up to its last latent point for the
targets; then the stitched model runs g's tail from j with a backward pass. Given
evaluation images, each trained stitch is then scored on them (accuracy, and the
objective's loss), as the sweep scores every stitch on its test split. This is the work
the sweep engine does for the same matrix, done the straightforward way.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np


def build(widths: Sequence[int], stage_sizes: Sequence[int], num_classes: int = 10,
          channels_last: bool = False):
  """(stages, head, point names) of a CIFAR ResNet in PyTorch, frozen, eval mode."""
  import torch
  from torch import nn

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.b1 = nn.BatchNorm2d(cout)
      self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.b2 = nn.BatchNorm2d(cout)
      self.proj = None
      if stride != 1 or cin != cout:
        self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.b1(self.c1(x)))
      y = self.b2(self.c2(y))
      return torch.relu(y + (x if self.proj is None else self.proj(x)))

  stages = [nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                          nn.BatchNorm2d(widths[0]), nn.ReLU())]
  names = ["stem"]
  cin = widths[0]
  for s, (n, w) in enumerate(zip(stage_sizes, widths)):
    for b in range(n):
      stages.append(Block(cin, w, 2 if s > 0 and b == 0 else 1))
      names.append(f"block{s + 1}.{b}")
      cin = w
  class Pool(nn.Module):
    def forward(self, x):
      return x.mean((2, 3))

  stages.append(Pool())
  names.append("pool")
  stages = nn.ModuleList(stages)
  head = nn.Linear(cin, num_classes)
  for m in (stages, head):
    m.eval()
    for p in m.parameters():
      p.requires_grad_(False)
    if channels_last:
      m.to(memory_format=torch.channels_last)
  return stages, head, names


def run(images: np.ndarray, labels: np.ndarray, objective: str, *, widths, stage_sizes,
        rows: Sequence[str], cols: Sequence[str], steps: int = 20, batch: int = 64,
        seed: int = 0, channels_last: bool = False, threads: int | None = None,
        eval_images: np.ndarray | None = None, eval_labels: np.ndarray | None = None,
        eval_batch: int = 512, init: str = "lstsq", lstsq_examples: int = 512,
        ridge: float = 1e-6) -> dict:
  """Start, train and (given evaluation images) score every stitch rows x cols one after
  another; seconds (all, starting, evaluating), stitch steps, and each cell's accuracy
  and objective loss on the evaluation images."""
  import torch
  import torch.nn.functional as F
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  stages, head, names = build(widths, stage_sizes, channels_last=channels_last)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x_all = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y_all = torch.from_numpy(labels.astype(np.int64))
  rng = np.random.default_rng(seed)
  order = [rng.permutation(len(labels)) for _ in range(steps)]
  with torch.no_grad():  # point shapes
    h, shapes = x_all[:1].contiguous(memory_format=fmt), {}
    for name, st in zip(names, stages):
      h = st(h)
      shapes[name] = tuple(h.shape[1:])
  last = names[-1]  # FuLA's k: the last latent stitch point

  def run_to(x, i):
    for st in stages[:names.index(i) + 1]:
      x = st(x)
    return x

  def front(x, i, j):
    """f's activation at i, resized to j's grid."""
    a, size = run_to(x, i), shapes[j][1:]
    if a.shape[2:] != size:
      a = F.interpolate(a, size=size, mode="bilinear", align_corners=False,
                        antialias=a.shape[2] > size[0])
    return a

  def stitched_loss(x, y, i, j, stitch):
    """(loss, logits) of the stitched model: f up to i, the stitch, g on from j."""
    with torch.no_grad():
      a = front(x, i, j)
      targets = {}
      if objective == "fula":
        t = x
        for name, st in zip(names, stages):
          t = st(t)
          if names.index(name) >= names.index(j):
            targets[name] = t
    z = stitch(a)
    if objective == "tlm":
      for st in stages[names.index(j) + 1:]:
        z = st(z)
      logits = head(z)
      return F.cross_entropy(logits, y), logits
    loss = 0.0
    for name in names[names.index(j):names.index(last) + 1]:
      if name != j:
        z = stages[names.index(name)](z)
      t = targets[name]
      err = (z - t).flatten(1).norm(dim=1) / t.flatten(1).norm(dim=1)
      loss = loss + err.mean()
    for st in stages[names.index(last) + 1:]:
      z = st(z)
    return loss, head(z)

  def least_squares_start(stitch, i, j):
    """The ridge least-squares map (relative ridge, as the sweep's) from i onto j."""
    with torch.no_grad():
      a = front(x_init, i, j)
      a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double()
      t = run_to(x_init, j)
      t = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
      a_c, t_c = a - a.mean(0), t - t.mean(0)
      cov = a_c.T @ a_c / len(a)
      lam = ridge * float(torch.trace(cov)) / cov.shape[0]
      kernel = torch.linalg.solve(cov + lam * torch.eye(cov.shape[0], dtype=cov.dtype),
                                  a_c.T @ t_c / len(a))
      stitch.weight.copy_(kernel.T[:, :, None, None].float())
      stitch.bias.copy_((t.mean(0) - a.mean(0) @ kernel).float())

  order_init = np.random.default_rng(seed + 1).permutation(len(labels))[:lstsq_examples]
  x_init = x_all[torch.from_numpy(order_init)].contiguous(memory_format=fmt)
  x_eval = y_eval = None
  if eval_images is not None:
    x_eval = torch.from_numpy(np.ascontiguousarray(eval_images.transpose(0, 3, 1, 2)))
    y_eval = torch.from_numpy(eval_labels.astype(np.int64))
  accuracy = np.full((len(rows), len(cols)), np.nan)
  eval_loss = np.full((len(rows), len(cols)), np.nan)
  eval_seconds = init_seconds = 0.0
  t0 = time.perf_counter()
  for r, i in enumerate(rows):
    for c, j in enumerate(cols):
      stitch = torch.nn.Conv2d(shapes[i][0], shapes[j][0], 1).to(memory_format=fmt)
      if init == "lstsq":
        te = time.perf_counter()
        least_squares_start(stitch, i, j)
        init_seconds += time.perf_counter() - te
      opt = torch.optim.Adam(stitch.parameters(), lr=1e-3)
      for step in range(steps):
        idx = torch.from_numpy(order[step][:batch])
        loss, _ = stitched_loss(x_all[idx].contiguous(memory_format=fmt), y_all[idx],
                                i, j, stitch)
        opt.zero_grad()
        loss.backward()
        opt.step()
      if x_eval is None:
        continue
      te = time.perf_counter()
      correct, total = 0, 0.0
      with torch.no_grad():
        for s in range(0, len(y_eval), eval_batch):
          x = x_eval[s:s + eval_batch].contiguous(memory_format=fmt)
          loss, logits = stitched_loss(x, y_eval[s:s + eval_batch], i, j, stitch)
          correct += int((logits.argmax(1) == y_eval[s:s + eval_batch]).sum())
          total += float(loss) * len(x)
      accuracy[r, c], eval_loss[r, c] = correct / len(y_eval), total / len(y_eval)
      eval_seconds += time.perf_counter() - te
  seconds = time.perf_counter() - t0
  return {"seconds": seconds, "init_seconds": init_seconds, "eval_seconds": eval_seconds,
          "accuracy": accuracy, "eval_loss": eval_loss,
          "stitch_steps": len(rows) * len(cols) * steps,
          "ms_per_stitch_step": 1e3 * (seconds - eval_seconds - init_seconds) /
                                max(len(rows) * len(cols) * steps, 1)}
