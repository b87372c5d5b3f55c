"""A sweep's settings in three parts: what it computes, which cells, and how it runs.

* `Science`: everything that changes a stitch's numbers (the arms: objectives as
  values, each through a stitch map; the optimiser, init, epochs, batch size, seed,
  PGD). A finished result's fingerprint is a digest of these and of nothing else.
* `Cells`: which cells of the matrix to compute (results are stored per cell).
* `Execution`: how the work is laid out (grouping, waves, memory budget, devices,
  evaluation batch, progress, the compilation cache); the numbers do not depend on it
  beyond float rounding, so changing it keeps finished results.

Users write one flat config (``configs/stitch.py``'s ``config.stitch``, or a dict);
each key belongs to the part whose dataclass declares it, so there is no list of
settings to keep apart by hand.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from fula_jax import registry
from fula_jax.errors import ConfigError
from fula_jax.stitching import ladder, maps
from fula_jax.stitching import objectives as objectives_lib

INITS = ("random", "lstsq")
DONOR_BN = {
    "eval": "the donors' BatchNorms in inference mode throughout (running averages)",
    "train": "PyTorch's train mode while stitches train: every BatchNorm normalises by "
             "the batch's statistics, and each stitch updates its own copy of g's "
             "running averages, which its evaluation then uses",
}
# Invariance-aware stitching (stitching/invariance.py): inverted sets per front point.
INVARIANCE_DEFAULTS = dict(examples=0, test_examples=0, steps=300, step_size=1 / 8,
                           momentum=0.9, batch_size=256, seed=0)
# Science fields added after results were first stored: left out of a fingerprint at
# their default, so earlier results keep theirs.
_LATER_DEFAULTS = {"donor_bn": "eval"}
GROUPINGS = ("end", "shape", "single")


@dataclasses.dataclass(frozen=True)
class PGD:
  """Accuracy of every stitched model under a PGD attack on the first test examples."""
  enabled: bool = False
  norm: str = "linf"
  eps: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 20
  random_start: bool = True
  num_examples: int = 512


@dataclasses.dataclass(frozen=True)
class Science:
  """Everything that changes a stitch's numbers.

  The default protocol: Adam at a constant 1e-2 with batch 256, starting from the
  least-squares (DM) map wherever the map has a closed form (a variant the literature
  offers; SN-Net starts there), for 3 epochs but at least `min_steps` = 100 steps.
  Public stitching code trains about 30 epochs (thousands of steps) from a random init
  with Adam at 1e-3. From the least-squares start a self-stitch begins at the model's
  own accuracy; at 1e-2, 100 steps reach the accuracy 1,000 steps reach at 1e-3 (the
  quickstart's CNN -> ResNet-20 cells), and `measures.Converged` checks every cell."""
  arms: tuple[ladder.Arm, ...] = ()  # (objective, stitch map) pairs, one matrix each
  batch_size: int = 256
  epochs: float = 3.0
  steps: int = 0                  # > 0 overrides epochs and min_steps
  min_steps: int = 100            # the epochs' budget is at least this many steps
  learning_rate: float = 1e-2
  adam: tuple[float, float, float] = (0.9, 0.999, 1e-8)  # b1, b2, eps
  init: str = "lstsq"             # 'lstsq' (the DM solution, where the map has a closed
                                  # form; fan-in random otherwise) | 'random' (fan-in)
  lstsq_examples: int = 512       # examples for init='lstsq'
  ridge: float = 1e-6             # relative ridge of the least-squares solves
  seed: int = 0
  cell_lr: tuple[tuple[str, float], ...] = ()  # per-cell learning rates
  pgd: PGD = PGD()
  c2t: str = "pool"   # prefix (CLS) tokens of a token target from a map: pool | learned
  t2c: str = "drop"   # a token source's prefix tokens into a map: drop | cls
  donor_bn: str = "eval"  # the donors' BatchNorms while stitches train (DONOR_BN)

  def arm(self, name: str) -> ladder.Arm:
    return {a.name: a for a in self.arms}[name]

  def lr(self, row: str, col: str) -> float:
    return dict(self.cell_lr).get(f"{row}->{col}", self.learning_rate)

  def fingerprint_fields(self, arm: str) -> dict[str, Any]:
    """What identifies the numbers of `arm`'s stitches (apart from models and data): the
    shared settings and that objective's and map's own."""
    shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name != "arms"}
    for name, default in _LATER_DEFAULTS.items():
      if shared[name] == default:
        del shared[name]
    shared["pgd"] = dataclasses.asdict(self.pgd)
    return dict(shared, objective=self.arm(arm).settings())


@dataclasses.dataclass(frozen=True)
class Cells:
  """Which cells: 'all' | 'diagonal' | 'offset:k' (i -> i +- k) | 'offset:+k' |
  'offset:-k' | 'a->b,c->d' | a list of 'a->b' or (a, b); over `rows` (points of the
  front model, None: all) and `cols` (points of the end model, None: all)."""
  pairs: Any = "all"
  rows: tuple[str, ...] | None = None
  cols: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Execution:
  """How the work is laid out; none of it changes the numbers beyond float rounding."""
  eval_batch_size: int = 512
  grouping: str = "end"           # 'end': one program per (end point, objective) |
                                  # 'shape': per exact front shape | 'single': per stitch
  max_stitches_per_wave: int = 64
  memory_budget_mb: float = 2048  # per device, for one unit's train step
  max_group_size: int = 0         # > 0 caps the stitches of one unit
  num_devices: int = 0            # 0 = every device of every process
  save_params: bool = False       # also write each unit's stitch parameters (.npz)
  # JAX's persistent cache (process-wide, so only when named): a PATH turns it on there;
  # '' leaves JAX's configuration alone (the CLI jobs turn it on in <workdir>);
  # 'off' keeps the CLI from doing so.
  compilation_cache: str = ""
  parallel_compile: bool = True   # compile a wave's programs in threads, the next
                                  # wave's in the background while one runs; the waves
                                  # then grow from one end point's (plan.pack_waves)
  progress: bool = True
  progress_every_s: float = 10.0
  # > 0: also evaluate every stitch on the first N examples of the split it was fitted
  # on: measures accuracy@fit and fit_gap (= accuracy@fit - accuracy), the stitch's
  # generalisation gap (cross-validated stitching). It adds measures, changes none.
  fit_gap_examples: int = 0
  # > 0: out-of-distribution scores per cell (energy_ood, mahalanobis_ratio) against the
  # end model's own reference from the first N examples of the fitting split
  ood_examples: int = 0
  ood_quantile: float = 0.95   # energy threshold: this quantile of g's own energies
  ood_ridge: float = 1e-3      # Gaussian at j: ridge x the mean variance
  # The end model's self-stitch at each of its points (g into g, same objectives and
  # protocol), the ceiling each column is read against: one more stitch in the units
  # into that point, sharing their programs and donor passes (`plan.SELF`); skipped
  # when the front model is the end model (the diagonal is then that ceiling).
  baselines: bool = True


def default_config() -> ml_collections.ConfigDict:
  """The flat config of a sweep with every default (see the three dataclasses)."""
  sci, cells, ex = Science(), Cells(), Execution()
  return ml_collections.ConfigDict(dict(
      objectives=("tlm", "slm", "dm", "fula"),
      pairs=cells.pairs,
      rows=config_dict.placeholder(tuple), cols=config_dict.placeholder(tuple),
      batch_size=sci.batch_size, epochs=sci.epochs, steps=sci.steps,
      min_steps=sci.min_steps,
      learning_rate=sci.learning_rate,
      adam=dict(b1=sci.adam[0], b2=sci.adam[1], eps=sci.adam[2]),
      init=sci.init, lstsq_examples=sci.lstsq_examples, ridge=sci.ridge, seed=sci.seed,
      cell_lr="",             # 'a->b=lr,...' (or a dict)
      slm=dict(tau=1.0),
      dm=dict(num_examples=0,     # rows of the closed form from this many examples
                                  # (0 = one epoch of the training split)
              refine_epochs=0.0),  # gradient refinement of the closed form
      fula=dict(C="1",            # scalar, 'c1,c2,..' per point of g, or 'point=c,..'
                k=config_dict.placeholder(str),  # last latent point (None: g's last)
                squared=False, normalise="example", eps=1e-8),
      ffm=dict(squared=False, normalise="example",  # final-feature matching; ffm_tlm:
               switch=0.5),                          # the share of steps before TLM
      map="affine",           # the stitch map (stitching/ladder.py), or a list of maps:
                              # one matrix per (objective, map), '<objective>@<map>';
                              # an entry may set its own options: 'lowrank:rank=4'
      map_options=dict(rank=8,      # lowrank's rank
                       hidden=0,    # mlp's hidden width (0: max(C_in, C_out))
                       l1=0.0,      # affine's L1 penalty
                       norm="layer"),  # norm_affine's norm: 'layer' | 'batch'
      pgd=dataclasses.asdict(sci.pgd),
      c2t=sci.c2t,            # CLS tokens of a ViT target stitched from a map: 'pool'
                              # (mean of the map) | 'learned' (a learned token)
      t2c=sci.t2c,            # a ViT's CLS token stitched into a map: 'drop' | 'cls'
                              # (only the CLS token, over the whole grid)
      donor_bn=sci.donor_bn,  # 'eval' | 'train': the donors' BatchNorms while stitches
                              # train (PyTorch's model.train(), as Balogh & Jelasity)
      # > 0 examples: train and score every stitch on inputs the front model represents
      # identically at its point (stitching/invariance.py); inversion steps etc.
      invariance=dict(INVARIANCE_DEFAULTS),
      **dataclasses.asdict(ex)))


def _plain(x: Any) -> Any:
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def resolve(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
  """Defaults overlaid with `cfg` (a ConfigDict or dict) as plain values; an unknown
  key is an error naming the valid ones."""
  full = _plain(default_config())

  def merge(base, over, path):
    for k, v in over.items():
      if k not in base:
        raise registry.unknown(f"stitch setting {path}", k, base.keys())
      if isinstance(base[k], dict) and isinstance(v, Mapping) and k != "cell_lr":
        merge(base[k], v, f"{path}{k}.")
      elif k in ("objectives", "map"):
        base[k] = list(v) if isinstance(v, (list, tuple)) else v
      else:
        base[k] = _plain(v)

  merge(full, _plain_top(cfg) if hasattr(cfg, "to_dict") else dict(cfg or {}), "")
  for k in ("objectives", "map"):
    if isinstance(full[k], str):
      full[k] = [o for o in full[k].replace(" ", "").split(",") if o]
  return full


def _plain_top(cfg: Any) -> dict[str, Any]:
  """A ConfigDict's top level as a dict, keeping `Objective` values as they are."""
  return {k: (cfg[k] if k == "objectives" else _plain(cfg[k])) for k in cfg.keys()}


def parse_cell_lr(spec: Any) -> tuple[tuple[str, float], ...]:
  if not spec:
    return ()
  if isinstance(spec, Mapping):
    return tuple(sorted((str(k), float(v)) for k, v in spec.items()))
  out = {}
  for part in str(spec).split(","):
    cell, _, lr = part.rpartition("=")
    out[cell.strip()] = float(lr)
  return tuple(sorted(out.items()))


def make_arms(cfg: Mapping[str, Any]) -> tuple[ladder.Arm, ...]:
  """Every (objective, stitch map) of a resolved config, objectives first: the
  objectives configured from the 'slm', 'dm' and 'fula' blocks (`Objective` values are
  taken as they are), the maps from 'map' and 'map_options'."""
  forms = list(cfg.get("map") or ["affine"])
  if len(set(forms)) != len(forms):
    raise ConfigError(f"Stitch maps must be distinct, got {forms}.")
  entries = [(entry, *ladder.parse_entry(entry)) for entry in forms]
  shared = dict(cfg.get("map_options") or {})
  arms = tuple(ladder.arm(objectives_lib.get(o, cfg), form, dict(shared, **own),
                          entry if own else "")
               for o in cfg["objectives"] for entry, form, own in entries)
  names = [a.name for a in arms]
  if not arms:
    raise ConfigError("No stitching objectives: set objectives to some of "
                      f"{', '.join(objectives_lib.OBJECTIVES)}.")
  if len(set(names)) != len(names):
    raise ConfigError(f"Objectives must be distinct, got {names}.")
  return arms


def split(cfg: Mapping[str, Any] | None) -> tuple[Science, Cells, Execution]:
  """The three parts of a flat sweep config (see the module docstring)."""
  full = resolve(cfg)
  registry.lookup("stitch init", full["init"], dict.fromkeys(INITS))
  registry.lookup("stitch grouping", full["grouping"], dict.fromkeys(GROUPINGS))
  registry.lookup("attack norm", full["pgd"]["norm"], dict.fromkeys(("linf", "l2")))
  adam = full["adam"]
  science = Science(
      arms=make_arms(full), batch_size=int(full["batch_size"]),
      epochs=float(full["epochs"]), steps=int(full["steps"]),
      min_steps=int(full["min_steps"]),
      learning_rate=float(full["learning_rate"]),
      adam=(float(adam["b1"]), float(adam["b2"]), float(adam["eps"])),
      init=str(full["init"]), lstsq_examples=int(full["lstsq_examples"]),
      ridge=float(full["ridge"]), seed=int(full["seed"]),
      cell_lr=parse_cell_lr(full["cell_lr"]), pgd=PGD(**full["pgd"]),
      c2t=registry.lookup("c2t option", full["c2t"], {k: k for k in maps.C2T}),
      t2c=registry.lookup("t2c option", full["t2c"], {k: k for k in maps.T2C}),
      donor_bn=registry.lookup("donor_bn mode", full["donor_bn"], {k: k for k in DONOR_BN}))
  rows, cols = full["rows"], full["cols"]
  cells = Cells(pairs=full["pairs"], rows=tuple(rows) if rows else None,
                cols=tuple(cols) if cols else None)
  execution = Execution(**{f.name: full[f.name] for f in dataclasses.fields(Execution)})
  if science.batch_size < 1 or execution.eval_batch_size < 1:
    raise ConfigError("batch_size and eval_batch_size must be positive.")
  return science, cells, execution
