"""Benchmark: the stitching sweep engine vs a one-pair-at-a-time loop, same run.

Two randomly initialised models (by default two 8-layer MLPs of widths 32 and 24, so
every end point has a group of 8 same-shape fronts) and the embedded digits: the full
cross-layer matrix (every stitchable (front point, end point) cell, all requested
objectives) is computed twice with the same JAX code (:func:`fula_jax.stitching.run_sweep`):

* sweep: groups of same-shape stitches trained together under vmap, ONE donor pass
  per batch shared by every stitch of every objective (the default engine);
* loop: every stitch alone (``grouping='single'``, one stitch per unit and per wave),
  so both donors run again for every stitch and every batch.

Both times include compilation (programs are compiled once per shape in each mode, in
parallel threads); the ratio is also given without it. It prints the largest difference
between the two matrices, the FLOPs each mode executed (XLA cost analysis of every
compiled program x its calls), the sweep's achieved FLOP/s and this machine's float32
matmul FLOP/s (a timed large ``jnp.dot``) for scale.

  # default, about 2 minutes on 2 CPU cores:
  python experiments/bench_stitching.py
  # a ResNet-20 into a small ViT (conv maps resized onto token grids), 20 steps:
  python experiments/bench_stitching.py --model_a=resnet20 --model_b=vit --steps=20
  # other objectives:
  python experiments/bench_stitching.py --objectives=fula,dm

Measured on the 2-core CPU this project was built on (see the final report / README),
the wall-clock ratio is bounded by compilation (~0.4 s per program there): the sweep
compiles about half as many programs as the loop, in parallel threads.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import models
from fula_jax.stitching import engine, sweeper, testing

SMALL = {
    "mlp8x32": {"widths": (32,) * 8},
    "mlp8x24": {"widths": (24,) * 8},
    "resnet20": {"width_multiplier": 0.25},
    "resnet18": {"width_multiplier": 0.125},
    "vit": {"patch": 2, "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32},
    "cnn": {"widths": (8, 16, 16)},
    "mlp": {"widths": (32, 32, 32)},
    "vgg11": {"width_multiplier": 0.125},
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model_a", default="mlp8x32",
                 help="a registered model, or a preset of SMALL (mlp8x32, mlp8x24)")
  p.add_argument("--model_b", default="mlp8x24")
  p.add_argument("--kwargs_a", default=None, help="JSON model kwargs (default: small)")
  p.add_argument("--kwargs_b", default=None)
  p.add_argument("--objectives", default="tlm,slm,dm,fula")
  p.add_argument("--steps", type=int, default=400, help="training steps per stitch")
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--num_train", type=int, default=1024)
  p.add_argument("--num_test", type=int, default=256)
  p.add_argument("--skip_loop", action="store_true", help="time the sweep only")
  p.add_argument("--matmul_n", type=int, default=2048)
  return p.parse_args(argv)


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


def build(name: str, kwargs_json: str | None, seed: int, input_shape):
  kwargs = json.loads(kwargs_json) if kwargs_json else SMALL.get(name, {})
  registered = "mlp" if name.startswith("mlp") and name not in models.MODELS else name
  model = models.get_model(registered, num_classes=10, **kwargs)
  variables = jax.jit(lambda k: models.init(model, k, input_shape))(
      jax.random.PRNGKey(seed))
  return model, variables


def timed(label, fn):
  t0 = time.perf_counter()
  out = fn()
  dt = time.perf_counter() - t0
  print(f"{label}: {dt:.1f} s", flush=True)
  return out, dt


def main(argv=None) -> dict:
  args = parse_args(argv)
  train, test = testing.digits_splits(args.num_train, args.num_test)
  shape = (1,) + train.images.shape[1:]
  model_a, vars_a = build(args.model_a, args.kwargs_a, 0, shape)
  model_b, vars_b = build(args.model_b, args.kwargs_b, 1, shape)
  cfg = dict(objectives=args.objectives.split(","), steps=args.steps,
             batch_size=args.batch_size, eval_batch_size=args.batch_size,
             progress=False, max_stitches_per_wave=4096)
  mesh = engine.mesh_for(1)
  print(f"devices: {jax.devices()}", flush=True)
  peak = matmul_flops_per_s(args.matmul_n)
  print(f"matmul {args.matmul_n}^2 float32: {peak / 1e9:.1f} GFLOP/s", flush=True)

  prof_sweep: dict = {}
  res, t_sweep = timed("sweep (vmapped groups, shared donor passes)", lambda: (
      sweeper.run_sweep(model_a, vars_a, model_b, vars_b, train, test, cfg, mesh=mesh,
                        profile=prof_sweep)))
  n_cells = sum(int(np.isfinite(m["accuracy"]).sum()) for m in res.values.values())
  c_sweep = res.stats["compile_seconds"]
  print(f"  {n_cells} stitches ({len(res.rows)} x {len(res.cols)} points, "
        f"{len(res.values)} objectives), {res.stats['units_computed']} units, "
        f"{res.stats['programs_compiled']} programs compiled in {c_sweep:.1f} s",
        flush=True)
  out = {"sweep_s": t_sweep, "sweep_compile_s": c_sweep, "stitches": n_cells,
         "matmul_flops": peak}
  flops_sweep = sweeper.program_flops(prof_sweep)
  out["sweep_flops"] = flops_sweep
  if not args.skip_loop:
    prof_loop: dict = {}
    loop_cfg = dict(cfg, grouping="single", max_group_size=1, max_stitches_per_wave=1)
    res_loop, t_loop = timed("loop (one stitch at a time, donors per stitch)", lambda: (
        sweeper.run_sweep(model_a, vars_a, model_b, vars_b, train, test, loop_cfg,
                          mesh=mesh, profile=prof_loop)))
    def max_diff(objs, measure):
      return max([float(np.nanmax(np.abs(res.values[o][measure] -
                                         res_loop.values[o][measure])))
                  for o in objs] or [0.0])
    closed = [o for o in res.values if o == "dm"]
    trained = [o for o in res.values if o != "dm"]
    diff = max(max_diff(closed, "loss"), max_diff(closed, "dm_error"))
    diff_trained = max_diff(trained, "loss")
    print(f"  largest |difference| sweep vs loop: closed-form DM {diff:.1e}; trained "
          f"objectives' test loss {diff_trained:.1e} (float rounding, amplified over "
          f"{args.steps} Adam steps)")
    flops_loop = sweeper.program_flops(prof_loop)
    c_loop = res_loop.stats["compile_seconds"]
    print(f"  {res_loop.stats['units_computed']} units, "
          f"{res_loop.stats['programs_compiled']} programs compiled in {c_loop:.1f} s")
    steady = (t_loop - c_loop) / max(t_sweep - c_sweep, 1e-9)
    out.update(loop_s=t_loop, loop_compile_s=c_loop, ratio=t_loop / t_sweep,
               ratio_without_compile=steady, max_abs_diff_dm=diff,
               max_abs_diff_trained=diff_trained, loop_flops=flops_loop)
    print(f"speed-up sweep vs loop: {t_loop / t_sweep:.1f}x wall clock; "
          f"{steady:.1f}x without compilation")
    print(f"FLOPs executed: sweep {flops_sweep / 1e9:.1f} G, loop "
          f"{flops_loop / 1e9:.1f} G ({flops_loop / max(flops_sweep, 1):.1f}x)")
  rate = flops_sweep / t_sweep
  rate_run = flops_sweep / max(t_sweep - c_sweep, 1e-9)
  out.update(sweep_flops_per_s=rate, sweep_flops_per_s_without_compile=rate_run)
  print(f"sweep achieved {rate / 1e9:.2f} GFLOP/s over its wall time "
        f"({100 * rate / peak:.1f}% of the measured matmul rate), "
        f"{rate_run / 1e9:.2f} GFLOP/s without compilation "
        f"({100 * rate_run / peak:.1f}%)")
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
