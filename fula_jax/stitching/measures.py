"""What every stitch reports, in one protocol.

A measure may add per-batch sums to the evaluation program (`terms`, run per stitch
inside the compiled program on each held-out batch; padded rows are masked out) and
turns the summed terms, and whatever else the run recorded, into one number per stitch
on the host (`value`). A measure that needs a pass of its own over the data declares
it (`needs`: the PGD attack, the end model's OOD reference, or the evaluation of the
fitting split), and one read on an evaluation set besides the test split names that
set (`eval_set`; ``accuracy@<set>``): the sweep runs a pass, or evaluates on a set, only
when an active measure asks for it, and a measure whose pass is switched off is not
reported. Adding a measure is one class here and one entry in `MEASURES`: the programs,
the accumulator shapes (`jax.eval_shape` of the terms) and the result matrices all
follow from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax.errors import ConfigError
from fula_jax.models.base import LOGITS
from fula_jax.similarity import outputs
from fula_jax.stitching import ood as ood_lib
from fula_jax.stitching.objectives import Objective, Where


@dataclasses.dataclass(frozen=True)
class Batch:
  """One stitch on one held-out batch, inside the evaluation program."""
  outs: Mapping[str, jax.Array]   # g's tail from z_j: every later point and 'logits'
  z: jax.Array                    # the stitch's output at the end point, z_j
  shared: Mapping[str, Any]       # 'label', 'teacher' (g's logits), 'targets' {point: g}
  mask: jax.Array                 # (B,) 1 on real examples
  objective: Objective
  where: Where


@dataclasses.dataclass(frozen=True)
class Readout:
  """Everything a stitch's numbers come from, on the host, for the unit's stitches."""
  sums: Mapping[str, np.ndarray]  # '<measure>/<term>' -> (S, ...) summed over the set
  n: float                        # real examples in the evaluation set
  end_accuracy: float             # g's own accuracy on that set
  objective: Objective
  where: Where
  train_loss: np.ndarray          # (S,) mean training loss of the last epoch (NaN: none)
  pgd_accuracy: np.ndarray | None  # (S,) or None when PGD is off
  trend: np.ndarray | None = None  # (S, 3, 3) see programs.StitchState.trend
  sets: Mapping[str, "Readout"] = dataclasses.field(default_factory=dict)
  # ^ the same stitches read out on every other evaluation set, by name


PGD = "pgd"  # pass: the sweep's PGD attack on every stitched model (stitch.pgd)
OOD = "ood"  # pass, and shared key: the end model's own reference (stitch.ood_examples)
FIT = "fit"  # pass: evaluation on the first fit_gap_examples of the fitting split
PASSES = (PGD, OOD, FIT)


class Measure:
  """Base: no device terms; `value` must be defined. `undefined` says when the value is
  NaN on a stitch that ran fine (stored as that cell's reason); `needs` names the pass
  the measure reads (one of `PASSES`; '' for none); `eval_set` the evaluation set
  besides the test split whose readout it reads (`Readout.sets`; '' for none)."""
  name = "measure"
  undefined = ""
  needs = ""
  eval_set = ""

  def terms(self, b: Batch) -> dict[str, jax.Array]:
    return {}

  def value(self, r: Readout) -> np.ndarray:
    raise NotImplementedError


def _correct(b: Batch) -> jax.Array:
  return jnp.sum(b.mask * (jnp.argmax(b.outs[LOGITS], -1) == b.shared["label"]))


class Accuracy(Measure):
  """Test accuracy of the stitched model."""
  name = "accuracy"

  def terms(self, b):
    return {"correct": _correct(b)}

  def value(self, r):
    return np.asarray(r.sums["accuracy/correct"]) / r.n


class RelativeAccuracy(Measure):
  """Stitched accuracy divided by the end model's own (1 = nothing lost)."""
  name = "relative_accuracy"
  undefined = "the end model's own accuracy is 0"

  def value(self, r):
    acc = Accuracy().value(r)
    return acc / r.end_accuracy if r.end_accuracy else np.full_like(acc, np.nan)


@dataclasses.dataclass(frozen=True)
class Scored(Objective):
  """Every objective of a sweep scored in one evaluation program (each one's sums as
  ``<name>/<term>``), so units of all objectives through one map and shapes share it."""
  parts: tuple[Objective, ...] = ()
  name = "scored"

  def targets(self, points_b, j):
    return tuple(dict.fromkeys(t for p in self.parts for t in p.targets(points_b, j)))

  def eval_terms(self, outs, shared, mask, where):
    return {f"{p.name}/{k}": v for p in self.parts
            for k, v in p.eval_terms(outs, shared, mask, where).items()}


class Loss(Measure):
  """The stitch's own objective on the held-out set (read from `Scored`'s sums)."""
  name = "loss"

  def terms(self, b):
    return b.objective.eval_terms(b.outs, b.shared, b.mask, b.where)

  def value(self, r):
    prefix = f"loss/{r.objective.name}/"
    own = {k[len(prefix):]: np.asarray(v) for k, v in r.sums.items()
           if k.startswith(prefix)}
    return np.asarray(r.objective.eval_value(own, r.n, r.where), np.float64)


class TrainLoss(Measure):
  """Mean training loss over the last epoch of training (NaN when not trained)."""
  name = "train_loss"
  undefined = "not trained: the map was fitted in closed form (DM) with no training epochs"

  def value(self, r):
    return np.asarray(r.train_loss, np.float64)


# The convergence rule (`LossTrend`, `Converged`).
MIN_STEPS = 8          # fewer training steps than this cannot show a plateau
TREND_RELATIVE = 0.05  # a last quarter may lower the loss by 5% of it ...
TREND_ABSOLUTE = 0.02  # ... or by 0.02 (nats for TLM/SLM; FuLA's relative error) ...
TREND_PROGRESS = 0.10  # ... or by 10% of what the whole run gained (first -> last quarter)


def _quarters(r: Readout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(steps counted, mean training loss, standard error of that mean) of each stitch
  over the first, the previous and the last quarter of its training steps: (S, 3)."""
  t = np.asarray(r.trend, np.float64)
  n = t[..., 0]
  with np.errstate(divide="ignore", invalid="ignore"):
    mean = t[..., 1] / n
    var = np.maximum(t[..., 2] / n - mean ** 2, 0.0) * n / np.maximum(n - 1, 1)
    return n, mean, np.sqrt(var / n)


class LossTrend(Measure):
  """How much the training loss still fell at the end of training: the relative drop of
  its mean from the previous to the last quarter of the stitch's steps,
  (previous - last) / |previous| (negative when it rose)."""
  name = "loss_trend"
  undefined = ("not trained: the map was fitted in closed form, or trained for fewer "
               f"than {MIN_STEPS} steps")

  def value(self, r):
    n, mean, _ = _quarters(r)
    with np.errstate(divide="ignore", invalid="ignore"):
      out = (mean[:, 1] - mean[:, 2]) / np.abs(mean[:, 1])
    return np.where(n[:, 1] * 4 >= MIN_STEPS, out, np.nan)


class Converged(Measure):
  """1 when a trained stitch reached a plateau, 0 when it did not, NaN when nothing was
  trained (a closed-form map).

  The rule compares the mean training loss of the last quarter of the stitch's steps
  with that of the quarter before. The stitch has converged when that drop is at most

  * TREND_RELATIVE (5%) of the loss, or TREND_ABSOLUTE (0.02; a loss near zero, such as
    a self-stitch's FuLA, has no relative scale): another quarter would move it little;
  * TREND_PROGRESS (10%) of what the run gained from its first quarter to its last: the
    curve has flattened. An exponential approach passes once the run spans about four
    of its time constants; a cross-entropy that keeps shrinking only by growing the
    logits of examples already right (about 1/t, as TLM and SLM do on separable data)
    passes, while a loss still falling in a straight line never does;
  * or twice the standard error of the difference (minibatch noise, not progress).

  A stitch trained for fewer than MIN_STEPS steps has not converged: too short to tell
  a plateau from a start. The rule reads the loss each stitch optimises, so it applies
  to every objective and map alike. Its limit: a stitch that barely moves from a poor
  random start (a learning rate far too small) also looks flat; the default init, the
  least-squares map, does not start there."""
  name = "converged"
  undefined = "not trained: the map was fitted in closed form (nothing to converge)"

  def value(self, r):
    n, mean, se = _quarters(r)
    trained = n[:, 2] > 0
    # The last quarter holds max(steps // 4, 1) steps: steps >= 8 iff it holds >= 2.
    long_enough = n[:, 2] >= MIN_STEPS // 4
    drop = mean[:, 1] - mean[:, 2]
    noise = 2.0 * np.sqrt(se[:, 1] ** 2 + se[:, 2] ** 2)
    with np.errstate(invalid="ignore"):
      allowed = np.maximum.reduce([TREND_RELATIVE * np.abs(mean[:, 1]),
                                   np.full_like(drop, TREND_ABSOLUTE),
                                   TREND_PROGRESS * (mean[:, 0] - mean[:, 2]), noise])
      flat = drop <= allowed
    ok = flat & long_enough & np.isfinite(mean).all(1)
    return np.where(trained, ok.astype(np.float64), np.nan)


class DMError(Measure):
  """The structural error ``||z_j - g_{<=j}(x)||^2 / ||g_{<=j}(x)||^2`` on held-out data."""
  name = "dm_error"

  def terms(self, b):
    z = b.z.reshape(b.z.shape[0], -1).astype(jnp.float32)
    t = b.shared["targets"][b.where.end]
    t = t.reshape(t.shape[0], -1).astype(jnp.float32)
    return {"num": jnp.sum(b.mask * jnp.sum(jnp.square(z - t), 1)),
            "den": jnp.sum(b.mask * jnp.sum(jnp.square(t), 1))}

  def value(self, r):
    return (np.asarray(r.sums["dm_error/num"]) /
            np.maximum(np.asarray(r.sums["dm_error/den"]), 1e-30))


class PGDAccuracy(Measure):
  """Accuracy of the stitched model under the sweep's PGD attack."""
  name = "pgd_accuracy"
  undefined = "no PGD attack was run on this cell"
  needs = PGD

  def value(self, r):
    if r.pgd_accuracy is None:
      return np.full_like(np.asarray(r.train_loss, np.float64), np.nan)
    return np.asarray(r.pgd_accuracy, np.float64)


class AccuracyOn(Measure):
  """Accuracy of the stitched model on the evaluation set `set_name` (reported as
  ``accuracy@<set_name>``), one of the sets the caller gives (`run_sweep`'s
  `eval_sets`)."""

  def __init__(self, eval_set: str):
    self.eval_set = eval_set
    self.name = f"accuracy@{eval_set}"

  def value(self, r):
    return Accuracy().value(r.sets[self.eval_set])


class FitAccuracy(AccuracyOn):
  """Accuracy of the stitched model on the first fit_gap_examples of the split it was
  fitted on (``accuracy@fit``)."""
  needs = FIT

  def __init__(self):
    super().__init__(FIT)


class FitGap(Measure):
  """``accuracy@fit - accuracy``: how much better a stitch does on examples it was
  fitted on than on held-out ones (its generalisation gap)."""
  name = "fit_gap"
  needs = eval_set = FIT

  def value(self, r):
    return FitAccuracy().value(r) - Accuracy().value(r)


def _predicted(logits: jax.Array) -> jax.Array:
  return jnp.argmax(logits, -1)


class Disagreement(Measure):
  """Fraction of held-out examples where the stitched model's top-1 class differs from
  the end model's."""
  name = "disagreement"

  def terms(self, b):
    differ = _predicted(b.outs[LOGITS]) != _predicted(b.shared["teacher"])
    return {"count": jnp.sum(b.mask * differ)}

  def value(self, r):
    return np.asarray(r.sums["disagreement/count"]) / r.n


class JSD(Measure):
  """Mean Jensen-Shannon divergence (bits) of the stitched and end models' softmax."""
  name = "jsd"

  def terms(self, b):
    return {"sum": jnp.sum(b.mask * outputs.jsd_per_example(b.outs[LOGITS],
                                                            b.shared["teacher"]))}

  def value(self, r):
    return np.asarray(r.sums["jsd/sum"]) / r.n


class ErrorConsistency(Measure):
  """Error consistency (Geirhos et al. 2020) of the stitched model with the end model."""
  name = "error_consistency"
  undefined = ("kappa is undefined: the agreement expected by chance is 1 (both models "
               "always right or both always wrong)")

  def terms(self, b):
    label = b.shared["label"]
    same = ((_predicted(b.outs[LOGITS]) == label)
            == (_predicted(b.shared["teacher"]) == label))
    return {"same": jnp.sum(b.mask * same)}

  def value(self, r):
    acc = Accuracy().value(r)
    observed = np.asarray(r.sums["error_consistency/same"]) / r.n
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.asarray(outputs.kappa(observed, acc, r.end_accuracy), np.float64)


class EnergyOOD(Measure):
  """Fraction of held-out examples whose stitched logits have a higher free energy
  (Liu et al. 2020) than the `quantile` of the end model's own energies on its reference
  examples: about 1 - quantile for a stitch g cannot tell from itself."""
  name = "energy_ood"
  needs = OOD

  def terms(self, b):
    if OOD not in b.shared:
      return {}
    e = ood_lib.energy(b.outs[LOGITS])
    return {"count": jnp.sum(b.mask * (e > b.shared[OOD]["threshold"]))}

  def value(self, r):
    return np.asarray(r.sums["energy_ood/count"]) / r.n


class MahalanobisRatio(Measure):
  """Mean squared Mahalanobis distance of z_j under one Gaussian of g's own activations
  at j (its reference examples), over that of g's own held-out activations at j: about 1
  in distribution, large for activations g never produces (stitching-ood's argument)."""
  name = "mahalanobis_ratio"
  needs = OOD

  def terms(self, b):
    if OOD not in b.shared:
      return {}
    ref = b.shared[OOD]
    dist = lambda a: ood_lib.mahalanobis(ref["mean"], ref["prec"], a)
    return {"stitched": jnp.sum(b.mask * dist(b.z)),
            "own": jnp.sum(b.mask * dist(b.shared["targets"][b.where.end]))}

  def value(self, r):
    own = np.asarray(r.sums["mahalanobis_ratio/own"])
    return np.asarray(r.sums["mahalanobis_ratio/stitched"]) / np.maximum(own, 1e-30)


MEASURES: tuple[Measure, ...] = (Accuracy(), RelativeAccuracy(), Loss(), TrainLoss(),
                                 LossTrend(), Converged(), DMError(), PGDAccuracy(),
                                 Disagreement(), JSD(), ErrorConsistency(), EnergyOOD(),
                                 MahalanobisRatio())
NAMES = tuple(m.name for m in MEASURES)
UNDEFINED = {m.name: m.undefined for m in MEASURES}
# Measures whose non-finite value marks a stitch as diverged.
REQUIRED_FINITE = ("accuracy", "loss", "dm_error")


def active(passes: Collection[str] = (), eval_sets: Sequence[str] = ()
           ) -> tuple[Measure, ...]:
  """The measures a sweep reports when it runs `passes` (some of `PASSES`) and
  evaluates on the named `eval_sets` too: every measure that needs no pass or one of
  those, then ``accuracy@<set>`` per set, then the fitting split's accuracy and gap."""
  for p in passes:
    if p not in PASSES:
      raise ValueError(f"Unknown measure pass {p!r}; passes: {', '.join(PASSES)}.")
  if FIT in passes and FIT in eval_sets:
    raise ConfigError(f"The evaluation set name {FIT!r} is the fitting split's when "
                      "fit_gap_examples > 0; give yours another name.")
  out = [m for m in MEASURES if not m.needs or m.needs in passes]
  out += [AccuracyOn(name) for name in eval_sets]
  if FIT in passes:
    out += [FitAccuracy(), FitGap()]
  return tuple(out)


def needed(measures: Sequence[Measure], which: str) -> bool:
  """Whether one of `measures` needs pass `which`: the sweep runs it only then."""
  return any(m.needs == which for m in measures)


def eval_sets(measures: Sequence[Measure]) -> tuple[str, ...]:
  """The evaluation sets beyond the test split that `measures` read, in their order."""
  return tuple(dict.fromkeys(m.eval_set for m in measures if m.eval_set))


def terms(b: Batch, measures: Sequence[Measure] = MEASURES) -> dict[str, jax.Array]:
  """Every measure's per-batch sums for one stitch, keyed '<measure>/<term>'."""
  out = {}
  for m in measures:
    for k, v in m.terms(b).items():
      out[f"{m.name}/{k}"] = v
  return out


def values(r: Readout, measures: Sequence[Measure] = MEASURES) -> dict[str, np.ndarray]:
  return {m.name: np.asarray(m.value(r), np.float64) for m in measures}
