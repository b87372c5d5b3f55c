"""The stitch maps of the capacity ladder as values: one class per map, one registry.

A map acts on the last axis of (..., C_in) activations (before or after the layout
change of :mod:`.maps`) and keeps its parameters as a plain pytree. The sweep engine
reads only the properties and methods of :class:`FeatureMap`, never a map's name, so a
new map is one class here plus its test (:class:`Diagonal` is the worked example).

* ``identity``    a fixed identity kernel; needs C_in == C_out; never trained.
* ``permutation`` a fixed one-hot kernel: the channel matching that maximises the
                  summed correlation (Hungarian algorithm on the C_in x C_out
                  correlation matrix); C_in == C_out; never trained.
* ``diagonal``    a per-channel scale and bias (C_in == C_out); closed form: each
                  channel's own least-squares line.
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
                  ``batch`` (each channel standardised by its mean and variance over
                  the fitting examples -- what a BatchNorm's running averages estimate
                  -- fixed while its scale and shift train; closed form: least squares
                  on the standardised features).
* ``mlp``         one hidden layer (option ``hidden``; 0: max(C_in, C_out)): affine,
                  ReLU, affine; no closed form.

The linear maps commute with the bilinear resize, so they run at the cheaper
resolution; the others run on the resized activations. Which maps can express the
identity: all but ``lowrank`` below full rank (and ``permutation`` only when the
identity matching is the best one).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fula_jax.stitching import lstsq

DEFAULTS = {"rank": 8, "hidden": 0, "l1": 0.0,   # hidden 0: max(C_in, C_out)
            "norm": "layer"}
NORMS = {"layer": "LayerNorm over each position's features",
         "batch": "each channel standardised by its statistics over the fitting set"}
STATISTICS = ("mean", "var")  # fitting-set statistics of a batch norm, never trained
# Leaves whose first axis is C_in (padded when fronts of several widths share a unit),
# and of those the matrices (C_in, .).
IN_AXIS = ("kernel", "u", "scale", "shift", "w1") + STATISTICS
IN_ROWS = ("kernel", "u", "w1")

Params = dict[str, Any]
_HI = jax.lax.Precision.HIGHEST
EPS = 1e-5  # of the norms of norm_affine
_lecun = jax.nn.initializers.lecun_normal()


def _zeros(n: int) -> jax.Array:
  return jnp.zeros((n,), jnp.float32)


def _dense(x, w, b=None):
  y = jnp.einsum("...c,cd->...d", x, w, precision=_HI,
                 preferred_element_type=jnp.float32)
  return y if b is None else y + b


def _f32(a) -> np.ndarray:
  return np.asarray(a, np.float32)


def _moments(stats: Any) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """(n, mean_x, mean_t, cross-covariance) of accumulated `lstsq.Stats`, in float64."""
  n = float(np.asarray(stats.n))
  return (n, np.asarray(stats.mean_x, np.float64), np.asarray(stats.mean_t, np.float64),
          np.asarray(stats.cxt, np.float64) / n)


def polar(k: jax.Array) -> jax.Array:
  """The nearest (partial) isometry to `k`: U V^T of its thin SVD."""
  u, _, vt = jnp.linalg.svd(k, full_matrices=False)
  return jnp.matmul(u, vt, precision=_HI)


class FeatureMap:
  """What the sweep engine asks of a stitch map; the defaults describe a trainable,
  unconstrained map with no closed form and no options."""
  name: ClassVar[str]
  summary: ClassVar[str]
  uses: ClassVar[tuple[str, ...]] = ()  # the options of DEFAULTS it reads
  fixed: ClassVar[bool] = False         # never trained: every objective evaluates it
  linear: ClassVar[bool] = False        # commutes with the bilinear resize
  equal_widths: ClassVar[bool] = False  # needs C_in == C_out

  def check(self, c_in: int, c_out: int, opts: Mapping[str, Any]) -> None:
    """Raise a ValueError where the map cannot apply to these widths and options."""
    if self.equal_widths and c_in != c_out:
      raise ValueError(f"The {self.name} map needs equal widths; here {c_in} -> "
                       f"{c_out} (use orthogonal, lowrank or affine).")

  def init(self, key: jax.Array, c_in: int, c_out: int, opts: Mapping[str, Any]
           ) -> Params:
    """Random initial parameters (fan-in scaled kernels, zero biases, unit scales)."""
    raise NotImplementedError

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """The map on (..., C_in) activations."""
    raise NotImplementedError

  def project(self, params: Params) -> Params:
    """Parameters put back on the map's constraint set after a gradient step."""
    return params

  def penalty(self, params: Params, opts: Mapping[str, Any]) -> jax.Array:
    """What the map adds to the training loss."""
    return jnp.zeros((), jnp.float32)

  def num_params(self, params: Params) -> int:
    """Trainable parameters (fitting-set statistics are not trained)."""
    if self.fixed:
      return 0
    return int(sum(np.prod(np.shape(p)) for k, p in params.items()
                   if k not in STATISTICS))

  def has_closed_form(self, opts: Mapping[str, Any]) -> bool:
    return False

  def needs_statistics(self, opts: Mapping[str, Any]) -> bool:
    """Whether the parameters include fitting-set statistics, which every start
    (random or closed-form) must be given."""
    return False

  def fit(self, stats: Any, ridge: float, opts: Mapping[str, Any]
          ) -> dict[str, np.ndarray]:
    """The closed form from accumulated row statistics (`lstsq.Stats`, n > 0)."""
    raise ValueError(f"The {self.name} map has no closed form.")


class Identity(FeatureMap):
  name, summary = "identity", "no parameters (equal widths)"
  fixed = linear = equal_widths = True

  def init(self, key, c_in, c_out, opts):
    return {"kernel": jnp.eye(c_in, c_out, dtype=jnp.float32)}

  def apply(self, params, x):
    """A fixed kernel (eye(C_in, C_out): shapes hold even where it cannot apply)."""
    return _dense(x, jax.lax.stop_gradient(params["kernel"]))

  def has_closed_form(self, opts):
    return True

  def fit(self, stats, ridge, opts):
    return {"kernel": _f32(np.eye(len(np.asarray(stats.mean_x))))}


class Permutation(Identity):
  name = "permutation"
  summary = "best channel matching by correlation (Hungarian), fixed"

  def fit(self, stats, ridge, opts):
    from scipy.optimize import linear_sum_assignment
    n, _, _, cxt = _moments(stats)
    sx = np.sqrt(np.maximum(np.diag(np.asarray(stats.cxx, np.float64)) / n, 1e-24))
    st = np.sqrt(np.maximum(np.asarray(stats.ctt, np.float64) / n, 1e-24))
    rows, cols = linear_sum_assignment(-(cxt / np.outer(sx, st)))
    kernel = np.zeros(cxt.shape, np.float32)
    kernel[rows, cols] = 1.0
    return {"kernel": kernel}


class Diagonal(FeatureMap):
  name, summary = "diagonal", "a scale and a bias per channel (equal widths)"
  linear = equal_widths = True

  def init(self, key, c_in, c_out, opts):
    return {"scale": jnp.ones((c_in,), jnp.float32), "bias": _zeros(c_out)}

  def apply(self, params, x):
    return x * params["scale"] + params["bias"]

  def has_closed_form(self, opts):
    return True

  def fit(self, stats, ridge, opts):
    """Each channel's own line: scale = cov(x_c, t_c) / var(x_c), ridge as least
    squares applies it (relative to the mean variance)."""
    n, mx, mt, cxt = _moments(stats)
    var = np.diag(np.asarray(stats.cxx, np.float64)) / n
    lam = ridge * max(var.mean(), 1e-30) if ridge > 0 else 0.0
    scale = np.diag(cxt) / np.maximum(var + lam, 1e-30)
    return {"scale": _f32(scale), "bias": _f32(mt - mx * scale)}


class Orthogonal(FeatureMap):
  name, summary = "orthogonal", "orthogonal kernel and bias (Procrustes closed form)"
  linear = True

  def init(self, key, c_in, c_out, opts):
    q = jax.nn.initializers.orthogonal()(jax.random.split(key, 3)[0], (c_in, c_out),
                                          jnp.float32)
    return {"kernel": q, "bias": _zeros(c_out)}

  def apply(self, params, x):
    return _dense(x, params["kernel"], params["bias"])

  def project(self, params):
    """The kernel replaced by its polar factor: projected gradient descent on the
    orthogonal group (the SVD is never differentiated, so equal singular values, as
    at an orthogonal start, are no problem)."""
    return dict(params, kernel=polar(params["kernel"]))

  def has_closed_form(self, opts):
    return True

  def fit(self, stats, ridge, opts):
    _, mx, mt, cxt = _moments(stats)
    u, _, vt = np.linalg.svd(cxt, full_matrices=False)
    q = u @ vt
    return {"kernel": _f32(q), "bias": _f32(mt - mx @ q)}


class LowRank(FeatureMap):
  name = "lowrank"
  summary = "rank-r kernel and bias (reduced-rank regression closed form)"
  uses, linear = ("rank",), True

  def check(self, c_in, c_out, opts):
    super().check(c_in, c_out, opts)
    if int(opts["rank"]) < 1:
      raise ValueError(f"lowrank rank = {opts['rank']} must be at least 1 (a rank at or "
                       f"above min(C_in, C_out) = {min(c_in, c_out)} is full rank).")

  def init(self, key, c_in, c_out, opts):
    ks, r = jax.random.split(key, 3), int(opts["rank"])
    return {"u": _lecun(ks[0], (c_in, r), jnp.float32),
            "v": _lecun(ks[1], (r, c_out), jnp.float32), "bias": _zeros(c_out)}

  def apply(self, params, x):
    return _dense(_dense(x, params["u"]), params["v"], params["bias"])

  def has_closed_form(self, opts):
    return True

  def fit(self, stats, ridge, opts):
    """Least squares, projected on the top-r directions of the fitted values' covariance
    (zero directions beyond C_out: full rank)."""
    n, mx, mt, _ = _moments(stats)
    w = np.asarray(lstsq.solve(stats, ridge)["kernel"], np.float64)
    cov = np.asarray(stats.cxx, np.float64) / n
    fitted = w.T @ (0.5 * (cov + cov.T)) @ w
    _, vecs = np.linalg.eigh(0.5 * (fitted + fitted.T))
    r = int(opts["rank"])
    v = np.zeros((len(mt), r))
    top = vecs[:, ::-1][:, :r]
    v[:, :top.shape[1]] = top
    return {"u": _f32(w @ v), "v": _f32(v.T), "bias": _f32(mt - mx @ w @ v @ v.T)}


class Affine(FeatureMap):
  name, summary = "affine", "full kernel and bias (least squares closed form)"
  uses, linear = ("l1",), True

  def init(self, key, c_in, c_out, opts):
    return {"kernel": _lecun(jax.random.split(key, 3)[0], (c_in, c_out), jnp.float32),
            "bias": _zeros(c_out)}

  def apply(self, params, x):
    return _dense(x, params["kernel"], params["bias"])

  def penalty(self, params, opts):
    """``l1 * sum |kernel|``."""
    l1 = float(opts.get("l1", 0.0))
    return l1 * jnp.sum(jnp.abs(params["kernel"])) if l1 else super().penalty(params, opts)

  def has_closed_form(self, opts):
    return True

  def fit(self, stats, ridge, opts):
    return lstsq.solve(stats, ridge)


class NormAffine(Affine):
  name, uses, linear = "norm_affine", ("norm",), False
  summary = ("a norm (LayerNorm, or BatchNorm by fitting-set statistics) with scale and "
             "shift, then a full kernel and bias")

  def init(self, key, c_in, c_out, opts):
    norm = {"mean": _zeros(c_in), "var": jnp.ones((c_in,), jnp.float32)} if (
        opts["norm"] == "batch") else {}
    return {**norm, "scale": jnp.ones((c_in,), jnp.float32), "shift": _zeros(c_in),
            **super().init(key, c_in, c_out, opts)}

  def apply(self, params, x):
    if "mean" in params:  # batch: the fitting set's fixed channel statistics
      mu, var = (jax.lax.stop_gradient(params[k]) for k in STATISTICS)
    else:                 # layer: each position's own
      mu, var = jnp.mean(x, -1, keepdims=True), jnp.var(x, -1, keepdims=True)
    x = (x - mu) * jax.lax.rsqrt(var + EPS) * params["scale"] + params["shift"]
    return super().apply(params, x)

  def penalty(self, params, opts):
    return FeatureMap.penalty(self, params, opts)

  def has_closed_form(self, opts):
    return self.needs_statistics(opts)

  def needs_statistics(self, opts):
    return opts["norm"] == "batch"

  def fit(self, stats, ridge, opts):
    """Least squares on standardised features: x W + b == ((x - m) / s) (s W) +
    (b + m W)."""
    if not self.has_closed_form(opts):
      return super(Affine, self).fit(stats, ridge, opts)
    n, mx, _, _ = _moments(stats)
    sol = lstsq.solve(stats, ridge)
    var = np.maximum(np.diag(np.asarray(stats.cxx, np.float64)) / n, 0.0)
    w = np.asarray(sol["kernel"], np.float64)
    s = np.sqrt(var + EPS)
    return {"mean": _f32(mx), "var": _f32(var), "scale": _f32(np.ones_like(mx)),
            "shift": _f32(np.zeros_like(mx)), "kernel": _f32(s[:, None] * w),
            "bias": _f32(np.asarray(sol["bias"], np.float64) + mx @ w)}


class MLP(FeatureMap):
  name, summary, uses = "mlp", "affine, ReLU, affine with a hidden width", ("hidden",)

  def init(self, key, c_in, c_out, opts):
    ks, h = jax.random.split(key, 3), int(opts["hidden"]) or max(c_in, c_out)
    return {"w1": _lecun(ks[1], (c_in, h), jnp.float32), "b1": _zeros(h),
            "w2": _lecun(ks[2], (h, c_out), jnp.float32), "b2": _zeros(c_out)}

  def apply(self, params, x):
    return _dense(jax.nn.relu(_dense(x, params["w1"], params["b1"])), params["w2"],
                  params["b2"])


# The ladder in order of capacity.
MAPS: dict[str, FeatureMap] = {m.name: m for m in (
    Identity(), Permutation(), Diagonal(), Orthogonal(), LowRank(), Affine(),
    NormAffine(), MLP())}
