"""Invariance-aware stitching, following the idea of FuLA's ICML 2026 version (its exact
recipe is not public): stitches are trained and scored on inputs that the front model
represents identically.

For the stitches out of f's point i, every fitting and test image x is replaced by x',
optimised with the inversion code of :mod:`fula_jax.similarity.inversion` from a seed
image of another class until f's activation at i matches x's: f_i(x') ~ f_i(x). x'
keeps x's label. The stitched model then sees what it would see for x, while g's own
targets (logits, latents) come from x': an objective that follows g must agree with g on
inputs that g may tell apart but f cannot, so the scores measure how far f's invariances
are g's. It applies to every objective and map.

``stitch.invariance.examples=N`` (and ``test_examples``) turns it on in `run_sweep`: per
front point, the inverted sets (kept in ``<workdir>/invariance/<point>.npz`` and reused)
and a sweep of that row on them (``<workdir>/invariance/<point>/``, resumed like any
sweep; `row_sweeps`); the rows make up one `SweepResult` (`merge`). g's accuracy
differs per row (each row has its own test images): ``meta['end_accuracy_by_row']``.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from fula_jax import io as fio
from fula_jax import registry
from fula_jax.data import Split
from fula_jax.data import split as split_lib
from fula_jax.errors import ConfigError
from fula_jax.similarity import inversion
from fula_jax.stitching import plan as plan_lib
from fula_jax.stitching.result import NOT_REQUESTED, SweepResult
from fula_jax.stitching.settings import INVARIANCE_DEFAULTS as DEFAULTS


def first_examples(source: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of the first `n` examples of any batch source, in order."""
  if len(source) < n:
    raise ConfigError(f"invariance: asked for {n} examples of {source.name}, which has "
                      f"{len(source)}.")
  split = split_lib.materialize(source.take(n))
  return split.images, split.labels


def invert_examples(model: Any, variables: Any, point: str, images: np.ndarray,
                    labels: np.ndarray, opts: Mapping[str, Any], key: jax.Array
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Each image replaced by one optimised from an image of another class until the
  model's activation at `point` matches: (images in the input order, final relative
  representation losses)."""
  target_idx, seed_idx = inversion.make_pairs(labels, key, len(labels))
  inv = inversion.invert(
      inversion.ModelRepresentation(model, point), variables, images[seed_idx],
      images[target_idx], {k: opts[k] for k in ("steps", "step_size", "momentum",
                                                 "batch_size")})
  out, loss = np.empty_like(images), np.empty(len(labels), np.float32)
  out[target_idx], loss[target_idx] = inv.images, inv.loss
  return out, loss


def inverted_sets(model_a: Any, vars_a: Any, point: str, train: Any, test: Any,
                  opts: Mapping[str, Any], num_classes: int, folder: Any = None
                  ) -> tuple[Split, Split, dict[str, float]]:
  """The fitting and test sets of the stitches out of `point`, inverted through f
  (read from ``<folder>/<point>.npz`` when there, else computed and written there)."""
  cached = None if folder is None else fio.path(folder) / f"{point}.npz"
  settings = np.asarray([opts[k] for k in sorted(DEFAULTS)], np.float64)
  if cached is not None and cached.exists():
    z = fio.read_npz(cached)
    if np.array_equal(z["settings"], settings):
      return _splits(point, z, num_classes)
  key = jax.random.fold_in(jax.random.PRNGKey(int(opts["seed"])), _salt(point))
  arrays = {"settings": settings}
  for k, (name, source, n) in enumerate((("train", train, opts["examples"]),
                                         ("test", test, opts["test_examples"]))):
    images, labels = first_examples(source, int(n))
    inv, loss = invert_examples(model_a, vars_a, point, images, labels, opts,
                                jax.random.fold_in(key, k))
    arrays.update({f"{name}_images": inv, f"{name}_labels": labels,
                   f"{name}_loss": loss})
  if cached is not None and fio.is_writer():
    fio.write_npz(cached, **arrays)
  return _splits(point, arrays, num_classes)


def _salt(point: str) -> int:
  return zlib.crc32(point.encode()) & 0x7FFFFFFF


def _splits(point: str, z: Mapping[str, np.ndarray], num_classes: int
            ) -> tuple[Split, Split, dict[str, float]]:
  info = {f"{name}_loss": float(np.mean(z[f"{name}_loss"])) for name in ("train", "test")}
  return (Split(z["train_images"], z["train_labels"], num_classes,
                f"inverted@{point}/train"),
          Split(z["test_images"], z["test_labels"], num_classes, f"inverted@{point}/test"),
          info)


def options(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
  """The invariance block of a sweep config with its defaults; errors name the keys."""
  out = dict(DEFAULTS)
  for k, v in dict(cfg or {}).items():
    if k not in DEFAULTS:
      raise registry.unknown("invariance setting", k, DEFAULTS)
    out[k] = type(DEFAULTS[k])(v)
  if out["examples"] > 0 and out["test_examples"] < 1:
    raise ConfigError("invariance.examples > 0 needs invariance.test_examples > 0: the "
                      "stitches are scored on inverted test images too.")
  return out


@dataclasses.dataclass(frozen=True)
class RowSweep:
  """The sweep of the stitches out of front point `point`: its cells (`cfg`), on that
  point's inverted fitting and test sets, resumed from `workdir`."""
  point: str
  train: Split
  test: Split
  cfg: dict[str, Any]
  workdir: str | None
  inversion_loss: dict[str, float]  # mean relative loss of the inversions, per set


def row_sweeps(model_a: Any, vars_a: Any, model_b: Any, train: Any, test: Any,
               cfg: Mapping[str, Any], workdir: str | None, opts: Mapping[str, Any]
               ) -> Iterator[RowSweep]:
  """One sweep per front point with requested cells, its inverted sets made (or read
  back) as it is reached; `run_sweep` runs each and `merge` makes one result."""
  folder = None if workdir is None else fio.path(workdir) / "invariance"
  rows, cols, cells = _cells(model_a, model_b, cfg)
  for point in rows:
    mine = [c for r, c in cells if r == point]
    if not mine:
      continue
    fit, held, info = inverted_sets(model_a, vars_a, point, train, test, opts,
                                    int(train.num_classes), folder)
    yield RowSweep(point, fit, held, dict(cfg, rows=[point], cols=mine, pairs="all"),
                   None if folder is None else str(folder / point), info)


def merge(parts: Sequence[tuple[RowSweep, SweepResult]], model_a: Any, model_b: Any,
          cfg: Mapping[str, Any], opts: Mapping[str, Any]) -> SweepResult:
  """The row sweeps' results as one over every requested cell."""
  rows, cols, cells = _cells(model_a, model_b, cfg)
  if not parts:
    raise ConfigError(f"No cells requested (pairs={cfg['pairs']!r} over rows {rows} and "
                      f"cols {cols}).")
  first = parts[0][1]
  values = {obj: {m: np.full((len(rows), len(cols)), np.nan) for m in ms}
            for obj, ms in first.values.items()}
  reasons = {obj: {} for obj in first.values}
  for row, part in parts:
    i = rows.index(row.point)
    for obj, ms in part.values.items():
      for m, arr in ms.items():
        values[obj][m][i, [cols.index(c) for c in part.cols]] = arr[0]
      reasons[obj].update(part.reasons.get(obj, {}))
  wanted = {plan_lib.cell_key(r, c) for r, c in cells}
  for obj in reasons:
    reasons[obj].update({plan_lib.cell_key(r, c): NOT_REQUESTED for r in rows for c in cols
                         if plan_lib.cell_key(r, c) not in wanted})
  params = {k: v for _, part in parts for k, v in part.params.items()}
  stats = {k: sum(part.stats[k] for _, part in parts) for k, v in first.stats.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
  by_row = {row.point: part.end_accuracy for row, part in parts}
  info = {row.point: row.inversion_loss for row, _ in parts}
  meta = dict(first.meta, invariance=dict(opts, inversion_loss=info),
              end_accuracy_by_row=by_row)
  return SweepResult(rows, cols, values, reasons, float(np.mean(list(by_row.values()))),
                     stats, meta, params)


def _cells(model_a: Any, model_b: Any, cfg: Mapping[str, Any]
           ) -> tuple[list[str], list[str], list[tuple[str, str]]]:
  rows = list(cfg.get("rows") or model_a.point_names)
  cols = list(cfg.get("cols") or model_b.point_names)
  return rows, cols, plan_lib.parse_pairs(cfg["pairs"], rows, cols)[0]
