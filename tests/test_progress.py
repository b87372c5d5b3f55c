"""Progress lines tell the truth: compiling is a named phase, left out of the rate, and
the ETA adds the compiles still to come."""

import io

import numpy as np

from fula_jax import models, stitching
from fula_jax import progress as progress_lib
from fula_jax.stitching import testing


def test_paused_time_is_left_out_of_the_rate_and_pending_work_is_in_the_eta(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: now[0])
  out = io.StringIO()
  bar = progress_lib.Progress("work", 100, unit="batch", stream=out, every_s=0.0)
  bar.update(0)
  now[0] += 10.0
  bar.update(20)                        # 2 batches/s
  with bar.paused():
    now[0] += 30.0                      # compiling: not the pace of the work
  now[0] += 10.0
  bar.update(40)                        # still 2 batches/s over 20 s of work
  assert np.isclose(bar.rate, 2.0)
  assert "ETA 30s" in out.getvalue().splitlines()[-1]  # 60 left at 2/s
  bar.pending_s = 45.0                  # two more waves to compile
  bar.update(40, force=True)
  assert "ETA 1m15s (incl. ~45s compiling)" in out.getvalue().splitlines()[-1]


def test_a_sweep_names_its_compile_phase_per_wave(capsys):
  train, test = testing.digits_splits(200, 100)
  model = models.get_model("mlp", widths=(8, 8))
  v = testing.train_donor(model, train, steps=20)
  stitching.sweep(model, v, model, v, train, test,
                  dict(objectives=["dm"], pairs="diagonal", max_stitches_per_wave=1,
                       grouping="single", batch_size=100, eval_batch_size=100,
                       progress_every_s=0.0, compilation_cache="off"))
  lines = capsys.readouterr().out.splitlines()
  for k, end in ((1, "fc1"), (2, "fc2")):
    start = next(i for i, l in enumerate(lines)
                 if l.startswith(f"stitch sweep: wave {k}/2: compiling "))
    assert f"programs (end points: {end})" in lines[start], lines[start]
    assert lines[start].endswith(" ...")
    assert lines[start + 1].startswith(f"stitch sweep: wave {k}/2: compiled in ")
  # Wave 2 compiled while wave 1 ran: it says so, and how long the sweep waited for it.
  assert "in the background" in lines[start] and "of waiting" in lines[start + 1]


def test_after_each_wave_compiles_the_eta_counts_the_later_waves_compiles():
  from fula_jax.stitching import api
  bar = progress_lib.Progress("sweep", 10, enabled=False)
  advance = api._Advance(bar, ["w1", "w2", "w3"])
  advance.compiled("w1", 12.0)  # 12 s for one wave: two more to come
  assert bar.pending_s == 24.0
  advance.compiled("w2", 18.0)  # 30 s for two: 15 s a wave, one more
  assert bar.pending_s == 15.0
  advance.compiled("w3", 0.0)
  assert bar.pending_s == 0.0
