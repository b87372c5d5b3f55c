"""The resume store: fingerprints, one file per finished unit and arm, atomic writes.

A unit's results go to ``<workdir>/stitch/<arm>/<uid>.json``, named by the arm
(``fula``, or ``fula@lowrank`` through a map other than affine), and to ``.npz`` with
the stitch parameters when asked (kernels stacked with `width` rows, cell k's own being
its first ``in_features[k]``), written atomically by process 0, the parameters first: a
JSON file marks a finished unit. A unit's cells include the end model's self-stitch
into its end point, the column's baseline, whose row is ``self:<point>``. Each file
records its cells and the fingerprint of everything that determines their numbers: the
science settings, the objective and its map, both donors (a digest of their variables)
and the data (a digest of the examples). A rerun loads every cell whose fingerprint
matches and plans only the rest, so an interrupted sweep recomputes nothing it finished.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from fula_jax import io as fio
from fula_jax.stitching import plan as plan_lib
from fula_jax.stitching.settings import Science

FORMAT_VERSION = 2


def tree_digest(tree: Any) -> str:
  """Digest of a pytree's structure and values (a donor's identity)."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  h.update(str(treedef).encode())
  for leaf in leaves:
    a = np.ascontiguousarray(leaf)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:24]


def to_json_value(v: float) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None


def from_json_value(v: Any) -> float:
  return float("nan") if v is None else float(v)


class Store:
  """Finished units of one sweep in `workdir` (None: nothing is read or written)."""

  def __init__(self, workdir: str | None, science: Science, identity: Mapping[str, Any]):
    """`identity`: what else the numbers depend on (models, data), JSON-able."""
    self.workdir = workdir
    self.fingerprints = {
        a.name: plan_lib.digest(dict(science.fingerprint_fields(a.name), **identity,
                                     version=FORMAT_VERSION), 24)
        for a in science.arms}

  def path(self, arm: str, uid: str, suffix: str = ".json"):
    return fio.path(self.workdir) / "stitch" / arm / f"{uid}{suffix}"

  def load(self) -> tuple[dict[tuple[str, str, str], dict[str, Any]], dict[str, Any]]:
    """Finished cells ``{(arm, row, col): record}`` with matching fingerprints,
    and the end model's accuracies recorded with them ({} when none)."""
    done: dict[tuple[str, str, str], dict[str, Any]] = {}
    end: dict[str, Any] = {}
    if self.workdir is None:
      return done, end
    root = fio.path(self.workdir) / "stitch"
    for arm, fp in self.fingerprints.items():
      folder = root / arm
      if not folder.exists():
        continue
      for path in sorted(folder.glob("*.json")):
        try:
          rec = fio.read_json(path)
        except (ValueError, OSError):
          continue  # a damaged file is recomputed
        if not isinstance(rec, dict) or rec.get("fingerprint") != fp:
          continue
        if rec.get("end_accuracy") is not None and not end:
          end = {"end_accuracy": float(rec["end_accuracy"]),
                 "end_accuracy_sets": {k: float(v) for k, v in
                                       rec.get("end_accuracy_sets", {}).items()}}
        for c in rec.get("cells", []):
          done[(arm, c["row"], c["col"])] = c
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      mine = np.frombuffer(bytes.fromhex(plan_lib.digest(sorted(done), 32)), np.uint8)
      first = multihost_utils.broadcast_one_to_all(mine)
      if not np.array_equal(np.asarray(first), mine):
        raise RuntimeError("Processes disagree on the finished stitch cells in "
                           f"{root}; is the workdir shared by every process?")
    return done, end

  def write(self, unit: plan_lib.Unit, cells: Sequence[dict[str, Any]],
            params: Mapping[str, np.ndarray] | None, *, seconds: float,
            end_accuracy: float | None, end_accuracy_sets: Mapping[str, float]) -> None:
    """One unit's records, atomically, by process 0 (the parameters first, if given)."""
    if self.workdir is None or not fio.is_writer():
      return
    if params is not None:  # kernels padded to the unit's widest front (zero rows)
      fio.write_npz(self.path(unit.arm, unit.uid, ".npz"), **params)
    fio.write_json(self.path(unit.arm, unit.uid), {
        "version": FORMAT_VERSION, "objective": unit.arm, "uid": unit.uid,
        "fingerprint": self.fingerprints[unit.arm], "end": unit.end,
        "fronts": list(unit.fronts), "width": unit.width,
        "in_features": [int(shape[-1]) for shape in unit.front_shapes],
        "end_accuracy": end_accuracy, "end_accuracy_sets": dict(end_accuracy_sets),
        "seconds": seconds, "cells": list(cells)})
