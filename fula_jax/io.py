"""Paths and file I/O that never leaves a half-written file, on local disks and buckets.

All paths go through `etils.epath`, so a workdir may be ``gs://...``. Writes go to a
temporary name beside the target and are renamed into place. A path a user gives is
resolved once, where it enters (the command line or a public function), by
:func:`resolve`: local paths become absolute (orbax refuses relative ones), URLs stay.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import jax
import numpy as np
from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL such as ``gs://bucket/run`` rather than a local path."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> str:
  """`path` as an absolute local path (``~`` expanded, relative to the current
  directory), or unchanged when it is a URL such as ``gs://bucket/run``."""
  path = os.fspath(path)
  if not path:
    raise ValueError("An empty string is not a path.")
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def path(p: str | os.PathLike) -> epath.Path:
  """:func:`resolve`, as an `epath.Path`."""
  return epath.Path(resolve(p))


def is_writer() -> bool:
  """Only process 0 writes shared files."""
  return jax.process_index() == 0


def _tmp(path: epath.Path) -> epath.Path:
  return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes(path: str | os.PathLike, data: bytes) -> epath.Path:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp(path)
  tmp.write_bytes(data)
  tmp.replace(path)
  return path


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
  return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> epath.Path:
  return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> epath.Path:
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return write_bytes(path, buf.getvalue())


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def _jsonable(obj: Any) -> Any:
  if isinstance(obj, (np.generic,)):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if hasattr(obj, "to_dict"):
    return obj.to_dict()
  return str(obj)
