"""The four stitching objectives (TLM, SLM, DM, FuLA), looked up by name.

Notation: front model f, end model g (both frozen), stitch T, stitch point i of f and j
of g, ``z_j = T(f_{<=i}(x))`` and ``z_l = g_{(j,l]}(z_j)``.

  tlm   CE(h(x), y)                                  task loss on the stitched model
  slm   CE(softmax(g(x)/tau), h(x)/tau)              soft labels from g, tau = 1
  dm    ||z_j - g_{<=j}(x)||^2 per row               closed form (least squares with a
                                                     bias over every pixel/token row),
                                                     optional gradient refinement
  fula  sum_{l=j..k} C_l mean_b(||z_l - g_{<=l}(x)|| / ||g_{<=l}(x)||)

FuLA's defaults are C_l = 1, plain (non-squared) norms, per-example normalisation and
k = the last latent stitch point of g (never the logits; a pooled point counts). The
paper's exact constants are not public, so all four are switchable:
``fula.C`` (a scalar, a list over g's stitch points in order, or a {point: C} dict),
``fula.k``, ``fula.squared`` and ``fula.normalise`` ('example' | 'batch'). Per-batch
normalisation divides the Frobenius norm of the batch's error by that of the batch's
target, ``||Z_l - T_l||_F / ||T_l||_F``.

Each objective gives a training loss for one stitch on one batch, and per-example
sums on held-out data from which the dataset-level value is computed, so padded rows of
an evaluation batch never count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fula_jax import registry
from fula_jax.models.base import LOGITS

Shared = Mapping[str, Any]  # 'label' (B,), 'teacher' (B, K), 'targets' {point: (B, ...)}
NORMALISE = ("example", "batch")


class Where(NamedTuple):
  """Static context of a stitch: its end point j and the end model's points in order."""
  end: str
  points_b: tuple[str, ...]


def _flat(a: jax.Array) -> jax.Array:
  return a.reshape(a.shape[0], -1).astype(jnp.float32)


def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with a zero (not infinite) derivative at 0, so an exact match gives finite
  gradients."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def example_norms(z: jax.Array, t: jax.Array, squared: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """Per-example ||z - t|| and ||t|| (squared when asked), over all non-batch axes."""
  e = jnp.sum(jnp.square(_flat(z) - _flat(t)), axis=1)
  d = jnp.sum(jnp.square(_flat(t)), axis=1)
  return (e, d) if squared else (safe_sqrt(e), safe_sqrt(d))


def fula_loss(zs: Sequence[jax.Array], ts: Sequence[jax.Array],
              coefs: Sequence[float], *, squared: bool = False,
              normalise: str = "example", eps: float = 1e-8) -> jax.Array:
  """``sum_l C_l * mean_b(||z_l - t_l|| / ||t_l||)`` (or the per-batch form)."""
  if normalise not in NORMALISE:
    raise registry.unknown("FuLA normalisation", normalise, NORMALISE)
  total = jnp.zeros((), jnp.float32)
  for z, t, c in zip(zs, ts, coefs, strict=True):
    if normalise == "example":
      e, d = example_norms(z, t, squared)
      term = jnp.mean(e / (d + eps))
    else:
      e = jnp.sum(jnp.square(_flat(z) - _flat(t)))
      d = jnp.sum(jnp.square(_flat(t)))
      term = e / (d + eps) if squared else safe_sqrt(e) / (safe_sqrt(d) + eps)
    total = total + c * term
  return total


def soft_cross_entropy(logits: jax.Array, teacher: jax.Array, tau: float) -> jax.Array:
  """Per-example CE(softmax(teacher/tau), logits/tau)."""
  p = jax.nn.softmax(teacher.astype(jnp.float32) / tau, axis=-1)
  return -jnp.sum(p * jax.nn.log_softmax(logits.astype(jnp.float32) / tau, axis=-1),
                  axis=-1)


def _masked_sum(v: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(v * mask)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base: a training loss per stitch and held-out sums.

  `outs` maps every point of g from j up to `train_end` (and 'logits' when the tail
  runs to the logits) to the stitched activation; ``outs[j]`` is z_j. `shared` holds
  the batch's labels, g's own logits ('teacher') and g's activations ('targets').
  """

  name = "objective"
  closed_form = False

  @property
  def decomposable(self) -> bool:
    """The loss is a mean over examples (so a batch can be split over devices)."""
    return True

  def train_end(self, points_b: Sequence[str], j: str) -> str:
    """How far g's tail runs in a training step (never further than the loss reads)."""
    return LOGITS

  def targets(self, points_b: Sequence[str], j: str) -> tuple[str, ...]:
    """g's own activations the loss compares against (its 'targets')."""
    return ()

  def train_steps(self, steps: int, steps_per_epoch: int) -> int:
    """Gradient steps of one stitch, given the sweep's `steps` (0: not trained)."""
    return steps

  def loss(self, outs: Mapping[str, jax.Array], shared: Shared, where: Where
           ) -> jax.Array:
    raise NotImplementedError

  def loss_at(self, outs: Mapping[str, jax.Array], shared: Shared, where: Where,
              step: jax.Array, steps: jax.Array) -> jax.Array:
    """The training loss at `step` of a stitch's `steps` (a schedule may switch)."""
    return self.loss(outs, shared, where)

  def eval_terms(self, outs: Mapping[str, jax.Array], shared: Shared, mask: jax.Array,
                 where: Where) -> dict[str, jax.Array]:
    """Sums over the real (mask = 1) examples of a held-out batch."""
    raise NotImplementedError

  def eval_value(self, terms: Mapping[str, np.ndarray], n: float, where: Where
                 ) -> np.ndarray:
    """The objective on the whole held-out set from the summed terms (n examples)."""
    raise NotImplementedError

  def settings(self) -> dict[str, Any]:
    """Every field, with the name: what a finished result's fingerprint records."""
    return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class TLM(Objective):
  name = "tlm"

  def loss(self, outs, shared, where):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        outs[LOGITS].astype(jnp.float32), shared["label"]))

  def eval_terms(self, outs, shared, mask, where):
    ce = optax.softmax_cross_entropy_with_integer_labels(
        outs[LOGITS].astype(jnp.float32), shared["label"])
    return {"ce": _masked_sum(ce, mask)}

  def eval_value(self, terms, n, where):
    return np.asarray(terms["ce"]) / n


@dataclasses.dataclass(frozen=True)
class SLM(Objective):
  name = "slm"
  tau: float = 1.0

  def loss(self, outs, shared, where):
    return jnp.mean(soft_cross_entropy(outs[LOGITS], shared["teacher"], self.tau))

  def eval_terms(self, outs, shared, mask, where):
    return {"ce": _masked_sum(
        soft_cross_entropy(outs[LOGITS], shared["teacher"], self.tau), mask)}

  def eval_value(self, terms, n, where):
    return np.asarray(terms["ce"]) / n


@dataclasses.dataclass(frozen=True)
class DM(Objective):
  """Direct matching; solved in closed form, optionally refined by gradient steps.

  `num_examples` examples give the least-squares rows (0: one epoch of the training
  split); `refine_epochs` > 0 then refines the closed form by gradient steps.
  """
  name = "dm"
  closed_form = True
  num_examples: int = 0
  refine_epochs: float = 0.0

  def train_end(self, points_b, j):
    return j

  def targets(self, points_b, j):
    return (j,)

  def train_steps(self, steps, steps_per_epoch):
    return int(round(self.refine_epochs * steps_per_epoch))

  @staticmethod
  def _row_errors(z, t):
    se = jnp.sum(jnp.square(z.astype(jnp.float32) - t.astype(jnp.float32)), axis=-1)
    return se.reshape(se.shape[0], -1)  # (B, rows per example)

  def loss(self, outs, shared, where):
    return jnp.mean(self._row_errors(outs[where.end], shared["targets"][where.end]))

  def eval_terms(self, outs, shared, mask, where):
    se = self._row_errors(outs[where.end], shared["targets"][where.end])
    return {"se": _masked_sum(se.sum(axis=1), mask),
            "rows": jnp.sum(mask) * se.shape[1]}

  def eval_value(self, terms, n, where):
    return np.asarray(terms["se"]) / np.maximum(np.asarray(terms["rows"]), 1.0)


@dataclasses.dataclass(frozen=True)
class FuLA(Objective):
  """Functional latent alignment over g's latent points j..k (see module docstring)."""
  name = "fula"
  C: float | tuple[float, ...] | tuple[tuple[str, float], ...] = 1.0
  k: str | None = None
  squared: bool = False
  normalise: str = "example"
  eps: float = 1e-8

  @property
  def decomposable(self) -> bool:
    return self.normalise == "example"

  def __post_init__(self):
    if self.normalise not in NORMALISE:
      raise registry.unknown("FuLA normalisation", self.normalise, NORMALISE)

  def last_point(self, points_b: Sequence[str], j: str) -> str:
    if self.k is None:
      return points_b[-1]
    if self.k not in points_b:
      raise registry.unknown("FuLA k (stitch point of the end model)", self.k, points_b)
    return self.k if points_b.index(self.k) >= points_b.index(j) else j

  def train_end(self, points_b, j):
    return self.last_point(points_b, j)

  def targets(self, points_b, j):
    return tuple(self.layers(points_b, j))

  def layers(self, points_b: Sequence[str], j: str) -> list[str]:
    lo, hi = points_b.index(j), points_b.index(self.last_point(points_b, j))
    return list(points_b[lo:hi + 1])

  def coefs(self, points_b: Sequence[str], layers: Sequence[str]) -> list[float]:
    c = self.C
    if isinstance(c, (int, float)):
      return [float(c)] * len(layers)
    if c and isinstance(c[0], tuple):
      table = dict(c)
      for p in table:
        if p not in points_b:
          raise registry.unknown("FuLA C_l point", p, points_b)
      return [float(table.get(p, 1.0)) for p in layers]
    if len(c) != len(points_b):
      raise ValueError(f"fula.C has {len(c)} entries; a per-layer list needs one per "
                       f"stitch point of the end model ({len(points_b)}: "
                       f"{', '.join(points_b)}).")
    return [float(c[points_b.index(p)]) for p in layers]

  def _terms(self, outs, shared, where):
    layers = self.layers(where.points_b, where.end)
    return layers, self.coefs(where.points_b, layers), [outs[p] for p in layers], [
        shared["targets"][p] for p in layers]

  def loss(self, outs, shared, where):
    _, coefs, zs, ts = self._terms(outs, shared, where)
    return fula_loss(zs, ts, coefs, squared=self.squared, normalise=self.normalise,
                     eps=self.eps)

  def eval_terms(self, outs, shared, mask, where):
    layers, _, zs, ts = self._terms(outs, shared, where)
    terms = {}
    for idx, (z, t) in enumerate(zip(zs, ts)):
      e, d = example_norms(z, t, squared=True)
      if self.normalise == "example":
        if not self.squared:
          e, d = safe_sqrt(e), safe_sqrt(d)
        terms[f"r{idx}"] = _masked_sum(e / (d + self.eps), mask)
      else:
        terms[f"e{idx}"] = _masked_sum(e, mask)
        terms[f"d{idx}"] = _masked_sum(d, mask)
    return terms

  def eval_value(self, terms, n, where):
    coefs = self.coefs(where.points_b, self.layers(where.points_b, where.end))
    total = 0.0
    for idx, c in enumerate(coefs):
      if self.normalise == "example":
        total = total + c * np.asarray(terms[f"r{idx}"]) / n
      else:
        e, d = np.asarray(terms[f"e{idx}"]), np.asarray(terms[f"d{idx}"])
        total = total + c * (e / (d + self.eps) if self.squared else
                             np.sqrt(e) / (np.sqrt(d) + self.eps))
    return total


@dataclasses.dataclass(frozen=True)
class FFM(FuLA):
  """Final-feature matching, following the idea of Mai et al. (CVPR 2026), whose exact
  recipe is not public: the stitch is trained to match g's penultimate features (its
  last stitch point) only, through g's tail from j; FuLA's normalised error there."""
  name = "ffm"
  C: float = 1.0

  def last_point(self, points_b: Sequence[str], j: str) -> str:
    return points_b[-1]

  def layers(self, points_b: Sequence[str], j: str) -> list[str]:
    return [points_b[-1]]


@dataclasses.dataclass(frozen=True)
class FFMThenTLM(FFM):
  """The schedule ffm -> tlm, following Mai et al. (CVPR 2026): final-feature matching
  for the first `switch` of each stitch's training steps, then the task loss; scored
  (loss measure) by the task loss it ends with."""
  name = "ffm_tlm"
  switch: float = 0.5

  def train_end(self, points_b, j):
    return LOGITS

  def loss_at(self, outs, shared, where, step, steps):
    first = FFM.loss(self, outs, shared, where)
    return jnp.where(step < jnp.floor(self.switch * steps), first,
                     TLM().loss(outs, shared, where))

  def eval_terms(self, outs, shared, mask, where):
    return TLM().eval_terms(outs, shared, mask, where)

  def eval_value(self, terms, n, where):
    return TLM().eval_value(terms, n, where)


def parse_fula_c(c: Any) -> float | tuple:
  """FuLA's C_l from a config: 1 -> 1.0; '1,1,0.5' -> (1, 1, 0.5) (one per point of g);
  'conv1=2,pool=0' or {'conv1': 2, 'pool': 0} -> (('conv1', 2.0), ('pool', 0.0))."""
  if isinstance(c, str):
    parts = [p.strip() for p in c.split(",") if p.strip()]
    if any("=" in p for p in parts):
      c = {p.split("=")[0].strip(): float(p.split("=")[1]) for p in parts}
    else:
      c = float(parts[0]) if len(parts) == 1 else [float(p) for p in parts]
  if isinstance(c, Mapping) or hasattr(c, "to_dict"):
    return tuple(sorted((str(k), float(v)) for k, v in dict(c).items()))
  if isinstance(c, (list, tuple)):
    if c and isinstance(c[0], (list, tuple)):
      return tuple((str(k), float(v)) for k, v in c)
    return tuple(float(v) for v in c)
  return float(c)


def _fula_from(cfg: Mapping[str, Any]) -> FuLA:
  k = cfg.get("k", None)
  return FuLA(C=parse_fula_c(cfg.get("C", 1.0)), k=None if k in (None, "") else str(k),
              squared=bool(cfg.get("squared", False)),
              normalise=str(cfg.get("normalise", "example")),
              eps=float(cfg.get("eps", 1e-8)))


def _dm_from(cfg: Mapping[str, Any]) -> DM:
  return DM(num_examples=int(cfg.get("num_examples", 0)),
            refine_epochs=float(cfg.get("refine_epochs", 0.0)))


OBJECTIVES: dict[str, Callable[[Mapping[str, Any]], Objective]] = {
    "tlm": lambda cfg: TLM(),
    "slm": lambda cfg: SLM(tau=float(cfg.get("slm", {}).get("tau", 1.0))),
    "dm": lambda cfg: _dm_from(cfg.get("dm", {})),
    "fula": lambda cfg: _fula_from(cfg.get("fula", {})),
    "ffm": lambda cfg: FFM(squared=bool(cfg.get("ffm", {}).get("squared", False)),
                           normalise=str(cfg.get("ffm", {}).get("normalise", "example"))),
    "ffm_tlm": lambda cfg: FFMThenTLM(
        squared=bool(cfg.get("ffm", {}).get("squared", False)),
        normalise=str(cfg.get("ffm", {}).get("normalise", "example")),
        switch=float(cfg.get("ffm", {}).get("switch", 0.5))),
}


def get(name: str | Objective, cfg: Mapping[str, Any] | None = None) -> Objective:
  """The objective `name` configured from the sweep config (its 'slm', 'dm' and 'fula'
  blocks); an `Objective` value is returned as it is."""
  if isinstance(name, Objective):
    return name
  return registry.lookup("stitching objective", name, OBJECTIVES)(cfg or {})
