"""Representation inversion and inverted-image CKA (Jones, Springer, Kenyon, Moore 2022).

For a reference model A and pairs (seed s, target t) with different labels, the input is
optimised from s until A's penultimate representation matches A's representation of t:

  loss(x) = ||rep(x) - rep(t)||_2 / ||rep(t)||_2            (per example)
  g = grad / ||grad||_2 (per example);  v <- momentum * v + g;
  x <- clip(x - lr * v, 0, 1)

with lr = 1/8, momentum 0.9 and 2000 steps by default, keeping each example's best
iterate. The inverted images carry A's "view" of t's class without t's pixels, which
removes the dataset confound from similarity. Then

  S(A, B) = linear CKA(rep_A(X_A), rep_B(X_A)),  X_A = images inverted with A,

an asymmetric model-by-model matrix with unit diagonal. The same (s, t) pairs are used
for every reference model (`make_pairs`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fula_jax import models as models_lib
from fula_jax import progress as progress_lib
from fula_jax import registry
from fula_jax.similarity import cka

RepFn = Callable[[Any, jax.Array], jax.Array]
_TINY = 1e-12


def default_inversion_config() -> ml_collections.ConfigDict:
  """Jones et al.'s settings. `point` None = the model's last stitch point ('pool')."""
  cfg = ml_collections.ConfigDict()
  cfg.steps = 2000
  cfg.step_size = 1 / 8
  cfg.momentum = 0.9
  cfg.point = ml_collections.config_dict.placeholder(str)
  cfg.batch_size = 256  # examples inverted per compiled call; memory, not results.
  cfg.eval_batch_size = 512  # examples per forward pass when taking activations.
  cfg.progress = True
  return cfg


def _resolve(cfg: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  full = default_inversion_config()
  if cfg is not None:
    for k, v in dict(cfg).items():
      if k not in full:
        raise registry.unknown("inversion setting", k, full.keys())
      full[k] = v
  return full


def representation_point(model: models_lib.StagedModel, point: str | None = None
                         ) -> str:
  """The point whose activation is the representation: 'pool', else the last point."""
  names = model.point_names
  if point is None:
    return "pool" if "pool" in names else names[-1]
  if point not in names:
    raise registry.unknown(f"stitch point of {type(model).__name__}", point, names)
  return point


@dataclasses.dataclass(frozen=True)
class ModelRepresentation:
  """Hashable ``rep(variables, x) -> (B, d)``: a model's activation at `point`, flat.

  Hashable so that jitted inversion compiles once per (model, point) and takes the
  variables as an argument rather than baking them into the program.
  """

  model: models_lib.StagedModel
  point: str

  def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
    h = models_lib.forward(self.model, variables, x, end=self.point)
    return h.reshape(h.shape[0], -1).astype(jnp.float32)


def model_representation(model: models_lib.StagedModel, point: str | None = None
                         ) -> ModelRepresentation:
  return ModelRepresentation(model, representation_point(model, point))


def _safe_norm(v: jax.Array) -> jax.Array:
  """L2 norm over the last axis whose gradient at 0 is 0 rather than NaN."""
  sq = jnp.sum(v * v, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def representation_loss(rep: jax.Array, target_rep: jax.Array) -> jax.Array:
  """Per-example ||rep - target|| / ||target||."""
  return _safe_norm(rep - target_rep) / jnp.maximum(_safe_norm(target_rep), _TINY)


class Inversion(NamedTuple):
  images: np.ndarray          # (n, H, W, C) best iterate of each example, in [0, 1]
  loss: np.ndarray            # (n,) loss of the returned images
  initial_loss: np.ndarray    # (n,) loss of the seeds
  history: np.ndarray | None  # (steps + 1, n) loss of every iterate, if requested


@functools.partial(jax.jit,
                   static_argnames=("rep_fn", "steps", "return_history"))
def _invert_batch(rep_fn: RepFn, variables: Any, seeds: jax.Array,
                  targets: jax.Array, step_size: jax.Array, momentum: jax.Array, *,
                  steps: int, return_history: bool):
  target_rep = jax.lax.stop_gradient(rep_fn(variables, targets))

  def losses(x):
    return representation_loss(rep_fn(variables, x), target_rep)

  def loss_and_grad(x):
    loss, vjp = jax.vjp(losses, x)
    (g,) = vjp(jnp.ones_like(loss))
    return loss, g

  def per_example_norm(g):
    n = jnp.sqrt(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1))
    return n.reshape((-1,) + (1,) * (g.ndim - 1))

  def keep_best(best_x, best_loss, x, loss):
    better = loss < best_loss
    sel = better.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(sel, x, best_x), jnp.where(better, loss, best_loss)

  def body(carry, _):
    x, v, best_x, best_loss = carry
    loss, g = loss_and_grad(x)
    best_x, best_loss = keep_best(best_x, best_loss, x, loss)
    v = momentum * v + g / jnp.maximum(per_example_norm(g), _TINY)
    x = jnp.clip(x - step_size * v, 0.0, 1.0)
    return (x, v, best_x, best_loss), (loss if return_history else None)

  x0 = jnp.clip(seeds.astype(jnp.float32), 0.0, 1.0)
  init = (x0, jnp.zeros_like(x0), x0,
          jnp.full((x0.shape[0],), jnp.inf, jnp.float32))
  (x, _, best_x, best_loss), hist = jax.lax.scan(body, init, None, length=steps)
  last = losses(x)
  best_x, best_loss = keep_best(best_x, best_loss, x, last)
  initial = losses(x0)
  if return_history:
    hist = jnp.concatenate([hist, last[None]], axis=0)
  return best_x, best_loss, initial, hist


def _pad_rows(a: np.ndarray, size: int) -> np.ndarray:
  if a.shape[0] == size:
    return a
  pad = np.zeros((size - a.shape[0],) + a.shape[1:], a.dtype)
  return np.concatenate([a, pad], axis=0)


def invert(rep_fn: RepFn, variables: Any, seeds: jax.Array | np.ndarray,
           targets: jax.Array | np.ndarray,
           cfg: Mapping[str, Any] | None = None, *,
           return_history: bool = False) -> Inversion:
  """Images that start at `seeds` and whose representation matches the `targets`'.

  Args:
    rep_fn: hashable ``rep(variables, x) -> (B, d)``, e.g. `model_representation`.
    variables: the reference model's variables (passed to `rep_fn`).
    seeds: (n, H, W, C) start images in [0, 1].
    targets: (n, H, W, C) images whose representations are matched.
    cfg: overrides of `default_inversion_config()` (steps, step_size, momentum,
      batch_size; the examples are processed in padded chunks of batch_size).
    return_history: also return the loss of every iterate, (steps + 1, n); row 0 is the
      seed, the last row the final iterate.
  """
  cfg = _resolve(cfg)
  seeds, targets = np.asarray(seeds, np.float32), np.asarray(targets, np.float32)
  if seeds.shape != targets.shape:
    raise ValueError(f"seeds {seeds.shape} and targets {targets.shape} differ in shape.")
  n = seeds.shape[0]
  bs = max(1, min(int(cfg.batch_size or n), n))
  parts = []
  for start in range(0, n, bs):
    rows = min(bs, n - start)
    out = _invert_batch(
        rep_fn, variables, _pad_rows(seeds[start:start + rows], bs),
        _pad_rows(targets[start:start + rows], bs), jnp.float32(cfg.step_size),
        jnp.float32(cfg.momentum), steps=int(cfg.steps),
        return_history=return_history)
    images, loss, initial, hist = jax.device_get(out)
    parts.append((images[:rows], loss[:rows], initial[:rows],
                  None if hist is None else hist[:, :rows]))
  images, loss, initial = (np.concatenate([p[i] for p in parts], 0) for i in range(3))
  history = (np.concatenate([p[3] for p in parts], 1) if return_history else None)
  return Inversion(images, loss, initial, history)


def make_pairs(labels: np.ndarray | Sequence[int], key: jax.Array, n: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """`n` (seed, target) index pairs with different labels, determined by `key`.

  Seeds are drawn without replacement while possible (with replacement beyond
  len(labels)); each target is drawn uniformly among the examples of other classes.
  """
  labels = np.asarray(labels)
  if np.unique(labels).size < 2:
    raise ValueError("make_pairs needs at least two classes.")
  k_seed, k_target = jax.random.split(key)
  m = labels.shape[0]
  if n <= m:
    seed_idx = np.asarray(jax.random.permutation(k_seed, m))[:n]
  else:
    seed_idx = np.asarray(jax.random.randint(k_seed, (n,), 0, m))
  u = np.asarray(jax.random.uniform(k_target, (n,)), np.float64)
  order = np.argsort(labels, kind="stable")
  sorted_labels = labels[order]
  classes, starts, counts = np.unique(sorted_labels, return_index=True,
                                      return_counts=True)
  target_idx = np.empty(n, np.int64)
  for i, s in enumerate(seed_idx):
    c = np.searchsorted(classes, labels[s])
    # The j-th position of `order` outside the seed's class block.
    others = m - counts[c]
    j = min(int(u[i] * others), others - 1)
    pos = j if j < starts[c] else j + counts[c]
    target_idx[i] = order[pos]
  return seed_idx.astype(np.int64), target_idx


def activations(rep_fn: RepFn, variables: Any, images: np.ndarray, *,
                batch_size: int = 512) -> np.ndarray:
  """`rep_fn` on every image, in padded batches of `batch_size`: (n, d) float32.
  `images` may be a batch source, streamed (only the activations are held)."""
  if hasattr(images, "eval_batches"):
    outs = [np.asarray(_apply_rep(rep_fn, variables, b["image"]))[b["mask"] > 0]
            for b in images.eval_batches(batch_size)]
    return np.concatenate(outs, axis=0)
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  bs = max(1, min(batch_size, n))
  outs = [np.asarray(_apply_rep(rep_fn, variables, _pad_rows(images[i:i + bs], bs)))
          [:min(bs, n - i)] for i in range(0, n, bs)]
  return np.concatenate(outs, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _apply_rep(rep_fn: RepFn, variables: Any, x: jax.Array) -> jax.Array:
  return rep_fn(variables, x)


ModelSpec = tuple[models_lib.StagedModel, Any]


def inverted_cka_matrix(models: Mapping[str, ModelSpec], images: np.ndarray,
                        labels: np.ndarray, pairs: tuple[np.ndarray, np.ndarray],
                        cfg: Mapping[str, Any] | None = None, *,
                        return_inversions: bool = False):
  """Jones et al.'s matrix: S[a, b] = CKA of a's and b's reps on a's inverted images.

  Args:
    models: name -> (model, variables); row and column order follow this mapping.
    images: (N, H, W, C) pool the pairs index into, in [0, 1], or a batch source
      (only the pairs' images are read).
    labels: (N,) labels of `images`; checked against the pairs (seed and target differ).
    pairs: (seed_idx, target_idx) from `make_pairs`, reused for every reference model.
    cfg: overrides of `default_inversion_config()`.
    return_inversions: also return {name: Inversion} for the reference models.

  Returns:
    (S, names), or (S, names, inversions); S is (M, M), rows = reference model.
  """
  cfg = _resolve(cfg)
  names = list(models)
  seed_idx, target_idx = (np.asarray(p) for p in pairs)
  labels = np.asarray(labels)
  if np.any(labels[seed_idx] == labels[target_idx]):
    raise ValueError("Every (seed, target) pair must have different labels.")
  if hasattr(images, "gather"):
    seeds, targets = images.gather(seed_idx)[0], images.gather(target_idx)[0]
  else:
    images = np.asarray(images, np.float32)
    seeds, targets = images[seed_idx], images[target_idx]
  reps = {name: model_representation(m, cfg.point) for name, (m, _) in models.items()}
  s = np.full((len(names), len(names)), np.nan, np.float64)
  inversions = {}
  bar = progress_lib.Progress("inverted-image CKA", len(names), unit="model",
                              every_s=0.0, enabled=bool(cfg.progress))
  for a, name_a in enumerate(names):
    inv = invert(reps[name_a], models[name_a][1], seeds, targets, cfg)
    inversions[name_a] = inv
    acts = {name_b: activations(reps[name_b], models[name_b][1], inv.images,
                                batch_size=int(cfg.eval_batch_size))
            for name_b in names}
    for b, name_b in enumerate(names):
      s[a, b] = float(cka.cka_linear(acts[name_a], acts[name_b]))
    bar.update(a + 1, extra=(
        f"{name_a}: rep loss {float(np.mean(inv.initial_loss)):.3f} -> "
        f"{float(np.mean(inv.loss)):.3f}"))
  return (s, names, inversions) if return_inversions else (s, names)


def natural_cka_matrix(models: Mapping[str, ModelSpec], images: np.ndarray,
                       cfg: Mapping[str, Any] | None = None
                       ) -> tuple[np.ndarray, list[str]]:
  """Plain linear CKA of every pair of models' representations on natural images."""
  cfg = _resolve(cfg)
  names = list(models)
  acts = {name: activations(model_representation(m, cfg.point), v, images,
                            batch_size=int(cfg.eval_batch_size))
          for name, (m, v) in models.items()}
  s = np.full((len(names), len(names)), np.nan, np.float64)
  for a, name_a in enumerate(names):
    for b, name_b in enumerate(names):
      s[a, b] = float(cka.cka_linear(acts[name_a], acts[name_b]))
  return s, names
