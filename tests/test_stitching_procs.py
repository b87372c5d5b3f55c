"""The sweep across processes: 2 jax.distributed CPU processes (gloo collectives), and a
sweep killed with SIGKILL mid-way then resumed. Workers are subprocesses of the test."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fula_jax import sharding

WORKER = textwrap.dedent("""
    import json, os, sys, time
    mode, ndev, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from fula_jax import cpu_flags
    os.environ["XLA_FLAGS"] = cpu_flags.with_ynn_convolutions_off(
        f"--xla_force_host_platform_device_count={ndev}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    if mode in ("dist", "folder"):
      port, pid = sys.argv[4], int(sys.argv[5])
      jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                                 initialization_timeout=120)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import spec
    from fula_jax.stitching import store
    cfg = None
    if mode == "kill":
      cfg = dict(max_stitches_per_wave=1, grouping="single", max_group_size=1)
      write = store.Store.write
      def slow_write(self, *args, **kwargs):
        write(self, *args, **kwargs)
        time.sleep(3.0)  # room for the test to kill us between two units
      store.Store.write = slow_write
    if mode == "cache":
      cfg = dict(compilation_cache=sys.argv[7])
    folder = sys.argv[7] if mode == "folder" else None
    reads = []
    res = spec.run(workdir=sys.argv[6] if len(sys.argv) > 6 else None, cfg=cfg,
                   folder=folder, reads=reads)
    if folder:
      with open(f"{out}.reads{jax.process_index()}", "w") as f:
        json.dump(sorted(set(reads)), f)
    if jax.process_index() == 0:
      with open(out, "w") as f:
        json.dump({"values": {o: {m: v.tolist() for m, v in d.items()}
                              for o, d in res.values.items()},
                   "stats": res.stats}, f)
""")

SPEC = textwrap.dedent("""
    import jax
    from fula_jax import models
    from fula_jax import stitching
    from fula_jax.stitching import testing

    # No test here reads the end model's self-stitch baselines (they train in the same
    # units; test_stitching_convergence checks them and their resume).
    CFG = dict(objectives=["tlm", "dm"], cols=["fc2"], steps=4, batch_size=96,
               eval_batch_size=96, learning_rate=3e-3, progress=False, baselines=False)

    def donors():
      a = models.get_model("mlp", widths=(8, 8))
      b = models.get_model("mlp", widths=(8, 6))
      va = models.init(a, jax.random.PRNGKey(0), (1, 8, 8, 1))
      vb = models.init(b, jax.random.PRNGKey(1), (1, 8, 8, 1))
      return a, va, b, vb

    def folder_splits(root, reads=None):
      # A streamed `folder:` dataset; `reads` collects the test records decoded here.
      from fula_jax import data
      cfg = dict(name="folder:" + root, image_size=None, channels=1)
      train, test = data.source(cfg, "train"), data.source(cfg, "test")
      if reads is not None:
        read = test.reader.read
        test.reader.read = lambda i: (reads.append(i), read(i))[1]
      return train, test

    def run(workdir=None, cfg=None, folder=None, in_memory=False, reads=None, **kw):
      if folder:
        train, test = folder_splits(folder, reads)
        if in_memory:
          from fula_jax import data
          train, test = data.materialize(train), data.materialize(test)
      else:
        train, test = testing.synthetic_splits(288, 96)
      return stitching.run_sweep(*donors(), train, test, dict(CFG, **(cfg or {})), workdir,
                               **kw)
""")


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
  d = tmp_path_factory.mktemp("stitch_workers")
  (d / "worker.py").write_text(WORKER)
  (d / "spec.py").write_text(SPEC)
  sys.path.insert(0, str(d))
  import spec
  yield d, spec
  sys.path.remove(str(d))


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _values(res):
  return {o: {m: np.asarray(v, float) for m, v in d.items()} for o, d in res.items()}


def _assert_close(a, b):
  for obj in a:
    for m in ("accuracy", "loss", "dm_error", "train_loss"):
      np.testing.assert_allclose(a[obj][m], b[obj][m], rtol=2e-4, atol=1e-5,
                                 err_msg=f"{obj}/{m}")


def _two_processes(d, tmp_path, mode, *extra):
  port = _free_port()
  out = tmp_path / f"{mode}.json"
  procs = [subprocess.Popen(
      [sys.executable, str(d / "worker.py"), mode, "2", str(out), str(port), str(pid),
       str(tmp_path / f"wd_{mode}"), *extra], env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
  return out, json.loads(out.read_text())


def test_two_processes_equal_one(scripts, tmp_path):
  d, spec = scripts
  _, got = _two_processes(d, tmp_path, "dist")
  assert got["stats"]["processes"] == 2 and got["stats"]["devices"] == 4
  # Process 0 wrote the unit files; the other wrote nothing of its own.
  assert list((tmp_path / "wd_dist" / "stitch").glob("*/*.json"))
  ref = spec.run(mesh=sharding.line_mesh("devices", sharding.devices(1)))
  _assert_close(_values(got["values"]), ref.values)


def test_two_processes_stream_disjoint_halves_and_equal_one_in_memory(scripts, tmp_path):
  """A `folder:` dataset streamed by 2 processes: each decodes only its own rows of the
  test split, and the matrices equal one process's sweep over the split in memory."""
  from PIL import Image
  from fula_jax.stitching import testing
  d, spec = scripts
  root = tmp_path / "images"
  for split, s in zip(("train", "test"), testing.synthetic_splits(288, 96)):
    for i, (x, y) in enumerate(zip(s.images, s.labels)):
      (root / split / f"c{y}").mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.uint8(np.round(x[..., 0] * 255))).save(
          root / split / f"c{y}" / f"{i:04d}.png")
  out, got = _two_processes(d, tmp_path, "folder", str(root))
  halves = [set(json.loads(pathlib.Path(f"{out}.reads{p}").read_text())) for p in (0, 1)]
  assert halves[0] and halves[1] and not halves[0] & halves[1]
  assert halves[0] | halves[1] == set(range(96))
  ref = spec.run(folder=str(root), in_memory=True,
                 mesh=sharding.line_mesh("devices", sharding.devices(1)))
  _assert_close(_values(got["values"]), ref.values)


def test_sigkilled_sweep_resumes_without_recomputing(scripts, tmp_path):
  d, spec = scripts
  wd = tmp_path / "wd"
  proc = subprocess.Popen(
      [sys.executable, str(d / "worker.py"), "kill", "8", str(tmp_path / "k.json"), "-",
       "-", str(wd)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  try:
    deadline = time.time() + 240
    while not list(wd.glob("stitch/*/*.json")):
      assert proc.poll() is None, proc.communicate()[0][-4000:]
      assert time.time() < deadline, "no unit file appeared"
      time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  done = list(wd.glob("stitch/*/*.json"))
  assert 1 <= len(done) < 4  # 2 cells x 2 objectives, one stitch per unit
  assert not list(wd.glob("stitch/*/*.npz"))
  # Resumed with the default grouping: the remaining stitches are planned afresh.
  resumed = spec.run(wd)
  assert resumed.stats["stitches_resumed"] == len(done)
  assert resumed.stats["stitches_computed"] == 4 - len(done)
  cells = [(f.parent.name, c["row"], c["col"]) for f in wd.glob("stitch/*/*.json")
           for c in json.loads(f.read_text())["cells"]]
  assert len(cells) == len(set(cells)) == 4
  fresh = spec.run(None)
  _assert_close(resumed.values, fresh.values)


def test_repeated_and_resumed_sweeps_compile_nothing(scripts, tmp_path):
  """With the persistent compilation cache, a sweep run again in a new process, and a
  sweep resumed with one unit left to do, compile no program: they count the programs
  XLA compiled and find none."""
  import shutil
  d, spec = scripts
  cache = tmp_path / "xla cache"
  own_cache = {k: v for k, v in _env().items() if k != "JAX_COMPILATION_CACHE_DIR"}

  def start(name):
    return subprocess.Popen(
        [sys.executable, str(d / "worker.py"), "cache", "1", str(tmp_path / f"{name}.json"),
         "-", "-", str(tmp_path / name), str(cache)], env=own_cache,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def finish(proc, name):
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-4000:]
    return json.loads((tmp_path / f"{name}.json").read_text())

  first = finish(start("first"), "first")
  assert first["stats"]["programs_compiled"] > 0
  units = sorted((tmp_path / "first" / "stitch").glob("*/*.json"))
  assert len(units) == 2  # one unit per objective: fc1 and fc2 into fc2 share it
  shutil.copytree(tmp_path / "first" / "stitch", tmp_path / "resumed" / "stitch")
  (tmp_path / "resumed" / "stitch" / units[0].relative_to(
      tmp_path / "first" / "stitch")).unlink()
  procs = {name: start(name) for name in ("resumed", "repeated")}
  runs = {name: finish(p, name) for name, p in procs.items()}
  assert runs["resumed"]["stats"]["stitches_resumed"] == 2
  assert runs["resumed"]["stats"]["stitches_computed"] == 2
  assert runs["repeated"]["stats"]["stitches_computed"] == 4
  for name, r in runs.items():
    assert r["stats"]["programs_compiled"] == 0, (name, r["stats"])
    assert r["stats"]["programs_from_cache"] > 0, (name, r["stats"])
    _assert_close(_values(r["values"]), _values(first["values"]))
