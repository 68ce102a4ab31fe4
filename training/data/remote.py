"""Token files on gs://: windows read with ranged requests, nothing copied (or, with
data.local_copy, copied once to a local folder and memory-mapped).

    tokens = RemoteTokenFile("gs://bucket/data/train.bin", np.uint16)
    rows = tokens.windows(starts, 1025)   # [len(starts), 1025], one ranged read per window,
                                          # all in flight at once
Each process asks only for its own rows of a batch (training/data/sources.py), and the loop's
prefetch thread keeps the next batches in flight, so a step waits on storage only if a batch
takes longer to read than a step takes to run.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from model.errors import NotFoundError, UserError
from training import storage
from training.data.bin import BIN_NAMES, META_NAME, check_meta, refuse_non_empty


def read_remote_meta(data_dir: str) -> dict[str, Any]:
  """meta.json of a prepared gs:// directory (required there: it names the dtype and largest
  token id, which a remote file is not scanned for)."""
  path = f"{data_dir.rstrip('/')}/{META_NAME}"
  raw = storage.read(path)
  if raw is None:
    raise NotFoundError(f"{path} does not exist: a gs:// data directory needs the meta.json "
                        f"that python -m launch.prepare --out_dir {data_dir} writes.")
  try:
    meta = json.loads(raw)
  except ValueError as e:
    raise UserError(f"Could not read {path}: {e}") from None
  return check_meta(meta, pathlib.Path(path))


class RemoteTokenFile:
  """A read-only view of a gs:// token file: len(), slices and batches of windows."""

  def __init__(self, path: str, dtype: np.dtype, expected: int | None = None):
    nbytes = storage.size(path)
    if nbytes is None:
      raise NotFoundError(f"Token file {path!r} does not exist.")
    self.path, self.dtype = path, np.dtype(dtype)
    if nbytes % self.dtype.itemsize:
      raise UserError(f"Token file {path!r} has {nbytes} bytes, not a whole number of "
                      f"{self.dtype.name} tokens.")
    self._n = nbytes // self.dtype.itemsize
    if expected is not None and self._n != expected:
      raise UserError(f"Token file {path!r} holds {self._n:,} tokens but meta.json says "
                      f"{expected:,}; prepare it again.")

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, step = index.indices(self._n)
    if step != 1:
      raise ValueError("RemoteTokenFile supports contiguous slices only")
    return self.windows([start], stop - start)[0]

  def windows(self, starts, length: int) -> np.ndarray:
    """[len(starts), length] tokens, starts[i] .. starts[i] + length - 1 (all in range)."""
    size = self.dtype.itemsize
    chunks = storage.read_ranges(self.path, [(int(s) * size, (int(s) + length) * size)
                                             for s in starts])
    return np.stack([np.frombuffer(c, self.dtype) for c in chunks]) if chunks else np.zeros(
        (0, length), self.dtype)


def local_copy(data_dir: str, folder: str) -> pathlib.Path:
  """The prepared gs:// directory copied into `folder`/<its name> (files whose size already
  matches are kept), for memory-mapped reads."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  bucket, key = storage.split_gs(data_dir)
  out = pathlib.Path(os.path.expanduser(folder)) / bucket / key
  out.mkdir(parents=True, exist_ok=True)
  for name in (META_NAME, *BIN_NAMES.values()):
    src, dst = epath.Path(f"{data_dir.rstrip('/')}/{name}"), out / name
    if not src.exists():
      continue
    if dst.exists() and dst.stat().st_size == src.stat().length:
      continue
    tmp = dst.with_name(f"{name}.tmp-{os.getpid()}")
    src.copy(epath.Path(tmp), overwrite=True)
    os.replace(tmp, dst)
  return out


def check_remote_out_dir(out_dir: str, force: bool = False) -> None:
  """A gs:// --out_dir may be written: reachable and writable, and empty unless `force`."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  storage.check_remote(out_dir, "--out_dir")
  folder = epath.Path(out_dir)
  if not force and folder.is_dir():
    refuse_non_empty(out_dir, [p.name for p in folder.iterdir()])


def prepare_remote(prepare, out_dir: str, force: bool = False) -> dict[str, Any]:
  """Runs `prepare(local_dir)` (a launch.prepare writer) into a temporary local folder, then
  uploads the token files and, last, meta.json (a gs:// directory counts as prepared only once
  meta.json is there)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  check_remote_out_dir(out_dir, force)
  with tempfile.TemporaryDirectory(prefix="flaxgpt-prepare-") as tmp:
    local = pathlib.Path(tmp) / "out"
    meta = prepare(local)
    for name in (*BIN_NAMES.values(), META_NAME):
      storage.upload(local / name, f"{out_dir.rstrip('/')}/{name}")
  return meta
