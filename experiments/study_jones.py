"""Study 2: inter-architecture inverted-image CKA (Jones et al., UAI 2022) as eps grows.

For every L-inf radius eps of ``config.eps`` and every architecture of
``config.architectures`` a model is trained (PGD adversarial training for eps > 0) or,
when ``<workdir>/models/<arch>_eps<eps>/summary.json`` exists, reused. One set of
(seed, target) test-image pairs with different labels is drawn once and used for every
reference model at every eps. Per eps the study computes

* the inverted-image CKA matrix S: row A is the reference model whose penultimate
  representation the seeds are optimised to match, column B the model compared, and
  ``S[A, B] = linear CKA(rep_A(X_A), rep_B(X_A))`` on A's inverted images X_A;
* plain linear CKA between the same representations on natural test images,

and writes both matrices through :mod:`fula_jax.results` (names
``jones/eps<eps>/inverted_cka`` and ``jones/eps<eps>/natural_cka``), heatmaps and a curve
of the mean off-diagonal similarity against eps under ``<workdir>/figures``, and
``<workdir>/report.md`` whose finding (does the inter-architecture inverted-image CKA
rise with eps?) is computed from the matrices of this run.

  python experiments/study_jones.py --config=configs/study_jones.py:runlocal \
      --workdir=workdirs/jones

Launch commands for every scale and the expected run times are in
configs/study_jones.py.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from fula_jax import attacks, data, errors, io, models, registry, reporting, results
from fula_jax.progress import Progress
from fula_jax.reporting import fmt, md_table, model_problem, no_finding
from fula_jax.similarity import inversion
from fula_jax.train import checkpoint
from fula_jax.train.zoo import robust_eval, train_or_reuse

MEASURES = ("inverted_cka", "natural_cka")
MODELS_DIR = "models"
EVALS_DIR = "evals"
FIGURES_DIR = "figures"
REPORT_FILE = "report.md"
NATURAL_IMAGES = ("seeds", "test")
OFFDIAG_HEADER = ("| ε | mean off-diagonal inverted CKA | mean off-diagonal natural CKA "
                  "| inversion loss (initial → final) | loss reduction |")
INVERSIONS_DIR = "inversions"
N_EXAMPLES = 6
_PAIRS_FOLD = 1
_EVAL_FOLD = 2


def eps_tag(eps: float) -> str:
  return f"{float(eps):g}"


def label(arch: str) -> str:
  """An architecture's name in ids, files and figures: 'resnet18' for
  'torchvision:resnet18' (the robustness library's file names), else itself."""
  return arch.partition(":")[2] or arch


def load_pretrained(arch: str, path: Any, image_size: int) -> tuple[Any, Any]:
  """A pretrained zoo member: a PyTorch architecture ('torchvision:resnet18') through
  `from_torch`, or a Flax layout of the zoo ('imagenet_resnet18')."""
  if ":" in arch:
    from fula_jax.models import torch_zoo
    return torch_zoo.load(arch, path, image_size=image_size)
  return models.load_weights(arch, path)


def model_id(arch: str, eps: float) -> str:
  return f"{arch}_eps{eps_tag(eps)}"


def result_name(eps: float, measure: str) -> str:
  return f"jones/eps{eps_tag(eps)}/{measure}"


def eps_label(eps: float, all_eps: Sequence[float]) -> str:
  """'2/255' style labels for CIFAR-scale grids, plain numbers otherwise."""
  quarter_255 = all(abs(e * 1020 - round(e * 1020)) < 1e-6 for e in all_eps)
  if eps and quarter_255 and max(all_eps) <= 16 / 255 + 1e-9:
    return f"{eps * 255:g}/255"
  return eps_tag(eps)


def check_grid(config: ml_collections.ConfigDict) -> tuple[list[str], list[float]]:
  """Validated architectures (config order) and eps values (ascending)."""
  archs = [str(a) for a in config.architectures]
  if len(archs) < 2 or len({label(a) for a in archs}) != len(archs):
    raise errors.ConfigError("config.architectures needs at least two distinct architectures "
                     f"for inter-architecture similarity, got {archs}.")
  for a in archs:
    if config.get("weights") and ":" in a:
      from fula_jax.models import torch_zoo
      torch_zoo.split(a)
    elif config.get("weights"):
      registry.lookup("model", a, models.MODELS)
    elif a not in config.models:
      raise registry.unknown("study architecture (no entry in config.models)", a,
                             list(config.models.keys()))
  eps = [float(e) for e in config.eps]
  if not eps or len(set(eps_tag(e) for e in eps)) != len(eps):
    raise errors.ConfigError(f"config.eps must be non-empty and distinct, got {eps}.")
  linf = attacks.check_norm(config.attack.norm) == "linf"
  if any(e < 0 or (linf and e > 1.0) for e in eps):
    raise errors.ConfigError(f"config.eps are {config.attack.norm} radii in pixel units "
                             f"({'[0, 1]' if linf else 'non-negative'}), got {eps}.")
  registry.lookup("natural-image set", config.natural, {n: n for n in NATURAL_IMAGES})
  return archs, sorted(eps)


def attack_for(config: ml_collections.ConfigDict, eps: float, *, evaluation: bool
               ) -> ml_collections.ConfigDict:
  """PGD settings at radius `eps`: step size ``step_size_factor * eps / steps``."""
  a = config.attack
  steps = int(a.eval_steps if evaluation else a.steps)
  return ml_collections.ConfigDict(dict(
      enabled=eps > 0, norm=attacks.check_norm(a.norm), eps=float(eps),
      step_size=float(a.step_size_factor) * float(eps) / max(steps, 1),
      steps=int(a.steps), eval_steps=int(a.eval_steps),
      random_start=bool(a.random_start)))


def model_config(config: ml_collections.ConfigDict, arch: str, eps: float
                 ) -> ml_collections.ConfigDict:
  """The `job=train` config of (arch, eps): the study's data, seed and attack."""
  cfg = ml_collections.ConfigDict(config.models[arch].to_dict())
  cfg.job = "train"
  cfg.data = ml_collections.ConfigDict(config.data.to_dict())
  cfg.seed = int(config.seed)
  train_attack = attack_for(config, eps, evaluation=False)
  cfg.train.adversarial = train_attack
  return cfg


def offdiag_mean(m: np.ndarray) -> float:
  """Mean of the finite off-diagonal entries (NaN when there are none)."""
  m = np.asarray(m, np.float64)
  vals = m[~np.eye(m.shape[0], dtype=bool)]
  vals = vals[np.isfinite(vals)]
  return float(np.mean(vals)) if vals.size else float("nan")


def trend(eps: Sequence[float], values: Sequence[float]) -> dict[str, Any]:
  """Does `values` rise with eps? Spearman rho > 0 and a higher value at the top eps."""
  from scipy import stats
  x, y = np.asarray(eps, np.float64), np.asarray(values, np.float64)
  ok = np.isfinite(y)
  x, y = x[ok], y[ok]
  rho = float("nan")
  if x.size >= 2 and np.ptp(y) > 0:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rho = float(stats.spearmanr(x, y)[0])
  delta = float(y[-1] - y[0]) if x.size >= 2 else float("nan")
  rises = bool(x.size >= 2 and delta > 0 and rho > 0)
  return {"rises": rises, "spearman_rho": rho, "delta": delta,
          "monotone": bool(x.size >= 2 and np.all(np.diff(y) > 0)),
          "first": float(y[0]) if y.size else float("nan"),
          "last": float(y[-1]) if y.size else float("nan")}


def donor_problems(model_rows: Sequence[Mapping[str, Any]], num_classes: int
                   ) -> list[str]:
  """Why this run's models cannot carry a verdict on the trend ([] when they can),
  by `reporting.model_problem`: a trend over eps means nothing unless the models
  learned and the robust ones are robust."""
  problems = [model_problem(f"{r['arch']} at eps {r['eps']:g}", r["clean"],
                            r.get("robust_own") if r["eps"] > 0 else None, num_classes)
              for r in model_rows]
  return [p for p in problems if p]


def no_verdict(problems: Sequence[str]) -> str:
  return no_finding(problems, "verdict on the trend")


def _finding(measure_words: str, eps: Sequence[float], tr: Mapping[str, Any]) -> str:
  verb = "rises" if tr["rises"] else "does not rise"
  mono = ", rising at every step" if tr["monotone"] else ""
  return (f"Inter-architecture {measure_words} {verb} with ε in this run: mean "
          f"off-diagonal {tr['first']:.4f} at ε={eps_label(eps[0], eps)} → "
          f"{tr['last']:.4f} at ε={eps_label(eps[-1], eps)} (Spearman ρ = "
          f"{tr['spearman_rho']:.2f}{mono}).")


def heatmap_figure(inv: results.Matrix, nat: results.Matrix, label: str) -> bytes:
  """Inverted-image CKA and natural-image CKA side by side on one colour scale."""
  n = len(inv.rows)
  fig = reporting.figure((2 * (3.2 + 0.7 * n), 2.8 + 0.55 * n))
  for i, (m, title, ylabel) in enumerate((
      (inv, f"inverted-image CKA, ε={label}", "reference model A (its inverted images)"),
      (nat, f"CKA on natural images, ε={label}", "model A"))):
    ax = fig.add_subplot(1, 2, i + 1)
    m.plot(ax=ax, vmin=0.0, vmax=1.0, fmt=".3f")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("model B")
    ax.set_ylabel(ylabel)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def inversions_figure(seeds: np.ndarray, targets: np.ndarray,
                      inverted: Mapping[str, np.ndarray], label: str) -> bytes:
  """A few pairs: seed, target, and the image each reference model inverted."""
  columns = [("seed", seeds), ("target", targets)] + [
      (f"inverted by {a}", x) for a, x in inverted.items()]
  n = len(seeds)
  fig = reporting.figure((1.6 * len(columns), 1.6 * n + 0.6))
  for i in range(n):
    for j, (title, images) in enumerate(columns):
      ax = fig.add_subplot(n, len(columns), i * len(columns) + j + 1)
      img = np.clip(images[i], 0.0, 1.0)
      if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
      else:
        ax.imshow(img, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=8)
  fig.suptitle(f"inverted images, ε={label}", fontsize=10)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def curve_figure(eps: Sequence[float], offdiag: Mapping[str, Sequence[float]],
                 accuracy: Mapping[str, Mapping[str, Sequence[float]]],
                 eval_label: str) -> bytes:
  """Mean off-diagonal similarity vs eps, and every model's clean/robust accuracy."""
  fig = reporting.figure((11, 4))
  x = np.arange(len(eps))
  labels = [eps_label(e, eps) for e in eps]
  ax = fig.add_subplot(1, 2, 1)
  for measure, style in (("inverted_cka", "o-"), ("natural_cka", "s--")):
    ax.plot(x, offdiag[measure], style, label=measure.replace("_", " "))
  ax.set_ylabel("mean off-diagonal linear CKA")
  ax.set_title("inter-architecture similarity")
  ax.legend()
  ax2 = fig.add_subplot(1, 2, 2)
  for i, (arch, acc) in enumerate(accuracy.items()):
    colour = f"C{i}"
    ax2.plot(x, acc["clean"], "o-", color=colour, label=f"{arch} clean")
    ax2.plot(x, acc["robust"], "^:", color=colour, label=f"{arch} robust @ ε={eval_label}")
  ax2.set_ylabel("test accuracy")
  ax2.set_ylim(0.0, 1.02)
  ax2.set_title("accuracy of the models")
  ax2.legend(fontsize=7)
  for a in (ax, ax2):
    a.set_xticks(x, labels)
    a.set_xlabel("training ε (L∞)")
    a.grid(alpha=0.3)
  fig.tight_layout()
  return reporting.png_bytes(fig)


def write_report(workdir: epath.Path, config: ml_collections.ConfigDict,
                 archs: Sequence[str], eps: Sequence[float], model_rows: Sequence[dict],
                 per_eps: Sequence[dict], trends: Mapping[str, dict], eval_eps: float,
                 figures: Sequence[str], elapsed_s: float, num_classes: int) -> str:
  inv = config.inversion
  lines = [
      "# Jones et al. study: inter-architecture inverted-image CKA vs adversarial ε", "",
      f"Data: {config.data.name} ({config.data.image_size or 'native'} px), "
      f"architectures: {', '.join(archs)}; ε (L∞, pixels in [0, 1]): "
      f"{', '.join(eps_label(e, eps) for e in eps)}. "
      f"{int(config.n_pairs)} (seed, target) pairs, the same for every reference model "
      f"and ε; inversion: {int(inv.steps)} steps, step size {float(inv.step_size):g}, "
      f"momentum {float(inv.momentum):g}. Natural-image CKA on "
      f"{'the seed images' if config.natural == 'seeds' else 'the whole test split'}. "
      f"Both measures are biased linear CKA of the penultimate representations. "
      f"Run time: {elapsed_s:.0f} s.", "",
      "## Models (read these first)", ""]
  lines += md_table(
      ["architecture", "ε", "clean accuracy", "robust accuracy @ own ε",
       f"robust accuracy @ ε={eps_label(eval_eps, eps)}", "this run"],
      [[r["arch"], eps_label(r["eps"], eps), fmt(r["clean"]),
        fmt(r["robust_own"]), fmt(r["robust_eval"]),
        "trained" if r["trained"] else "reused"]
       for r in sorted(model_rows, key=lambda r: (archs.index(r["arch"]), r["eps"]))])
  problems = donor_problems(model_rows, num_classes)
  lines += ["", "**Finding (computed from this run's matrices).** " + (
      no_verdict(problems) if problems else
      _finding("inverted-image CKA", eps, trends["inverted_cka"]) + " "
      + _finding("plain CKA on natural images", eps, trends["natural_cka"]))]
  lines += ["", "## Similarity by ε", "",
            "Mean off-diagonal = mean over ordered pairs A ≠ B (inter-architecture). "
            "Loss: Jones et al.'s ‖rep(x) − rep(t)‖/‖rep(t)‖, mean over the pairs and "
            "reference models; reduction = 1 − final/initial.", "",
            OFFDIAG_HEADER, "|---|---|---|---|---|"]
  for p in per_eps:
    lines.append(f"| {eps_tag(p['eps'])} | {fmt(p['offdiag']['inverted_cka'])} | "
                 f"{fmt(p['offdiag']['natural_cka'])} | {fmt(p['loss_initial'])} → "
                 f"{fmt(p['loss_final'])} | {fmt(p['loss_reduction'])} |")
  lines += ["", "## Matrices", "",
            "Inverted-image CKA: row = reference model A whose inverted images are "
            "used, column = model B. Files: `results/jones_eps<ε>_<measure>.*`; load "
            "them with `fula_jax.results.load(workdir)`.", ""]
  for p in per_eps:
    lines.append(f"### ε = {eps_label(p['eps'], eps)}")
    for measure in MEASURES:
      m = p["matrices"][measure]
      lines += ["", f"{measure.replace('_', ' ')}:", ""]
      lines += md_table(["A \\ B", *m.cols],
                        [[r, *(fmt(v) for v in m.matrix[i])] for i, r in enumerate(m.rows)])
    lines.append("")
  lines += ["## Figures", ""] + [f"![{f}]({FIGURES_DIR}/{f})" for f in figures] + [""]
  text = "\n".join(lines)
  if io.is_writer():
    io.write_text(workdir / REPORT_FILE, text)
  return text


def prepare_zoo(config: ml_collections.ConfigDict, workdir: epath.Path,
                archs: Sequence[str], eps: Sequence[float], test: Any,
                key: jax.Array, eval_eps: float):
  """Train, reuse or load every (arch, eps) model; measure its clean and PGD accuracy.

  `archs` are the config's names; the results name each by its `label`.

  Returns ({eps: {arch: (model, variables)}}, rows of per-model numbers, trained ids,
  reused ids).
  """
  grid = [(a, e) for e in eps for a in archs]
  bar = Progress("jones models", len(grid), unit="model", every_s=0.0)
  zoo: dict[float, dict[str, inversion.ModelSpec]] = {e: {} for e in eps}
  rows, trained, reused = [], [], []
  eval_set = test.take(config.get("eval_examples"))
  for i, (spec, e) in enumerate(grid):
    arch = label(spec)
    mid = model_id(arch, e)
    mdir = workdir / MODELS_DIR / mid
    if config.get("weights"):  # a pretrained zoo, e.g. robust ImageNet models
      mdir = io.path(config.weights.format(arch=arch, eps=eps_tag(e)))
      model, variables = load_pretrained(spec, mdir, int(config.data.image_size))
      was_trained = False
    else:
      _, was_trained = train_or_reuse(model_config(config, arch, e), mdir)
      model, variables, _ = checkpoint.load_trained(mdir)
    (trained if was_trained else reused).append(mid)
    zoo[e][arch] = (model, variables)
    evals = {radius: robust_eval(
        model, variables, eval_set, attack_for(config, radius, evaluation=True),
        jax.random.fold_in(key, _EVAL_FOLD), int(config.eval_batch_size),
        workdir / EVALS_DIR / f"{mid}_at_eps{eps_tag(radius)}.json")
             for radius in sorted({eval_eps, e}) if radius > 0 or radius == eval_eps}
    ev = evals[eval_eps]
    rows.append({
        "id": mid, "arch": arch, "eps": e, "dir": str(mdir), "trained": was_trained,
        "clean": float(ev["accuracy"]),
        "robust_own": float(evals[e]["robust_accuracy"]) if e > 0 else None,
        "robust_eval": float(ev["robust_accuracy"])})
    bar.update(i + 1, extra=(
        f"{mid} {'trained' if was_trained else 'loaded' if config.get('weights') else 'reused'}"
        f": clean {ev['accuracy']:.3f}, "
        f"robust @ ε={eps_tag(eval_eps)} {ev['robust_accuracy']:.3f}"))
  return zoo, rows, trained, reused


def compare_at(config: ml_collections.ConfigDict, workdir: epath.Path, e: float,
               zoo_e: Mapping[str, inversion.ModelSpec], test: Any,
               pairs: tuple[np.ndarray, np.ndarray], model_rows: Sequence[dict],
               eval_eps: float) -> dict[str, Any]:
  """Both CKA matrices of the models trained at `e`, saved with their settings."""
  seed_idx, target_idx = pairs
  natural_images = test.gather(seed_idx)[0] if config.natural == "seeds" else test
  inv_cfg = config.inversion.to_dict()
  print(f"ε={eps_tag(e)}: inverting {len(seed_idx)} pairs with each of {len(zoo_e)} "
        "reference models", flush=True)
  s_inv, names, invs = inversion.inverted_cka_matrix(
      zoo_e, test, test.labels, pairs, inv_cfg, return_inversions=True)
  s_nat, _ = inversion.natural_cka_matrix(zoo_e, natural_images, inv_cfg)
  loss0 = {a: float(np.mean(invs[a].initial_loss)) for a in names}
  loss1 = {a: float(np.mean(invs[a].loss)) for a in names}
  reduction = {a: 1.0 - loss1[a] / loss0[a] if loss0[a] > 0 else float("nan")
               for a in names}
  mean0, mean1 = float(np.mean(list(loss0.values()))), float(np.mean(list(loss1.values())))
  mean_reduction = 1.0 - mean1 / mean0 if mean0 > 0 else float("nan")
  common = {
      "eps": e, "norm": config.attack.norm, "architectures": names,
      "model_dirs": {a: str(workdir / MODELS_DIR / model_id(a, e)) for a in names},
      "points": {a: inversion.representation_point(m, inv_cfg.get("point"))
                 for a, (m, _) in zoo_e.items()},
      "estimator": "linear CKA, biased (Kornblith et al. 2019)",
      "clean_accuracy": {r["arch"]: r["clean"] for r in model_rows if r["eps"] == e},
      f"robust_accuracy_eps{eps_tag(eval_eps)}": {
          r["arch"]: r["robust_eval"] for r in model_rows if r["eps"] == e}}
  zoo_name = f"zoo eps={eps_tag(e)}"
  mats = {
      "inverted_cka": results.Matrix(
          s_inv, names, names, "inverted_cka", f"{zoo_name} (A: inverts)", zoo_name, {
              **common, "n": int(len(seed_idx)), "n_pairs": int(len(seed_idx)),
              "rows_are": "reference model A whose inverted images are used",
              "inversion": inv_cfg, "loss_initial": loss0, "loss_final": loss1,
              "loss_reduction": reduction, "mean_loss_reduction": mean_reduction,
              "pairs_file": str(workdir / "pairs.npz")}),
      "natural_cka": results.Matrix(
          s_nat, names, names, "natural_cka", zoo_name, zoo_name, {
              **common, "n": int(len(natural_images)), "images": config.natural})}
  for measure, m in mats.items():
    results.save(workdir, result_name(e, measure), m)
  if io.is_writer() and config.get("save_inversions", True):
    for a in names:
      io.write_npz(workdir / INVERSIONS_DIR / f"eps{eps_tag(e)}" / f"{a}.npz",
                   images=invs[a].images, loss=invs[a].loss,
                   initial_loss=invs[a].initial_loss, seed_idx=seed_idx,
                   target_idx=target_idx)
  off = {k: offdiag_mean(m.matrix) for k, m in mats.items()}
  print(f"ε={eps_tag(e)}: mean off-diagonal inverted CKA {off['inverted_cka']:.4f}, "
        f"natural CKA {off['natural_cka']:.4f}; inversion loss {mean0:.3f} -> "
        f"{mean1:.3f}", flush=True)
  return {"eps": e, "matrices": mats, "offdiag": off,
          "examples": {a: invs[a].images[:N_EXAMPLES] for a in names},
          "loss_initial": mean0, "loss_final": mean1, "loss_reduction": mean_reduction}


def write_figures(workdir: epath.Path, eps: Sequence[float], per_eps: Sequence[dict],
                  test: Any, pairs: tuple[np.ndarray, np.ndarray],
                  model_rows: Sequence[dict], archs: Sequence[str], eval_eps: float
                  ) -> list[str]:
  """Heatmaps and example inversions per eps, and the curves against eps."""
  figures = {}
  seeds, targets = (test.gather(p[:N_EXAMPLES])[0] for p in pairs)
  for p in per_eps:
    label = eps_label(p["eps"], eps)
    figures[f"heatmaps_eps{eps_tag(p['eps'])}.png"] = heatmap_figure(
        p["matrices"]["inverted_cka"], p["matrices"]["natural_cka"], label)
    figures[f"inversions_eps{eps_tag(p['eps'])}.png"] = inversions_figure(
        seeds, targets, p["examples"], label)
  offdiag = {k: [p["offdiag"][k] for p in per_eps] for k in MEASURES}
  accuracy = {a: {"clean": [r["clean"] for r in model_rows if r["arch"] == a],
                  "robust": [r["robust_eval"] for r in model_rows if r["arch"] == a]}
              for a in archs}
  figures["offdiag_vs_eps.png"] = curve_figure(eps, offdiag, accuracy,
                                               eps_label(eval_eps, eps))
  if io.is_writer():
    for name, png in figures.items():
      io.write_bytes(workdir / FIGURES_DIR / name, png)
  return list(figures)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train or reuse the zoo, compute both CKA matrices per eps, write figures/report.

  Returns the per-model numbers, which model ids were trained and which reused, the
  mean off-diagonal similarity per eps for both measures and their trends.
  """
  t0 = time.perf_counter()
  workdir = io.path(workdir)
  specs, eps = check_grid(config)
  archs = [label(a) for a in specs]
  test = data.source(config.data, "test")
  key = jax.random.PRNGKey(int(config.seed))
  eval_eps = float(config.attack.eval_eps if config.attack.get("eval_eps") is not None
                   else max(eps))
  zoo, model_rows, trained, reused = prepare_zoo(config, workdir, specs, eps, test, key,
                                                 eval_eps)
  # One set of pairs for every reference model and every eps.
  pairs = inversion.make_pairs(test.labels, jax.random.fold_in(key, _PAIRS_FOLD),
                               int(config.n_pairs))
  if io.is_writer():
    io.write_npz(workdir / "pairs.npz", seed_idx=pairs[0], target_idx=pairs[1])
  per_eps = [compare_at(config, workdir, e, zoo[e], test, pairs, model_rows, eval_eps)
             for e in eps]
  offdiag = {k: [p["offdiag"][k] for p in per_eps] for k in MEASURES}
  trends = {k: trend(eps, offdiag[k]) for k in MEASURES}
  figures = write_figures(workdir, eps, per_eps, test, pairs, model_rows, archs, eval_eps)
  elapsed = time.perf_counter() - t0
  write_report(workdir, config, archs, eps, model_rows, per_eps, trends, eval_eps,
               figures, elapsed, test.num_classes)
  problems = donor_problems(model_rows, test.num_classes)
  out = {"workdir": str(workdir), "architectures": archs, "eps": eps,
         "eval_eps": eval_eps, "models": model_rows, "trained": trained,
         "reused": reused, "offdiag": offdiag, "trend": trends,
         "loss_reduction": [p["loss_reduction"] for p in per_eps],
         "figures": figures, "elapsed_s": elapsed, "donor_problems": problems}
  print("\nModels (clean / robust accuracy at their own eps):", flush=True)
  for r in model_rows:
    robust = "" if r.get("robust_own") is None else f" / {r['robust_own']:.3f}"
    print(f"  {r['arch']:12s} eps {r['eps']:<8g} {r['clean']:.3f}{robust}", flush=True)
  if problems:
    print(no_verdict(problems), flush=True)
  else:
    print(_finding("inverted-image CKA", eps, trends["inverted_cka"]), flush=True)
    print(_finding("plain CKA on natural images", eps, trends["natural_cka"]), flush=True)
  print(f"Done in {elapsed:.0f} s.", flush=True)
  results.finish_job(workdir, out, report=workdir / REPORT_FILE,
                     notebook="notebooks/reproduce_jones.ipynb")
  return out


if __name__ == "__main__":
  from fula_jax import main
  main.script(run)
