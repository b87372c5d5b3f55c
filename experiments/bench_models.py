"""Benchmark: a PyTorch model run through `models.from_torch` against torch itself and
against our own Flax layout of the same architecture.

For ResNet-50 (random weights) at 224 px, forward only, it times in one run:

* torch eager (``torch.no_grad``, eval mode, NCHW);
* torchvision's module through `from_torch`, jitted (NHWC in, as every job feeds it);
* our Flax ``imagenet_resnet50``, jitted;

and prints each one's median time per batch and images per second, and the ratios
from_torch / Flax (the issue's target is within 1.2x) and from_torch / torch eager.
Then it counts what the from_torch program spends beyond the Flax one: the transposes
(layout changes between NHWC and NCHW) in each compiled program.

  python experiments/bench_models.py                      # resnet50, 224 px, batch 32
  python experiments/bench_models.py --batch_size=8 --repeats=3   # a quicker look
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", default="resnet50", help="a torchvision architecture whose "
                 "Flax layout is imagenet_<arch> (resnet18, resnet50)")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5, help="timed batches per model")
  return p.parse_args(argv)


def _median_time(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _transposes(compiled_text: str) -> int:
  return len(re.findall(r"= \S+ transpose\(", compiled_text))


def main(argv=None) -> None:
  args = parse_args(argv)
  import torch
  import torchvision

  from fula_jax import models
  torch.manual_seed(0)
  net = getattr(torchvision.models, args.arch)(weights=None).eval()
  x = np.random.default_rng(0).uniform(
      size=(args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
  xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous()

  def eager():
    with torch.no_grad():
      net(xt)

  theirs, tv = models.from_torch(net, ["layer4"], input_shape=x.shape[1:])
  run_torch = jax.jit(lambda v, x: theirs.apply(v, x))
  flax_model = models.get_model(f"imagenet_{args.arch}")
  fv = models.init(flax_model, jax.random.PRNGKey(0), (1,) + x.shape[1:])
  run_flax = jax.jit(lambda v, x: flax_model.apply(v, x))
  xj = jax.device_put(x)

  t_eager = _median_time(eager, args.repeats)
  t_torchax = _median_time(lambda: run_torch(tv, xj).block_until_ready(), args.repeats)
  t_flax = _median_time(lambda: run_flax(fv, xj).block_until_ready(), args.repeats)
  print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, forward, "
        f"{jax.devices()[0].platform}, median of {args.repeats}:")
  for name, t in (("torch eager", t_eager), ("from_torch, jitted", t_torchax),
                  ("Flax imagenet_" + args.arch + ", jitted", t_flax)):
    print(f"  {name:32s} {t * 1e3:9.1f} ms/batch  {args.batch_size / t:8.1f} images/s")
  print(f"  from_torch / Flax:        {t_torchax / t_flax:.2f}x (target: within 1.2x)")
  print(f"  from_torch / torch eager: {t_torchax / t_eager:.2f}x")
  hlo_t = run_torch.lower(tv, xj).compile().as_text()
  hlo_f = run_flax.lower(fv, xj).compile().as_text()
  print(f"  transposes in the compiled program: from_torch {_transposes(hlo_t)}, "
        f"Flax {_transposes(hlo_f)}")


if __name__ == "__main__":
  main()
