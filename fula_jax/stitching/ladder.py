"""The capacity ladder of stitch maps (``stitch.map``: a name or a list), by name: the
checks, options and closed forms the sweep engine calls, each answered by the map's
class in :mod:`.feature_maps` (which lists the maps), and the sweep's two axes: a
`MapChoice` (one ``stitch.map`` entry) and an `Arm` (an objective through one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import registry
from fula_jax.stitching import feature_maps
from fula_jax.stitching.feature_maps import (DEFAULTS, EPS, IN_AXIS, IN_ROWS, MAPS, NORMS,
                                             STATISTICS, Params, polar)
from fula_jax.stitching.objectives import Objective

__all__ = ["DEFAULTS", "EPS", "IN_AXIS", "IN_ROWS", "MAPS", "NORMS", "STATISTICS",
           "Params", "polar"]
USES = {name: m.uses for name, m in MAPS.items() if m.uses}  # options per map
FIXED = tuple(name for name, m in MAPS.items() if m.fixed)   # never trained
LINEAR = tuple(name for name, m in MAPS.items() if m.linear)  # commute with the resize


def get(name: str) -> feature_maps.FeatureMap:
  """The map called `name`, or an error naming the valid ones."""
  return registry.lookup("stitch map", name, MAPS)


def _options(options: Mapping[str, Any] | None, kind: str = "stitch map option"
             ) -> dict[str, Any]:
  opts = dict(DEFAULTS, **(options or {}))
  for k in opts:
    if k not in DEFAULTS:
      raise registry.unknown(kind, k, DEFAULTS)
  return opts


def check(name: str, c_in: int, c_out: int, options: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
  """Options of map `name` for these widths, with a clear error where it cannot apply."""
  fmap = get(name)
  opts = _options(options, f"option of stitch map {name}")
  registry.lookup("norm of norm_affine", str(opts["norm"]), NORMS)
  fmap.check(c_in, c_out, opts)
  return opts


def options_of(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
  """The options map `name` uses, where they differ from the defaults (what names
  and fingerprints a map's results)."""
  opts = _options(options)
  registry.lookup("norm of norm_affine (map_options.norm)", str(opts["norm"]), NORMS)
  return {k: type(DEFAULTS[k])(opts[k]) for k in get(name).uses if opts[k] != DEFAULTS[k]}


def init(name: str, key: jax.Array, c_in: int, c_out: int,
         options: Mapping[str, Any] | None = None) -> Params:
  """Random initial parameters; the widths are not checked here (see :func:`check`)."""
  return get(name).init(key, c_in, c_out, dict(DEFAULTS, **(options or {})))


def apply(name: str, params: Params, x: jax.Array) -> jax.Array:
  """The map on (..., C_in) activations."""
  return MAPS[name].apply(params, x)


def project(name: str, params: Params) -> Params:
  """Parameters put back on the map's constraint set after a gradient step (an
  orthogonal kernel's polar factor; other maps are unconstrained)."""
  return MAPS[name].project(params)


def penalty(name: str, params: Params, options: Mapping[str, Any]) -> jax.Array:
  """What the map adds to the training loss (``l1 * sum |kernel|`` for affine)."""
  return MAPS[name].penalty(params, options)


def num_params(name: str, params: Params) -> int:
  """Trainable parameters (fixed maps have none; fitting-set statistics are not
  trained)."""
  return get(name).num_params(params)


def has_closed_form(name: str, options: Mapping[str, Any] | None = None) -> bool:
  """Whether map `name` with these options has a closed form (:func:`fit_from_stats`)."""
  return get(name).has_closed_form(dict(DEFAULTS, **(options or {})))


def needs_statistics(name: str, options: Mapping[str, Any] | None = None) -> bool:
  """Whether the map's parameters include statistics of the fitting set, which every
  start (random or closed-form) must be given."""
  return get(name).needs_statistics(dict(DEFAULTS, **(options or {})))


def closed_forms() -> str:
  """The maps with a closed form, for messages."""
  return ", ".join(n for n, m in MAPS.items() if m.has_closed_form(DEFAULTS)) + (
      ", norm_affine with norm='batch'")


def statistics(params: Params) -> Params:
  """The leaves of a closed form that are fitting-set statistics (kept under a random
  init)."""
  return {k: v for k, v in params.items() if k in STATISTICS}


# ----------------------------------------------------------------------------
# Closed forms from paired activations (rows: examples, columns: features).
# ----------------------------------------------------------------------------


def fit_permutation(x: np.ndarray, y: np.ndarray) -> Params:
  """The one-hot kernel of the channel matching with the largest summed correlation."""
  from scipy.optimize import linear_sum_assignment
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  xs = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
  ys = (y - y.mean(0)) / np.maximum(y.std(0), 1e-12)
  corr = xs.T @ ys / len(x)
  rows, cols = linear_sum_assignment(-corr)
  kernel = np.zeros((x.shape[1], y.shape[1]), np.float32)
  kernel[rows, cols] = 1.0
  return {"kernel": jnp.asarray(kernel)}


def fit_orthogonal(x: np.ndarray, y: np.ndarray) -> Params:
  """Q = argmin ||(X - mx) Q - (Y - my)||_F over partial isometries, bias my - mx Q."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mx, my = x.mean(0), y.mean(0)
  u, _, vt = np.linalg.svd((x - mx).T @ (y - my), full_matrices=False)
  q = u @ vt
  return {"kernel": jnp.asarray(q, jnp.float32),
          "bias": jnp.asarray(my - mx @ q, jnp.float32)}


def fit_lowrank(x: np.ndarray, y: np.ndarray, rank: int) -> Params:
  """Reduced-rank regression: the least-squares fit W, then W projected on the top
  `rank` right singular directions of the fitted values X W (Izenman 1975)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mx, my = x.mean(0), y.mean(0)
  xc, yc = x - mx, y - my
  w = np.linalg.lstsq(xc, yc, rcond=None)[0]
  _, _, vt = np.linalg.svd(xc @ w, full_matrices=False)
  v = vt[:rank].T                                   # (C_out, r)
  return {"u": jnp.asarray(w @ v, jnp.float32), "v": jnp.asarray(v.T, jnp.float32),
          "bias": jnp.asarray(my - mx @ w @ v @ v.T, jnp.float32)}


def fit_from_stats(name: str, stats: Any, ridge: float = 1e-6,
                   options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
  """The closed form of map `name` from accumulated row statistics (`lstsq.Stats` of
  one stitch, as NumPy): the same answers as the ``fit_*`` functions on the rows.

  Raises:
    ValueError: the map has no closed form, or no rows were accumulated.
  """
  opts = dict(DEFAULTS, **(options or {}))
  if not has_closed_form(name, opts):
    raise ValueError(f"The {name} map has no closed form (closed forms: "
                     f"{closed_forms()}).")
  if not float(np.asarray(stats.n)) > 0:
    raise ValueError("Least squares over zero rows: no data was accumulated.")
  return MAPS[name].fit(stats, ridge, opts)


# ----------------------------------------------------------------------------
# The sweep's two axes: a stitch map (`MapChoice`) and an objective, paired in an `Arm`.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MapChoice:
  """One entry of ``stitch.map``: map `form` of this ladder with the options that
  differ from the defaults; `label` is the entry when it set options of its own
  ('lowrank:rank=4'), so one sweep can hold several of one map."""
  form: str = "affine"
  options: tuple[tuple[str, Any], ...] = ()
  label: str = ""

  @property
  def key(self) -> str:
    """What names the map in result keys and tables."""
    return self.label or self.form

  @property
  def option_values(self) -> dict[str, Any]:
    """Every option of the map, defaults included."""
    return dict(DEFAULTS, **dict(self.options))

  @property
  def fixed(self) -> bool:
    """Never trained (identity, permutation)."""
    return self.form in FIXED

  @property
  def is_default(self) -> bool:
    return self.form == "affine" and not self.options and not self.label


@dataclasses.dataclass(frozen=True)
class Arm:
  """What one matrix of a sweep trains: `objective` through stitch map `fmap`. Its name,
  the objective's for the default affine map and ``<objective>@<map>`` otherwise, keys
  its results and resume files, so each (objective, map) is a matrix of its own and
  resumes on its own; its settings (the fingerprint) include a non-default map.

  A fixed map (identity, permutation) is never trained: every objective evaluates the
  same map. DM needs the map's closed form; without one (norm_affine, mlp) it trains
  the map from a random start on DM's loss for ``dm.refine_epochs``.
  """
  objective: Objective
  fmap: MapChoice = MapChoice()

  @property
  def name(self) -> str:
    base = self.objective.name
    return base if self.fmap.is_default else f"{base}@{self.fmap.key}"

  @property
  def closed_form(self) -> bool:
    """Solved, not trained from gradients alone: a fixed map, or DM through a map
    with a closed form."""
    return self.fmap.fixed or (self.objective.closed_form and
                               has_closed_form(self.fmap.form, dict(self.fmap.options)))

  @property
  def unsolvable(self) -> str:
    """Why DM cannot use this map without refinement ('' when it can)."""
    if self.objective.closed_form and not has_closed_form(self.fmap.form,
                                                          dict(self.fmap.options)):
      return (f"the {self.fmap.form} map has no closed form for DM (closed forms: "
              f"{closed_forms()}); set "
              "dm.refine_epochs > 0 to train it on DM's loss from a random start")
    return ""

  def inapplicable(self, c_in: int, c_out: int, steps: int) -> str:
    """Why this arm cannot give a stitch of these widths a value ('' when it can):
    the map cannot join the widths, or DM has no closed form and no `steps`."""
    try:
      check(self.fmap.form, c_in, c_out, self.fmap.option_values)
    except ValueError as e:
      return str(e)
    return self.unsolvable if not steps else ""

  @property
  def decomposable(self) -> bool:
    return self.objective.decomposable

  @property
  def num_examples(self) -> int:
    """Rows DM's least squares accumulates (0 for the other objectives)."""
    return getattr(self.objective, "num_examples", 0)

  def train_steps(self, steps: int, steps_per_epoch: int) -> int:
    if self.fmap.fixed:
      return 0
    return self.objective.train_steps(steps, steps_per_epoch)

  def settings(self) -> dict[str, Any]:
    if self.fmap.is_default:
      return self.objective.settings()
    return dict(self.objective.settings(), map=self.fmap.form,
                map_options=dict(self.fmap.options))


def parse_entry(entry: str) -> tuple[str, dict[str, Any]]:
  """A `stitch.map` entry: a map name, optionally with options of its own,
  ``'lowrank:rank=4'`` or ``'mlp:hidden=32'`` (so one sweep can hold several ranks)."""
  form, *parts = str(entry).split(":")
  registry.lookup("stitch map", form, MAPS)
  own = {}
  for part in parts:
    key, eq, value = part.partition("=")
    if key not in DEFAULTS or not eq:
      raise registry.unknown(f"option of stitch map entry {entry!r} (write "
                             "name:option=value)", key, DEFAULTS)
    own[key] = type(DEFAULTS[key])(value)
  return form, own


def arm(objective: Objective, form: str = "affine",
        options: Mapping[str, Any] | None = None, label: str = "") -> Arm:
  """`objective` through map `form` with `options` (only those that differ from the
  defaults are kept, so a map's results keep their names and fingerprints); `label`
  names a map entry with options of its own."""
  registry.lookup("stitch map", form, MAPS)
  return Arm(objective, MapChoice(form, tuple(sorted(options_of(form, options).items())),
                                  label))
