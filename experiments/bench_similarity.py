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

Against PyTorch (when torch is installed; `--peer=off` skips it), forwards included:
the same L_A x L_B debiased minibatch CKA matrix of two randomly initialised CIFAR
ResNet-18s (width 64, stem + 8 blocks) on 4,096 digits upsampled to 32x32x3 in batches
of 256, computed by

* fula_jax: `similarity.matrices` (the call a Colab and the similarity job make);
* pytorch-cka (PyPI `pytorch-cka`, an optional benchmark dependency): ``compute_cka``
  with the same layers;
* a plain PyTorch loop: for every batch and every layer pair, both Grams and three HSIC
  values from scratch.

It reports each one's wall time, both frameworks' forward passes alone, our time beyond
the forwards (compilation, Grams, HSIC, capture) and compile time. Like with like:
pytorch-cka and fula_jax (through torchax) on the same torch weights give the same
matrix. Run as a script, it sets the XLA CPU flag the jobs set
(`fula_jax.cpu_flags`: with YNNPACK kept to matrix products, XLA beats PyTorch here) unless
XLA_FLAGS names that option already, and prints XLA_FLAGS. The peer section alone, at
the issue's workload:

  python experiments/bench_similarity.py --skip_kept
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fula_jax import cpu_flags, models  # noqa: E402
from fula_jax.similarity import cka  # noqa: E402
from fula_jax.similarity import minibatch  # noqa: E402


TINY = dict(model="cnn", width_multiplier=1.0, num_examples=96, batch_size=32,
            image_size=8, channels=1, peer_examples=64, peer_batch=32, peer_width=8,
            peer_image_size=16)


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
  p.add_argument("--skip_kept", action="store_true",
                 help="skip the engine vs per-pair loop on kept activations")
  p.add_argument("--peer", choices=("auto", "off"), default="auto",
                 help="auto: compare with pytorch-cka and a PyTorch loop when torch is "
                      "installed (pytorch-cka: pip install pytorch-cka)")
  p.add_argument("--peer_examples", type=int, default=4096)
  p.add_argument("--peer_batch", type=int, default=256)
  p.add_argument("--peer_width", type=int, default=64, help="ResNet-18 base width")
  p.add_argument("--peer_image_size", type=int, default=32)
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
  print(f"devices: {jax.devices()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  out = {} if args.skip_kept else kept(args)
  if args.peer != "off":
    import importlib.util
    if importlib.util.find_spec("torch") is None:
      print("against PyTorch: skipped (torch is not installed)")
      return out
    out["peer"] = against_pytorch(args)
  return out


def kept(args) -> dict:
  """The streaming engine vs a per-pair loop, on activations captured once and kept."""
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


# ----------------------------------------------------------------------------
# Against PyTorch: pytorch-cka and a plain loop, forwards included
# ----------------------------------------------------------------------------


def digits_32(n: int, size: int) -> np.ndarray:
  """`n` embedded digits (cycled), nearest-upsampled to size x size x 3, in [0, 1]."""
  from fula_jax.data import digits
  images = digits.raw()[0]
  images = np.resize(images, (n, *images.shape[1:]))
  scale = -(-size // images.shape[1])
  big = images.repeat(scale, axis=1).repeat(scale, axis=2)[:, :size, :size]
  return np.ascontiguousarray(np.repeat(big, 3, axis=3), np.float32)


def torch_resnet18(width: int, seed: int):
  """The CIFAR ResNet-18 layout of the zoo's `resnet18` in PyTorch (the stitching
  benchmark's, `torch_loop.build`) as one module: children '0' (the stem) to '8' (the
  last block), then the pooling and the head."""
  import torch
  from torch import nn

  from experiments import torch_loop
  torch.manual_seed(seed)
  stages, head, _ = torch_loop.build([width, 2 * width, 4 * width, 8 * width],
                                     [2, 2, 2, 2])
  return nn.Sequential(*stages, head).eval()


TORCH_POINTS = [str(k) for k in range(9)]  # the stem and the 8 blocks


def _torch_hsic(k, l):
  """Unbiased HSIC (Song et al. 2012) of two Gram matrices, in PyTorch."""
  import torch
  n = k.shape[0]
  k, l = k.clone(), l.clone()
  k.fill_diagonal_(0.0)
  l.fill_diagonal_(0.0)
  value = (torch.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
           - 2.0 * torch.sum(k.sum(0) * l.sum(0)) / (n - 2))
  return value / (n * (n - 3))


def _torch_features(net, x):
  feats = {}
  hooks = [net.get_submodule(p).register_forward_hook(
      lambda mod, inp, out, p=p: feats.__setitem__(p, out.flatten(1)))
           for p in TORCH_POINTS]
  net(x)
  for h in hooks:
    h.remove()
  return [feats[p] for p in TORCH_POINTS]


def _torch_loop(net_a, net_b, batches) -> np.ndarray:
  """The plain per-pair loop: every batch, every layer pair, Grams from scratch."""
  import torch
  la = lb = len(TORCH_POINTS)
  sums = torch.zeros(3, la, lb, dtype=torch.float64)
  with torch.inference_mode():
    for x in batches:
      fa, fb = _torch_features(net_a, x), _torch_features(net_b, x)
      for i in range(la):
        for j in range(lb):
          k, l = fa[i] @ fa[i].T, fb[j] @ fb[j].T
          sums[:, i, j] += torch.stack([_torch_hsic(k, l), _torch_hsic(k, k),
                                        _torch_hsic(l, l)]).double()
  return (sums[0] / torch.sqrt(sums[1] * sums[2])).numpy()


class _Loader:
  """Prepared batches as one data loader (a list would read as one loader per batch)."""

  def __init__(self, batches):
    self.batches = batches

  def __len__(self):
    return len(self.batches)

  def __iter__(self):
    return iter(self.batches)


def _timed(fn):
  t0 = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - t0


def against_pytorch(args) -> dict:
  """fula_jax vs pytorch-cka vs a plain PyTorch loop on the same work (see the module
  docstring); returns the times, ratios and the like-with-like difference."""
  import torch

  from fula_jax import sharding
  from fula_jax import similarity
  try:
    import cka as pytorch_cka
  except ImportError:
    pytorch_cka = None
    print("pytorch-cka is not installed (pip install pytorch-cka): timing fula_jax "
          "against the plain PyTorch loop only")
  n, bs, size, width = (args.peer_examples, args.peer_batch, args.peer_image_size,
                        args.peer_width)
  if n < bs or n % bs:
    raise SystemExit("--peer_examples must be a multiple of --peer_batch")
  images = digits_32(n, size)
  torch_batches = [torch.from_numpy(images[k:k + bs]).permute(0, 3, 1, 2).contiguous()
                   for k in range(0, n, bs)]
  print(f"\n== against PyTorch: ResNet-18 (CIFAR layout, width {width}) x 2, "
        f"{len(TORCH_POINTS)} points each, {n} digits at {size}x{size}x3, batch {bs}, "
        f"debiased minibatch CKA, forwards included; torch threads "
        f"{torch.get_num_threads()}")
  ours_a = models.get_model("resnet18", width_multiplier=width / 64)
  ours_b = ours_a
  shape = (1, size, size, 3)
  va = models.init(ours_a, jax.random.PRNGKey(0), shape)
  vb = models.init(ours_b, jax.random.PRNGKey(1), shape)
  measure = ("cka_linear_debiased",)
  with sharding.count_compiles() as compiles:
    ours, t_ours = _timed(lambda: similarity.matrices(
        ours_a, va, ours_b, vb, images, measure, batch_size=bs,
        progress=False)["cka_linear_debiased"].matrix)
  print(f"fula_jax similarity.matrices: {t_ours:.1f} s ({compiles.compiled} programs "
        f"compiled in {compiles.seconds:.1f} s)")

  capture = jax.jit(lambda v, x: models.capture(ours_a, v, x)[1])
  block(capture(va, jnp.asarray(images[:bs])))  # compile once, not timed

  def our_forwards():
    for k in range(0, n, bs):
      x = jnp.asarray(images[k:k + bs])
      block((capture(va, x), capture(vb, x)))
  _, t_our_fwd = _timed(our_forwards)
  overhead = t_ours - t_our_fwd
  print(f"  its forward passes alone (both models, compiled): {t_our_fwd:.1f} s; "
        f"beyond them {overhead:.1f} s = {overhead / t_our_fwd:.0%} of the forwards")

  net_a, net_b = torch_resnet18(width, 0), torch_resnet18(width, 1)

  def torch_forwards():
    with torch.inference_mode():
      for x in torch_batches:
        net_a(x), net_b(x)
  _, t_torch_fwd = _timed(torch_forwards)
  print(f"PyTorch forward passes alone (both models): {t_torch_fwd:.1f} s")
  _, t_loop = _timed(lambda: _torch_loop(net_a, net_b, torch_batches))
  print(f"plain PyTorch per-pair loop: {t_loop:.1f} s")
  out = dict(ours_s=t_ours, ours_forward_s=t_our_fwd, ours_overhead_s=overhead,
             ours_overhead_fraction=overhead / t_our_fwd, compile_s=compiles.seconds,
             programs_compiled=compiles.compiled, torch_forward_s=t_torch_fwd,
             loop_s=t_loop, ours_vs_loop=t_ours / t_loop,
             finite=bool(np.isfinite(ours).all()))
  if pytorch_cka is None:
    return out
  _, t_peer = _timed(lambda: pytorch_cka.compute_cka(
      net_a, net_b, _Loader(torch_batches), layers=TORCH_POINTS, device="cpu",
      progress=False))
  print(f"pytorch-cka compute_cka: {t_peer:.1f} s")
  print(f"ratio fula_jax / pytorch-cka: {t_ours / t_peer:.2f}x; "
        f"fula_jax / plain loop: {t_ours / t_loop:.2f}x")

  # Like with like: the same torch weights through torchax in fula_jax, on a few
  # batches (pytorch-cka clamps to [0, 1]; so does the comparison).
  few = images[:min(n, 2 * bs)]
  peer_few = pytorch_cka.compute_cka(
      net_a, net_b, _Loader(torch_batches[:len(few) // bs]), layers=TORCH_POINTS,
      device="cpu", progress=False)[0].numpy()
  ta = models.from_torch(net_a, TORCH_POINTS, input_shape=(size, size, 3))
  tb = models.from_torch(net_b, TORCH_POINTS, input_shape=(size, size, 3))
  same = similarity.matrices(*ta, *tb, few, measure, batch_size=bs,
                             progress=False)["cka_linear_debiased"].matrix
  diff = float(np.max(np.abs(np.clip(same, 0.0, 1.0) - peer_few)))
  print(f"like with like (same torch weights, {len(few)} images): max |fula_jax - "
        f"pytorch-cka| = {diff:.1e}")
  out.update(peer_s=t_peer, ours_vs_peer=t_ours / t_peer, max_abs_diff_peer=diff)
  return out


if __name__ == "__main__":
  cpu_flags.set_for_jobs()  # as the jobs run (see fula_jax.cpu_flags)
  main()
