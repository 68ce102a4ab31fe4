"""Task mlm (BERT): windows of T tokens of the lm task's stream (lm.py), 15% of them chosen (80%
-> the mask token, 10% -> a random token, 10% kept), deterministic by (seed, split, index, row).

A batch is [B, 2T] = inputs | targets, the target IGNORE (-1) where not chosen (no loss there).
The four special ids come after the data's vocabulary (sources.py: special_ids).
"""

from __future__ import annotations

import numpy as np

from model.errors import UserError
from training.data import lm
from training.data.sources import IGNORE, NUM_SPECIALS, DataSource, special_ids


def add_config(cfg) -> None:
  cfg.mlm_probability = 0.15  # mlm: tokens chosen (80% mask, 10% random, 10% kept)


def mask_tokens(rng: np.random.Generator, tokens_T: np.ndarray, *, base_vocab: int,
                mask_id: int, probability: float) -> tuple[np.ndarray, np.ndarray]:
  """BERT's masking of one row: (inputs, targets); targets IGNORE where not chosen."""
  T = tokens_T.shape[0]
  chosen = rng.random(T) < probability
  action = rng.random(T)
  random_ids = rng.integers(0, base_vocab, T)
  inputs = np.where(chosen & (action < 0.8), mask_id, tokens_T)
  inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
  targets = np.where(chosen, tokens_T, IGNORE)
  return inputs.astype(np.int32), targets.astype(np.int32)


class MLMSource(DataSource):
  """Windows of T tokens of a token source, masked per row by (seed, split, index, row)."""

  def __init__(self, base: DataSource, probability: float):
    if not 0 < probability < 1:
      raise UserError(f"config.data.mlm_probability must be in (0, 1), got {probability!r}.")
    super().__init__(name=base.name, vocab_size=base.vocab_size + NUM_SPECIALS,
                     tokenizer=base.tokenizer, **base.layout())
    self.base, self.probability = base, probability
    self.specials = special_ids(base.vocab_size)
    self.max_token_id = self.vocab_size - 1

  def rows(self, split, sid, index, lo, hi):
    windows = self.base.rows(split, sid, index, lo, hi)[:, :self.seq_len]
    out = np.empty((hi - lo, 2 * self.seq_len), np.int32)
    for r, row in enumerate(range(lo, hi)):
      inputs, targets = mask_tokens(self.rng(sid, index, row, 1), windows[r],
                                    base_vocab=self.base.vocab_size,
                                    mask_id=self.specials["mask_id"],
                                    probability=self.probability)
      out[r, :self.seq_len], out[r, self.seq_len:] = inputs, targets
    return out

  def split_desc(self) -> str:
    return (f"{self.base.split_desc()}; masked LM, {self.probability:.0%} of tokens chosen "
            f"(80% mask, 10% random, 10% kept)")

  def row_desc(self) -> str:
    return f"{self.seq_len} tokens"


def make_source(data_cfg, **layout) -> DataSource:
  return MLMSource(lm.make_source(data_cfg, **layout), data_cfg.get("mlm_probability", 0.15))
