"""Study 1: the FuLA testbeds. Do the stitching objectives tell apart models that are
known to differ?

Per architecture of ``config.architectures`` four models are trained (or reused from
``<workdir>/models/<arch>_<role>``): `standard`, `second_seed`, `robust` (PGD adversarial
training) and `shortcut` (trained with a label-coloured corner patch). Every sweep trains
TLM, SLM, FuLA and DM stitches at once (fula_jax.stitching.run_sweep, resumable from
``<workdir>/stitch``):

* robust: depth-matched stitches robust -> standard, standard -> robust and the control
  second_seed -> standard; clean accuracy and accuracy under PGD of the stitched model;
* shortcut: the same pairs with the shortcut model, trained on data with the cue and
  scored with the cue present, absent and permuted;
* cross_seed: the full L x L matrix second_seed -> standard.

A similarity measure should rate a pair of models that differ (robust vs standard, a
shortcut model vs a clean one) lower than two standard seeds; the report computes, per
objective, each pair's mean stitched accuracy over depth and its gap to the control, and
answers e.g. "does FuLA rate the shortcut pair lower than TLM does?" from this run's
numbers. Outputs: ``results/`` (matrices, ``fula_jax.results.load``), ``by_depth.csv``
(one row per architecture, testbed, pair, objective, cell and measure), ``figures/``,
``report.md`` and ``summary.json``.

  python experiments/study_fula.py --config=configs/study_fula.py:runlocal \
      --workdir=workdirs/fula

Launch commands for every scale and the expected run times are in configs/study_fula.py.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from fula_jax import attacks, data, errors, io, registry, reporting, results
from fula_jax.data import transforms
from fula_jax.progress import Progress
from fula_jax.reporting import fmt, md_table
from fula_jax import stitching
from fula_jax.stitching import plan as stitch_plan
from fula_jax.stitching import settings as sweep_settings
from fula_jax.train import checkpoint, loop
from fula_jax.train.zoo import robust_eval, train_or_reuse

ROLES = ("standard", "second_seed", "robust", "shortcut")
CONTROL = ("second_seed", "standard")
TESTBEDS = {
    "robust": (("robust", "standard"), ("standard", "robust"), CONTROL),
    "shortcut": (("shortcut", "standard"), ("standard", "shortcut"), CONTROL),
    "cross_seed": (CONTROL,),
}
OBJECTIVES = ("tlm", "slm", "dm", "fula")
MODELS_DIR = "models"
EVALS_DIR = "evals"
STITCH_DIR = "stitch"
FIGURES_DIR = "figures"
REPORT_FILE = "report.md"
DEPTH_CSV = "by_depth.csv"
_EVAL_FOLD = 2


def pair_name(pair: Sequence[str]) -> str:
  return f"{pair[0]}->{pair[1]}"


def check_config(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """Validated architectures and testbeds (config order)."""
  archs = [str(a) for a in config.architectures]
  if not archs or len(set(archs)) != len(archs):
    raise errors.ConfigError(f"config.architectures must be non-empty and distinct, got {archs}.")
  for a in archs:
    if a not in config.models:
      raise registry.unknown("study architecture (no entry in config.models)", a,
                             list(config.models.keys()))
  testbeds = [str(t) for t in config.testbeds]
  if not testbeds:
    raise errors.ConfigError(f"config.testbeds is empty; choose from {list(TESTBEDS)}.")
  for t in testbeds:
    registry.lookup("FuLA testbed", t, TESTBEDS)
  sweep_settings.split(config.stitch)  # unknown names and settings raise here
  if "shortcut" in testbeds:
    for mode in config.shortcut.eval_modes:
      if mode not in transforms.SHORTCUT_EVAL_MODES:
        raise registry.unknown("shortcut evaluation mode", mode,
                               transforms.SHORTCUT_EVAL_MODES)
  if not 0.0 < float(config.robust.eps) <= 1.0 and "robust" in testbeds:
    raise errors.ConfigError(f"config.robust.eps must be in (0, 1] (pixels in [0, 1]), got "
                     f"{config.robust.eps}.")
  return archs, testbeds


def roles_for(testbeds: Sequence[str]) -> list[str]:
  needed = {r for t in testbeds for pair in TESTBEDS[t] for r in pair}
  return [r for r in ROLES if r in needed]


def attack(config: ml_collections.ConfigDict, *, evaluation: bool
           ) -> ml_collections.ConfigDict:
  """The robust role's PGD; step size ``step_size_factor * eps / steps``."""
  r = config.robust
  steps = int(r.eval_steps if evaluation else r.steps)
  return ml_collections.ConfigDict(dict(
      enabled=True, norm=attacks.check_norm(r.norm), eps=float(r.eps),
      step_size=float(r.step_size_factor) * float(r.eps) / max(steps, 1),
      steps=int(r.steps), eval_steps=int(r.eval_steps), random_start=bool(r.random_start)))


def cue_data(config: ml_collections.ConfigDict, mode: str = "present"
             ) -> ml_collections.ConfigDict:
  """The study's data with the shortcut cue; `mode` is the test split's cue."""
  cfg = ml_collections.ConfigDict(config.data.to_dict())
  s = config.shortcut
  cfg.shortcut = ml_collections.ConfigDict(dict(
      enabled=True, correlation=float(s.correlation), strength=float(s.strength),
      patch_size=int(s.patch_size), eval=mode, seed=int(s.seed)))
  return cfg


def model_config(config: ml_collections.ConfigDict, arch: str, role: str
                 ) -> ml_collections.ConfigDict:
  """The `job=train` config of (arch, role)."""
  cfg = ml_collections.ConfigDict(config.models[arch].to_dict())
  cfg.job = "train"
  cfg.seed = int(config.seed) + (1 if role == "second_seed" else 0)
  cfg.data = cue_data(config) if role == "shortcut" else ml_collections.ConfigDict(
      config.data.to_dict())
  adv = attack(config, evaluation=False)
  adv.enabled = role == "robust"
  cfg.train.adversarial = adv
  return cfg


def load_splits(config: ml_collections.ConfigDict, testbeds: Sequence[str]
                ) -> dict[str, Any]:
  """Clean train/test, and with the shortcut testbed the cue train split and one test
  split per evaluation mode."""
  out = {"train": data.source(config.data, "train"),
         "test": data.source(config.data, "test")}
  if "shortcut" in testbeds:
    out["cue_train"] = data.source(cue_data(config), "train")
    out["cue_tests"] = {m: data.source(cue_data(config, m), "test")
                        for m in config.shortcut.eval_modes}
  return out


def prepare_models(config: ml_collections.ConfigDict, workdir: epath.Path, arch: str,
                   roles: Sequence[str], splits: Mapping[str, Any]
                   ) -> tuple[dict[str, tuple[Any, Any]], list[dict[str, Any]]]:
  """Train or reuse every role of `arch`; ({role: (model, variables)}, table rows).

  Roles of one architecture share one model object, so sweeps between them share
  compiled programs.
  """
  bar = Progress(f"{arch} models", len(roles), unit="model", every_s=0.0)
  key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _EVAL_FOLD)
  zoo: dict[str, tuple[Any, Any]] = {}
  rows = []
  first = None
  for i, role in enumerate(roles):
    mid = f"{arch}_{role}"
    mdir = workdir / MODELS_DIR / mid
    _, trained = train_or_reuse(model_config(config, arch, role), mdir)
    model, variables, _ = checkpoint.load_trained(mdir)
    if first is None:
      first = model
    elif model == first:
      model = first
    zoo[role] = (model, variables)
    row = {"id": mid, "arch": arch, "role": role, "dir": str(mdir), "trained": trained}
    if "robust" in config.testbeds:
      ev = robust_eval(model, variables, splits["test"], attack(config, evaluation=True),
                       key, int(config.eval_batch_size),
                       workdir / EVALS_DIR / f"{mid}_pgd.json")
      row.update(clean=float(ev["accuracy"]), robust=float(ev["robust_accuracy"]))
    else:
      row.update(clean=_accuracy(model, variables, splits["test"], config), robust=None)
    for mode, split in splits.get("cue_tests", {}).items():
      row[f"cue_{mode}"] = _accuracy(model, variables, split, config)
    rows.append(row)
    bar.update(i + 1, extra=f"{mid} {'trained' if trained else 'reused'}: clean "
               f"{row['clean']:.3f}" + (f", robust {row['robust']:.3f}"
                                        if row["robust"] is not None else ""))
  return zoo, rows


def _accuracy(model, variables, split, config) -> float:
  return float(loop.evaluate(model, variables, split, int(config.eval_batch_size))
               ["accuracy"])


def stitch_settings(config: ml_collections.ConfigDict, testbed: str) -> dict[str, Any]:
  """The sweep settings of `testbed`: the shared ones, its cells, and for the robust
  testbed PGD on the stitched models at the robust models' eps."""
  cfg = sweep_settings.resolve(config.stitch)
  cfg["pairs"] = "all" if testbed == "cross_seed" else str(config.depth_pairs)
  if testbed == "robust":
    a = attack(config, evaluation=True)
    cfg["pgd"] = dict(enabled=True, norm=a.norm, eps=a.eps, step_size=a.step_size,
                      steps=int(a.eval_steps), random_start=a.random_start,
                      num_examples=int(config.robust.eval_examples))
  return cfg


def run_testbed(config: ml_collections.ConfigDict, workdir: epath.Path, arch: str,
                testbed: str, zoo: Mapping[str, tuple[Any, Any]],
                splits: Mapping[str, Any]) -> dict[str, stitching.SweepResult]:
  """Every pair of `testbed` for `arch`: {'front->end': SweepResult}, matrices saved."""
  cfg = stitch_settings(config, testbed)
  train, test, eval_sets = splits["train"], splits["test"], None
  if testbed == "shortcut":
    eval_sets = splits["cue_tests"]
    train, test = splits["cue_train"], eval_sets[config.shortcut.eval_modes[0]]
  out = {}
  for front, end in TESTBEDS[testbed]:
    name = pair_name((front, end))
    print(f"{arch} {testbed}: stitching {name}", flush=True)
    folder = workdir / STITCH_DIR / arch / testbed / f"{front}_to_{end}"
    (ma, va), (mb, vb) = zoo[front], zoo[end]
    res = stitching.run_sweep(ma, va, mb, vb, train, test, cfg, str(folder),
                              name_a=f"{arch}_{front}", name_b=f"{arch}_{end}",
                              eval_sets=eval_sets)
    for mname, m in res.matrices(f"{arch}_{front}", f"{arch}_{end}").items():
      m.meta.update(testbed=testbed, pair=name, architecture=arch)
      png = testbed == "cross_seed" and mname.endswith(("/accuracy", "/dm_error"))
      results.save(workdir, f"fula/{arch}/{testbed}/{front}_to_{end}/{mname}", m,
                   png=png)
    out[name] = res
  return out


def depth_records(arch: str, testbed: str, pair: str, res: stitching.SweepResult,
                  pairs_spec: str) -> list[dict[str, Any]]:
  """Tidy rows (one per objective, requested cell and measure) of a sweep."""
  cells, _ = stitch_plan.parse_pairs(pairs_spec, res.rows, res.cols)
  out = []
  for obj, measures in res.values.items():
    for r, c in cells:
      i, j = res.rows.index(r), res.cols.index(c)
      for measure, m in measures.items():
        out.append({"architecture": arch, "testbed": testbed, "pair": pair,
                    "objective": obj, "cell": stitch_plan.cell_key(r, c), "front_point": r,
                    "end_point": c, "depth": j, "measure": measure,
                    "value": float(m[i, j])})
  return out


def mean_over(records: Sequence[Mapping[str, Any]], **where: Any) -> float:
  vals = [r["value"] for r in records
          if all(r[k] == v for k, v in where.items()) and np.isfinite(r["value"])]
  return float(np.mean(vals)) if vals else float("nan")


def _by_objective(records, objectives, **where) -> dict[str, float]:
  return {o: mean_over(records, objective=o, **where) for o in objectives}


def display(objective: str) -> str:
  return {"fula": "FuLA"}.get(objective, objective.upper())


def _names(values: Mapping[str, float], spec: str = ".3f") -> str:
  return ", ".join(f"{display(o)} {fmt(v, spec)}" for o, v in values.items())


def compare_verdict(fula: float, tlm: float, n_test: int) -> str:
  """Which of the two rates a pair lower; closer than one test example is a tie."""
  if not (np.isfinite(fula) and np.isfinite(tlm)):
    return "FuLA and TLM cannot be compared here"
  if abs(fula - tlm) < 1.0 / n_test:
    return "FuLA and TLM rate this pair the same within one test example"
  return f"FuLA rates this pair {'lower' if fula < tlm else 'higher'} than TLM does"


def findings(arch: str, testbeds: Sequence[str], records: Sequence[dict],
             objectives: Sequence[str], modes: Sequence[str], cross: Mapping[str, Any],
             n_test: int) -> tuple[list[str], dict[str, Any]]:
  """Sentences computed from this run's numbers, and the numbers behind them."""
  rec = [r for r in records if r["architecture"] == arch]
  lines, facts = [], {}
  control = pair_name(CONTROL)
  compare = [o for o in ("fula", "tlm") if o in objectives]

  def lower_than(rating: Mapping[str, float], ctrl: Mapping[str, float]) -> str:
    """FuLA vs TLM on the pair, in absolute terms and relative to the control."""
    if len(compare) < 2:
      return ""
    rel = {o: rating[o] / ctrl[o] if ctrl[o] > 0 else np.nan for o in compare}
    return (f" {compare_verdict(rating['fula'], rating['tlm'], n_test)} "
            f"({fmt(rating['fula'], '.3f')} vs {fmt(rating['tlm'], '.3f')}); pair / "
            f"control: FuLA {fmt(rel['fula'], '.3f')}, TLM {fmt(rel['tlm'], '.3f')} "
            "(below 1: rated less alike than two standard seeds).")

  if "robust" in testbeds:
    pair = pair_name(("robust", "standard"))
    clean = _by_objective(rec, objectives, testbed="robust", pair=pair, measure="accuracy")
    ctrl = _by_objective(rec, objectives, testbed="robust", pair=control,
                         measure="accuracy")
    pgd = _by_objective(rec, objectives, testbed="robust", pair=pair,
                        measure="pgd_accuracy")
    pgd_ctrl = _by_objective(rec, objectives, testbed="robust", pair=control,
                             measure="pgd_accuracy")
    facts["robust"] = {"clean": clean, "control": ctrl, "pgd": pgd, "pgd_control": pgd_ctrl}
    lines.append(
        f"**Robust vs standard ({arch}).** Mean stitched accuracy over depth, {pair}: "
        f"{_names(clean)}; control {control}: {_names(ctrl)}." + lower_than(clean, ctrl)
        + f" Under PGD the {pair} stitches keep {_names(pgd)} (control: "
        f"{_names(pgd_ctrl)}).")
  if "shortcut" in testbeds:
    pair = pair_name(("shortcut", "standard"))
    main_mode = modes[0]
    present = _by_objective(rec, objectives, testbed="shortcut", pair=pair,
                            measure=f"accuracy@{main_mode}")
    ctrl = _by_objective(rec, objectives, testbed="shortcut", pair=control,
                         measure=f"accuracy@{main_mode}")
    facts["shortcut"] = {"present": present, "control": ctrl}
    text = (f"**Shortcut vs clean ({arch}).** Mean stitched accuracy over depth with the "
            f"cue {main_mode}, {pair}: {_names(present)}; control {control}: "
            f"{_names(ctrl)}." + lower_than(present, ctrl))
    if "absent" in modes and main_mode != "absent":
      absent = _by_objective(rec, objectives, testbed="shortcut", pair=pair,
                             measure="accuracy@absent")
      drop = {o: present[o] - absent[o] for o in objectives}
      facts["shortcut"].update(absent=absent, drop=drop)
      most = max(drop, key=lambda o: drop[o] if np.isfinite(drop[o]) else -np.inf)
      text += (f" Removing the cue costs these stitches {_names(drop)} accuracy; "
               f"{display(most)} depends on the cue most.")
    lines.append(text)
  if "cross_seed" in testbeds and cross:
    contrast = {o: cross[o]["diagonal"] - cross[o]["off_diagonal"] for o in objectives}
    facts["cross_seed"] = {o: dict(cross[o], contrast=contrast[o]) for o in objectives}
    sharpest = max(contrast, key=lambda o: contrast[o] if np.isfinite(contrast[o])
                   else -np.inf)
    lines.append(
        f"**Cross-layer matrices, two seeds ({arch}).** Mean accuracy on the diagonal "
        f"(depth-matched) minus off the diagonal: {_names(contrast)}; {display(sharpest)} "
        "separates matching from mismatched layers most sharply.")
  return lines, facts


def cross_summary(res: stitching.SweepResult) -> dict[str, dict[str, float]]:
  out = {}
  for obj, measures in res.values.items():
    m = measures["accuracy"]
    n = min(m.shape)
    diag = np.diag(m[:n, :n])
    off = m[~np.eye(*m.shape, dtype=bool)]
    out[obj] = {"diagonal": float(np.nanmean(diag)) if np.isfinite(diag).any() else np.nan,
                "off_diagonal": (float(np.nanmean(off)) if np.isfinite(off).any()
                                 else np.nan)}
  return out


# ---------------------------------------------------------------------------- figures


def _depth_lines(ax, records, objective, pair, measure, style, label, points):
  ys = []
  for p in points:
    v = [r["value"] for r in records if r["objective"] == objective and r["pair"] == pair
         and r["measure"] == measure and r["end_point"] == p]
    ys.append(v[0] if v else np.nan)
  ax.plot(np.arange(len(points)), ys, style, label=label)


def depth_figure(arch: str, testbed: str, records: Sequence[dict],
                 objectives: Sequence[str], panels: Sequence[tuple[str, str]],
                 lines: Sequence[tuple[str, str, str]], points: Sequence[str],
                 end_levels: Mapping[str, Mapping[str, float]]) -> bytes:
  """Rows = panels (measure, title), columns = objectives, lines = (pair, style, label)
  by the end point's depth; dotted grey lines mark the end models' own accuracy."""
  rec = [r for r in records if r["architecture"] == arch and r["testbed"] == testbed]
  fig = reporting.figure((3.4 * len(objectives), 2.9 * len(panels) + 0.5))
  for i, (measure, title) in enumerate(panels):
    for j, obj in enumerate(objectives):
      ax = fig.add_subplot(len(panels), len(objectives), i * len(objectives) + j + 1)
      for pair, style, label in lines:
        _depth_lines(ax, rec, obj, pair, measure, style, label, points)
      for name, level in end_levels.get(measure, {}).items():
        ax.axhline(level, color="grey", ls=":", lw=1)
        ax.text(len(points) - 1, level, name, fontsize=6, color="grey", ha="right",
                va="bottom")
      ax.set_ylim(0.0, 1.02)
      ax.set_xticks(np.arange(len(points)), points, rotation=45, ha="right", fontsize=7)
      ax.grid(alpha=0.3)
      ax.set_title(f"{display(obj)}: {title}", fontsize=9)
      if j == 0:
        ax.set_ylabel("accuracy")
      if i == 0 and j == len(objectives) - 1:
        ax.legend(fontsize=6)
  fig.suptitle(f"{arch}: {testbed} testbed, stitched accuracy by depth", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def cross_figure(arch: str, res: stitching.SweepResult, objectives: Sequence[str]) -> bytes:
  """Accuracy heatmaps of every objective, two per row, sized so values stay legible."""
  mats = res.matrices()
  n = max(len(res.rows), len(res.cols))
  ncols = min(2, len(objectives))
  nrows = -(-len(objectives) // ncols)
  fig = reporting.figure(((2.4 + 0.55 * n) * ncols, (1.9 + 0.45 * n) * nrows + 0.4))
  for j, obj in enumerate(objectives):
    ax = fig.add_subplot(nrows, ncols, j + 1)
    mats[f"stitch_{obj}/accuracy"].plot(ax=ax, vmin=0.0, vmax=1.0, fmt=".2f")
    ax.set_title(f"{display(obj)} stitched accuracy", fontsize=9)
    ax.set_xlabel("end model (standard), point")
    ax.set_ylabel("front model (second seed), point" if j % ncols == 0 else "")
  fig.suptitle(f"{arch}: cross-layer stitching, two seeds", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def summary_figure(arch: str, facts: Mapping[str, Any], objectives: Sequence[str]
                   ) -> bytes | None:
  """Bars per objective: each testbed pair's mean stitched accuracy next to the
  control's."""
  panels = []
  if "robust" in facts:
    f = facts["robust"]
    panels += [("robust vs standard: clean", {"robust->standard": f["clean"],
                                              "control": f["control"]}),
               ("robust vs standard: under PGD", {"robust->standard": f["pgd"],
                                                  "control": f["pgd_control"]})]
  if "shortcut" in facts:
    f = facts["shortcut"]
    bars = {"shortcut->standard, cue present": f["present"], "control": f["control"]}
    if "absent" in f:
      bars["shortcut->standard, cue absent"] = f["absent"]
    panels.append(("shortcut vs clean", bars))
  if not panels:
    return None
  fig = reporting.figure((4.2 * len(panels), 3.4))
  x = np.arange(len(objectives))
  for k, (title, bars) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), k + 1)
    width = 0.8 / len(bars)
    for b, (label, vals) in enumerate(bars.items()):
      ax.bar(x + (b - (len(bars) - 1) / 2) * width, [vals[o] for o in objectives],
             width, label=label)
    ax.set_xticks(x, [display(o) for o in objectives])
    ax.set_ylim(0.0, 1.3)
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("mean stitched accuracy over depth")
    ax.legend(fontsize=6, loc="upper center", ncol=2)
    ax.grid(alpha=0.3, axis="y")
  fig.suptitle(f"{arch}: how each objective rates the pairs", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)


# ----------------------------------------------------------------------------- report


def _depth_table(records, arch, testbed, objectives, columns) -> list[str]:
  """One row per (objective, cell): `columns` = [(header, pair, measure)]."""
  rec = [r for r in records if r["architecture"] == arch and r["testbed"] == testbed]
  cells = list(dict.fromkeys(r["cell"] for r in rec))
  rows = []
  for obj in objectives:
    for cell in cells:
      vals = []
      for _, pair, measure in columns:
        v = [r["value"] for r in rec if r["objective"] == obj and r["cell"] == cell
             and r["pair"] == pair and r["measure"] == measure]
        vals.append(fmt(v[0], ".3f") if v else "—")
      rows.append([display(obj), cell, *vals])
  return md_table(["objective", "cell", *(c[0] for c in columns)], rows)


def write_report(workdir: epath.Path, config: ml_collections.ConfigDict,
                 archs: Sequence[str], testbeds: Sequence[str], model_rows: Sequence[dict],
                 records: Sequence[dict], finding_lines: Mapping[str, list[str]],
                 cross: Mapping[str, Any], figures: Sequence[str], elapsed_s: float) -> str:
  objectives = [str(o) for o in config.stitch.objectives]
  modes = list(config.shortcut.eval_modes)
  r, s, st = config.robust, config.shortcut, config.stitch
  lines = [
      "# FuLA testbeds: do the stitching objectives tell apart models that differ?", "",
      f"Data: {config.data.name} ({config.data.image_size or 'native'} px); "
      f"architectures: {', '.join(archs)}; testbeds: {', '.join(testbeds)}; objectives: "
      f"{', '.join(display(o) for o in objectives)}. Robust models: PGD-{int(r.steps)} "
      f"{r.norm} adversarial training at ε = {float(r.eps):.4g}; stitched models are "
      f"attacked with PGD-{int(r.eval_steps)} at the same ε on the first "
      f"{int(r.eval_examples)} test images. Shortcut: a {int(s.patch_size)}-pixel corner "
      f"patch in the label's colour with probability {float(s.correlation):g} (strength "
      f"{float(s.strength):g}); stitches train on data with the cue and are scored with "
      f"it {', '.join(modes)}. Stitches: {st.epochs:g} epochs (or {int(st.steps)} steps "
      f"when > 0), batch {int(st.batch_size)}, Adam {float(st.learning_rate):g}, init "
      f"{st.init}; depth testbeds use cells '{config.depth_pairs}'. Run time: "
      f"{elapsed_s:.0f} s.", "",
      "A similarity measure should rate two models that are known to differ lower than "
      "two seeds of the same standard model (the control, second_seed->standard). "
      "Ratings below are mean stitched accuracies over the depth cells.", "",
      "## Findings (computed from this run)", ""]
  for arch in archs:
    lines += [f"- {line}" for line in finding_lines[arch]]
  lines += ["", "## Models", ""]
  cue_cols = [f"cue {m}" for m in modes] if "shortcut" in testbeds else []
  lines += md_table(
      ["model", "clean accuracy", f"PGD accuracy @ ε={float(r.eps):.4g}", *cue_cols,
       "this run"],
      [[row["id"], fmt(row["clean"], ".3f"), fmt(row["robust"], ".3f"),
        *(fmt(row.get(f"cue_{m}"), ".3f") for m in modes if cue_cols),
        "trained" if row["trained"] else "reused"] for row in model_rows])
  for arch in archs:
    if "robust" in testbeds:
      pairs = [pair_name(p) for p in TESTBEDS["robust"]]
      lines += ["", f"## {arch}: robust vs standard, by depth", ""]
      lines += _depth_table(records, arch, "robust", objectives,
                            [(f"{p} clean", p, "accuracy") for p in pairs]
                            + [(f"{p} PGD", p, "pgd_accuracy") for p in pairs])
    if "shortcut" in testbeds:
      pairs = [pair_name(p) for p in TESTBEDS["shortcut"]]
      lines += ["", f"## {arch}: shortcut vs clean, by depth", ""]
      lines += _depth_table(records, arch, "shortcut", objectives,
                            [(f"{p}, cue {m}", p, f"accuracy@{m}") for p in pairs
                             for m in modes])
    if "cross_seed" in testbeds and arch in cross:
      lines += ["", f"## {arch}: cross-layer matrices (second_seed -> standard)", "",
                f"Files: `results/fula_{arch}_cross_seed_second_seed_to_standard_stitch_"
                "<objective>_<measure>.*`.", ""]
      lines += md_table(["objective", "mean diagonal accuracy",
                         "mean off-diagonal accuracy"],
                        [[display(o), fmt(v["diagonal"], ".3f"),
                          fmt(v["off_diagonal"], ".3f")] for o, v in cross[arch].items()])
  lines += ["", "## Files", "",
            f"`{DEPTH_CSV}`: every number above, one row per architecture, testbed, pair, "
            "objective, cell and measure. `results/`: every sweep's matrices "
            "(`fula_jax.results.load(workdir)`). `stitch/`: resumable sweep units.", "",
            "## Figures", ""]
  lines += [f"![{f}]({FIGURES_DIR}/{f})" for f in figures] + [""]
  text = "\n".join(lines)
  if io.is_writer():
    io.write_text(workdir / REPORT_FILE, text)
  return text


def write_depth_csv(workdir: epath.Path, records: Sequence[dict]) -> None:
  import pandas as pd
  if io.is_writer():
    io.write_text(workdir / DEPTH_CSV,
                  pd.DataFrame.from_records(records).to_csv(index=False, na_rep="NaN"))


# -------------------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train or reuse the models, run every testbed, write results/figures/report.

  Returns the model table, the findings (sentences and the numbers behind them), the
  cross-seed summaries, which models were trained and the figure names.
  """
  t0 = time.perf_counter()
  workdir = io.path(workdir)
  archs, testbeds = check_config(config)
  objectives = [str(o) for o in config.stitch.objectives]
  modes = [str(m) for m in config.shortcut.eval_modes]
  splits = load_splits(config, testbeds)
  roles = roles_for(testbeds)
  model_rows, records, figures = [], [], {}
  finding_lines, facts, cross = {}, {}, {}
  for arch in archs:
    zoo, rows = prepare_models(config, workdir, arch, roles, splits)
    model_rows += rows
    by_role = {r["role"]: r for r in rows}
    sweeps = {}
    for testbed in testbeds:
      sweeps[testbed] = run_testbed(config, workdir, arch, testbed, zoo, splits)
      spec = "all" if testbed == "cross_seed" else str(config.depth_pairs)
      for pair, res in sweeps[testbed].items():
        records += depth_records(arch, testbed, pair, res, spec)
    if "cross_seed" in sweeps:
      res = sweeps["cross_seed"][pair_name(CONTROL)]
      cross[arch] = cross_summary(res)
      figures[f"cross_seed_{arch}.png"] = cross_figure(arch, res, objectives)
    finding_lines[arch], facts[arch] = findings(arch, testbeds, records, objectives, modes,
                                                cross.get(arch, {}),
                                                len(splits["test"]))
    points = list(zoo["standard"][0].point_names)
    if "robust" in testbeds:
      pairs = TESTBEDS["robust"]
      figures[f"robust_{arch}.png"] = depth_figure(
          arch, "robust", records, objectives,
          [("accuracy", "clean"), ("pgd_accuracy", "under PGD")],
          [(pair_name(p), s, pair_name(p)) for p, s in zip(pairs, ("o-", "s-", "^--"))],
          points,
          {"accuracy": {"standard": by_role["standard"]["clean"],
                        "robust": by_role["robust"]["clean"]},
           "pgd_accuracy": {"standard": by_role["standard"]["robust"],
                            "robust": by_role["robust"]["robust"]}})
    if "shortcut" in testbeds:
      pairs = TESTBEDS["shortcut"]
      figures[f"shortcut_{arch}.png"] = depth_figure(
          arch, "shortcut", records, objectives,
          [(f"accuracy@{m}", f"cue {m}") for m in modes],
          [(pair_name(p), s, pair_name(p)) for p, s in zip(pairs, ("o-", "s-", "^--"))],
          points,
          {f"accuracy@{m}": {"standard": by_role["standard"][f"cue_{m}"],
                             "shortcut": by_role["shortcut"][f"cue_{m}"]} for m in modes})
    bars = summary_figure(arch, facts[arch], objectives)
    if bars is not None:
      figures[f"summary_{arch}.png"] = bars
  if io.is_writer():
    for name, png in figures.items():
      io.write_bytes(workdir / FIGURES_DIR / name, png)
  write_depth_csv(workdir, records)
  elapsed = time.perf_counter() - t0
  write_report(workdir, config, archs, testbeds, model_rows, records, finding_lines,
               cross, list(figures), elapsed)
  out = {"workdir": str(workdir), "architectures": archs, "testbeds": testbeds,
         "models": model_rows, "trained": [r["id"] for r in model_rows if r["trained"]],
         "reused": [r["id"] for r in model_rows if not r["trained"]],
         "findings": finding_lines, "facts": facts, "cross_seed": cross,
         "figures": list(figures), "elapsed_s": elapsed}
  if io.is_writer():
    io.write_json(workdir / "summary.json", out)
  for arch in archs:
    for line in finding_lines[arch]:
      print("\n" + line.replace("**", ""), flush=True)
  print(f"\nReport: {workdir / REPORT_FILE} ({elapsed:.0f} s)", flush=True)
  return out


if __name__ == "__main__":
  from fula_jax import main
  main.script(run)
