"""The prepared-data format: nanoGPT-style token files, written once and cached.

A prepared directory holds `train.bin` and `val.bin` (flat little-endian uint16 token ids, or
uint32 for vocabularies above 65,536) and `meta.json` (vocab_size, dtype, token counts, the
largest token id and the tokenizer's `to_dict()`, which for a character tokenizer is the whole
vocabulary). `meta.json` is written last, so a directory that has one is complete, and is
checked when read (`check_meta`); the token files are checked against it when opened
(training/data/sources.py). Text files (training/data/text.py)
and TFDS datasets (training/data/tfds.py) are written with `write_prepared`; the `text` and
`tfds` sources prepare into the cache directory (`build_cached`) on first use and reuse it.
`read_meta` reads one back (and nanoGPT's own directories, which have no meta.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import shutil
import sys
import time
from typing import Any, Iterable

import numpy as np

from model.errors import UserError
from model.tokenizer import HF_PREFIX, TOKENIZER_NAMES
from training.interrupts import uninterrupted

META_NAME = "meta.json"
BIN_NAMES = {"train": "train.bin", "val": "val.bin"}
FORMAT_VERSION = 1
TOKEN_DTYPES = ("uint16", "uint32")  # what `token_dtype` gives (BinWriter writes no other)
CACHE_ENV = "FLAXGPT_CACHE_DIR"


# ---------------------------------------------------------------------------------------------
# The cache of prepared directories.


def cache_root(cache_dir: str = "") -> pathlib.Path:
  """`cache_dir`, else $FLAXGPT_CACHE_DIR, else ~/.cache/flaxgpt."""
  root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "flaxgpt")
  return pathlib.Path(root).expanduser()


def cache_key(parts: dict[str, Any]) -> str:
  blob = json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_cached(out_dir: pathlib.Path, build) -> pathlib.Path:
  """Return `out_dir` if it is complete; otherwise build into a private staging directory and
  rename it into place (concurrent builders are harmless: the first rename wins)."""
  if (out_dir / META_NAME).exists():
    return out_dir
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  try:
    build(staging)
    try:
      os.rename(staging, out_dir)
    except OSError:  # another process finished first
      if not (out_dir / META_NAME).exists():
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out_dir


# ---------------------------------------------------------------------------------------------
# Reading a prepared directory.


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
  """meta.json (checked: `check_meta`); else nanoGPT's meta.pkl (a char vocabulary); else GPT-2
  BPE in uint16, which is what nanoGPT's openwebtext/shakespeare preparation writes without any
  meta file."""
  data_dir = pathlib.Path(data_dir)
  if (data_dir / META_NAME).exists():
    try:
      meta = json.loads((data_dir / META_NAME).read_text())
    except (OSError, ValueError) as e:
      raise UserError(f"Could not read {data_dir / META_NAME}: {e}") from None
    return check_meta(meta, data_dir / META_NAME)
  if (data_dir / "meta.pkl").exists():
    with open(data_dir / "meta.pkl", "rb") as f:
      pkl = pickle.load(f)
    chars = "".join(pkl["itos"][i] for i in range(pkl["vocab_size"]))
    return {"vocab_size": pkl["vocab_size"], "dtype": "uint16",
            "tokenizer": {"name": "char", "chars": chars}}
  return {"vocab_size": 50257, "dtype": "uint16", "tokenizer": {"name": "gpt2"}}


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_meta(meta: Any, where: pathlib.Path) -> dict[str, Any]:
  """`meta` (read from `where`) if it describes token files this project can read: vocab_size a
  positive integer, dtype one that `token_dtype` writes and wide enough for the vocabulary,
  token counts and max_token_id (when present) whole numbers, the largest id below vocab_size,
  a character tokenizer's table as long as the vocabulary. UserError naming the field if not."""
  if not isinstance(meta, dict):
    raise UserError(f"{where} holds a JSON {type(meta).__name__}, not an object with "
                    f"vocab_size and dtype; prepare the data again with python -m launch.prepare.")
  if "vocab_size" not in meta:
    raise UserError(f"{where} has no vocab_size; it must give the vocabulary size as a positive "
                    f"integer (python -m launch.prepare writes it).")
  vocab = meta["vocab_size"]
  if not _is_count(vocab) or vocab == 0:
    raise UserError(f"{where} has vocab_size {vocab!r}; it must be a positive integer.")
  dtype = meta.get("dtype", "uint16")
  if dtype not in TOKEN_DTYPES:
    raise UserError(f"{where} has dtype {dtype!r}; token files are "
                    f"{' or '.join(TOKEN_DTYPES)} (what python -m launch.prepare writes).")
  if np.iinfo(dtype).max + 1 < vocab:
    raise UserError(f"{where} has dtype {dtype} for vocab_size {vocab:,}, which needs ids up to "
                    f"{vocab - 1:,}; use uint32.")
  for key in ("train_tokens", "val_tokens", "max_token_id"):
    if key in meta and not _is_count(meta[key]):
      raise UserError(f"{where} has {key} {meta[key]!r}; it must be a non-negative integer.")
  if meta.get("max_token_id", -1) >= vocab:
    raise UserError(f"{where} has max_token_id {meta['max_token_id']:,} but vocab_size "
                    f"{vocab:,}; every token id must be below vocab_size.")
  tokenizer = meta.get("tokenizer")
  if isinstance(tokenizer, dict) and tokenizer.get("name") == "char":
    chars = tokenizer.get("chars")
    if not isinstance(chars, str) or len(chars) != vocab:
      size = f"{len(chars)} characters" if isinstance(chars, str) else f"chars {chars!r}"
      raise UserError(f"{where} has a character tokenizer of {size} but vocab_size {vocab}; "
                      f"they must match (prepare the data again).")
  return meta


# ---------------------------------------------------------------------------------------------
# The range of the token ids in a file.

SAMPLE_TOKENS = 1 << 16  # tokens read at each of a few places to check a recorded maximum
SCAN_CHUNK = 1 << 24  # tokens per vectorised max when a whole file is scanned


def sampled_max(tokens: np.ndarray) -> int:
  """The largest id among SAMPLE_TOKENS tokens at the start, the middle and the end (reads at
  most 3 x SAMPLE_TOKENS tokens, whatever the file's size)."""
  n = len(tokens)
  starts = sorted({0, max(n // 2 - SAMPLE_TOKENS // 2, 0), max(n - SAMPLE_TOKENS, 0)})
  return max(int(tokens[i:i + SAMPLE_TOKENS].max()) for i in starts)


def scanned_max(path: pathlib.Path, tokens: np.ndarray, cache_dir: str = "") -> int:
  """The largest id in the whole file, by a vectorised max over chunks of SCAN_CHUNK tokens
  (about 1 s per 2e9 tokens from the page cache; disk speed otherwise). Done once per file: the
  result is cached under the cache directory keyed by the file's path, size and mtime."""
  stat = path.stat()
  key = cache_key({"kind": "max_token_id", "file": str(path.resolve()), "size": stat.st_size,
                   "mtime": stat.st_mtime_ns, "dtype": tokens.dtype.name})
  cached = cache_root(cache_dir) / "max_token_id" / f"{key}.json"
  try:
    return int(json.loads(cached.read_text())["max_token_id"])
  except (OSError, ValueError, KeyError, TypeError):
    pass
  top = max((int(tokens[i:i + SCAN_CHUNK].max()) for i in range(0, len(tokens), SCAN_CHUNK)),
            default=0)
  try:
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"file": str(path), "max_token_id": top}))
    os.replace(tmp, cached)
  except OSError:  # a read-only cache only costs the scan next time
    pass
  return top


# ---------------------------------------------------------------------------------------------
# Writing a prepared directory.


class Progress:
  """A one-line progress report on stderr: percent, tokens, tokens/s and ETA."""

  def __init__(self, label: str, total: int, unit: str, quiet: bool = False):
    self.label, self.total, self.unit, self.quiet = label, max(total, 1), unit, quiet
    self.done = self.tokens = 0
    self.start = self._last = time.perf_counter()
    self._tty = sys.stderr.isatty()

  def update(self, done: int, tokens: int) -> None:
    self.done += done
    self.tokens += tokens
    now = time.perf_counter()
    if now - self._last >= (0.5 if self._tty else 10.0):
      self._last = now
      self._print(end="\r" if self._tty else "\n")

  def close(self) -> None:
    self._print(end="\n")

  def _print(self, end: str) -> None:
    if self.quiet:
      return
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    frac = min(self.done / self.total, 1.0)
    eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
    print(f"{self.label}: {100 * frac:5.1f}% of {self.total:,} {self.unit}, "
          f"{self.tokens:,} tokens, {self.tokens / elapsed:,.0f} tokens/s, ETA {eta:.0f}s",
          end=end, file=sys.stderr, flush=True)


class BinWriter:
  """Appends token chunks to `<split>.bin.tmp` files in `out_dir`; `commit` renames them into
  place and writes meta.json last, so nothing half-written ever carries a final name."""

  def __init__(self, out_dir: pathlib.Path, dtype: np.dtype):
    self.out_dir, self.dtype = out_dir, dtype
    self.counts = {split: 0 for split in BIN_NAMES}
    self.max_token_id = 0
    self._tmp = {s: out_dir / f"{n}.tmp-{os.getpid()}" for s, n in BIN_NAMES.items()}
    self._files = {s: open(p, "wb") for s, p in self._tmp.items()}

  def write(self, split: str, ids: Iterable[int] | np.ndarray) -> None:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
      raise ValueError(f"token ids {ids.min()}..{ids.max()} do not fit {self.dtype.name}")
    arr = ids.astype(self.dtype)
    self._files[split].write(arr.tobytes())
    self.counts[split] += arr.size
    if arr.size:
      self.max_token_id = max(self.max_token_id, int(arr.max()))

  def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
    for f in self._files.values():
      f.close()
    for split, count in self.counts.items():
      if count == 0:
        self.abort()
        raise UserError(f"The {split} split of {meta['source']} has no tokens; give more text "
                        f"or another val_fraction / split.")
    for split, tmp in self._tmp.items():
      os.replace(tmp, self.out_dir / BIN_NAMES[split])
    meta = {"format": "flaxgpt-bin", "version": FORMAT_VERSION, "dtype": self.dtype.name,
            **meta, "train_tokens": self.counts["train"], "val_tokens": self.counts["val"],
            "max_token_id": self.max_token_id}
    tmp_meta = self.out_dir / f"{META_NAME}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_meta, self.out_dir / META_NAME)
    return meta

  def abort(self) -> None:
    for split, f in self._files.items():
      f.close()
      self._tmp[split].unlink(missing_ok=True)


def check_out_dir(out_dir: str | os.PathLike, force: bool = False) -> pathlib.Path:
  """`out_dir` if a prepared directory may be written there: it does not exist, or is an
  empty directory, or (force) a directory whose train.bin, val.bin and meta.json are replaced."""
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f"Output directory {str(out_dir)!r} is an existing file.")
  if not force and out_dir.is_dir():
    refuse_non_empty(str(out_dir), [p.name for p in out_dir.iterdir()])
  return out_dir


def refuse_non_empty(out_dir: str, entries: list[str]) -> None:
  """UserError naming what a prepared --out_dir (local or gs://) already holds, if anything."""
  if entries:
    entries = sorted(entries)
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise UserError(f"Output directory {out_dir!r} is not empty (it holds {shown}); choose an "
                    f"empty or new one, or pass --force to replace its "
                    f"{', '.join([*BIN_NAMES.values(), META_NAME])}.")


def _make_out_dir(out_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(the output directory, created; the topmost folder this call created, None if none)."""
  out_dir = check_out_dir(out_dir, force=True)  # checked before the work began
  created = None
  for folder in (out_dir, *out_dir.parents):
    if folder.exists():
      break
    created = folder
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"Cannot create output directory {str(out_dir)!r}: {e.strerror}.") from None
  return out_dir, created


def write_prepared(out_dir, tokenizer, meta: dict[str, Any], pieces) -> dict[str, Any]:
  """Runs `pieces(writer)` (which writes the splits), then commits; returns meta with counts.
  A failure or Ctrl-C leaves `out_dir` as it was (folders this call made are removed again);
  the commit itself is not cut in half by Ctrl-C (training/interrupts.py)."""
  out_dir, created = _make_out_dir(out_dir)
  start = time.perf_counter()
  try:
    writer = BinWriter(out_dir, token_dtype(tokenizer.vocab_size))
    try:
      pieces(writer)
      with uninterrupted(f"{out_dir} was written completely before it stopped"):
        meta = writer.commit({"vocab_size": tokenizer.vocab_size,
                              "tokenizer": tokenizer.to_dict(), **meta})
    except BaseException:
      writer.abort()
      raise
  except BaseException:
    for folder in (out_dir, *out_dir.parents) if created is not None else ():
      try:
        folder.rmdir()  # only while empty
      except OSError:
        break
      if folder == created:
        break
    raise
  return {**meta, "seconds": time.perf_counter() - start}


def check_tokenizer(name: str) -> None:
  if isinstance(name, str) and name.startswith(HF_PREFIX) and name[len(HF_PREFIX):]:
    return
  if name not in TOKENIZER_NAMES:
    raise UserError(f"Unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}.")
