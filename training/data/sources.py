"""What every data source shares: the DataSource base (batches as a pure function of (seed,
split, index), each process reading only its own rows), the split ids, the process layout,
the special tokens of the bert / encdec tasks, and prefetch.

    source = make_task_source(config.data, "lm", seq_len=1024, global_batch_size=512, seed=0)
    tokens = source.get_batch("train", step)   # this process's rows of global batch `step`
    for tokens in prefetch(source, "train", start_step):   # the same batches, from a thread
      ...

Batch `index` of a split is a global batch, drawn by a counter-based RNG keyed by (seed, split,
index); each process returns (and reads from disk) only its own contiguous rows
[process_index * local, (process_index + 1) * local). So a resumed run, or the same run on any
number of hosts, sees exactly the same global batches. "val" batches 0..n-1 are a fixed eval set.
The sources themselves are the tasks' (training/data/tasks.py has the table).
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, Iterator

import numpy as np

from model.errors import UserError

SPLIT_IDS = {"train": 0, "val": 1}
# bert and encdec runs add four ids after the data's vocabulary V (`special_ids`).
NUM_SPECIALS = 4
IGNORE = -1  # an MLM target that is not scored


def special_ids(base_vocab: int) -> dict[str, int]:
  """The special tokens appended after a vocabulary of base_vocab ids: pad = V, bos = V + 1,
  eos = V + 2, mask = V + 3 (the model's pad_id / bos_id / eos_id / mask_id)."""
  return {"pad_id": base_vocab, "bos_id": base_vocab + 1, "eos_id": base_vocab + 2,
          "mask_id": base_vocab + 3}


def split_id(split: str) -> int:
  try:
    return SPLIT_IDS[split]
  except KeyError:
    raise UserError(f"Unknown split {split!r}; use 'train' or 'val'.") from None


def process_layout(global_batch_size: int, process_index: int | None,
                   process_count: int | None) -> tuple[int, int]:
  """(process_index, process_count), jax's unless given, checked against the batch."""
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


def source_layout(*, seq_len: int, global_batch_size: int, seed: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> dict[str, int]:
  """The keyword arguments every DataSource takes, checked (process_layout fills the
  process's place)."""
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
    raise UserError(f"seq_len must be positive, got {seq_len}.")
  if seed < 0:
    raise UserError(f"The data seed must be >= 0, got {seed}.")
  process_index, process_count = process_layout(global_batch_size, process_index,
                                                process_count)
  return dict(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
              process_index=process_index, process_count=process_count)


class DataSource:
  """Fixed-shape batches for one process. Subclasses implement `rows` and `split_desc`."""

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

  def layout(self) -> dict[str, int]:
    """The keyword arguments a source built on this one passes on."""
    return dict(seq_len=self.seq_len, global_batch_size=self.global_batch_size,
                seed=self.seed, process_index=self.process_index,
                process_count=self.process_count)

  def get_batch(self, split: str, index: int) -> np.ndarray:
    """int32 [local_batch_size, width]: this process's rows of global batch `index`."""
    sid = split_id(split)
    if index < 0:
      raise UserError(f"Batch index must be >= 0, got {index}.")
    lo = self.process_index * self.local_batch_size
    return self.rows(split, sid, int(index), lo, lo + self.local_batch_size)

  def rng(self, sid: int, index: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, sid, index, *extra])

  def rows(self, split: str, sid: int, index: int, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of global batch `index` of `split` (split id `sid`)."""
    raise NotImplementedError

  def split_desc(self) -> str:
    raise NotImplementedError

  def row_desc(self) -> str:
    """What one row holds, for describe()."""
    return f"{self.seq_len + 1} tokens"

  def describe(self) -> str:
    tok = (self.tokenizer or {}).get("name", "none")
    procs = (f" ({self.local_batch_size} on each of {self.process_count} processes)"
             if self.process_count > 1 else "")
    return (f"data: {self.name}, {self.split_desc()}, vocab {self.vocab_size:,} ({tok}), "
            f"batch {self.global_batch_size} x {self.row_desc()}{procs}")


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
