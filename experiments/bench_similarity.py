"""Benchmark: the streaming minibatch-CKA engine vs a per-pair loop, same run, same data.

Two randomly initialised models (seeds 0 and 1) see the same random images; every stitch
point's activation is captured once per batch and kept. Then the full L_A x L_B debiased
minibatch CKA matrix (Nguyen et al. 2021) is computed twice from the kept activations:

* engine: :func:`fula_jax.similarity.minibatch.update`, one jitted call per batch that
  forms each layer's Gram once and gets the whole HSIC block with one matmul;
* per-pair loop: for every (a, b) pair and batch, a jitted plain function recomputes both
  Grams and the three HSIC values (``cka.gram_linear`` + ``cka.hsic``).

It prints compile and steady-state times, their ratio, the largest difference between the
two matrices, and peak memory (host max RSS; device peak bytes where the backend reports
them).

  # default, ~1-2 minutes on 2 CPU cores (ResNet-18 at 1/4 width, 1,024 images):
  python experiments/bench_similarity.py
  # paper scale (accelerator): full-width ResNet-18s, 5,000 CIFAR-sized images:
  python experiments/bench_similarity.py --width_multiplier=1 --num_examples=5000
  # any registered model:
  python experiments/bench_similarity.py --model=vgg11 --model_kwargs='{"width_multiplier": 0.25}'
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import models
from fula_jax.similarity import cka
from fula_jax.similarity import minibatch


TINY = dict(model="cnn", width_multiplier=1.0, num_examples=96, batch_size=32,
            image_size=8, channels=1)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="resnet18" if "resnet18" in models.MODELS else "cnn",
                 help=f"one of {', '.join(models.MODELS)}")
  p.add_argument("--width_multiplier", type=float, default=0.25,
                 help="passed to models that take one (ResNets, VGGs); 1 = paper size")
  p.add_argument("--model_kwargs", default="{}", help="JSON dict of extra model kwargs")
  p.add_argument("--num_examples", type=int, default=1024)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--channels", type=int, default=3)
  p.add_argument("--skip_loop", action="store_true", help="time the engine only")
  p.add_argument("--tiny", action="store_true",
                 help="seconds: a small CNN on 96 8x8 images (a check that it runs; its "
                      "ratio means nothing)")
  if p.parse_known_args(argv)[0].tiny:
    p.set_defaults(**TINY)  # flags given explicitly still win
  return p.parse_args(argv)


def peak_memory() -> str:
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  parts = [f"host max RSS {rss_gib:.2f} GiB"]
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    parts.append(f"device peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  return ", ".join(parts)


def build(args, seed: int):
  kwargs = json.loads(args.model_kwargs)
  if args.model.startswith(("resnet", "vgg")):
    kwargs.setdefault("width_multiplier", args.width_multiplier)
  model = models.get_model(args.model, **kwargs)
  shape = (1, args.image_size, args.image_size, args.channels)
  return model, models.init(model, jax.random.PRNGKey(seed), shape)


def block(tree):
  return jax.block_until_ready(tree)


@jax.jit
def plain_pair(x, y):
  """The per-pair baseline: both Grams from scratch, three debiased HSIC values."""
  k, l = cka.gram_linear(x), cka.gram_linear(y)
  return (cka.hsic(k, l, debiased=True), cka.hsic(k, k, debiased=True),
          cka.hsic(l, l, debiased=True))


def main(argv=None) -> dict:
  args = parse_args(argv)
  print(f"devices: {jax.devices()}")
  model_a, vars_a = build(args, 0)
  model_b, vars_b = build(args, 1)
  points_a, points_b = list(model_a.point_names), list(model_b.point_names)
  cap_a = jax.jit(lambda v, x: [models.capture(model_a, v, x)[1][p] for p in points_a])
  cap_b = jax.jit(lambda v, x: [models.capture(model_b, v, x)[1][p] for p in points_b])
  rng = np.random.default_rng(0)
  nb = args.num_examples // args.batch_size
  if nb == 0:
    raise SystemExit("--num_examples must be at least --batch_size")
  shape = (args.batch_size, args.image_size, args.image_size, args.channels)
  dims_a = [int(np.prod(s.shape[1:])) for s in jax.eval_shape(
      cap_a, vars_a, jax.ShapeDtypeStruct(shape, jnp.float32))]
  dims_b = [int(np.prod(s.shape[1:])) for s in jax.eval_shape(
      cap_b, vars_b, jax.ShapeDtypeStruct(shape, jnp.float32))]
  print(f"model {args.model} {json.loads(args.model_kwargs) or ''} "
        f"width x{args.width_multiplier}: L_A = {len(points_a)}, L_B = {len(points_b)}; "
        f"features per example A {sum(dims_a):,}, B {sum(dims_b):,} "
        f"(widest {max(dims_a + dims_b):,}); {nb} batches of {args.batch_size}")

  t0 = time.perf_counter()
  kept = []
  for _ in range(nb):
    x = jnp.asarray(rng.uniform(size=shape).astype(np.float32))
    kept.append(block((cap_a(vars_a, x), cap_b(vars_b, x))))
  t_capture = time.perf_counter() - t0
  print(f"capture (both models, incl. compile): {t_capture:.1f} s")

  # Engine: first batch includes compilation.
  acc = minibatch.init(len(points_a), len(points_b))
  t0 = time.perf_counter()
  acc = block(minibatch.update(acc, *kept[0]))
  t_engine_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for acts_a, acts_b in kept[1:]:
    acc = minibatch.update(acc, acts_a, acts_b)
  acc = block(acc)
  t_engine = time.perf_counter() - t0
  engine = np.asarray(acc.cka())[0]
  per_batch_engine = t_engine / max(nb - 1, 1)
  print(f"engine: first batch (compile+run) {t_engine_first:.2f} s, then "
        f"{per_batch_engine:.3f} s/batch; full matrix {t_engine_first + t_engine:.2f} s")
  gram_mib = (len(points_a) + len(points_b)) * args.batch_size**2 * 4 / 2**20
  print(f"engine per-batch centred Grams ~ {gram_mib:.1f} MiB; " + peak_memory())
  out = dict(engine_s=t_engine_first + t_engine, engine_per_batch_s=per_batch_engine,
             capture_s=t_capture)
  if args.skip_loop:
    return out

  la, lb = len(points_a), len(points_b)
  sums = np.zeros((3, la, lb))
  t0 = time.perf_counter()
  for i in range(la):  # first batch: compiles every distinct shape pair
    for j in range(lb):
      sums[:, i, j] += np.asarray(block(plain_pair(kept[0][0][i], kept[0][1][j])))
  t_loop_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for acts_a, acts_b in kept[1:]:
    for i in range(la):
      for j in range(lb):
        sums[:, i, j] += np.asarray(plain_pair(acts_a[i], acts_b[j]))
  t_loop = time.perf_counter() - t0
  loop = sums[0] / np.sqrt(sums[1] * sums[2])
  per_batch_loop = t_loop / max(nb - 1, 1)
  print(f"per-pair loop: first batch (compile+run) {t_loop_first:.2f} s, then "
        f"{per_batch_loop:.3f} s/batch; full matrix {t_loop_first + t_loop:.2f} s")
  diff = float(np.nanmax(np.abs(loop - engine)))
  speed = (t_loop_first + t_loop) / (t_engine_first + t_engine)
  steady = per_batch_loop / per_batch_engine if nb > 1 else float("nan")
  print(f"ratio loop/engine: {speed:.1f}x overall, {steady:.1f}x per batch after "
        f"compilation; max |difference| {diff:.2e}")
  print("peak memory: " + peak_memory())
  out.update(loop_s=t_loop_first + t_loop, loop_per_batch_s=per_batch_loop,
             ratio=speed, ratio_steady=steady, max_abs_diff=diff)
  return out


if __name__ == "__main__":
  main()
