"""Study 1: the FuLA testbeds. Do the stitching objectives tell apart models that are
known to differ?

Per architecture of ``config.architectures`` four models are trained (or reused from
``<workdir>/models/<arch>_<role>``): `standard`, `second_seed`, `robust` (PGD adversarial
training) and `shortcut` (trained with a label-coloured corner patch). Every sweep trains
TLM, SLM, FuLA and DM stitches at once, through every stitch map of ``stitch.map`` (the
capacity ladder; fula_jax.stitching.run_sweep, resumable from ``<workdir>/stitch``):

* robust: depth-matched stitches robust -> standard, standard -> robust and the control
  second_seed -> standard; clean accuracy and accuracy under PGD of the stitched model;
* shortcut: the same pairs with the shortcut model, trained on data with the cue and
  scored with the cue present, absent and permuted;
* cross_seed: the full L x L matrix second_seed -> standard.

A similarity measure should rate a pair of models that differ (robust vs standard, a
shortcut model vs a clean one) lower than two standard seeds; the report computes, per
objective, each pair's mean stitched accuracy over depth and its gap to the control, and
answers e.g. "does FuLA rate the shortcut pair lower than TLM does?" from this run's
numbers, then whether that verdict survives at every map of the ladder, and (with
``stitch.ood_examples``) how far each objective's stitched activations lie from the end
model's own. The report is built in experiments/fula_report.py, its figures in
experiments/fula_figures.py. Outputs: ``results/``
(matrices, ``fula_jax.results.load``), ``by_depth.csv`` (one row per architecture,
testbed, pair, objective, stitch map, cell and measure), ``figures/``, ``report.md`` and
``summary.json``.

  python experiments/study_fula.py --config=configs/study_fula.py:runlocal \
      --workdir=workdirs/fula

Launch commands for every scale and the expected run times are in configs/study_fula.py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from etils import epath

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import fula_figures as figures_lib  # noqa: E402
from experiments import fula_report as report  # noqa: E402
from experiments.fula_report import (  # noqa: E402,F401  (the study's names)
    CONTROL, DEPTH_CSV, FIGURES_DIR, REPORT_FILE, TESTBEDS, pair_name)
from fula_jax import attacks, data, errors, io, registry, results  # noqa: E402
from fula_jax.data import transforms  # noqa: E402
from fula_jax.progress import Progress  # noqa: E402
from fula_jax import stitching  # noqa: E402
from fula_jax.stitching import plan as stitch_plan  # noqa: E402
from fula_jax.stitching import settings as sweep_settings  # noqa: E402
from fula_jax.train import checkpoint, loop  # noqa: E402
from fula_jax.train.zoo import robust_eval, train_or_reuse  # noqa: E402

ROLES = ("standard", "second_seed", "robust", "shortcut")
OBJECTIVES = ("tlm", "slm", "dm", "fula")
MODELS_DIR = "models"
EVALS_DIR = "evals"
STITCH_DIR = "stitch"
_EVAL_FOLD = 2


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
  """Tidy rows (one per objective, stitch map, requested cell and measure) of a
  sweep."""
  cells, _ = stitch_plan.parse_pairs(pairs_spec, res.rows, res.cols)
  out = []
  for key, measures in res.values.items():
    obj, form = res.objective_map(key)
    for r, c in cells:
      i, j = res.rows.index(r), res.cols.index(c)
      for measure, m in measures.items():
        out.append({"architecture": arch, "testbed": testbed, "pair": pair,
                    "objective": obj, "map": form, "cell": stitch_plan.cell_key(r, c),
                    "front_point": r, "end_point": c, "depth": j, "measure": measure,
                    "value": float(m[i, j])})
  return out


# -------------------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train or reuse the models, run every testbed, write results/figures/report.

  Returns the model table, the findings (sentences and the numbers behind them: per
  architecture the main map's testbeds, the capacity ladder's verdicts under
  'capacity' and the OOD scores under 'ood'), the cross-seed summaries, which models
  were trained and the figure names.
  """
  t0 = time.perf_counter()
  workdir = io.path(workdir)
  archs, testbeds = check_config(config)
  objectives = [str(o) for o in config.stitch.objectives]
  modes = [str(m) for m in config.shortcut.eval_modes]
  maps = report.map_list(config.stitch)
  form = report.main_map(maps)
  splits = load_splits(config, testbeds)
  n_test = len(splits["test"])
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
      cross[arch] = report.cross_summary(res, form)
      figures[f"cross_seed_{arch}.png"] = figures_lib.cross_figure(arch, res, objectives,
                                                                   form)
    finding_lines[arch], facts[arch] = report.findings(
        arch, testbeds, records, objectives, modes, cross.get(arch, {}), n_test, form)
    more, facts[arch]["capacity"] = report.capacity(arch, testbeds, records, maps, modes,
                                                    n_test)
    finding_lines[arch] += more
    more, facts[arch]["ood"] = report.ood_summary(arch, records, form)
    finding_lines[arch] += more
    main = [r for r in records if r["map"] == form]
    points = list(zoo["standard"][0].point_names)
    if "robust" in testbeds:
      pairs = TESTBEDS["robust"]
      figures[f"robust_{arch}.png"] = figures_lib.depth_figure(
          arch, "robust", main, objectives,
          [("accuracy", "clean"), ("pgd_accuracy", "under PGD")],
          [(pair_name(p), s, pair_name(p)) for p, s in zip(pairs, ("o-", "s-", "^--"))],
          points,
          {"accuracy": {"standard": by_role["standard"]["clean"],
                        "robust": by_role["robust"]["clean"]},
           "pgd_accuracy": {"standard": by_role["standard"]["robust"],
                            "robust": by_role["robust"]["robust"]}})
    if "shortcut" in testbeds:
      pairs = TESTBEDS["shortcut"]
      figures[f"shortcut_{arch}.png"] = figures_lib.depth_figure(
          arch, "shortcut", main, objectives,
          [(f"accuracy@{m}", f"cue {m}") for m in modes],
          [(pair_name(p), s, pair_name(p)) for p, s in zip(pairs, ("o-", "s-", "^--"))],
          points,
          {f"accuracy@{m}": {"standard": by_role["standard"][f"cue_{m}"],
                             "shortcut": by_role["shortcut"][f"cue_{m}"]} for m in modes})
    for name, png in ((f"summary_{arch}.png",
                       figures_lib.summary_figure(arch, facts[arch], objectives)),
                      (f"capacity_{arch}.png",
                       figures_lib.capacity_figure(arch, facts[arch]["capacity"], maps))):
      if png is not None:
        figures[name] = png
  if io.is_writer():
    for name, png in figures.items():
      io.write_bytes(workdir / FIGURES_DIR / name, png)
  report.write_depth_csv(workdir, records)
  elapsed = time.perf_counter() - t0
  report.write_report(workdir, config, archs, testbeds, model_rows, records, finding_lines,
                      cross, facts, list(figures), elapsed)
  out = {"workdir": str(workdir), "architectures": archs, "testbeds": testbeds,
         "models": model_rows, "trained": [r["id"] for r in model_rows if r["trained"]],
         "reused": [r["id"] for r in model_rows if not r["trained"]],
         "findings": finding_lines, "facts": facts, "cross_seed": cross,
         "figures": list(figures), "elapsed_s": elapsed}
  for arch in archs:
    for line in finding_lines[arch]:
      print("\n" + line.replace("**", ""), flush=True)
  print(f"\nDone in {elapsed:.0f} s.", flush=True)
  results.finish_job(workdir, out, report=workdir / REPORT_FILE)
  return out


if __name__ == "__main__":
  from fula_jax import main
  main.script(run)
