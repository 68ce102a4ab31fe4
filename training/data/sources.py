"""Data sources: fixed-length token windows, a pure function of (seed, split, index).

    source = make_source(config.data, seq_len=1024, global_batch_size=512, seed=0)
    tokens = source.get_batch("train", step)   # int32 [local_batch, seq_len + 1]
    for tokens in prefetch(source, "train", start_step):   # the same batches, from a thread
      ...

Batch `index` of a split is a global batch: its window offsets come from a counter-based RNG
keyed by (seed, split, index), like nanoGPT's `get_batch` (a window is data[i : i + T + 1] at
a uniformly random i); each process returns (and reads from disk) only its own contiguous rows
[process_index * local, (process_index + 1) * local). So a resumed run, or the same run on any
number of hosts, sees exactly the same global batches. "val" batches 0..n-1 are a fixed eval set.

Sources: "bin" (a prepared directory's train.bin/val.bin via np.memmap; training/data/bin.py),
"text" (local files, tokenized once into a cached prepared directory; training/data/text.py),
"tfds" (tfds.data_source documents joined with <|endoftext|>, tokenized once into the cache;
training/data/tfds.py; for big datasets run `python -m launch.prepare` once and use "bin"),
"synthetic" (uniform random tokens, no disk).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import queue
import threading
import time
from typing import Any, Iterator

import ml_collections
import numpy as np

from model.errors import NotFoundError, UserError
from training.data import remote
from training.data.bin import BIN_NAMES, read_meta, sampled_max, scanned_max
from training.data.text import cached_text_dir, resolve_text_paths, tiny_shakespeare_path
from training.data.tfds import cached_tfds_dir

SOURCES = ("text", "bin", "tfds", "synthetic")
SPLIT_IDS = {"train": 0, "val": 1}


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` part of an experiment config (see the module docstring for the sources)."""
  cfg = ml_collections.ConfigDict()
  cfg.source = "text"  # text files | bin (prepared token files) | tfds | synthetic (random)
  # text: a file, comma-separated files or a glob; "" = tiny shakespeare (the package's copy, or
  # $FLAXGPT_DATA_DIR's). bin: a directory with train.bin, val.bin, meta.json.
  cfg.path = ""
  # char | gpt2 | hf:DIR (a Hugging Face checkpoint's tokenizer.json, e.g. the Llama a run
  # fine-tunes); text and tfds sources (bin reads it from meta.json)
  cfg.tokenizer = "char"
  cfg.tfds_name = "tiny_shakespeare"  # tfds: the TFDS data set
  cfg.tfds_train_split = "train"  # tfds: the split training reads
  cfg.tfds_val_split = "validation"  # tfds: the split evaluation reads
  cfg.tfds_text_key = "text"  # tfds: the feature holding each document's text
  cfg.tfds_data_dir = ""  # tfds: where TFDS keeps its data ("": its default)
  cfg.val_fraction = 0.1  # text: the last 10% of the characters is the val split
  cfg.cache_dir = ""  # "" = $FLAXGPT_CACHE_DIR or ~/.cache/flaxgpt
  cfg.prefetch = 2  # batches a background thread keeps ready (0 = none)
  # bin on gs://: "" reads windows by ranged requests; a folder: the files are copied there once
  # and memory-mapped.
  cfg.local_copy = ""
  cfg.vocab_size = 50257  # synthetic only
  # What the batches teach (training/data/tasks.py): lm | mlm | reverse | denoise | tsv;
  # "": the model family's default (gpt: lm, bert: mlm).
  cfg.task = ""
  cfg.mlm_probability = 0.15  # mlm: tokens chosen (80% mask, 10% random, 10% kept)
  cfg.denoise_ratio = 0.3  # denoise: share of tokens in masked spans
  cfg.denoise_span = 3.0  # denoise: mean span length (Poisson)
  cfg.val_path = ""  # tsv: the val pairs ("": the last val_fraction of data.path's)
  return cfg


class DataSource:
  """Fixed-length windows for one process. Subclasses implement `_rows` and `_split_desc`."""

  def __init__(self, *, name: str, vocab_size: int, tokenizer: dict[str, Any] | None,
               seq_len: int, global_batch_size: int, seed: int, process_index: int,
               process_count: int):
    self.name = name
    self.vocab_size = int(vocab_size)
    self.max_token_id = self.vocab_size - 1  # the largest id in the data (< vocab_size)
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count

  def get_batch(self, split: str, index: int) -> np.ndarray:
    """int32 [local_batch_size, seq_len + 1]: this process's rows of global batch `index`."""
    split_id = _split_id(split)
    if index < 0:
      raise UserError(f"Batch index must be >= 0, got {index}.")
    lo = self.process_index * self.local_batch_size
    return self._rows(split, split_id, int(index), lo, lo + self.local_batch_size)

  def _rng(self, split_id: int, index: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, split_id, index, *extra])

  def _rows(self, split: str, split_id: int, index: int, lo: int, hi: int) -> np.ndarray:
    raise NotImplementedError

  def _split_desc(self) -> str:
    raise NotImplementedError

  def describe(self) -> str:
    tok = (self.tokenizer or {}).get("name", "none")
    procs = (f" ({self.local_batch_size} on each of {self.process_count} processes)"
             if self.process_count > 1 else "")
    return (f"data: {self.name}, {self._split_desc()}, vocab {self.vocab_size:,} ({tok}), "
            f"batch {self.global_batch_size} x {self.seq_len + 1} tokens{procs}")


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
    self.tokens = {split: _open_tokens(data_dir / BIN_NAMES[split], dtype, self.seq_len,
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
    return self._rng(_split_id(split), index).integers(0, high, size=self.global_batch_size)

  def _rows(self, split, split_id, index, lo, hi):
    data = self.tokens[split]
    window = self.seq_len + 1
    starts = self.offsets(split, index)[lo:hi]
    if isinstance(data, remote.RemoteTokenFile):
      return data.windows(starts, window).astype(np.int32)
    return np.stack([data[i:i + window] for i in starts]).astype(np.int32)

  def _split_desc(self) -> str:
    counts = ", ".join(f"{len(t):,} {s} tokens" for s, t in self.tokens.items())
    read = (f" (ranged reads: {1e3 * self.read_seconds:.0f} ms per batch of "
            f"{self.local_batch_size} x {self.seq_len + 1} tokens)"
            if self.read_seconds is not None else "")
    return f"{counts} in {self.data_dir}{read}"


class SyntheticSource(DataSource):
  """Uniform random tokens in [0, vocab_size); row r of batch i is keyed by (seed, split, i, r),
  so each process draws only its own rows."""

  def _rows(self, split, split_id, index, lo, hi):
    window = self.seq_len + 1
    return np.stack([self._rng(split_id, index, row).integers(0, self.vocab_size, window,
                                                              dtype=np.int32)
                     for row in range(lo, hi)])

  def _split_desc(self) -> str:
    return "random tokens"


def _split_id(split: str) -> int:
  try:
    return SPLIT_IDS[split]
  except KeyError:
    raise UserError(f"Unknown split {split!r}; use 'train' or 'val'.") from None


def _open_tokens(path: pathlib.Path, dtype: np.dtype, seq_len: int,
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


def _process_layout(global_batch_size: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is outside [0, {process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(f"Global batch size {global_batch_size} must be a positive multiple of "
                    f"the process count {process_count}.")
  return process_index, process_count


def _data_dir(data_cfg, quiet: bool) -> tuple[pathlib.Path, str]:
  """The prepared directory for a bin/text/tfds config, and a name for logs."""
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
    paths = (resolve_text_paths(data_cfg.path) if data_cfg.path
             else [tiny_shakespeare_path(data_cfg.cache_dir)])
    name = "text " + (data_cfg.path or paths[0])
    return cached_text_dir(paths, data_cfg.tokenizer, data_cfg.val_fraction,
                           cache_dir=data_cfg.cache_dir, quiet=quiet), name
  return cached_tfds_dir(data_cfg.tfds_name, train_split=data_cfg.tfds_train_split,
                         val_split=data_cfg.tfds_val_split, tokenizer_name=data_cfg.tokenizer,
                         text_key=data_cfg.tfds_text_key, data_dir=data_cfg.tfds_data_dir,
                         cache_dir=data_cfg.cache_dir, quiet=quiet), f"tfds {data_cfg.tfds_name}"


def make_source(data_cfg: ml_collections.ConfigDict, *, seq_len: int, global_batch_size: int,
                seed: int, process_index: int | None = None,
                process_count: int | None = None) -> DataSource:
  """The configured source for this process (jax.process_index/count unless given). text and
  tfds sources tokenize into the cache on first use (with a progress line) and reuse it."""
  if data_cfg.source not in SOURCES:
    raise UserError(f"Unknown data source {data_cfg.source!r}; choose one of "
                    f"{', '.join(SOURCES)}.")
  if seq_len <= 0:
    raise UserError(f"seq_len must be positive, got {seq_len}.")
  if seed < 0:
    raise UserError(f"The data seed must be >= 0, got {seed}.")
  process_index, process_count = _process_layout(global_batch_size, process_index,
                                                 process_count)
  common = dict(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                process_index=process_index, process_count=process_count)
  if data_cfg.source == "synthetic":
    vocab_size = data_cfg.get("vocab_size", 50257)
    if vocab_size <= 0:
      raise UserError(f"data.vocab_size must be positive, got {vocab_size}.")
    return SyntheticSource(name="synthetic", vocab_size=vocab_size, tokenizer=None, **common)
  data_dir, name = _data_dir(data_cfg, quiet=process_index != 0)
  return TokenFileSource(data_dir, name=name, cache_dir=data_cfg.cache_dir, **common)


_END = object()


def prefetch(source: DataSource, split: str, start_index: int, count: int | None = None,
             depth: int = 2) -> Iterator[np.ndarray]:
  """Yields source.get_batch(split, start_index), (start_index + 1), ... (`count` of them, or
  forever), computed by a background thread that keeps up to `depth` batches ready. Errors in
  the thread are raised here; closing the generator stops the thread."""
  indices = (itertools.count(start_index) if count is None
             else range(start_index, start_index + count))
  if depth <= 0:
    for i in indices:
      yield source.get_batch(split, i)
    return
  ready: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work() -> None:
    try:
      for i in indices:
        if not put((source.get_batch(split, i), None)):
          return
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      put((None, e))
      return
    put(_END)

  thread = threading.Thread(target=work, name=f"flaxgpt-prefetch-{split}", daemon=True)
  thread.start()
  try:
    while (item := ready.get()) is not _END:
      batch, error = item
      if error is not None:
        raise error
      yield batch
  finally:
    stop.set()
