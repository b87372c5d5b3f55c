"""Tests for fula_jax.data: digits, tfds (mocked, no network), transforms, batching."""

from __future__ import annotations

import itertools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from fula_jax import data
from fula_jax import registry

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _cfg(**kw):
  cfg = data.default_config()
  shortcut = kw.pop("shortcut", {})
  for k, v in kw.items():
    cfg[k] = v
  for k, v in shortcut.items():
    cfg.shortcut[k] = v
  return cfg


def _rows(images):
  return {r.tobytes() for r in np.asarray(images, np.float32).reshape(len(images), -1)}


@pytest.fixture(scope="module")
def sk_digits():
  d = sk_datasets.load_digits()
  return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


# ------------------------------------------------------------------------------ digits


def test_digits_native_split_partitions_the_dataset(sk_digits):
  ref_x, ref_y = sk_digits
  cfg = _cfg(image_size=None, channels=None)
  tr, te = data.load(cfg, "train"), data.load(cfg, "test")
  assert len(tr) + len(te) == 1797
  assert tr.images.shape == (len(tr), 8, 8, 1) and te.images.shape == (len(te), 8, 8, 1)
  assert tr.images.dtype == np.float32 and tr.labels.dtype == np.int32
  assert tr.num_classes == te.num_classes == 10
  assert tr.name == "digits/train" and te.name == "digits/test"
  assert _rows(tr.images).isdisjoint(_rows(te.images))
  # Together the splits are exactly sklearn's images (scaled by 1/16), labels attached.
  ref = {r.tobytes(): y for r, y in zip(ref_x.reshape(1797, -1), ref_y)}
  for s in (tr, te):
    flat = s.images.reshape(len(s), -1)
    assert all(r.tobytes() in ref for r in flat)
    assert [ref[r.tobytes()] for r in flat] == s.labels.tolist()
  assert _rows(tr.images) | _rows(te.images) == set(ref)
  for s in (tr, te):
    assert s.images.min() >= 0.0 and s.images.max() <= 1.0
  assert max(tr.images.max(), te.images.max()) == 1.0


def test_digits_split_is_stratified(sk_digits):
  _, ref_y = sk_digits
  cfg = _cfg(image_size=None, channels=None, digits_test_fraction=0.25)
  te = data.load(cfg, "test")
  counts = np.bincount(ref_y, minlength=10)
  np.testing.assert_array_equal(np.bincount(te.labels, minlength=10),
                                np.round(0.25 * counts).astype(int))
  tr = data.load(cfg, "train")
  assert set(np.unique(tr.labels)) == set(range(10))


def test_digits_split_seed(sk_digits):
  a = data.load(_cfg(image_size=None, channels=None), "test")
  b = data.load(_cfg(image_size=None, channels=None), "test")
  c = data.load(_cfg(image_size=None, channels=None, digits_split_seed=1), "test")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert _rows(a.images) != _rows(c.images)


def test_digits_upsampled_to_cifar_shape():
  native = data.load(_cfg(image_size=None, channels=None), "test")
  up = data.load(_cfg(image_size=32, channels=3), "test")
  assert up.images.shape == (len(native), 32, 32, 3)
  np.testing.assert_array_equal(up.labels, native.labels)
  ref = jax.image.resize(native.images, (len(native), 32, 32, 1), "bilinear")
  for ch in range(3):
    np.testing.assert_allclose(up.images[..., ch], np.asarray(ref)[..., 0], atol=1e-5)
  assert up.images.min() >= 0.0 and up.images.max() <= 1.0 + 1e-6


def test_resize_matches_jax_antialiased_bilinear():
  x = np.random.default_rng(0).random((2, 13, 9, 3)).astype(np.float32)
  for size in [(4, 4), (20, 30), (13, 9), (5, 17)]:
    ref = jax.image.resize(x, (2,) + size + (3,), "linear", antialias=True)
    np.testing.assert_allclose(data.resize(x, size), np.asarray(ref), atol=1e-5)


# ------------------------------------------------------------------------------ batching


def _toy_split(n=103, h=2):
  images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None],
                           (n, h, h, 1)).copy()
  return data.Split(images, (np.arange(n) % 7).astype(np.int32), 7, "toy/train")


def _ids(batch):
  return batch["image"][:, 0, 0, 0].astype(int)


def _stream(split, bs, **kw):
  return [_ids(b) for b in data.train_batches(split, bs, **kw)]


def test_train_batches_follow_epoch_permutations():
  split = _toy_split()
  bs, seed = 10, 3
  batches = list(data.train_batches(split, bs, seed=seed, num_steps=25))
  assert len(batches) == 25
  for b in batches:
    assert b["image"].shape == (bs, 2, 2, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32
    np.testing.assert_array_equal(b["label"], _ids(b) % 7)
  per_epoch = 103 // bs
  for step, b in enumerate(batches):
    e, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, e]).permutation(103)
    np.testing.assert_array_equal(_ids(b), perm[i * bs:(i + 1) * bs])
  for e in range(2):
    seen = np.concatenate([_ids(b) for b in batches[e * per_epoch:(e + 1) * per_epoch]])
    assert len(seen) == per_epoch * bs == len(set(seen.tolist()))
  assert not np.array_equal(_ids(batches[0]), _ids(batches[per_epoch]))


def test_train_batches_seed_and_resume():
  split = _toy_split()
  full = _stream(split, 8, seed=0, num_steps=30)
  again = _stream(split, 8, seed=0, num_steps=30)
  other = _stream(split, 8, seed=1, num_steps=30)
  assert all(np.array_equal(a, b) for a, b in zip(full, again))
  assert not all(np.array_equal(a, b) for a, b in zip(full, other))
  for k in (1, 12, 13, 29):
    tail = _stream(split, 8, seed=0, start_step=k, num_steps=30 - k)
    assert len(tail) == 30 - k
    assert all(np.array_equal(a, b) for a, b in zip(full[k:], tail))
  endless = data.train_batches(split, 8, seed=0)
  head = [_ids(b) for b in itertools.islice(endless, 40)]
  assert len(head) == 40
  assert all(np.array_equal(a, b) for a, b in zip(full, head[:30]))


@pytest.mark.parametrize("procs", [2, 4])
def test_train_batches_process_slices_concatenate(procs):
  split = _toy_split()
  full = _stream(split, 12, seed=5, start_step=4, num_steps=15)
  parts = [_stream(split, 12, seed=5, start_step=4, num_steps=15, process_index=p,
                   process_count=procs) for p in range(procs)]
  for step, glob in enumerate(full):
    assert all(len(part[step]) == 12 // procs for part in parts)
    np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), glob)


def test_batch_size_errors():
  split = _toy_split()
  with pytest.raises(ValueError, match="divisible"):
    next(data.train_batches(split, 10, seed=0, process_count=4))
  with pytest.raises(ValueError, match="larger"):
    next(data.train_batches(split, 104, seed=0))
  with pytest.raises(ValueError, match="divisible"):
    next(data.eval_batches(split, 10, process_count=3))


@pytest.mark.parametrize("procs", [1, 4])
def test_eval_batches_pad_and_mask(procs):
  split = _toy_split(n=103)
  bs = 20
  per_proc = [list(data.eval_batches(split, bs, process_index=p, process_count=procs))
              for p in range(procs)]
  assert all(len(b) == 6 for b in per_proc)
  ids, masks, labels = [], [], []
  for step in range(6):
    parts = [per_proc[p][step] for p in range(procs)]
    for part in parts:
      assert part["image"].shape == (bs // procs, 2, 2, 1)
      assert part["mask"].dtype == np.float32 and part["label"].dtype == np.int32
    ids.append(np.concatenate([_ids(p) for p in parts]))
    masks.append(np.concatenate([p["mask"] for p in parts]))
    labels.append(np.concatenate([p["label"] for p in parts]))
  ids, masks, labels = map(np.concatenate, (ids, masks, labels))
  expected_mask = (np.arange(120) < 103).astype(np.float32)
  np.testing.assert_array_equal(masks, expected_mask)
  np.testing.assert_array_equal(ids[:103], np.arange(103))
  np.testing.assert_array_equal(labels[:103], split.labels)
  assert not ids[103:].any() and not labels[103:].any()


# ------------------------------------------------------------------------------ shortcut


def _binomial_ok(frac, p, n, z=4.5):
  return abs(frac - p) <= z * np.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("corr", [0.9, 0.5])
def test_shortcut_train_correlation(corr):
  cfg = _cfg(image_size=None, channels=3, shortcut=dict(enabled=True, correlation=corr))
  split, cues = data.load_with_cues(cfg, "train")
  assert cues.shape == split.labels.shape and cues.min() >= 0
  match = cues == split.labels
  assert _binomial_ok(match.mean(), corr, len(split))
  # Mismatched cues spread over the other classes.
  others = cues[~match]
  assert set(np.unique(others)) == set(range(10))


def test_shortcut_patch_pixels_and_eval_modes():
  clean_cfg = _cfg(image_size=16, channels=3)
  sc = dict(enabled=True, correlation=0.8, strength=0.75, patch_size=3, seed=4)
  clean_tr = data.load(clean_cfg, "train")
  shortcut_tr, cues = data.load_with_cues(_cfg(image_size=16, channels=3, shortcut=sc),
                                          "train")
  colours = data.palette(10, 3)
  expected = clean_tr.images.copy()
  blend = 0.25 * clean_tr.images[:, :3, :3, :] + 0.75 * colours[cues][:, None, None, :]
  expected[:, :3, :3, :] = blend
  np.testing.assert_allclose(shortcut_tr.images, expected, atol=1e-6)
  # Strength 1: the patch is exactly the class colour, which identifies the cue.
  full, cues_full = data.load_with_cues(
      _cfg(image_size=16, channels=3, shortcut=dict(sc, strength=1.0)), "train")
  np.testing.assert_array_equal(cues_full, cues)
  corner = full.images[:, 1, 1, :]
  decoded = np.argmin(((corner[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(decoded, cues)

  clean_te = data.load(clean_cfg, "test")
  absent, a_cues = data.load_with_cues(
      _cfg(image_size=16, channels=3, shortcut=dict(sc, eval="absent")), "test")
  np.testing.assert_array_equal(absent.images, clean_te.images)
  assert (a_cues == -1).all()
  perm, p_cues = data.load_with_cues(
      _cfg(image_size=16, channels=3, shortcut=dict(sc, eval="permuted")), "test")
  assert p_cues.min() >= 0 and not (p_cues == perm.labels).any()
  assert not np.array_equal(perm.images, clean_te.images)
  present, pr_cues = data.load_with_cues(
      _cfg(image_size=16, channels=3, shortcut=dict(sc, eval="present")), "test")
  assert _binomial_ok((pr_cues == present.labels).mean(), 0.8, len(present))
  with pytest.raises(registry.UnknownNameError, match="permuted"):
    data.load(_cfg(shortcut=dict(sc, eval="swapped")), "test")


def test_shortcut_seed_and_palette():
  sc = dict(enabled=True, correlation=0.5)
  a = data.load_with_cues(_cfg(image_size=None, shortcut=sc), "train")[1]
  b = data.load_with_cues(_cfg(image_size=None, shortcut=sc), "train")[1]
  c = data.load_with_cues(_cfg(image_size=None, shortcut=dict(sc, seed=1)), "train")[1]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for k, ch in [(10, 3), (100, 3), (10, 1), (100, 1)]:
    pal = data.palette(k, ch)
    assert pal.shape == (k, ch) and pal.min() >= 0.0 and pal.max() <= 1.0
    assert len(np.unique(np.round(pal, 4), axis=0)) == k


# ------------------------------------------------------------------------------ transforms


def test_grayscale_is_luminance():
  x = np.random.default_rng(1).random((4, 5, 6, 3)).astype(np.float32)
  lum = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
  g = data.grayscale(x)
  assert g.shape == x.shape
  for ch in range(3):
    np.testing.assert_allclose(g[..., ch], lum, atol=1e-6)
  g1 = data.grayscale(x, channels=1)
  np.testing.assert_allclose(g1[..., 0], lum, atol=1e-6)
  np.testing.assert_allclose(data.to_channels(x, 1)[..., 0], lum, atol=1e-6)


def _crops_of(image, pad):
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  for i in range(2 * pad + 1):
    for j in range(2 * pad + 1):
      crop = padded[i:i + h, j:j + w]
      yield crop
      yield crop[:, ::-1]


def test_augment():
  x = jnp.asarray(np.random.default_rng(2).random((6, 8, 8, 3)), jnp.float32)
  key = jax.random.key(0)
  np.testing.assert_array_equal(data.augment(key, x, crop_padding=0, flip=False), x)
  out = data.augment(key, x)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(out, data.augment(key, x))
  jitted = jax.jit(lambda k, im: data.augment(k, im, crop_padding=2))
  np.testing.assert_allclose(jitted(key, x), data.augment(key, x, crop_padding=2))
  assert not np.array_equal(out, data.augment(jax.random.key(1), x))
  for img, res in zip(np.asarray(x), np.asarray(out)):
    assert any(np.array_equal(res, c) for c in _crops_of(img, 4))
  many = jnp.asarray(np.random.default_rng(3).random((32, 4, 4, 1)), jnp.float32)
  flipped = np.asarray(data.augment(key, many, crop_padding=0))
  same = [np.array_equal(f, m) for f, m in zip(flipped, np.asarray(many))]
  mirror = [np.array_equal(f, m[:, ::-1]) for f, m in zip(flipped, np.asarray(many))]
  assert all(s or m for s, m in zip(same, mirror)) and any(same) and any(mirror)


# ------------------------------------------------------------------------------ tfds


def test_tfds_cifar10_mocked():
  n = 6
  cfg = _cfg(name="cifar10", image_size=None, channels=None, download=True)
  with tfds.testing.mock_data(num_examples=n):
    with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                           autospec=True) as prepare:
      split = data.load(cfg, "train")
    assert prepare.call_count == 1
    raw = tfds.data_source("cifar10", split="train", download=False)
    ref_x = np.stack([raw[i]["image"] for i in range(n)]).astype(np.float32) / 255.0
    ref_y = np.array([raw[i]["label"] for i in range(n)])
    small = data.load(_cfg(name="cifar10", image_size=16, channels=1, download=True,
                           grayscale=True), "test")
    gray = data.load(_cfg(name="cifar10", image_size=None, channels=3, download=True,
                          grayscale=True), "test")
    # Prepared on disk: no download even when allowed to.
    with mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True), \
        mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare") as prepare:
      prepared = data.load(_cfg(name="cifar10", image_size=None, channels=None), "test")
    prepare.assert_not_called()
  assert split.images.shape == (n, 32, 32, 3) and split.images.dtype == np.float32
  assert split.labels.dtype == np.int32 and split.num_classes == 10
  assert split.name == "cifar10/train"
  assert split.images.min() >= 0.0 and split.images.max() <= 1.0
  np.testing.assert_allclose(split.images, ref_x, atol=1e-6)
  np.testing.assert_array_equal(split.labels, ref_y)
  assert small.images.shape == (n, 16, 16, 1)
  lum = ref_x @ LUMA
  for ch in range(3):
    np.testing.assert_allclose(gray.images[..., ch], lum, atol=1e-5)
  assert prepared.images.shape == (n, 32, 32, 3)


def test_tfds_other_datasets_mocked():
  with tfds.testing.mock_data(num_examples=3):
    mn = data.load(_cfg(name="mnist", image_size=None, channels=None, download=True),
                   "test")
    c100 = data.load(_cfg(name="cifar100", download=True), "train")
    nette = data.load(_cfg(name="imagenette", image_size=24, download=True), "test")
  assert mn.images.shape == (3, 28, 28, 1) and mn.num_classes == 10
  assert c100.images.shape == (3, 32, 32, 3) and c100.num_classes == 100
  assert c100.labels.max() < 100
  assert nette.images.shape == (3, 24, 24, 3) and nette.name == "imagenette/test"


def test_tfds_missing_dataset_fails_at_once(tmp_path):
  cfg = _cfg(name="cifar10", data_dir=str(tmp_path))
  with mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare") as prepare:
    with pytest.raises(data.DatasetNotReadyError) as err:
      data.load(cfg, "train")
  prepare.assert_not_called()
  msg = str(err.value)
  assert "cifar10" in msg and str(tmp_path) in msg and "download=True" in msg


def test_unknown_names():
  with pytest.raises(registry.UnknownNameError) as err:
    data.load(_cfg(name="cifar-10"), "train")
  msg = str(err.value)
  assert "cifar-10" in msg
  for name in ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagenette"):
    assert name in msg
  with pytest.raises(registry.UnknownNameError, match="train"):
    data.load(_cfg(), "validation")


def test_default_config_fields():
  cfg = data.default_config()
  assert (cfg.name, cfg.data_dir, cfg.download, cfg.image_size, cfg.channels,
          cfg.grayscale, cfg.digits_test_fraction, cfg.digits_split_seed) == (
              "digits", None, False, 32, 3, False, 0.2, 0)
  sc = cfg.shortcut
  assert (sc.enabled, sc.correlation, sc.strength, sc.patch_size, sc.eval, sc.seed) == (
      False, 0.9, 1.0, 4, "present", 0)
  assert set(data.DATASETS) == {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist",
                                "imagenet2012",
                                "imagenette"}


def test_image_shape_and_num_classes_match_loaded_data():
  for overrides in (dict(), dict(image_size=None, channels=None), dict(channels=1)):
    cfg = data.default_config()
    cfg.update(overrides)
    split = data.load(cfg, "test")
    assert data.image_shape(cfg) == split.images.shape[1:]
    assert data.num_classes(cfg) == split.num_classes == 10
