"""Packing variable-length examples into rows of T + 1 tokens, deterministic by (seed, split,
step, process), so a resumed run sees exactly the batches it would have seen.

A packed batch is int32 [B, 3 (T + 1)] = tokens | segment_ids | loss_mask, each plane T + 1
wide (training/lm_inputs.py reads it): the examples of a row are numbered 1, 2, ... in their
segment ids, 0 is padding (masked out of attention and loss); loss_mask[t] = 1 iff token t is a
target the loss scores (predicted by the output at t - 1 of the same example).

Epoch e of a split is a permutation of its examples by (seed, split, e), packed by best fit
decreasing (the longest example first, each into the row whose free space it fills best, a new
row when none has room; ties in the permutation's order), and the rows shuffled by the same key.
The packing depends only on the lengths, so every epoch has the same number of rows R; global
row g of the split's row stream is row g mod R of epoch g // R, and global batch i is rows
[i B, (i + 1) B). With data.packing="none" each example is its own padded row (the comparison
that shows what packing saves).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any

import numpy as np

from model.errors import UserError
from training.data.sources import DataSource, split_id

PACKINGS = ("best_fit", "none")


@dataclasses.dataclass
class Examples:
  """Examples of one split, concatenated: example k is tokens[starts[k] : starts[k] +
  lengths[k]] with its loss mask (1 where the token is a scored target) in loss[...]."""
  tokens: np.ndarray  # int32
  loss: np.ndarray  # int32 0 / 1
  starts: np.ndarray  # int64
  lengths: np.ndarray  # int64

  @classmethod
  def of(cls, items: list[tuple[np.ndarray, np.ndarray]]) -> "Examples":
    lengths = np.array([len(t) for t, _ in items], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    cat = lambda xs: (np.concatenate(xs).astype(np.int32) if xs else np.zeros(0, np.int32))
    return cls(cat([t for t, _ in items]), cat([m for _, m in items]), starts, lengths)

  def __len__(self) -> int:
    return len(self.lengths)

  def get(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    s, n = self.starts[k], self.lengths[k]
    return self.tokens[s:s + n], self.loss[s:s + n]

  def scored(self) -> int:
    return int(self.loss.sum())


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
  """Indices of `lengths` per row: longest first (a stable sort, so ties keep the given
  order), each into the row with the least free space that still holds it."""
  rows: list[list[int]] = []
  by_free: dict[int, list[int]] = {}  # free space -> rows with exactly that much, a stack
  frees: list[int] = []  # the sorted keys of by_free
  for i in np.argsort(-np.asarray(lengths), kind="stable"):
    n = int(lengths[i])
    k = bisect.bisect_left(frees, n)
    if k < len(frees):
      free = frees[k]
      r = by_free[free].pop()
      if not by_free[free]:
        del by_free[free]
        frees.pop(k)
    else:
      r, free = len(rows), capacity
      rows.append([])
    rows[r].append(int(i))
    free -= n
    if free > 0:
      if free not in by_free:
        by_free[free] = []
        bisect.insort(frees, free)
      by_free[free].append(r)
  return rows


def packed_row(examples: Examples, members: list[int], width: int) -> np.ndarray:
  """int32 [3 width]: the tokens | segment ids | loss mask of the examples `members` in order."""
  out = np.zeros((3, width), np.int32)
  at = 0
  for seg, k in enumerate(members, start=1):
    tokens, loss = examples.get(k)
    n = len(tokens)
    out[0, at:at + n], out[1, at:at + n], out[2, at:at + n] = tokens, seg, loss
    at += n
  return out.reshape(-1)


def pack_rows(examples: Examples, order: np.ndarray, width: int,
              packing: str) -> list[list[int]]:
  """The rows (example indices) of the examples taken in `order`."""
  if packing == "none":
    return [[int(k)] for k in order]
  return [[int(order[j]) for j in row]
          for row in best_fit_decreasing(examples.lengths[order], width)]


class PackedSource(DataSource):
  """Batches of packed rows of fixed examples per split (module docstring)."""

  def __init__(self, examples: dict[str, Examples], *, name: str, vocab_size: int,
               tokenizer: dict[str, Any] | None, what: str, packing: str = "best_fit",
               **layout):
    super().__init__(name=name, vocab_size=vocab_size, tokenizer=tokenizer, **layout)
    if packing not in PACKINGS:
      raise UserError(f"config.data.packing must be one of {', '.join(PACKINGS)}; got "
                      f"{packing!r}.")
    width = self.seq_len + 1
    for split, ex in examples.items():
      if not len(ex):
        raise UserError(f"{name}: no {split} examples.")
      if int(ex.lengths.max()) > width:
        raise ValueError(f"an example of {int(ex.lengths.max())} tokens is longer than a row")
    self.examples, self.what, self.packing = examples, what, packing
    self.max_token_id = max(int(ex.tokens.max()) for ex in examples.values())
    self.rows_per_epoch = {split: len(self.epoch(split, 0)) for split in examples}

  @functools.lru_cache(maxsize=4)  # the epochs a batch spans, per split
  def epoch(self, split: str, e: int) -> list[list[int]]:
    """The rows of epoch e of `split`, shuffled (module docstring)."""
    rng = self.rng(split_id(split), e, 3)
    ex = self.examples[split]
    rows = pack_rows(ex, rng.permutation(len(ex)), self.seq_len + 1, self.packing)
    return [rows[i] for i in rng.permutation(len(rows))]

  def rows(self, split, sid, index, lo, hi):
    R, width = self.rows_per_epoch[split], self.seq_len + 1
    out = []
    for g in range(index * self.global_batch_size + lo, index * self.global_batch_size + hi):
      out.append(packed_row(self.examples[split], self.epoch(split, g // R)[g % R], width))
    return np.stack(out)

  def padding_share(self, split: str = "train") -> float:
    """The share of a split's row tokens that are padding."""
    ex = self.examples[split]
    return 1 - float(ex.lengths.sum()) / (self.rows_per_epoch[split] * (self.seq_len + 1))

  def split_desc(self) -> str:
    counts = ", ".join(f"{len(ex):,} {split} examples in {self.rows_per_epoch[split]:,} rows"
                       for split, ex in self.examples.items())
    how = ("packed best fit" if self.packing == "best_fit" else "one per row")
    return (f"{counts} ({self.what}; {how}, {self.padding_share():.0%} of train tokens "
            f"padding)")

  def row_desc(self) -> str:
    return f"3 x {self.seq_len + 1} (tokens | segment ids | loss mask)"


def pack_all(examples: Examples, width: int) -> np.ndarray:
  """Every example exactly once, packed best fit in rows [R, 3 width] (for evaluation)."""
  rows = pack_rows(examples, np.arange(len(examples)), width, "best_fit")
  return np.stack([packed_row(examples, r, width) for r in rows])
