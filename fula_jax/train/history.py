"""A training run's curves, kept beside its checkpoints: ``history.json`` (the logged
train and test scalars by step, saved with each checkpoint so a resumed run keeps its
past), and at the end ``curves.png`` and ``report.md``."""

from __future__ import annotations

from typing import Any, Mapping

from fula_jax import io, reporting

FILE = "history.json"
CURVES_FILE = "curves.png"
REPORT_FILE = "report.md"


def load(workdir, upto_step: int) -> dict[str, list[dict[str, float]]]:
  """The history saved in `workdir` up to `upto_step` (where a resumed run restarts;
  anything logged after the checkpoint it resumes from is redone), or an empty one."""
  path = io.path(workdir) / FILE
  hist = io.read_json(path) if path.exists() else {}
  return {part: [r for r in hist.get(part, []) if r["step"] <= upto_step]
          for part in ("train", "test")}


def save(workdir, hist: Mapping[str, Any]) -> None:
  if io.is_writer():
    io.write_json(io.path(workdir) / FILE, dict(hist))


def curves_png(hist: Mapping[str, Any], title: str) -> bytes:
  """Training loss (log scale) and train/test accuracy against the step."""
  fig = reporting.figure((9.0, 3.2), layout="constrained")
  loss_ax, acc_ax = fig.subplots(1, 2)
  train, test = hist.get("train", []), hist.get("test", [])
  steps = [r["step"] for r in train]
  if train:
    loss_ax.plot(steps, [r["train/loss"] for r in train], label="train loss")
    loss_ax.set_yscale("log")
    if "train/accuracy" in train[0]:
      acc_ax.plot(steps, [r["train/accuracy"] for r in train], label="train")
  if test:
    acc_ax.plot([r["step"] for r in test], [r["test/accuracy"] for r in test], "o-",
                label="test")
  loss_ax.set(xlabel="step", ylabel="loss", title="training loss")
  acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(0.0, 1.02), title="accuracy")
  acc_ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  return reporting.png_bytes(fig)


def write_report(workdir, summary: Mapping[str, Any], hist: Mapping[str, Any],
                 next_lines: str) -> None:
  """`report.md` and `curves.png`: the run's settings, final accuracies and curves."""
  if not io.is_writer():
    return
  workdir = io.path(workdir)
  io.write_bytes(workdir / CURVES_FILE, curves_png(
      hist, f"{summary['model']} on {summary['dataset']}"))
  robust = summary.get("test_robust_accuracy")
  lines = [f"# Training: {summary['model']} on {summary['dataset']}", "",
           f"- test accuracy **{summary['test_accuracy']:.4f}** (n={summary['test_n']})"
           + ("" if robust is None else f", robust accuracy {robust:.4f}"),
           f"- {summary['steps']} steps"
           + (f" (resumed from step {summary['resumed_from']})"
              if summary.get("resumed_from") else ""),
           f"- {summary['num_params']:,} parameters", "",
           f"![curves]({CURVES_FILE})", "", "## Next", "", "```", next_lines, "```", ""]
  io.write_text(workdir / REPORT_FILE, "\n".join(lines))
