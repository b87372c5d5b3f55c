"""The FuLA testbeds study's report: findings computed from the run's numbers, the
capacity ladder's verdicts, the out-of-distribution scores, and report.md (its figures
are drawn by experiments/fula_figures.py).

Everything here reads tidy records (one per architecture, testbed, pair, objective,
stitch map, cell and measure; `by_depth.csv`), never a sweep's files, so the report can
be rebuilt from the CSV alone. The main findings use one map (`affine` when the sweep
has it, else the first); the capacity section asks whether their FuLA vs TLM verdict
survives at every map of the ladder (`stitch.map`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from etils import epath

from fula_jax import data, io
from fula_jax.reporting import fmt, md_table, model_problem, no_finding
from fula_jax.stitching import ladder
from fula_jax.stitching import settings as sweep_settings

CONTROL = ("second_seed", "standard")
TESTBEDS = {
    "robust": (("robust", "standard"), ("standard", "robust"), CONTROL),
    "shortcut": (("shortcut", "standard"), ("standard", "shortcut"), CONTROL),
    "cross_seed": (CONTROL,),
}
FIGURES_DIR = "figures"
REPORT_FILE = "report.md"
DEPTH_CSV = "by_depth.csv"
OOD_MEASURES = ("energy_ood", "mahalanobis_ratio")


def pair_name(pair: Sequence[str]) -> str:
  return f"{pair[0]}->{pair[1]}"


def main_map(maps: Sequence[str]) -> str:
  """The map the main findings use: `affine` when swept, else the lowest on the
  ladder."""
  maps = ladder_order(maps) or ["affine"]
  return "affine" if "affine" in maps else maps[0]


def ladder_order(maps: Sequence[str]) -> list[str]:
  """`maps` from the least to the most capacity: the ladder's order, then an entry's
  own options ('lowrank:rank=2' before 'lowrank:rank=8')."""
  order = list(ladder.MAPS)

  def key(entry: str):
    form, own = ladder.parse_entry(entry)
    return order.index(form), tuple(float(v) for _, v in sorted(own.items())
                                    if not isinstance(v, str))
  return sorted(maps, key=key)


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


def model_problems(model_rows: Sequence[Mapping[str, Any]], num_classes: int
                   ) -> list[str]:
  """Why this run's models cannot carry the findings ([] when they can), by
  `reporting.model_problem`; a shortcut model is judged with its cue present (without
  it, it is meant to fail)."""
  problems = []
  for row in model_rows:
    shortcut, robust = (str(row["id"]).endswith(k) for k in ("shortcut", "robust"))
    accuracy = max(row["clean"], row.get("cue_present") or 0.0) if shortcut else (
        row["clean"])
    problems.append(model_problem(row["id"], accuracy, row.get("robust") if robust
                                  else None, num_classes))
  return [p for p in problems if p]


def compare_verdict(fula: float, tlm: float, n_test: int) -> str:
  """Which of the two rates a pair lower; closer than one test example is a tie."""
  word = verdict_word(fula, tlm, n_test)
  if word == "n/a":
    return "FuLA and TLM cannot be compared here"
  if word == "same":
    return "FuLA and TLM rate this pair the same within one test example"
  return f"FuLA rates this pair {word} than TLM does"


def verdict_word(fula: float, tlm: float, n_test: int) -> str:
  """'lower' / 'higher' (FuLA's rating against TLM's), 'same' within one test example,
  or 'n/a' when either is missing."""
  if not (np.isfinite(fula) and np.isfinite(tlm)):
    return "n/a"
  if abs(fula - tlm) < 1.0 / n_test:
    return "same"
  return "lower" if fula < tlm else "higher"


def findings(arch: str, testbeds: Sequence[str], records: Sequence[dict],
             objectives: Sequence[str], modes: Sequence[str], cross: Mapping[str, Any],
             n_test: int, form: str = "affine") -> tuple[list[str], dict[str, Any]]:
  """Sentences computed from this run's numbers at map `form`, and the numbers behind
  them."""
  rec = [r for r in records if r["architecture"] == arch and r["map"] == form]
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


def cross_summary(res: Any, form: str = "affine") -> dict[str, dict[str, float]]:
  """Per objective at map `form`: mean accuracy on and off the diagonal of a sweep
  (a `stitching.SweepResult`)."""
  out = {}
  for key, measures in res.values.items():
    obj, m_form = res.objective_map(key)
    if m_form != form:
      continue
    m = measures["accuracy"]
    n = min(m.shape)
    diag = np.diag(m[:n, :n])
    off = m[~np.eye(*m.shape, dtype=bool)]
    out[obj] = {"diagonal": float(np.nanmean(diag)) if np.isfinite(diag).any() else np.nan,
                "off_diagonal": (float(np.nanmean(off)) if np.isfinite(off).any()
                                 else np.nan)}
  return out


# ---------------------------------------------------------------------------- capacity


def _testbed_measure(testbed: str, modes: Sequence[str]) -> str:
  return "accuracy" if testbed == "robust" else f"accuracy@{modes[0]}"


def capacity(arch: str, testbeds: Sequence[str], records: Sequence[dict],
             maps: Sequence[str], modes: Sequence[str], n_test: int
             ) -> tuple[list[str], dict[str, Any]]:
  """Does the FuLA vs TLM verdict survive across stitch capacities?

  Per testbed and map: FuLA's and TLM's mean stitched accuracy over depth on the
  differing pair and on the control, and which objective rates the pair lower
  (`verdict_word`); for cross_seed, each objective's diagonal minus off-diagonal mean.
  Returns sentences (one per testbed, when the sweep has several maps) and the numbers.
  """
  rec = [r for r in records if r["architecture"] == arch]
  maps = ladder_order(maps)
  ref = main_map(maps)
  control = pair_name(CONTROL)
  lines, facts = [], {}
  for testbed in ("robust", "shortcut"):
    if testbed not in testbeds:
      continue
    pair, measure = pair_name((testbed, "standard")), _testbed_measure(testbed, modes)
    rows = {}
    for m in maps:
      val = {f"{o}{suffix}": mean_over(rec, testbed=testbed, pair=p, measure=measure,
                                       objective=o, map=m)
             for o in ("fula", "tlm") for suffix, p in (("", pair), ("_control", control))}
      val["verdict"] = verdict_word(val["fula"], val["tlm"], n_test)
      rows[m] = val
    facts[testbed] = rows
    if len(maps) < 2:
      continue
    words = {m: v["verdict"] for m, v in rows.items()}
    judged = [m for m in maps if words[m] != "n/a"]
    if words[ref] == "n/a" or not judged:
      tail = f"there is no verdict at the {ref} map to compare."
    else:
      changed = [m for m in judged if words[m] != words[ref]]
      tail = (f"the verdict at the {ref} map (FuLA {words[ref]}) survives at every "
              "capacity." if not changed else
              f"the verdict at the {ref} map (FuLA {words[ref]}) holds at "
              f"{len(judged) - len(changed)} of {len(judged)} maps and changes at "
              f"{', '.join(changed)}.")
    lines.append(f"**Across stitch capacities ({arch}, {testbed}, {measure}).** How FuLA "
                 f"rates {pair} against TLM, by map: "
                 + ", ".join(f"{m} {words[m]}" for m in maps) + "; " + tail)
  if "cross_seed" in testbeds:
    rows = {}
    for m in maps:
      cross = [r for r in rec if r["testbed"] == "cross_seed" and r["map"] == m
               and r["measure"] == "accuracy"]
      on = [r for r in cross if r["front_point"] == r["end_point"]]
      off = [r for r in cross if r["front_point"] != r["end_point"]]
      rows[m] = {o: mean_over(on, objective=o) - mean_over(off, objective=o)
                 for o in ("fula", "tlm")}
    facts["cross_seed"] = rows
  return lines, facts


def ood_summary(arch: str, records: Sequence[dict], form: str
                ) -> tuple[list[str], dict[str, Any]]:
  """Mean OOD scores over depth per testbed, pair and objective at map `form` (empty
  when the sweeps did not score them), and one sentence per testbed."""
  rec = [r for r in records if r["architecture"] == arch and r["map"] == form
         and r["measure"] in OOD_MEASURES]
  facts: dict[str, Any] = {}
  for r in rec:
    facts.setdefault(r["testbed"], {}).setdefault(r["pair"], {}).setdefault(
        r["objective"], {})
  for testbed, pairs in facts.items():
    for pair, objs in pairs.items():
      for obj in objs:
        objs[obj] = {m: mean_over(rec, testbed=testbed, pair=pair, objective=obj, measure=m)
                     for m in OOD_MEASURES}
  lines = []
  for testbed, pairs in facts.items():
    said = "; ".join(
        f"{pair}: " + ", ".join(f"{display(o)} {fmt(v['mahalanobis_ratio'], '.2f')}"
                                for o, v in objs.items()) for pair, objs in pairs.items())
    lines.append(f"**How far stitched activations lie from g's own ({arch}, {testbed}, "
                 f"{form} map).** Mean Mahalanobis ratio over depth (1: as typical as "
                 f"g's own held-out activations; larger: further out) -- {said}.")
  return lines, facts


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


def map_list(stitch: Mapping[str, Any]) -> list[str]:
  """The map entries of a study's `stitch` block, as the sweep reads them."""
  return list(sweep_settings.resolve(stitch)["map"] or ["affine"])


def _capacity_tables(arch: str, capacity_facts: Mapping[str, Any], maps: Sequence[str]
                     ) -> list[str]:
  if len(maps) < 2 or not capacity_facts:
    return []
  lines = ["", f"## {arch}: FuLA vs TLM across stitch capacities", "",
           "Mean stitched accuracy over depth per map (ladder order); pair / control "
           "below 1 means the pair is rated less alike than two standard seeds; the "
           "verdict says how FuLA rates the pair against TLM.", ""]
  rows = []
  for testbed in ("robust", "shortcut"):
    for m, v in capacity_facts.get(testbed, {}).items():
      rel = {o: v[o] / v[f"{o}_control"] if v[f"{o}_control"] > 0 else np.nan
             for o in ("fula", "tlm")}
      rows.append([testbed, m, fmt(v["fula"], ".3f"), fmt(v["fula_control"], ".3f"),
                   fmt(rel["fula"], ".3f"), fmt(v["tlm"], ".3f"),
                   fmt(v["tlm_control"], ".3f"), fmt(rel["tlm"], ".3f"), v["verdict"]])
  if rows:
    lines += md_table(["testbed", "map", "FuLA pair", "FuLA control", "FuLA pair/control",
                       "TLM pair", "TLM control", "TLM pair/control", "FuLA vs TLM"],
                      rows)
  if "cross_seed" in capacity_facts:
    lines += ["", "Cross-seed matrices: mean diagonal minus mean off-diagonal accuracy.",
              ""]
    lines += md_table(["map", "FuLA", "TLM"],
                      [[m, fmt(v["fula"], ".3f"), fmt(v["tlm"], ".3f")]
                       for m, v in capacity_facts["cross_seed"].items()])
  return lines


def _ood_table(arch: str, ood_facts: Mapping[str, Any], form: str) -> list[str]:
  if not ood_facts:
    return []
  lines = ["", f"## {arch}: out-of-distribution scores of the stitched activations "
           f"({form} map)", "",
           "Means over depth. energy_ood: the share of stitched logits whose energy is "
           "above the 95% quantile of g's own; mahalanobis_ratio: the stitched "
           "activation's Mahalanobis distance under g's own Gaussian at the stitch point, "
           "over that of g's held-out activations (1: in distribution).", ""]
  rows = [[testbed, pair, display(obj), fmt(v["energy_ood"], ".3f"),
           fmt(v["mahalanobis_ratio"], ".3f")]
          for testbed, pairs in ood_facts.items() for pair, objs in pairs.items()
          for obj, v in objs.items()]
  return lines + md_table(["testbed", "pair", "objective", "energy_ood",
                           "mahalanobis_ratio"], rows)


def write_report(workdir: epath.Path, config: ml_collections.ConfigDict,
                 archs: Sequence[str], testbeds: Sequence[str], model_rows: Sequence[dict],
                 records: Sequence[dict], finding_lines: Mapping[str, list[str]],
                 cross: Mapping[str, Any], facts: Mapping[str, Any],
                 figures: Sequence[str], elapsed_s: float) -> str:
  objectives = [str(o) for o in config.stitch.objectives]
  modes = list(config.shortcut.eval_modes)
  r, s, st = config.robust, config.shortcut, config.stitch
  maps = ladder_order(map_list(st))
  form = main_map(maps)
  main = [rec for rec in records if rec["map"] == form]
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
      f"{st.init}; depth testbeds use cells '{config.depth_pairs}'. Stitch maps: "
      f"{', '.join(maps)} (options {dict(st.map_options)}; the findings and depth tables "
      f"use {form}). Run time: {elapsed_s:.0f} s.", "",
      "A similarity measure should rate two models that are known to differ lower than "
      "two seeds of the same standard model (the control, second_seed->standard). "
      "Ratings below are mean stitched accuracies over the depth cells.", "",
      "## Models (read these first)", ""]
  cue_cols = [f"cue {m}" for m in modes] if "shortcut" in testbeds else []
  lines += md_table(
      ["model", "clean accuracy", f"PGD accuracy @ ε={float(r.eps):.4g}", *cue_cols,
       "this run"],
      [[row["id"], fmt(row["clean"], ".3f"), fmt(row["robust"], ".3f"),
        *(fmt(row.get(f"cue_{m}"), ".3f") for m in modes if cue_cols),
        "trained" if row["trained"] else "reused"] for row in model_rows])
  lines += ["", "## Findings (computed from this run)", ""]
  problems = model_problems(model_rows, data.num_classes(config.data))
  if problems:
    lines += [no_finding(problems, "findings")]
  else:
    for arch in archs:
      lines += [f"- {line}" for line in finding_lines[arch]]
  for arch in archs:
    if "robust" in testbeds:
      pairs = [pair_name(p) for p in TESTBEDS["robust"]]
      lines += ["", f"## {arch}: robust vs standard, by depth", ""]
      lines += _depth_table(main, arch, "robust", objectives,
                            [(f"{p} clean", p, "accuracy") for p in pairs]
                            + [(f"{p} PGD", p, "pgd_accuracy") for p in pairs])
    if "shortcut" in testbeds:
      pairs = [pair_name(p) for p in TESTBEDS["shortcut"]]
      lines += ["", f"## {arch}: shortcut vs clean, by depth", ""]
      lines += _depth_table(main, arch, "shortcut", objectives,
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
    lines += _capacity_tables(arch, facts[arch].get("capacity", {}), maps)
    lines += _ood_table(arch, facts[arch].get("ood", {}), form)
  lines += ["", "## Files", "",
            f"`{DEPTH_CSV}`: every number above, one row per architecture, testbed, pair, "
            "objective, stitch map, cell and measure. `results/`: every sweep's matrices "
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
