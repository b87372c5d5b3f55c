"""The capacity ladder of stitch maps over the feature axis, their closed forms, and
what the sweep engine needs to train them (``stitch.map``: a name or a list).

Each map acts on the last axis of (..., C_in) activations, before or after the layout
change of :mod:`maps`, and has a plain pytree of parameters:

* ``identity``    a fixed identity kernel; needs C_in == C_out; never trained.
* ``permutation`` a fixed one-hot kernel: the channel matching that maximises the
                  summed correlation (Hungarian algorithm on the C_in x C_out
                  correlation matrix); C_in == C_out; never trained.
* ``orthogonal``  kernel and bias; closed form: Procrustes on centred activations, bias
                  from the means; trained, each step is projected back onto the
                  (partial) isometries (the kernel's polar factor, U V^T of its SVD).
* ``lowrank``     kernel U V (C_in x r, r x C_out, option ``rank``) and a bias; closed
                  form: reduced-rank regression.
* ``affine``      kernel (C_in x C_out) and bias: the default; closed form: least
                  squares; option ``l1`` adds ``l1 * sum |kernel|`` to the training loss.
* ``norm_affine`` a norm (learned scale and shift) before the affine map, as Bansal et
                  al. (2021) and stitching-ood do. Option ``norm``: ``layer``
                  (LayerNorm over each position's features; no closed form) or
                  ``batch`` (BatchNorm: each channel standardised by its mean and
                  variance over the fitting examples -- what a BatchNorm's running
                  averages estimate -- fixed while its scale and shift train; closed
                  form: least squares on the standardised features).
* ``mlp``         one hidden layer (option ``hidden``; 0: max(C_in, C_out)): affine,
                  ReLU, affine; no closed form.

The linear maps (all but ``norm_affine`` and ``mlp``) commute with the bilinear resize,
so they run at the cheaper resolution; the others run on the resized activations.
Which maps can express the identity: all but ``lowrank`` below full rank (and
``permutation`` only when the identity matching is the best one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax import registry
from fula_jax.stitching import lstsq
from fula_jax.stitching.objectives import Objective

MAPS = {
    "identity": "no parameters (equal widths)",
    "permutation": "best channel matching by correlation (Hungarian), fixed",
    "orthogonal": "orthogonal kernel and bias (Procrustes closed form)",
    "lowrank": "rank-r kernel and bias (reduced-rank regression closed form)",
    "affine": "full kernel and bias (least squares closed form)",
    "norm_affine": "a norm (LayerNorm, or BatchNorm by fitting-set statistics) with "
                   "scale and shift, then a full kernel and bias",
    "mlp": "affine, ReLU, affine with a hidden width",
}
DEFAULTS = {"rank": 8, "hidden": 0, "l1": 0.0,   # hidden 0: max(C_in, C_out)
            "norm": "layer"}
USES = {"affine": ("l1",), "lowrank": ("rank",), "mlp": ("hidden",),  # options per map
        "norm_affine": ("norm",)}
NORMS = {"layer": "LayerNorm over each position's features",
         "batch": "each channel standardised by its statistics over the fitting set"}
FIXED = ("identity", "permutation")              # never trained
CLOSED_FORM = ("identity", "permutation", "orthogonal", "lowrank", "affine")
LINEAR = CLOSED_FORM                             # commute with the bilinear resize
STATISTICS = ("mean", "var")  # fitting-set statistics of a batch norm, never trained
IN_AXIS = ("kernel", "u", "scale", "shift", "w1") + STATISTICS  # first axis is C_in
IN_ROWS = ("kernel", "u", "w1")                    # ... of which matrices (C_in, .)

Params = dict[str, Any]
_HI = jax.lax.Precision.HIGHEST
EPS = 1e-5  # of the norms of norm_affine


def check(name: str, c_in: int, c_out: int, options: Mapping[str, Any] | None = None
          ) -> dict[str, Any]:
  """Options of map `name` for these widths, with a clear error where it cannot apply."""
  registry.lookup("stitch map", name, MAPS)
  opts = dict(DEFAULTS, **(options or {}))
  for k in opts:
    if k not in DEFAULTS:
      raise registry.unknown(f"option of stitch map {name}", k, DEFAULTS)
  if name in ("identity", "permutation") and c_in != c_out:
    raise ValueError(f"The {name} map needs equal widths; here {c_in} -> {c_out} "
                     "(use orthogonal, lowrank or affine).")
  registry.lookup("norm of norm_affine", str(opts["norm"]), NORMS)
  if name == "lowrank" and int(opts["rank"]) < 1:
    raise ValueError(f"lowrank rank = {opts['rank']} must be at least 1 (a rank at or "
                     f"above min(C_in, C_out) = {min(c_in, c_out)} is full rank).")
  return opts


def options_of(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
  """The options map `name` uses, where they differ from the defaults (what names
  and fingerprints a map's results)."""
  opts = dict(DEFAULTS, **(options or {}))
  for k in opts:
    if k not in DEFAULTS:
      raise registry.unknown("stitch map option", k, DEFAULTS)
  registry.lookup("norm of norm_affine (map_options.norm)", str(opts["norm"]), NORMS)
  return {k: type(DEFAULTS[k])(opts[k]) for k in USES.get(name, ())
          if opts[k] != DEFAULTS[k]}


def init(name: str, key: jax.Array, c_in: int, c_out: int,
         options: Mapping[str, Any] | None = None) -> Params:
  """Random initial parameters (fan-in scaled kernels, zero biases, unit norms); the
  widths are not checked here (see :func:`check`)."""
  registry.lookup("stitch map", name, MAPS)
  opts = dict(DEFAULTS, **(options or {}))
  lecun = jax.nn.initializers.lecun_normal()
  ks = jax.random.split(key, 3)
  zeros = lambda n: jnp.zeros((n,), jnp.float32)
  if name in FIXED:
    return {"kernel": jnp.eye(c_in, c_out, dtype=jnp.float32)}
  if name == "orthogonal":
    q = jax.nn.initializers.orthogonal()(ks[0], (c_in, c_out), jnp.float32)
    return {"kernel": q, "bias": zeros(c_out)}
  if name == "lowrank":
    r = int(opts["rank"])
    return {"u": lecun(ks[0], (c_in, r), jnp.float32),
            "v": lecun(ks[1], (r, c_out), jnp.float32), "bias": zeros(c_out)}
  affine = {"kernel": lecun(ks[0], (c_in, c_out), jnp.float32), "bias": zeros(c_out)}
  if name == "affine":
    return affine
  if name == "norm_affine":
    norm = {"mean": zeros(c_in), "var": jnp.ones((c_in,), jnp.float32)} if (
        opts["norm"] == "batch") else {}
    return {**norm, "scale": jnp.ones((c_in,), jnp.float32), "shift": zeros(c_in),
            **affine}
  h = int(opts["hidden"]) or max(c_in, c_out)
  return {"w1": lecun(ks[1], (c_in, h), jnp.float32), "b1": zeros(h),
          "w2": lecun(ks[2], (h, c_out), jnp.float32), "b2": zeros(c_out)}


def _dense(x, w, b=None):
  y = jnp.einsum("...c,cd->...d", x, w, precision=_HI,
                 preferred_element_type=jnp.float32)
  return y if b is None else y + b


def apply(name: str, params: Params, x: jax.Array, eps: float = EPS) -> jax.Array:
  """The map on (..., C_in) activations."""
  if name in FIXED:  # the identity's kernel is eye(C_in, C_out): shapes hold even
    return _dense(x, jax.lax.stop_gradient(params["kernel"]))  # where it cannot apply
  if name == "lowrank":
    return _dense(_dense(x, params["u"]), params["v"], params["bias"])
  if name == "norm_affine":
    if "mean" in params:  # batch: the fitting set's fixed channel statistics
      mu, var = (jax.lax.stop_gradient(params[k]) for k in ("mean", "var"))
    else:                 # layer: each position's own
      mu, var = jnp.mean(x, -1, keepdims=True), jnp.var(x, -1, keepdims=True)
    x = (x - mu) * jax.lax.rsqrt(var + eps) * params["scale"] + params["shift"]
  if name == "mlp":
    return _dense(jax.nn.relu(_dense(x, params["w1"], params["b1"])), params["w2"],
                  params["b2"])
  return _dense(x, params["kernel"], params["bias"])


def polar(k: jax.Array) -> jax.Array:
  """The nearest (partial) isometry to `k`: U V^T of its thin SVD."""
  u, _, vt = jnp.linalg.svd(k, full_matrices=False)
  return jnp.matmul(u, vt, precision=_HI)


def project(name: str, params: Params) -> Params:
  """Parameters put back on the map's constraint set after a gradient step: an
  orthogonal map's kernel is replaced by its polar factor (projected gradient descent on
  the orthogonal group; the SVD is never differentiated, so equal singular values, as
  at an orthogonal start, are no problem). Other maps are unconstrained."""
  if name != "orthogonal":
    return params
  return dict(params, kernel=polar(params["kernel"]))


def penalty(name: str, params: Params, options: Mapping[str, Any]) -> jax.Array:
  """What the map adds to the training loss: ``l1 * sum |kernel|`` for an affine map."""
  l1 = float(options.get("l1", 0.0))
  if name == "affine" and l1:
    return l1 * jnp.sum(jnp.abs(params["kernel"]))
  return jnp.zeros((), jnp.float32)


def num_params(name: str, params: Params) -> int:
  """Trainable parameters (the fixed maps have none; a batch norm's statistics are
  not trained)."""
  if name in FIXED:
    return 0
  return int(sum(np.prod(np.shape(p)) for k, p in params.items() if k not in STATISTICS))


def has_closed_form(name: str, options: Mapping[str, Any] | None = None) -> bool:
  """Whether map `name` with these options has a closed form (:func:`fit_from_stats`)."""
  return name in CLOSED_FORM or needs_statistics(name, options)


def needs_statistics(name: str, options: Mapping[str, Any] | None = None) -> bool:
  """Whether the map's parameters include statistics of the fitting set, which every
  start (random or closed-form) must be given."""
  return name == "norm_affine" and dict(DEFAULTS, **(options or {}))["norm"] == "batch"


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
                     f"{', '.join(CLOSED_FORM)}, norm_affine with norm='batch').")
  n = float(np.asarray(stats.n))
  if not n > 0:
    raise ValueError("Least squares over zero rows: no data was accumulated.")
  mx = np.asarray(stats.mean_x, np.float64)
  mt = np.asarray(stats.mean_t, np.float64)
  cxt = np.asarray(stats.cxt, np.float64) / n
  f32 = lambda a: np.asarray(a, np.float32)
  if name == "identity":
    return {"kernel": f32(np.eye(len(mx)))}
  if name == "permutation":
    from scipy.optimize import linear_sum_assignment
    sx = np.sqrt(np.maximum(np.diag(np.asarray(stats.cxx, np.float64)) / n, 1e-24))
    st = np.sqrt(np.maximum(np.asarray(stats.ctt, np.float64) / n, 1e-24))
    rows, cols = linear_sum_assignment(-(cxt / np.outer(sx, st)))
    kernel = np.zeros(cxt.shape, np.float32)
    kernel[rows, cols] = 1.0
    return {"kernel": kernel}
  if name == "orthogonal":
    u, _, vt = np.linalg.svd(cxt, full_matrices=False)
    q = u @ vt
    return {"kernel": f32(q), "bias": f32(mt - mx @ q)}
  sol = lstsq.solve(stats, ridge)
  if name == "affine":
    return sol
  if name == "norm_affine":  # x W + b == ((x - m) / s) (s W) + (b + m W)
    var = np.maximum(np.diag(np.asarray(stats.cxx, np.float64)) / n, 0.0)
    w = np.asarray(sol["kernel"], np.float64)
    s = np.sqrt(var + EPS)
    return {"mean": f32(mx), "var": f32(var), "scale": f32(np.ones_like(mx)),
            "shift": f32(np.zeros_like(mx)), "kernel": f32(s[:, None] * w),
            "bias": f32(np.asarray(sol["bias"], np.float64) + mx @ w)}
  w = np.asarray(sol["kernel"], np.float64)
  cov = np.asarray(stats.cxx, np.float64) / n
  fitted = w.T @ (0.5 * (cov + cov.T)) @ w              # covariance of X W
  _, vecs = np.linalg.eigh(0.5 * (fitted + fitted.T))
  r = int(opts["rank"])
  v = np.zeros((len(mt), r))                            # top-r directions (D, r); zero
  top = vecs[:, ::-1][:, :r]                            # beyond D (full rank)
  v[:, :top.shape[1]] = top
  return {"u": f32(w @ v), "v": f32(v.T), "bias": f32(mt - mx @ w @ v @ v.T)}


# ----------------------------------------------------------------------------
# An objective trained through a map of the ladder (what `stitch.map` makes).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mapped(Objective):
  """`objective` trained (or solved) through stitch map `form` of this ladder other
  than the default affine one. Its name, ``<objective>@<form>``, keys its results and
  its resume files, so each (objective, map) is a matrix of its own and resumes on its
  own; its settings (the fingerprint) include the map and its options.

  A fixed map (identity, permutation) is never trained: every objective evaluates the
  same map. DM needs the map's closed form; without one (norm_affine, mlp) it trains
  the map from a random start on DM's loss for ``dm.refine_epochs``.
  """
  objective: Objective
  form: str = "affine"
  options: tuple[tuple[str, Any], ...] = ()
  label: str = ""  # the map entry when it set its own options ('lowrank:rank=4')

  @property
  def name(self) -> str:
    return f"{self.objective.name}@{self.label or self.form}"

  @property
  def closed_form(self) -> bool:
    return self.form in FIXED or (self.objective.closed_form and
                                  has_closed_form(self.form, dict(self.options)))

  @property
  def unsolvable(self) -> str:
    """Why DM cannot use this map without refinement ('' when it can)."""
    if self.objective.closed_form and not has_closed_form(self.form, dict(self.options)):
      return (f"the {self.form} map has no closed form for DM (closed forms: "
              f"{', '.join(CLOSED_FORM)}, norm_affine with norm='batch'); set "
              "dm.refine_epochs > 0 to train it on DM's loss from a random start")
    return ""

  @property
  def decomposable(self) -> bool:
    return self.objective.decomposable

  @property
  def num_examples(self) -> int:
    return getattr(self.objective, "num_examples", 0)

  def train_end(self, points_b, j):
    return self.objective.train_end(points_b, j)

  def targets(self, points_b, j):
    return self.objective.targets(points_b, j)

  def train_steps(self, steps, steps_per_epoch):
    if self.form in FIXED:
      return 0
    return self.objective.train_steps(steps, steps_per_epoch)

  def loss(self, outs, shared, where):
    return self.objective.loss(outs, shared, where)

  def loss_at(self, outs, shared, where, step, steps):
    return self.objective.loss_at(outs, shared, where, step, steps)

  def eval_terms(self, outs, shared, mask, where):
    return self.objective.eval_terms(outs, shared, mask, where)

  def eval_value(self, terms, n, where):
    return self.objective.eval_value(terms, n, where)

  def settings(self) -> dict[str, Any]:
    return dict(self.objective.settings(), map=self.form, map_options=dict(self.options))


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


def with_map(objective: Objective, form: str, options: Mapping[str, Any] | None = None,
             label: str = "") -> Objective:
  """`objective` through map `form` (the objective itself for the default affine map
  without options, so existing results keep their names and fingerprints); `label`
  names a map entry with options of its own."""
  registry.lookup("stitch map", form, MAPS)
  opts = options_of(form, options)
  if form == "affine" and not opts and not label:
    return objective
  return Mapped(objective, form, tuple(sorted(opts.items())), label)
