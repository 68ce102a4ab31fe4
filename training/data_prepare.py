"""Tokenize text or TFDS documents once into nanoGPT-format token files.

A prepared directory holds `train.bin` and `val.bin` (flat little-endian uint16 token ids, or
uint32 for vocabularies above 65,536) and `meta.json` (vocab_size, dtype, token counts and the
tokenizer's `to_dict()`, which for a character tokenizer is the whole vocabulary). `meta.json`
is written last, so a directory that has one is complete. `launch.prepare` calls
`prepare_text` (here) / `prepare_tfds` (training/data_tfds.py); the `text` and `tfds` data
sources call the `cached_*_dir` variants, which prepare into the cache directory on first use
and reuse it afterwards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import pickle
import shutil
import sys
import time
import urllib.request
from typing import Any, Iterable

import numpy as np

from model.tokenizer import TOKENIZER_NAMES, get_tokenizer
from training.errors import UserError

META_NAME = "meta.json"
BIN_NAMES = {"train": "train.bin", "val": "val.bin"}
FORMAT_VERSION = 1
CACHE_ENV = "FLAXGPT_CACHE_DIR"
DATA_DIR_ENV = "FLAXGPT_DATA_DIR"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CHUNK_CHARS = 1 << 20  # text is encoded in pieces of about this many characters


class DataError(UserError, ValueError):
  """A user mistake in the data settings (bad path, value or file); the message says which."""


class MissingDataError(DataError, FileNotFoundError):
  """A data file or directory that does not exist."""


# ---------------------------------------------------------------------------------------------
# Paths and the cache.


def cache_root(cache_dir: str = "") -> pathlib.Path:
  """`cache_dir`, else $FLAXGPT_CACHE_DIR, else ~/.cache/flaxgpt."""
  root = cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "flaxgpt")
  return pathlib.Path(root).expanduser()


def resolve_text_paths(path: str) -> list[str]:
  """A file, comma-separated files, or glob patterns -> existing file paths, in order."""
  paths = []
  for part in (p.strip() for p in path.split(",")):
    if not part:
      continue
    if glob.has_magic(part):
      matches = sorted(glob.glob(os.path.expanduser(part)))
      if not matches:
        raise MissingDataError(f"No file matches the text pattern {part!r}.")
      paths.extend(matches)
      continue
    part = os.path.expanduser(part)
    if not os.path.isfile(part):
      what = "is a directory, not a text file" if os.path.isdir(part) else "does not exist"
      raise MissingDataError(f"Text file {part!r} {what}.")
    paths.append(part)
  if not paths:
    raise DataError(f"No text file given in {path!r}.")
  return paths


def tiny_shakespeare_path(cache_dir: str = "") -> str:
  """$FLAXGPT_DATA_DIR/tinyshakespeare.txt, else the char-rnn file downloaded once to the cache."""
  data_dir = os.environ.get(DATA_DIR_ENV)
  if data_dir:
    path = os.path.join(data_dir, SHAKESPEARE_FILE)
    if not os.path.isfile(path):
      raise MissingDataError(f"{path!r} does not exist (from ${DATA_DIR_ENV}).")
    return path
  path = cache_root(cache_dir) / SHAKESPEARE_FILE
  if not path.exists():
    _download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
  return str(path)


def _download(url: str, path: pathlib.Path, sha256: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      content = response.read()
  except OSError as e:
    raise DataError(f"Could not download {url} ({e}); set ${DATA_DIR_ENV} to a directory "
                    f"holding {SHAKESPEARE_FILE} or give data.path.") from None
  if hashlib.sha256(content).hexdigest() != sha256:
    raise DataError(f"The file downloaded from {url} does not have the expected sha256 {sha256}.")
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(content)
  os.replace(tmp, path)


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


def cached_text_dir(paths: list[str], tokenizer_name: str, val_fraction: float, *,
                    cache_dir: str = "", quiet: bool = False) -> pathlib.Path:
  """Prepared directory for text files, keyed by their paths, sizes and mtimes."""
  check_tokenizer(tokenizer_name)
  _check_val_fraction(val_fraction)
  stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
  key = cache_key({"kind": "text", "files": stats, "tokenizer": tokenizer_name,
                   "val_fraction": val_fraction})
  out_dir = cache_root(cache_dir) / "text" / f"{pathlib.Path(paths[0]).stem}-{key}"
  return build_cached(out_dir, lambda d: prepare_text(paths, tokenizer_name, d,
                                                     val_fraction=val_fraction, quiet=quiet))


# ---------------------------------------------------------------------------------------------
# Reading a prepared directory.


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
  """meta.json; else nanoGPT's meta.pkl (a char vocabulary); else GPT-2 BPE in uint16, which is
  what nanoGPT's openwebtext/shakespeare preparation writes without any meta file."""
  data_dir = pathlib.Path(data_dir)
  if (data_dir / META_NAME).exists():
    try:
      return json.loads((data_dir / META_NAME).read_text())
    except (OSError, ValueError) as e:
      raise DataError(f"Could not read {data_dir / META_NAME}: {e}") from None
  if (data_dir / "meta.pkl").exists():
    with open(data_dir / "meta.pkl", "rb") as f:
      pkl = pickle.load(f)
    chars = "".join(pkl["itos"][i] for i in range(pkl["vocab_size"]))
    return {"vocab_size": pkl["vocab_size"], "dtype": "uint16",
            "tokenizer": {"name": "char", "chars": chars}}
  return {"vocab_size": 50257, "dtype": "uint16", "tokenizer": {"name": "gpt2"}}


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


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
    self._tmp = {s: out_dir / f"{n}.tmp-{os.getpid()}" for s, n in BIN_NAMES.items()}
    self._files = {s: open(p, "wb") for s, p in self._tmp.items()}

  def write(self, split: str, ids: Iterable[int] | np.ndarray) -> None:
    arr = np.asarray(ids, dtype=self.dtype)
    self._files[split].write(arr.tobytes())
    self.counts[split] += arr.size

  def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
    for f in self._files.values():
      f.close()
    for split, count in self.counts.items():
      if count == 0:
        self.abort()
        raise DataError(f"The {split} split of {meta['source']} has no tokens; give more text "
                        f"or another val_fraction / split.")
    for split, tmp in self._tmp.items():
      os.replace(tmp, self.out_dir / BIN_NAMES[split])
    meta = {"format": "flaxgpt-bin", "version": FORMAT_VERSION, "dtype": self.dtype.name,
            **meta, "train_tokens": self.counts["train"], "val_tokens": self.counts["val"]}
    tmp_meta = self.out_dir / f"{META_NAME}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_meta, self.out_dir / META_NAME)
    return meta

  def abort(self) -> None:
    for split, f in self._files.items():
      f.close()
      self._tmp[split].unlink(missing_ok=True)


def check_out_dir(out_dir: str | os.PathLike) -> pathlib.Path:
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not out_dir.is_dir():
    raise DataError(f"Output directory {str(out_dir)!r} is an existing file.")
  return out_dir


def _make_out_dir(out_dir: str | os.PathLike) -> pathlib.Path:
  out_dir = check_out_dir(out_dir)
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DataError(f"Cannot create output directory {str(out_dir)!r}: {e.strerror}.") from None
  return out_dir


def write_prepared(out_dir, tokenizer, meta: dict[str, Any], pieces) -> dict[str, Any]:
  """Runs `pieces(writer)` (which writes the splits), then commits; returns meta with counts."""
  writer = BinWriter(_make_out_dir(out_dir), token_dtype(tokenizer.vocab_size))
  start = time.perf_counter()
  try:
    pieces(writer)
  except BaseException:
    writer.abort()
    raise
  meta = writer.commit({"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.to_dict(),
                        **meta})
  return {**meta, "seconds": time.perf_counter() - start}


def check_tokenizer(name: str) -> None:
  if name not in TOKENIZER_NAMES:
    raise DataError(f"Unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}.")


def _check_val_fraction(val_fraction: float) -> None:
  if not 0 < val_fraction < 1:
    raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")


# ---------------------------------------------------------------------------------------------
# Text files.


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"Text file {path!r} is not UTF-8 ({e.reason} at byte {e.start}).") from None


def _safe_cut(text: str, lo: int, hi: int) -> int | None:
  """A position in (lo, hi] just after a newline with non-space on both sides. GPT-2's
  pre-tokenizer never joins characters across such a point, so encoding the pieces on either
  side separately gives exactly the tokens of encoding the whole text."""
  i = text.rfind("\n", lo, hi)
  while i > lo:
    if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
      return i + 1
    i = text.rfind("\n", lo, i)
  return None


def split_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
  """`text` in pieces of at most about `chunk_chars` cut at safe points (see `_safe_cut`)."""
  pieces, start = [], 0
  while len(text) - start > chunk_chars:
    cut = _safe_cut(text, start + chunk_chars // 2, start + chunk_chars)
    if cut is None:
      break
    pieces.append(text[start:cut])
    start = cut
  pieces.append(text[start:])
  return pieces


def _text_segments(texts: list[str], val_fraction: float, eot_id: int | None):
  """(split, text, end_with_eot) in order: the first (1 - val_fraction) of all characters is
  train (nanoGPT's convention); files after the first are separated by <|endoftext|>."""
  total = sum(len(t) for t in texts)
  cut, offset = int(total * (1 - val_fraction)), 0
  for n, text in enumerate(texts):
    eot = eot_id is not None and n < len(texts) - 1
    here = min(max(cut - offset, 0), len(text))
    if here > 0:
      yield "train", text[:here], eot and here == len(text)
    if here < len(text):
      yield "val", text[here:], eot
    offset += len(text)


def prepare_text(paths: list[str], tokenizer_name: str, out_dir: str | os.PathLike, *,
                 val_fraction: float = 0.1, quiet: bool = False) -> dict[str, Any]:
  """Tokenize text files into out_dir/{train,val}.bin + meta.json; returns meta + seconds."""
  check_tokenizer(tokenizer_name)
  _check_val_fraction(val_fraction)
  check_out_dir(out_dir)
  texts = [_read_text(p) for p in paths]
  charset = "".join(sorted(set().union(*map(set, texts))))
  if not charset:
    raise DataError(f"Text file(s) {', '.join(paths)} are empty.")
  tokenizer = get_tokenizer(tokenizer_name, text=charset)
  progress = Progress(f"tokenizing {pathlib.Path(paths[0]).name}" +
                      (f" (+{len(paths) - 1} files)" if len(paths) > 1 else ""),
                      sum(map(len, texts)), "characters", quiet)

  def pieces(writer: BinWriter) -> None:
    for split, text, eot in _text_segments(texts, val_fraction, tokenizer.eot_id):
      chunks = split_text(text)
      for i in range(0, len(chunks), 8):
        group = chunks[i:i + 8]
        encoded = tokenizer.encode_batch(group)
        for ids in encoded:
          writer.write(split, ids)
        progress.update(sum(map(len, group)), sum(map(len, encoded)))
      if eot:
        writer.write(split, [tokenizer.eot_id])
    progress.close()

  return write_prepared(out_dir, tokenizer, {"source": "text:" + ",".join(paths)}, pieces)
