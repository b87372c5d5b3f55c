"""Streamed data: `folder:` datasets and tfds splits read record by record, against the
same data held in memory; errors for damaged or missing data."""

import concurrent.futures
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch  # test dependency; imported with the module, as importing it while other
import torchvision  # threads run (grain's decoders) can crash the interpreter
from PIL import Image
from safetensors.torch import save_file

from fula_jax import data, defaults, results
from fula_jax.data import preprocess
from fula_jax.errors import ConfigError, UserError

import torch_checkpoints

_REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Digits 0-2 as 8x8 grayscale PNGs (about 540 files) in <split>/<class>/ folders, the
  test split named 'val'; non-image files are ignored."""
  root = tmp_path_factory.mktemp("images")
  for split, out in (("train", "train"), ("test", "val")):
    s = data.load(ml_collections.ConfigDict(dict(image_size=None, channels=1)), split)
    for i in np.flatnonzero(s.labels < 3):
      d = root / out / CLASSES[s.labels[i]]
      d.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.uint8(np.round(s.images[i, ..., 0] * 255))).save(d / f"{i:04d}.png")
  (root / "train" / "ant" / "notes.txt").write_text("not an image")
  return root


MEASURES = ("cka_linear_debiased", "cka_linear", "procrustes")

# A process of a multi-process similarity job: `python -m fula_jax.main` with a record of
# the test images its folder reader decodes.
SIMILARITY_WORKER = textwrap.dedent("""
    import atexit, json, os, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    from absl import app
    from fula_jax import main
    from fula_jax.data import folder
    out, reads, read = sys.argv.pop(1), [], folder.FolderReader.read
    def logged(self, index):
      if "/val/" in self.paths[index]:
        reads.append(int(index))
      return read(self, index)
    folder.FolderReader.read = logged
    atexit.register(lambda: open(out, "w").write(json.dumps(sorted(set(reads)))))
    app.run(main.main, flags_parser=main.parse_flags)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cfg(root, **kw):
  return ml_collections.ConfigDict(dict(name=f"folder:{root}", image_size=None,
                                        channels=1, **kw))


def _within(seconds, fn, *args):
  """fn(*args), failing the test if it runs for longer than `seconds` (a hang)."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(fn, *args).result(timeout=seconds)


def test_folder_layout_labels_and_batches_equal_the_split_in_memory(folder):
  src = data.source(_cfg(folder), "train")
  mem = data.load(_cfg(folder), "train")
  assert isinstance(src, data.RecordSource) and isinstance(mem, data.Split)
  assert len(src) == len(mem) > 300 and src.num_classes == 3
  assert src.image_shape == mem.image_shape == (8, 8, 1)
  # Classes sorted by name, files in name order: labels come in sorted runs.
  assert np.all(np.diff(src.labels) >= 0) and set(src.labels) == {0, 1, 2}
  first = Image.open(sorted((folder / "train" / "ant").glob("*.png"))[0])
  np.testing.assert_array_equal(mem.images[0, ..., 0], np.asarray(first) / np.float32(255))
  # Training order: deterministic, resumable at a step, the same as in memory.
  kw = dict(seed=3, num_steps=12)
  streamed = list(src.train_batches(64, **kw))
  for a, b in zip(streamed, mem.train_batches(64, **kw)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  resumed = list(src.train_batches(64, seed=3, start_step=7, num_steps=5))
  for a, b in zip(resumed, streamed[7:]):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert data.source(_cfg(folder), "test").name.endswith("/test")


def test_each_process_decodes_only_its_half_of_every_batch(folder):
  src = data.source(_cfg(folder), "test")
  reads = {0: [], 1: []}
  whole = list(src.eval_batches(50))
  for p in (0, 1):
    log = reads[p]
    mine = data.source(_cfg(folder), "test")
    read = mine.reader.read
    mine.reader.read = lambda i, log=log, read=read: (log.append(i), read(i))[1]
    part = list(mine.eval_batches(50, process_index=p, process_count=2))
    assert len(part) == len(whole)
    for b, w in zip(part, whole):
      np.testing.assert_array_equal(b["image"], w["image"][p * 25:(p + 1) * 25])
      np.testing.assert_array_equal(b["mask"], w["mask"][p * 25:(p + 1) * 25])
  assert not set(reads[0]) & set(reads[1])
  assert sorted(reads[0] + reads[1]) == list(range(len(src)))  # each decoded once


def test_a_folder_dataset_trains_and_gives_the_same_cka_streamed_or_in_memory(folder,
                                                                              tmp_path):
  from fula_jax.similarity import job as similarity_job
  from fula_jax.train import loop
  cfg = defaults.load_config(_REPO / "configs" / "train.py", "model=cnn,runlocal")
  cfg.data = ml_collections.ConfigDict({**cfg.data.to_dict(), **_cfg(folder).to_dict()})
  cfg.model.kwargs = {"widths": (8, 16)}
  cfg.train.num_steps, cfg.train.batch_size, cfg.eval_batch_size = 60, 64, 64
  out = loop.run(cfg, str(tmp_path / "model"))
  assert out["test_accuracy"] > 0.8  # 3 classes: chance is 1/3

  mats = {}
  for in_memory in (False, True):
    sim = defaults.load_config(_REPO / "configs" / "similarity.py")
    sim.model_a_workdir = str(tmp_path / "model")
    sim.measures = MEASURES
    sim.batch_size = 64
    sim.data_from = "config"
    sim.data = ml_collections.ConfigDict({**cfg.data.to_dict(), "in_memory": in_memory})
    wd = tmp_path / f"sim_{in_memory}"
    similarity_job.run(sim, str(wd))
    mats[in_memory] = {m: results.load(wd)[m].matrix for m in sim.measures}
  for m in mats[True]:
    np.testing.assert_allclose(mats[False][m], mats[True][m], rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(mats[True][m]))

  # The same job from the command line in 2 jax.distributed processes, streaming: each
  # decodes only its own half of every batch, and the matrices equal the in-memory ones.
  port = _free_port()
  wd = tmp_path / "sim_2proc"
  procs = [subprocess.Popen(
      [sys.executable, "-c", SIMILARITY_WORKER, str(tmp_path / f"reads{p}.json"),
       f"--config={_REPO / 'configs' / 'similarity.py'}", f"--workdir={wd}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={p}", f"--config.model_a_workdir={tmp_path / 'model'}",
       "--config.batch_size=64", f"--config.measures={MEASURES!r}"],
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in (0, 1)]
  logs = []
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
  # Beyond record 0, which opening a folder split decodes for its image shape.
  reads = [set(json.loads((tmp_path / f"reads{p}.json").read_text())) for p in (0, 1)]
  assert reads[0] and reads[1] and not (reads[0] & reads[1]) - {0}
  assert reads[0] | reads[1] == set(range(len(data.source(_cfg(folder), "test"))))
  got = results.load(wd)
  for m in MEASURES:
    assert got[m].meta["batch_size"] == 64 and got[m].meta["num_devices"] == 2
    np.testing.assert_allclose(got[m].matrix, mats[True][m], rtol=1e-5, atol=1e-6,
                               err_msg=m)


def test_a_corrupt_image_is_named_or_skipped_and_counted(folder, tmp_path):
  root = tmp_path / "damaged"
  shutil.copytree(folder, root)
  bad = sorted((root / "val" / "bee").glob("*.png"))[3]
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  src = data.source(_cfg(root), "test")
  with pytest.raises(data.CorruptRecordError, match=str(bad)) as e:
    _within(60, lambda: list(src.eval_batches(32)))
  assert "on_corrupt=skip" in str(e.value) and isinstance(e.value, UserError)

  skip = data.source(_cfg(root, on_corrupt="skip"), "test")
  batches = _within(60, lambda: list(skip.eval_batches(32)))
  assert sum(float(b["mask"].sum()) for b in batches) == len(skip) - 1
  assert skip.skipped == [str(bad)]
  # What a job's summary and closing lines say of it (None and {} for a clean split).
  assert data.skipped_records({"test": skip, "clean": src.take(4)}) == {"test": [str(bad)]}
  assert data.skipped_line({"test": [str(bad)]}).endswith(f"test 1 (first: {bad})")
  assert data.skipped_line({}) is None
  # Decoded by worker processes: the same batches, the skip reported back.
  workers = data.source(_cfg(root, on_corrupt="skip", num_workers=2), "test")
  for a, b in zip(_within(120, lambda: list(workers.eval_batches(32))), batches,
                  strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
  assert workers.skipped == [str(bad)]
  with pytest.raises(data.CorruptRecordError, match=str(bad)):
    _within(120, lambda: list(data.source(_cfg(root, num_workers=2), "test")
                              .eval_batches(32)))
  train = data.source(_cfg(root, on_corrupt="skip"), "train")
  (root / "train" / "cat" / sorted(p.name for p in (root / "train" / "cat").glob("*.png"))[0]
   ).write_bytes(b"garbage")
  steps = _within(60, lambda: list(train.train_batches(64, seed=0, num_steps=10)))
  assert all(b["image"].shape == (64, 8, 8, 1) for b in steps) and len(train.skipped) == 1
  with pytest.raises(UserError, match="data.on_corrupt 'ignore'.*error, skip"):
    data.source(_cfg(root, on_corrupt="ignore"), "test")


def test_missing_folders_and_empty_classes_have_clear_messages(folder, tmp_path):
  with pytest.raises(ConfigError, match="does not exist"):
    data.source(_cfg(tmp_path / "nowhere"), "train")
  root = tmp_path / "partial"
  shutil.copytree(folder / "train", root / "train")
  with pytest.raises(ConfigError, match="no test split.*test or val or validation"):
    data.source(_cfg(root), "test")
  shutil.copytree(folder / "val", root / "val")
  (root / "val" / "zebra").mkdir()
  with pytest.raises(ConfigError, match=r"classes the training split lacks: \['zebra'\]"):
    data.source(_cfg(root), "test")
  (root / "train" / "dog").mkdir()
  with pytest.raises(ConfigError, match="dog holds no images"):
    data.source(_cfg(root), "train")
  with pytest.raises(ConfigError, match="needs a path"):
    data.num_classes(ml_collections.ConfigDict(dict(name="folder:")))


def test_imagenet_eval_preset_matches_resize_then_centre_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
  got = preprocess.crop_resize(preprocess.to_float(image), 224, "imagenet_eval")
  # Independent reference: jax.image.resize (antialiased bilinear) to shorter side 256.
  big = np.asarray(jax.image.resize(image.astype(np.float32) / 255, (256, 358, 3),
                                    "linear", antialias=True))
  np.testing.assert_allclose(got, big[16:240, 67:291], atol=2e-5)
  square = preprocess.crop_resize(preprocess.to_float(image), 32, "square")
  ref = np.asarray(jax.image.resize(image[:, 60:360].astype(np.float32) / 255, (32, 32, 3),
                                    "linear", antialias=True))
  np.testing.assert_allclose(square, ref, atol=2e-5)
  with pytest.raises(UserError, match="Valid choices: .*imagenet_eval"):
    preprocess.crop_resize(image, 32, "imagenet")


def test_tfds_splits_are_streamed_and_equal_the_split_in_memory():
  cfg = ml_collections.ConfigDict(dict(name="imagenette", image_size=24, download=True))
  with tfds.testing.mock_data(num_examples=10):
    src = data.source(cfg, "test")
    mem = data.load(cfg, "test")
    assert isinstance(src, data.RecordSource) and len(src) == 10
    batches = list(src.eval_batches(4))
    raw = tfds.data_source("imagenette/160px", split="validation", download=False)
    ref = np.stack([preprocess.crop_resize(preprocess.to_float(raw[i]["image"]), 24)
                    for i in range(10)])
  np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:10],
                                mem.images)
  np.testing.assert_allclose(mem.images, ref, atol=1e-6)
  assert [float(b["mask"].sum()) for b in batches] == [4, 4, 2]


@pytest.fixture(scope="module")
def imagenet_weights(tmp_path_factory):
  """Randomly initialised torchvision ResNet-18 and -50 as safetensors, written once:
  '<dir>/imagenet_<arch>.safetensors'."""
  d = tmp_path_factory.mktemp("weights")
  torch.manual_seed(0)
  for arch in ("resnet18", "resnet50"):
    net = getattr(torchvision.models, arch)()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(d / f"imagenet_{arch}.safetensors"))
  return d


@pytest.mark.parametrize("config_file,arg,arch,job", [
    ("similarity.py", "imagenet", "resnet50", "similarity"),
    ("stitch.py", "imagenette", "resnet18", "stitching"),
])
def test_imagenet_scale_configs_run_on_mock_data(tmp_path, imagenet_weights, config_file,
                                                 arg, arch, job):
  """The ImageNet-scale configs as shipped, shrunk only in size (32 px, a few examples
  and steps), on tfds mock data and randomly initialised torchvision weights."""
  import importlib
  cfg = defaults.load_config(_REPO / "configs" / config_file, arg)
  cfg.model_a.weights = str(imagenet_weights / f"imagenet_{arch}.safetensors")
  cfg.model_b.weights = cfg.model_a.weights
  cfg.data.image_size, cfg.data.download, cfg.png = 32, True, False
  if job == "similarity":
    cfg.num_examples, cfg.batch_size = 6, 6
  else:
    cfg.num_train = cfg.num_test = 8
    cfg.stitch.update(dict(objectives=("dm", "tlm"), rows=("layer1.0", "layer2.0"),
                           cols=("layer2.0",), steps=2, batch_size=8, eval_batch_size=8,
                           lstsq_examples=8,  # of 512: 64 passes of two ResNet-18s
                           progress=False, baselines=False))  # checked in its own test
  with tfds.testing.mock_data(num_examples=8):
    importlib.import_module(f"fula_jax.{job}.job").run(cfg, str(tmp_path / "out"))
    labels = data.source(cfg.data, "test").labels
  mats = results.load(tmp_path / "out")
  # (Random weights: relative accuracy divides by an end accuracy that is often 0, error
  # consistency is undefined when both models are always wrong, DM has no training
  # loss, and 2 steps have no loss trend; convergence is checked below.)
  assert mats and all(np.isfinite(m.matrix).all() for k, m in mats.items()
                      if not k.endswith(("relative_accuracy", "train_loss",
                                         "error_consistency", "loss_trend", "converged")))
  if job == "stitching":  # 2 steps cannot converge; DM trains nothing
    assert np.all(mats["stitch_tlm/converged"].matrix == 0.0)
    assert np.all(np.isnan(mats["stitch_dm/converged"].matrix))
  if job == "stitching":  # imagenette labels became ImageNet-1k ids for the 1000-way heads
    assert set(labels) <= set(data.DATASETS["imagenette"].imagenet_ids)
    assert all(m.matrix.shape == (2, 1) for m in mats.values())


def test_jones_study_on_a_pretrained_imagenet_zoo_runs_on_mock_data(tmp_path):
  """configs/study_jones.py:imagenet as shipped, shrunk in size (32 px, a few examples
  and steps) and to two of its nine PyTorch architectures (each of the nine loads and
  equals torch in test_torch_models): robustness-library checkpoints under the
  {arch}/{eps} file pattern, run through torchax; nothing is trained."""
  from experiments import study_jones
  from fula_jax.models import torch_zoo
  cfg = defaults.load_config(_REPO / "configs" / "study_jones.py", "imagenet")
  assert sorted(cfg.architectures) == sorted(torch_zoo.JONES_ZOO)
  cfg.architectures = ("torchvision:resnet18", "torchvision:shufflenet_v2_x1_0")
  torch.manual_seed(0)
  for spec in cfg.architectures:
    torch_checkpoints.robustness_checkpoint(
        tmp_path / f"{study_jones.label(spec)}.ckpt", torch_zoo.build(spec).state_dict(),
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  cfg.eps = (3.0,)
  cfg.weights = str(tmp_path / "{arch}.ckpt")  # one file for every eps
  cfg.data.image_size, cfg.data.download = 32, True
  cfg.n_pairs, cfg.eval_examples, cfg.eval_batch_size = 4, 4, 4
  cfg.attack.eval_steps = 1
  cfg.inversion.update(dict(steps=2, batch_size=4, eval_batch_size=4, progress=False))
  with tfds.testing.mock_data(num_examples=16):
    out = study_jones.run(cfg, str(tmp_path / "study"))
  assert out["trained"] == [] and out["architectures"] == ["resnet18",
                                                           "shufflenet_v2_x1_0"]
  mats = results.load(tmp_path / "study")
  assert set(mats) == {"jones/eps3/inverted_cka", "jones/eps3/natural_cka"}
  for m in mats.values():
    assert m.matrix.shape == (2, 2) and np.isfinite(m.matrix).all()
    assert list(m.rows) == out["architectures"]
