"""Benchmark: the stitching sweep engine against one-pair-at-a-time loops, in one run.

The same cross-layer matrix is computed three ways:

* sweep: the engine's default (`grouping='end'`): one program per (end point, objective)
  trains every stitch into that point under vmap, and one donor pass per batch is
  shared by every stitch;
* loop: the same JAX code one stitch at a time (`grouping='single'`, one stitch per
  wave), so both donors run again for every stitch and every batch;
* torch: the loop a researcher would write in PyTorch (`experiments/torch_loop.py`,
  ResNet presets only, when torch is installed): a 1x1-conv stitch per pair from the
  sweep's least-squares start, donors rerun per step, then every stitch scored on the
  test split, as the sweep scores it.

For each it prints wall time, compile time (total, and what the sweep waited for: the
rest compiled in the background while earlier waves ran) and programs compiled, ms per
stitch step (training time / (stitches x steps)), the sweep's phases (compile, least squares, train,
evaluate), the FLOPs each JAX mode executed (XLA's cost analysis x calls) and the
achieved FLOP/s next to this machine's float32 matmul FLOP/s, and the ratios. Run as a
script, it sets the XLA CPU flag the jobs set (`fula_jax.cpu_flags`) unless XLA_FLAGS
names that option already.

  # the ResNet workload (two randomly initialised CIFAR ResNet-18 layouts at width 1/4,
  # stem + 8 block points = 81 cells, digits at 32x32x3, batch 64, 20 Adam steps per
  # stitch from the least-squares start), TLM then FuLA; about 14 minutes on 2 CPU cores
  # against the PyTorch loop alone, much longer with the JAX loop too:
  python experiments/bench_stitching.py --preset=resnet18 --loops=torch
  python experiments/bench_stitching.py --preset=resnet18
  # a realistic budget (200 steps per stitch; the sweep alone, about 15 minutes for TLM):
  python experiments/bench_stitching.py --preset=resnet18 --objectives=tlm --steps=200 \
      --loops=none
  # small MLPs, all four objectives, about 2 minutes:
  python experiments/bench_stitching.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fula_jax import cpu_flags, models, sharding, stitching  # noqa: E402
from fula_jax.data import Split, transforms  # noqa: E402
from fula_jax.stitching import testing  # noqa: E402

SMALL = {
    "mlp8x32": ("mlp", {"widths": (32,) * 8}),
    "mlp8x24": ("mlp", {"widths": (24,) * 8}),
    "resnet18": ("resnet18", {"width_multiplier": 0.25}),
    "resnet20": ("resnet20", {"width_multiplier": 0.25}),
    "vit": ("vit", {"patch": 2, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}),
    "cnn": ("cnn", {"widths": (8, 16, 16)}),
}
PRESETS = {
    "mlp": dict(model_a="mlp8x32", model_b="mlp8x24", objectives="tlm,slm,dm,fula",
                steps=400, batch_size=128, image_size=8, loops="jax"),
    "resnet18": dict(model_a="resnet18", model_b="resnet18", objectives="tlm,fula",
                     steps=20, batch_size=64, image_size=32, loops="jax,torch",
                     drop_last_point=True),
}


TINY = dict(preset="mlp", objectives="tlm", steps=3, batch_size=64, loops="jax",
            matmul_n=64, max_points=3)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="mlp", choices=sorted(PRESETS))
  p.add_argument("--model_a", help=f"one of {sorted(SMALL)}")
  p.add_argument("--model_b")
  p.add_argument("--objectives", help="comma separated; each is timed on its own")
  p.add_argument("--steps", type=int, help="training steps per stitch")
  p.add_argument("--batch_size", type=int)
  p.add_argument("--loops", help="baselines to time: jax, torch, both ('jax,torch'), none")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--max_points", type=int, default=0,
                 help="> 0: only the first N points of each model (a smoke run)")
  p.add_argument("--tiny", action="store_true",
                 help="seconds: TLM only, 3 steps, 3 x 3 cells, the JAX loop (a check "
                      "that it runs; its ratios mean nothing)")
  if p.parse_known_args(argv)[0].tiny:
    p.set_defaults(**TINY)  # flags given explicitly still win
  args = p.parse_args(argv)
  for k, v in PRESETS[args.preset].items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  return args


def matmul_flops_per_s(n: int, reps: int = 5) -> float:
  """Float32 FLOP/s of a jitted n x n matmul on the default device (best of reps)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def data(image_size: int):
  train, test = testing.digits_splits(1400, 359)
  if image_size == 8:
    return train, test

  def up(s):
    im = transforms.to_channels(transforms.resize(s.images, image_size), 3)
    return Split(np.ascontiguousarray(im, np.float32), s.labels, 10,
                 f"{s.name}@{image_size}")
  return up(train), up(test)


def donor(preset: str, seed: int, input_shape):
  name, kwargs = SMALL[preset]
  model = models.get_model(name, num_classes=10, **kwargs)
  return model, models.init(model, jax.random.PRNGKey(seed), input_shape)


def time_jax(label, a, b, train, test, cfg):
  profile: dict = {}
  mesh = sharding.line_mesh("devices", sharding.devices(1))
  t0 = time.perf_counter()
  res = stitching.run_sweep(*a, *b, train, test, cfg, mesh=mesh, profile=profile)
  wall = time.perf_counter() - t0
  st = res.stats
  n = st["stitches_computed"]
  train_s = st["phase_seconds"].get("train", 0.0)
  out = {"wall_s": wall, "compile_s": st["compile_seconds_blocking"],
         "compile_total_s": st["compile_seconds"],
         "programs": st["programs_compiled"], "stitches": n,
         "phases_s": st["phase_seconds"],
         "ms_per_stitch_step": 1e3 * train_s / max(n * res.meta["steps"], 1),
         "flops": stitching.program_flops(profile)}
  out["flops_per_s_run"] = out["flops"] / max(wall - out["compile_s"], 1e-9)
  print(f"  {label}: {wall:.1f} s wall; {out['programs']} programs compiled in "
        f"{out['compile_total_s']:.1f} s, of which the sweep waited "
        f"{out['compile_s']:.1f} s ({100 * out['compile_s'] / wall:.0f}% of the wall; the "
        "rest ran in parallel threads or while earlier waves ran); "
        f"{out['ms_per_stitch_step']:.1f} ms per stitch step; phases "
        + ", ".join(f"{k} {v:.1f} s" for k, v in st["phase_seconds"].items()), flush=True)
  return res, out


def main(argv=None) -> dict:
  args = parse_args(argv)
  train, test = data(args.image_size)
  shape = (1,) + train.image_shape
  a = donor(args.model_a, 0, shape)
  b = donor(args.model_b, 1, shape)
  rows = list(a[0].point_names[:-1] if getattr(args, "drop_last_point", False)
              else a[0].point_names)
  cols = list(b[0].point_names[:-1] if getattr(args, "drop_last_point", False)
              else b[0].point_names)
  if args.max_points > 0:
    rows, cols = rows[:args.max_points], cols[:args.max_points]
  loops = [x for x in args.loops.split(",") if x and x != "none"]
  print(f"devices: {jax.devices()}; {args.model_a} -> {args.model_b}, {len(rows)} x "
        f"{len(cols)} cells, {args.steps} steps of batch {args.batch_size}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  peak = matmul_flops_per_s(args.matmul_n)
  print(f"matmul {args.matmul_n}^2 float32: {peak / 1e9:.1f} GFLOP/s", flush=True)
  report = {"matmul_flops_per_s": peak, "objectives": {}}
  for obj in args.objectives.split(","):
    print(f"\n== {obj}", flush=True)
    cfg = dict(objectives=[obj], rows=rows, cols=cols, steps=args.steps,
               batch_size=args.batch_size, progress=False, compilation_cache="off",
               max_stitches_per_wave=4096, baselines=False)  # the loops have none
    res, sweep = time_jax("sweep (one program per end point, shared donors)", a, b,
                          train, test, cfg)
    entry = {"sweep": sweep}
    if "jax" in loops:
      loop_cfg = dict(cfg, grouping="single", max_group_size=1, max_stitches_per_wave=1)
      res_loop, loop = time_jax("loop  (one stitch at a time, donors per stitch)", a, b,
                                train, test, loop_cfg)
      diff = float(np.nanmax(np.abs(res.values[obj]["loss"] -
                                    res_loop.values[obj]["loss"])))
      print(f"  largest |test loss difference| sweep vs loop: {diff:.1e}; loop did "
            f"{loop['flops'] / max(sweep['flops'], 1):.2f}x the sweep's FLOPs")
      entry.update(loop=loop, max_abs_diff=diff,
                   ratio_wall=loop["wall_s"] / sweep["wall_s"])
      print(f"  sweep vs JAX loop: {entry['ratio_wall']:.2f}x faster wall clock")
    if "torch" in loops and args.model_a.startswith("resnet"):
      try:
        from experiments import torch_loop
      except ImportError as e:
        print(f"  torch loop skipped: {e}")
      else:
        name, kwargs = SMALL[args.model_a]
        widths = [max(1, round(w * kwargs["width_multiplier"])) for w in
                  models.get_model(name).widths]
        t = torch_loop.run(train.images, train.labels, obj, widths=widths,
                           stage_sizes=models.get_model(name).stage_sizes, rows=rows,
                           cols=cols, steps=args.steps, batch=args.batch_size,
                           eval_images=test.images, eval_labels=test.labels,
                           init=res.meta["settings"]["init"])  # the sweep's start
        entry["torch"] = dict(t, accuracy=t["accuracy"].tolist(),
                              eval_loss=t["eval_loss"].tolist())
        entry["ratio_torch"] = t["seconds"] / sweep["wall_s"]
        print(f"  torch loop (NCHW, donors per step, each stitch scored on the "
              f"{len(test.labels)} test images): {t['seconds']:.1f} s, of which "
              f"least-squares starts {t['init_seconds']:.1f} s, evaluating "
              f"{t['eval_seconds']:.1f} s; {t['ms_per_stitch_step']:.1f} ms "
              f"per stitch step; the sweep took {1 / entry['ratio_torch']:.2f}x its time")
    print(f"  sweep executed {sweep['flops'] / 1e9:.0f} GFLOP: "
          f"{sweep['flops_per_s_run'] / 1e9:.1f} GFLOP/s outside compilation = "
          f"{100 * sweep['flops_per_s_run'] / peak:.0f}% of the measured matmul rate")
    report["objectives"][obj] = entry
  print(json.dumps(report, default=float))
  return report


if __name__ == "__main__":
  cpu_flags.set_for_jobs()  # as the stitch job runs (see fula_jax.cpu_flags)
  main()
