"""Task lm (GPT): windows of T + 1 tokens of one token stream, like nanoGPT's `get_batch`.

    source = make_source(config.data, seq_len=1024, global_batch_size=512, seed=0)
    tokens = source.get_batch("train", step)      # int32 [local_batch, seq_len + 1]

A window of batch `index` is data[i : i + T + 1] at a uniformly random i drawn by (seed, split,
index). The stream is data.source's:
  "bin"        a prepared directory's train.bin / val.bin via np.memmap (training/data/bin.py;
               a gs:// directory by ranged reads, training/data/remote.py)
  "text"       local files, tokenized once into a cached prepared directory (text.py)
  "tfds"       tfds.data_source documents joined with <|endoftext|>, tokenized once into the
               cache (tfds.py; for big datasets run `python -m launch.prepare` once, use "bin")
  "synthetic"  uniform random tokens, no disk
The masked-LM and denoising tasks read the same windows (mlm.py, pairs.py).
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import numpy as np

from model.errors import NotFoundError, UserError
from model.tokenizer import GPT2_VOCAB_SIZE, HF_PREFIX, get_tokenizer
from training.data import remote
from training.data.bin import (BIN_NAMES, check_tokenizer, read_meta, sampled_max,
                               scanned_max)
from training.data.sources import SPLIT_IDS, DataSource, source_layout, split_id
from training.data.text import cached_text_dir, read_text, text_paths
from training.data.tfds import cached_tfds_dir

STREAM_SOURCES = ("text", "bin", "tfds", "synthetic")


class TokenFileSource(DataSource):
  """Random windows of a prepared directory's train.bin / val.bin, read through np.memmap (a
  gs:// directory: by ranged reads, training/data/remote.py)."""

  def __init__(self, data_dir: str | os.PathLike, *, name: str, cache_dir: str = "", **kwargs):
    self.read_seconds = None  # a gs:// source: the time to read one batch, measured at start
    if "://" in os.fspath(data_dir):
      self._init_remote(os.fspath(data_dir), name=name, **kwargs)
      return
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
      raise NotFoundError(f"Data directory {str(data_dir)!r} does not exist (it should hold "
                          f"train.bin and val.bin, e.g. from `python -m launch.prepare`).")
    meta = read_meta(data_dir)
    super().__init__(name=name, vocab_size=meta["vocab_size"], tokenizer=meta.get("tokenizer"),
                     **kwargs)
    self.data_dir = data_dir
    dtype = np.dtype(meta.get("dtype", "uint16"))
    self.tokens = {split: open_tokens(data_dir / BIN_NAMES[split], dtype, self.seq_len,
                                       meta.get(f"{split}_tokens"))
                   for split in SPLIT_IDS}
    self.max_token_id = max(self._check_ids(split, meta, cache_dir) for split in SPLIT_IDS)

  def _init_remote(self, data_dir: str, *, name: str, **kwargs) -> None:
    meta = remote.read_remote_meta(data_dir)
    super().__init__(name=name, vocab_size=meta["vocab_size"], tokenizer=meta.get("tokenizer"),
                     **kwargs)
    self.data_dir = data_dir
    dtype = np.dtype(meta.get("dtype", "uint16"))
    self.tokens = {}
    for split in SPLIT_IDS:
      path = f"{data_dir.rstrip('/')}/{BIN_NAMES[split]}"
      self.tokens[split] = remote.RemoteTokenFile(path, dtype, meta.get(f"{split}_tokens"))
      if len(self.tokens[split]) < self.seq_len + 1:
        raise UserError(f"Token file {path!r} has {len(self.tokens[split]):,} tokens, fewer "
                        f"than seq_len + 1 = {self.seq_len + 1:,}; use a shorter seq_len or "
                        f"more data.")
    recorded = meta.get("max_token_id")
    limit = recorded if recorded is not None else self.vocab_size - 1
    for split, tokens in self.tokens.items():
      found = sampled_max(tokens)
      if found > limit:
        raise UserError(f"Token file {tokens.path!r} holds id {found:,}, beyond the data's "
                        f"{'max_token_id' if recorded is not None else 'vocab_size'} "
                        f"{limit + (recorded is None):,}; its dtype or vocabulary is wrong: "
                        f"prepare it again.")
    self.max_token_id = limit
    start = time.perf_counter()
    self.get_batch("train", 0)
    self.read_seconds = time.perf_counter() - start

  def _check_ids(self, split: str, meta: dict[str, Any], cache_dir: str) -> int:
    """The largest id of a split, which must be below the vocabulary: meta.json's max_token_id
    (recorded by launch.prepare) checked against a sample of the file, which catches a wrong
    dtype; without one (nanoGPT's directories), a scan of the whole file, cached."""
    path, tokens = self.data_dir / BIN_NAMES[split], self.tokens[split]
    recorded = meta.get("max_token_id")
    found = sampled_max(tokens) if recorded is not None else scanned_max(path, tokens, cache_dir)
    limit, what = ((recorded, f"max_token_id {recorded:,} in meta.json") if recorded is not None
                   else (self.vocab_size - 1, f"vocab_size {self.vocab_size:,}"))
    if found > limit:
      dtype = tokens.dtype.name
      raise UserError(f"Token file {str(path)!r} holds id {found:,}, beyond the data's "
                      f"{what}; its dtype ({dtype}) or vocabulary is wrong: prepare it again.")
    return found if recorded is None else recorded

  def offsets(self, split: str, index: int) -> np.ndarray:
    """Start offsets of all global_batch_size windows of batch `index` (every process)."""
    high = len(self.tokens[split]) - self.seq_len  # windows data[i : i + seq_len + 1]
    return self.rng(split_id(split), index).integers(0, high, size=self.global_batch_size)

  def rows(self, split, sid, index, lo, hi):
    data = self.tokens[split]
    window = self.seq_len + 1
    starts = self.offsets(split, index)[lo:hi]
    if isinstance(data, remote.RemoteTokenFile):
      return data.windows(starts, window).astype(np.int32)
    return np.stack([data[i:i + window] for i in starts]).astype(np.int32)

  def split_desc(self) -> str:
    counts = ", ".join(f"{len(t):,} {s} tokens" for s, t in self.tokens.items())
    read = (f" (ranged reads: {1e3 * self.read_seconds:.0f} ms per batch of "
            f"{self.local_batch_size} x {self.seq_len + 1} tokens)"
            if self.read_seconds is not None else "")
    return f"{counts} in {self.data_dir}{read}"


class SyntheticSource(DataSource):
  """Uniform random tokens in [0, vocab_size); row r of batch i is keyed by (seed, split, i, r),
  so each process draws only its own rows."""

  def rows(self, split, sid, index, lo, hi):
    window = self.seq_len + 1
    return np.stack([self.rng(sid, index, row).integers(0, self.vocab_size, window,
                                                              dtype=np.int32)
                     for row in range(lo, hi)])

  def split_desc(self) -> str:
    return "random tokens"


def open_tokens(path: pathlib.Path, dtype: np.dtype, seq_len: int,
                 expected: int | None) -> np.ndarray:
  if not path.is_file():
    raise NotFoundError(f"Token file {str(path)!r} does not exist.")
  size = path.stat().st_size
  if size % dtype.itemsize:
    raise UserError(f"Token file {str(path)!r} has {size} bytes, not a whole number of "
                    f"{dtype.name} tokens.")
  n = size // dtype.itemsize
  if expected is not None and n != expected:
    raise UserError(f"Token file {str(path)!r} holds {n:,} tokens but meta.json says "
                    f"{expected:,}; prepare it again.")
  if n < seq_len + 1:
    raise UserError(f"Token file {str(path)!r} has {n:,} tokens, fewer than seq_len + 1 = "
                    f"{seq_len + 1:,}; use a shorter seq_len or more data.")
  return np.memmap(path, dtype=dtype, mode="r")


def prepared_dir(data_cfg, quiet: bool) -> tuple[pathlib.Path | str, str]:
  """The prepared directory of a bin / text / tfds config (text and tfds: tokenized into the
  cache on first use), and a name for logs."""
  source = data_cfg.source
  if source == "bin":
    if not data_cfg.path:
      raise UserError("data.path must name a directory holding train.bin and val.bin.")
    if "://" in data_cfg.path:
      if data_cfg.get("local_copy"):
        return remote.local_copy(data_cfg.path, data_cfg.local_copy), f"bin {data_cfg.path}"
      return data_cfg.path, "bin"
    return pathlib.Path(os.path.expanduser(data_cfg.path)), "bin"
  if source == "text":
    paths = text_paths(data_cfg.path, data_cfg.cache_dir)
    name = "text " + (data_cfg.path or paths[0])
    return cached_text_dir(paths, data_cfg.tokenizer, data_cfg.val_fraction,
                           cache_dir=data_cfg.cache_dir, quiet=quiet), name
  return cached_tfds_dir(data_cfg.tfds_name, train_split=data_cfg.tfds_train_split,
                         val_split=data_cfg.tfds_val_split, tokenizer_name=data_cfg.tokenizer,
                         text_key=data_cfg.tfds_text_key, data_dir=data_cfg.tfds_data_dir,
                         cache_dir=data_cfg.cache_dir, quiet=quiet), f"tfds {data_cfg.tfds_name}"


def check_stream_source(data_cfg) -> None:
  if data_cfg.source not in STREAM_SOURCES:
    raise UserError(f"Unknown data source {data_cfg.source!r}; choose one of "
                    f"{', '.join(STREAM_SOURCES)}.")


def make_source(data_cfg, *, seq_len: int, global_batch_size: int, seed: int,
                process_index: int | None = None,
                process_count: int | None = None) -> DataSource:
  """The windows of data.source for this process (jax.process_index/count unless given). text
  and tfds sources tokenize into the cache on first use (with a progress line) and reuse it."""
  check_stream_source(data_cfg)
  common = source_layout(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count)
  if data_cfg.source == "synthetic":
    vocab_size = data_cfg.get("vocab_size", GPT2_VOCAB_SIZE)
    if vocab_size <= 0:
      raise UserError(f"data.vocab_size must be positive, got {vocab_size}.")
    return SyntheticSource(name="synthetic", vocab_size=vocab_size, tokenizer=None, **common)
  data_dir, name = prepared_dir(data_cfg, quiet=common["process_index"] != 0)
  return TokenFileSource(data_dir, name=name, cache_dir=data_cfg.cache_dir, **common)


def char_tokenizer_of(texts: list[str], name: str = "char"):
  """The tokenizer `name` (for "char": the table of the characters in `texts`)."""
  check_tokenizer(name)
  charset = "".join(sorted(set().union(*map(set, texts))))
  if not charset:
    raise UserError("The text is empty.")
  return get_tokenizer(name, text=charset)


def stream_tokenizer(data_cfg) -> tuple[int, str, dict[str, Any] | None]:
  """(vocabulary size, where it comes from, the tokenizer's to_dict()) of the stream
  `make_source` reads, found without tokenizing anything (for launch.benchmark and
  launch.aot, which do not read the data): synthetic data's data.vocab_size (no tokenizer);
  GPT-2 BPE's 50,257; an hf:DIR tokenizer's; a prepared directory's meta.json; the character
  table of a text source's files."""
  check_stream_source(data_cfg)
  source = data_cfg.source
  if source == "synthetic":
    return (data_cfg.get("vocab_size", GPT2_VOCAB_SIZE), "data.vocab_size (synthetic tokens)",
            None)
  if source == "bin":
    if not data_cfg.path:
      raise UserError("data.path must name a directory holding train.bin and val.bin.")
    path = data_cfg.path if "://" in data_cfg.path else os.path.expanduser(data_cfg.path)
    if "://" not in path and not os.path.isdir(path):
      raise NotFoundError(f"Data directory {path!r} does not exist (it should hold train.bin "
                          f"and val.bin, e.g. from `python -m launch.prepare`).")
    meta = remote.read_remote_meta(path) if "://" in path else read_meta(path)
    return meta["vocab_size"], f"{path.rstrip('/')}'s meta.json", meta.get("tokenizer")
  named = named_tokenizer(data_cfg.tokenizer)
  if named is not None:
    return named
  if source == "tfds":
    raise UserError("config.model.vocab_size is unset and the character table of a tfds data "
                    "set is only known once it is read; set it (e.g. "
                    "--config.model.vocab_size=256) or prepare the data with launch.prepare "
                    "and use data.source='bin'.")
  paths = text_paths(data_cfg.path, data_cfg.cache_dir)
  what = paths[0] + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else "")
  return char_vocabulary([read_text(p) for p in paths], what)


def named_tokenizer(name: str) -> tuple[int, str, dict[str, Any]] | None:
  """(vocabulary size, where, to_dict()) of a tokenizer known by its name alone (gpt2,
  hf:DIR); None for "char", whose table is the data's."""
  check_tokenizer(name)
  if name == "gpt2":
    return GPT2_VOCAB_SIZE, "GPT-2 BPE", get_tokenizer("gpt2").to_dict()
  if name.startswith(HF_PREFIX):
    tok = get_tokenizer(name)
    return tok.vocab_size, f"the tokenizer.json of {tok.directory}", tok.to_dict()
  return None


def char_vocabulary(texts: list[str], what: str) -> tuple[int, str, dict[str, Any]]:
  tokenizer = char_tokenizer_of(texts)
  return (tokenizer.vocab_size, f"the {tokenizer.vocab_size} characters of {what}",
          tokenizer.to_dict())
