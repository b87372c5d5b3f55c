"""Projected gradient descent (PGD) attacks under L-inf and L2, jitted and batched.

`pgd` maximises the cross-entropy of any function ``apply_fn(images) -> logits`` (a
model, a stitched model, a model in a training step), so the same code serves adversarial
training, robust evaluation and the robust stitching studies. Images live in [0, 1]
(models standardise internally); every step projects the perturbation onto the eps-ball
around the clean image and clips the pixels to [0, 1].

Examples are independent: the loss that is differentiated is a sum of per-example losses,
so every example gets its own gradient (models run in inference mode, so nothing mixes
across the batch), and L2 steps and projections are per example.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from fula_jax import registry

ApplyFn = Callable[[jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

NORMS = ("linf", "l2")
_TINY = 1e-12


def default_attack_config() -> ml_collections.ConfigDict:
  """Madry et al.'s CIFAR-scale defaults: L-inf, eps 8/255, step 2/255.

  `steps` is used for adversarial training and `eval_steps` for robust evaluation
  (`robust_accuracy` and ``attack_kwargs(cfg, evaluation=True)``).
  """
  cfg = ml_collections.ConfigDict()
  cfg.norm = "linf"
  cfg.eps = 8 / 255
  cfg.step_size = 2 / 255
  cfg.steps = 10
  cfg.eval_steps = 20
  cfg.random_start = True
  return cfg


def check_norm(norm: str) -> str:
  if norm not in NORMS:
    raise registry.unknown("attack norm", norm, NORMS)
  return norm


def attack_kwargs(cfg: Mapping[str, Any], *, evaluation: bool = False
                  ) -> dict[str, Any]:
  """Keyword arguments of `pgd` from an attack config (eval_steps when evaluating)."""
  steps = cfg["steps"]
  if evaluation and cfg.get("eval_steps") is not None:
    steps = cfg["eval_steps"]
  return dict(eps=float(cfg["eps"]), step_size=float(cfg["step_size"]),
              steps=int(steps), norm=check_norm(cfg["norm"]),
              random_start=bool(cfg.get("random_start", True)))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def _per_example_norm(v: jax.Array) -> jax.Array:
  """L2 norm over all non-batch axes, shaped to broadcast against `v`."""
  flat = v.reshape(v.shape[0], -1)
  n = jnp.sqrt(jnp.sum(flat * flat, axis=1))
  return n.reshape((-1,) + (1,) * (v.ndim - 1))


def project(delta: jax.Array, eps: jax.Array | float, norm: str) -> jax.Array:
  """Nearest point of the eps-ball (per example) to the perturbation `delta`."""
  if check_norm(norm) == "linf":
    return jnp.clip(delta, -eps, eps)
  n = _per_example_norm(delta)
  return delta * jnp.minimum(1.0, eps / jnp.maximum(n, _TINY))


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  if norm == "linf":
    return jnp.sign(grad)
  return grad / jnp.maximum(_per_example_norm(grad), _TINY)


def _random_start(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """A uniform draw from the eps-ball (L-inf: the cube; L2: the ball's volume)."""
  if norm == "linf":
    return jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
  k_dir, k_rad = jax.random.split(key)
  direction = jax.random.normal(k_dir, x.shape, x.dtype)
  direction = direction / jnp.maximum(_per_example_norm(direction), _TINY)
  d = np.prod(x.shape[1:])
  radius = jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
  return direction * eps * radius ** (1.0 / d)


def random_starts(key: jax.Array, x: jax.Array, eps, norm: str,
                  index: jax.Array) -> jax.Array:
  """`_random_start` drawn example by example from ``fold_in(key, index[e])``: example
  e's draw depends on its index alone, not on how the batch is split over devices."""
  one = lambda i, xe: _random_start(jax.random.fold_in(key, i), xe[None], eps, norm)[0]
  return jax.vmap(one)(index, x)


def pgd(apply_fn: ApplyFn, x: jax.Array, y: jax.Array, key: jax.Array | None, *,
        eps: float | jax.Array, step_size: float | jax.Array, steps: int,
        norm: str = "linf", random_start: bool = True,
        loss_fn: LossFn = cross_entropy, start: jax.Array | None = None) -> jax.Array:
  """Adversarial examples maximising ``loss_fn(apply_fn(x_adv), y)`` within the eps-ball.

  Args:
    apply_fn: images (B, ...) in [0, 1] -> logits (B, K). Any model or stitched model.
    x: clean images in [0, 1].
    y: integer labels (B,).
    key: PRNG key of the random start.
    eps: radius of the ball (L-inf or per-example L2); may be traced.
    step_size: L-inf: step along the gradient sign; L2: length of the
      normalised-gradient step. May be traced.
    steps: number of ascent steps (static under jit).
    norm: 'linf' or 'l2' (static).
    random_start: start from a uniform point of the ball (static).
    loss_fn: per-example loss ``(logits, labels) -> (B,)``; cross-entropy by default.
    start: a given initial perturbation (e.g. from `random_starts`) instead of the
      random start drawn from `key`.

  Returns:
    x_adv with ``x_adv - x`` inside the eps-ball and pixels in [0, 1]; ``x`` itself when
    eps = 0.
  """
  check_norm(norm)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  eps = jnp.asarray(eps, x.dtype)
  step_size = jnp.asarray(step_size, x.dtype)

  def to_ball(x_adv):
    return jnp.clip(x + project(x_adv - x, eps, norm), 0.0, 1.0)

  def total_loss(x_adv):
    return jnp.sum(loss_fn(apply_fn(x_adv), y))

  grad_fn = jax.grad(total_loss)

  def step(_, x_adv):
    g = grad_fn(x_adv)
    return to_ball(x_adv + step_size * _ascent_direction(g, norm))

  x_adv = x
  if start is not None:
    x_adv = to_ball(x + start)
  elif random_start:
    x_adv = to_ball(x + _random_start(key, x, eps, norm))
  x_adv = jax.lax.fori_loop(0, steps, step, x_adv)
  return jax.lax.stop_gradient(x_adv)


def make_attack(apply_fn: ApplyFn, cfg: Mapping[str, Any], *,
                evaluation: bool = False) -> Callable[..., jax.Array]:
  """A jitted ``attack(x, y, key) -> x_adv`` with the settings of an attack config."""
  kwargs = attack_kwargs(cfg, evaluation=evaluation)
  return jax.jit(lambda x, y, key: pgd(apply_fn, x, y, key, **kwargs))


def _batch_sums(logits_of: ApplyFn, x, y, mask, k, attack: Mapping[str, Any]) -> dict:
  """One batch's clean and PGD sums (correct, loss, count) of `logits_of`."""
  x_adv = pgd(logits_of, x, y, k, **attack)
  out = {}
  for name, images in (("clean", x), ("adv", x_adv)):
    logits = logits_of(images)
    out[f"{name}_correct"] = jnp.sum((jnp.argmax(logits, -1) == y) * mask)
    out[f"{name}_loss"] = jnp.sum(cross_entropy(logits, y) * mask)
  out["n"] = jnp.sum(mask)
  return out


@functools.partial(jax.jit, static_argnames=("apply_fn", "attack"))
def _batch_sums_of(params, x, y, mask, k, *, apply_fn, attack: tuple) -> dict:
  """:func:`_batch_sums` of ``apply_fn(params, images)``: one program per (apply_fn,
  attack settings, shapes), whatever the weights."""
  return _batch_sums(lambda images: apply_fn(params, images), x, y, mask, k, dict(attack))


def robust_accuracy(apply_fn: Callable, batches: Iterable[Mapping[str, Any]],
                    key: jax.Array, attack_cfg: Mapping[str, Any] | None = None, *,
                    params: Any = None) -> dict[str, float]:
  """Clean and PGD accuracy (and loss) of any images -> logits function.

  `batches` yield 'image', 'label' and optionally 'mask' (1 for real rows, 0 for
  padding; padded rows never count). With several processes, each passes its own
  slice (`data.eval_batches(..., process_index=...)`) and the totals are summed over
  processes, so every process gets the global numbers. Batch i is attacked with
  ``fold_in(key, i)``. The attack uses ``attack_cfg.eval_steps`` (or ``steps`` when
  absent); None means `default_attack_config()`.

  With `params`, the function is ``apply_fn(params, images)`` and `apply_fn` is
  hashable (e.g. ``models.Forward(model)``): its program is compiled once and reused
  for every set of weights, where a closure over the weights compiles anew per call.

  Returns:
    {'accuracy', 'robust_accuracy', 'loss', 'robust_loss', 'num_examples'}.
  """
  cfg = default_attack_config() if attack_cfg is None else attack_cfg
  kwargs = attack_kwargs(cfg, evaluation=True)
  if params is None:
    evaluate = jax.jit(lambda x, y, mask, k: _batch_sums(apply_fn, x, y, mask, k, kwargs))
  else:
    # On this process's first device, as a closure's weights would be: each process
    # attacks its own slice of the data.
    params = jax.device_put(jax.tree_util.tree_map(np.asarray, params),
                            jax.local_devices()[0])
    evaluate = functools.partial(_batch_sums_of, params, apply_fn=apply_fn,
                                 attack=tuple(sorted(kwargs.items())))

  totals: dict[str, float] = {}
  for i, batch in enumerate(batches):
    x = jnp.asarray(batch["image"], jnp.float32)
    y = jnp.asarray(batch["label"], jnp.int32)
    mask = batch.get("mask")
    mask = (jnp.ones(y.shape, jnp.float32) if mask is None
            else jnp.asarray(mask, jnp.float32))
    stats = jax.device_get(evaluate(x, y, mask, jax.random.fold_in(key, i)))
    for k, v in stats.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  if jax.process_count() > 1:  # each process saw its own slice of the data.
    keys = sorted(totals)
    summed = multihost_utils.process_allgather(
        np.array([totals[k] for k in keys], np.float64)).sum(axis=0)
    totals = dict(zip(keys, summed.tolist()))
  n = totals.get("n", 0.0)
  if n == 0:
    raise ValueError("robust_accuracy got no (unmasked) examples.")
  return {"accuracy": totals["clean_correct"] / n,
          "robust_accuracy": totals["adv_correct"] / n,
          "loss": totals["clean_loss"] / n,
          "robust_loss": totals["adv_loss"] / n,
          "num_examples": int(n)}
