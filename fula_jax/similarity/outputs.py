"""Output measures: do two models (or a stitched model and its end model) make the same
predictions? Each takes two (n, classes) logit arrays on the same examples.

* ``disagreement``: the fraction of examples whose top-1 classes differ (ReSi).
* ``jsd``: the mean Jensen-Shannon divergence of the two softmax distributions, in bits
  (so in [0, 1]; 0 = identical predictive distributions).
* ``error_consistency`` (Geirhos, Meding & Wichmann 2020): Cohen's kappa of the two
  models' correct/wrong patterns, (c_obs - c_exp) / (1 - c_exp), with c_obs the
  fraction of examples both get right or both get wrong and c_exp = p_a p_b +
  (1 - p_a)(1 - p_b) from their accuracies. 1 = the same errors, 0 = as many shared
  errors as independent models with these accuracies make; needs labels.

All are O(n classes).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import registry


@dataclasses.dataclass(frozen=True)
class OutputMeasure:
  name: str
  kind: str                  # 'similarity' or 'distance'
  needs_labels: bool
  description: str
  fn: Callable[..., jax.Array]


def disagreement(logits_a: jax.Array, logits_b: jax.Array, labels=None) -> jax.Array:
  return jnp.mean(jnp.argmax(logits_a, -1) != jnp.argmax(logits_b, -1))


def jsd_per_example(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """(n,) Jensen-Shannon divergence of each example's two softmax outputs, in bits."""
  lp = jax.nn.log_softmax(logits_a.astype(jnp.float32), -1)
  lq = jax.nn.log_softmax(logits_b.astype(jnp.float32), -1)
  p, q = jnp.exp(lp), jnp.exp(lq)
  lm = jnp.log(0.5 * (p + q))
  kl = lambda a, la: jnp.sum(jnp.where(a > 0, a * (la - lm), 0.0), axis=-1)
  return 0.5 * (kl(p, lp) + kl(q, lq)) / jnp.log(2.0)


def jsd(logits_a: jax.Array, logits_b: jax.Array, labels=None) -> jax.Array:
  return jnp.mean(jsd_per_example(logits_a, logits_b))


def kappa(observed, acc_a, acc_b):
  """Error consistency from the fraction of equal correct/wrong outcomes and the two
  accuracies (NaN when both models are always right or always wrong)."""
  expected = acc_a * acc_b + (1.0 - acc_a) * (1.0 - acc_b)
  return (observed - expected) / (1.0 - expected)


def error_consistency(logits_a: jax.Array, logits_b: jax.Array,
                      labels: jax.Array) -> jax.Array:
  ra = jnp.argmax(logits_a, -1) == labels
  rb = jnp.argmax(logits_b, -1) == labels
  return kappa(jnp.mean(ra == rb), jnp.mean(ra), jnp.mean(rb))


OUTPUT_MEASURES: dict[str, OutputMeasure] = {
    "disagreement": OutputMeasure(
        "disagreement", "distance", False,
        "Fraction of examples whose top-1 predictions differ.", disagreement),
    "jsd": OutputMeasure(
        "jsd", "distance", False,
        "Mean Jensen-Shannon divergence of the softmax outputs, in bits ([0, 1]).", jsd),
    "error_consistency": OutputMeasure(
        "error_consistency", "similarity", True,
        "Cohen's kappa of the correct/wrong patterns (Geirhos et al. 2020).",
        error_consistency),
}


def get(name: str) -> OutputMeasure:
  return registry.lookup("output measure", name, OUTPUT_MEASURES)


def compute(name: str, logits_a, logits_b, labels=None) -> float:
  """One output measure of two models' logits on the same examples."""
  m = get(name)
  a, b = np.asarray(logits_a, np.float32), np.asarray(logits_b, np.float32)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"{name}: both logits must be (n, classes) of one shape; got "
                     f"{a.shape} and {b.shape}.")
  if m.needs_labels:
    if labels is None:
      raise ValueError(f"{name} needs the labels of the examples.")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != a.shape[0]:
      raise ValueError(f"{name}: {labels.shape[0]} labels for {a.shape[0]} examples.")
  return float(m.fn(jnp.asarray(a), jnp.asarray(b), labels))
