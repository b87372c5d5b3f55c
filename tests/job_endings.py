"""What every job's last lines and files must be: summary.json in the workdir, then a
closing block naming the results, the report and the next notebook."""

import json


def check(workdir, printed: str, report_file: str, notebook: str) -> dict:
  """Asserts the closing block ends `printed`; returns the saved summary."""
  summary = json.loads((workdir / "summary.json").read_text())
  tail = printed.strip().splitlines()[-3:]
  assert tail[0] == f"Results: {workdir}/results (fula_jax.results.load({str(workdir)!r}))"
  assert tail[1] == f"Report:  {workdir / report_file}"
  assert tail[2] == f"Next:    open {notebook} with WORKDIR={str(workdir)!r}"
  assert (workdir / report_file).exists()
  return summary


def run_printing(fn, *args) -> tuple[object, str]:
  """(fn(*args), what it printed on stdout)."""
  import contextlib
  import io
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    out = fn(*args)
  return out, printed.getvalue()


def check_study(workdir, out: dict, report_file: str, notebook: str) -> None:
  """`check` for a study run by `run_printing`, whose summary names its workdir and
  its models."""
  summary = check(workdir, out["printed"], report_file, notebook)
  assert summary["workdir"] == str(workdir)
  assert len(summary["models"]) == len(out["models"]) > 0
