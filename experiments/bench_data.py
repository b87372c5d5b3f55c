"""Benchmark: streamed data keeps host memory flat in the dataset size, and the loader
keeps up with the models.

It writes a `folder:` dataset of 64x64 PNG images (10 classes) at two sizes, then, for
each size and in a fresh process each, so every peak RSS is its own:

* the similarity job's computation (`similarity.matrices`, debiased minibatch CKA of the
  quickstart's two models over every stitch point) on the whole training split;
* a small stitching sweep (DM and 20 TLM steps, 2 x 2 cells) on the same split;
* the loader alone: images per second decoded, resized to the models' 32x32 input and
  batched, next to the images per second of the two models' forward passes; once with
  decoding threads in this process and once per `--num_workers` count of grain worker
  processes (`data.num_workers`), which escape the GIL at a start-up cost.

The large size is also read into memory (`data.in_memory=True`) once, for contrast.
It prints each run's peak RSS and time, the RSS growth from the small to the large
dataset, and the loader/forward throughput ratio.

  # default, ~10 minutes on 2 CPU cores (of which ~2 writing 34,000 PNGs once):
  python experiments/bench_data.py
  # quicker look:
  python experiments/bench_data.py --sizes=1000,8000
  # seconds, a check that it runs:
  python experiments/bench_data.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

_REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
SIDE = 64


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="2000,32000",
                 help="training-split sizes (images), comma separated; the test split "
                      "holds one eighth as many")
  p.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                  "fula_jax_bench_data"),
                 help="where the image folders are written (kept for reruns)")
  p.add_argument("--image_size", type=int, default=32, help="model input side")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--num_threads", type=int, default=4, help="decoding threads")
  p.add_argument("--num_workers", default="0,2",
                 help="loader decoding processes to measure, comma separated (0: threads "
                      "of the main process only)")
  p.add_argument("--throughput_only", action="store_true",
                 help="only the loader vs forward throughput, on the largest size")
  p.add_argument("--skip_in_memory", action="store_true",
                 help="do not load the large dataset into memory for contrast")
  p.add_argument("--tiny", action="store_true",
                 help="seconds: the loader against the models' forward pass on 64 "
                      "images, no worker processes (a check that it runs)")
  p.add_argument("--window_s", type=float, default=5.0,
                 help="seconds each model's forward pass is timed over")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--root", default=None, help=argparse.SUPPRESS)
  p.add_argument("--in_memory", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.tiny:
    args.sizes, args.num_workers, args.throughput_only = "64", "0", True
    args.batch_size, args.window_s = min(args.batch_size, 32), 0.5
  return args


def write_folder(root: pathlib.Path, n_train: int) -> None:
  """Class-dependent smooth patterns plus noise, as PNGs; skipped when already there."""
  from PIL import Image
  done = root / "COMPLETE"
  if done.exists():
    return
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
  t0 = time.perf_counter()
  for split, n in (("train", n_train), ("test", max(NUM_CLASSES, n_train // 8))):
    for c in range(NUM_CLASSES):
      (root / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
      c = i % NUM_CLASSES
      base = np.stack([np.sin(2 * np.pi * ((c + 1) * xx + k * yy)) for k in range(3)], -1)
      img = 0.5 + 0.35 * base + 0.15 * rng.standard_normal((SIDE, SIDE, 3))
      Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255)).save(
          root / split / f"class_{c:02d}" / f"{i:06d}.png")
  done.write_text("ok")
  print(f"wrote {root} ({n_train} training images) in {time.perf_counter() - t0:.0f} s",
        flush=True)


def _models(image_size: int):
  import jax
  from fula_jax import defaults, models
  out = []
  for seed, name in enumerate(("cnn", "resnet20")):
    cfg = defaults.load_config(_REPO / "configs" / "train.py", f"model={name},runlocal")
    m = models.get_model(name, num_classes=NUM_CLASSES, **cfg.model.kwargs.to_dict())
    v = models.init(m, jax.random.PRNGKey(seed), (1, image_size, image_size, 3))
    out += [m, v]
  return out


def child(args) -> dict:
  """One measured run in this process; returns its figures and this process's peak RSS."""
  import jax
  from fula_jax import data, models, similarity, stitching
  cfg = dict(name=f"folder:{args.root}", image_size=args.image_size, channels=3,
             num_threads=args.num_threads, num_workers=int(args.num_workers),
             in_memory=args.in_memory)
  t0 = time.perf_counter()
  train = data.source(cfg, "train")
  out: dict = {"n": len(train)}
  if args.child == "loader":
    out["listing_s"] = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for batch in train.eval_batches(args.batch_size):
      n += int(batch["mask"].sum())
    out["images_per_s"] = n / (time.perf_counter() - t1)
  elif args.child == "forward":
    ma, va, mb, vb = _models(args.image_size)
    x = np.random.default_rng(0).uniform(
        size=(args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)
    for m, v, key in ((ma, va, "cnn"), (mb, vb, "resnet20")):
      f = jax.jit(lambda x, m=m, v=v: models.forward(m, v, x))
      jax.block_until_ready(f(x))
      reps, t = 0, time.perf_counter()
      while time.perf_counter() - t < args.window_s:
        jax.block_until_ready(f(x))
        reps += 1
      out[f"{key}_images_per_s"] = reps * args.batch_size / (time.perf_counter() - t)
  elif args.child == "similarity":
    ma, va, mb, vb = _models(args.image_size)
    mats = similarity.matrices(ma, va, mb, vb, train, ("cka_linear_debiased",),
                               batch_size=args.batch_size, progress=False)
    out["finite"] = bool(np.isfinite(mats["cka_linear_debiased"].matrix).all())
  elif args.child == "stitch":
    ma, va, mb, vb = _models(args.image_size)
    test = data.source(cfg, "test")
    res = stitching.sweep(ma, va, mb, vb, train, test, dict(
        objectives=["dm", "tlm"], rows=list(ma.point_names)[:2],
        cols=list(mb.point_names)[:2], steps=20, batch_size=64, eval_batch_size=256,
        progress=False))
    out["cells"] = int(sum(np.isfinite(m.matrix).sum() for m in res.values()))
  out["seconds"] = time.perf_counter() - t0
  out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def run_child(args, kind: str, root: pathlib.Path, in_memory: bool = False,
              num_workers: int = 0) -> dict:
  cmd = [sys.executable, __file__, f"--child={kind}", f"--root={root}",
         f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
         f"--num_threads={args.num_threads}", f"--num_workers={num_workers}",
         f"--window_s={args.window_s}"] + (["--in_memory"] if in_memory else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"{kind} on {root} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.child:
    print(json.dumps(child(args)))
    return
  sizes = [int(s) for s in args.sizes.split(",")]
  work = pathlib.Path(args.workdir)
  rows = []
  for n in sizes:
    root = work / f"images_{n}"
    write_folder(root, n)
    for kind in () if args.throughput_only else ("similarity", "stitch"):
      r = run_child(args, kind, root)
      rows.append((n, kind, "streamed", r))
      print(f"{n:>7} images  {kind:<10} streamed   peak RSS {r['peak_rss_mib']:7.0f} MiB  "
            f"{r['seconds']:6.1f} s", flush=True)
  if not (args.skip_in_memory or args.throughput_only):
    n = max(sizes)
    r = run_child(args, "similarity", work / f"images_{n}", in_memory=True)
    rows.append((n, "similarity", "in memory", r))
    print(f"{n:>7} images  similarity in memory  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
          f"{r['seconds']:6.1f} s  (float32 split: "
          f"{n * args.image_size ** 2 * 3 * 4 / 2**20:.0f} MiB at the model's input size)",
          flush=True)
  lo, hi = min(sizes), max(sizes)
  for kind in () if args.throughput_only else ("similarity", "stitch"):
    a, b = (next(r for m, k, how, r in rows if m == s and k == kind and how == "streamed")
            for s in (lo, hi))
    print(f"{kind}: peak RSS grows {b['peak_rss_mib'] - a['peak_rss_mib']:+.0f} MiB from "
          f"{lo} to {hi} images (target: under 300 MB)")
  forward = run_child(args, "forward", work / f"images_{hi}")
  slowest = min(forward["cnn_images_per_s"], forward["resnet20_images_per_s"])
  both = 1.0 / (1.0 / forward["cnn_images_per_s"] + 1.0 / forward["resnet20_images_per_s"])
  print(f"forward: cnn {forward['cnn_images_per_s']:.0f}, resnet20 "
        f"{forward['resnet20_images_per_s']:.0f}, both in turn {both:.0f} images/s")
  for workers in (int(w) for w in args.num_workers.split(",")):
    loader = run_child(args, "loader", work / f"images_{hi}", num_workers=workers)
    how = (f"{workers} worker processes x {args.num_threads} threads" if workers else
           f"{args.num_threads} threads")
    print(f"loader ({how}): {loader['images_per_s']:.0f} images/s over {loader['n']} "
          f"PNGs 64x64 -> {args.image_size}x{args.image_size} (listing the files took "
          f"{loader['listing_s']:.1f} s); / forward of both models: "
          f"{loader['images_per_s'] / both:.2f}x; / the slower model alone: "
          f"{loader['images_per_s'] / slowest:.2f}x (target: 2x)", flush=True)

if __name__ == "__main__":
  main()
