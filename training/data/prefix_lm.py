"""Task prefix_lm (GPT): the autoregressive task, but the first part of each sequence (the
prefix) is immediately available: attention is bidirectional inside the prefix and causal
after it, and the loss covers the continuation only. Batches are packed (packing.py:
tokens | segment_ids | loss_mask); the step derives the prefix from the loss mask (a token is
in the prefix iff it lies before its segment's first scored target).

  data.source = "jsonl"   {"prompt": ..., "completion": ...} lines (data.path; data.val_path or
                          the last val_fraction): prefix = the prompt, continuation = the
                          completion and the end-of-text token (where the tokenizer has one),
                          packed into rows; longer than a row: data.overlong (examples.py)
  any other source        the lm task's windows of T + 1 tokens (lm.py), one example per row:
                          the first round(prefix_fraction x T) tokens are the prefix (at least
                          1, at most T); prefix_fraction = 0 draws the length uniformly from
                          [1, T] per row, by (seed, split, index, row)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.errors import UserError
from model.tokenizer import get_tokenizer
from training.data import examples as ex
from training.data import lm
from training.data.packing import Examples, PackedSource
from training.data.sources import DataSource, source_layout


def add_config(cfg) -> None:
  # prefix_lm on windows: the prefix's share of each window (0: uniform random per row)
  cfg.prefix_fraction = 0.5


def prefix_length(rng: np.random.Generator, fraction: float, T: int) -> int:
  if fraction == 0:
    return int(rng.integers(1, T + 1))
  return min(max(int(round(fraction * T)), 1), T)


class PrefixWindowSource(DataSource):
  """The lm windows as packed rows of one segment, the loss from the prefix's end on."""

  def __init__(self, base: DataSource, fraction: float):
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
        0 <= fraction < 1):
      raise UserError(f"config.data.prefix_fraction must be in [0, 1) (0: a random length "
                      f"per row), got {fraction!r}.")
    super().__init__(name=base.name, vocab_size=base.vocab_size, tokenizer=base.tokenizer,
                     **base.layout())
    self.base, self.fraction = base, fraction
    self.max_token_id = base.max_token_id

  def rows(self, split, sid, index, lo, hi):
    T = self.seq_len
    windows = self.base.rows(split, sid, index, lo, hi)
    out = np.zeros((hi - lo, 3, T + 1), np.int32)
    out[:, 0], out[:, 1] = windows, 1
    for r, row in enumerate(range(lo, hi)):
      out[r, 2, prefix_length(self.rng(sid, index, row, 3), self.fraction, T):] = 1
    return out.reshape(hi - lo, -1)

  def split_desc(self) -> str:
    share = ("a uniform random prefix" if self.fraction == 0
             else f"the first {self.fraction:.0%} of each window the prefix")
    return f"{self.base.split_desc()}; prefix LM, {share}"

  def row_desc(self) -> str:
    return f"3 x {self.seq_len + 1} (tokens | segment ids | loss mask)"


def read_pairs(data_cfg) -> dict[str, list[tuple[str, str, str]]]:
  """(prompt, completion, where) of each line, per split."""
  lines = ex.split_lines(data_cfg.path, data_cfg.get("val_path", ""), data_cfg.val_fraction,
                         "prefix_lm")
  out = {}
  for split, items in lines.items():
    out[split] = []
    for value, where in items:
      if not isinstance(value, dict) or not {"prompt", "completion"} <= set(value):
        raise UserError(f"{where}: a prefix_lm line must be a JSON object with \"prompt\" "
                        f"and \"completion\".")
      for key in ("prompt", "completion"):
        if not isinstance(value[key], str):
          raise UserError(f"{where}: \"{key}\" is a {type(value[key]).__name__}, not a "
                          f"string.")
      if not value["completion"]:
        raise UserError(f"{where}: the completion is empty, so nothing in it is learned.")
      out[split].append((value["prompt"], value["completion"], where))
  return out


def pair_tokenizer(data_cfg, pairs=None):
  named = lm.named_tokenizer(data_cfg.tokenizer)
  if named is not None:
    return get_tokenizer(data_cfg.tokenizer)
  pairs = read_pairs(data_cfg) if pairs is None else pairs
  return lm.char_tokenizer_of([p + c for items in pairs.values() for p, c, _ in items])


def vocabulary(data_cfg) -> tuple[int, str, dict[str, Any] | None]:
  """TASKS' tokenizer entry."""
  if data_cfg.source != "jsonl":
    return lm.stream_tokenizer(data_cfg)
  tok = pair_tokenizer(data_cfg)
  return tok.vocab_size, f"the {tok.name} tokens of {data_cfg.path}", tok.to_dict()


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, loss mask): the prompt's ids (not scored), then the completion's and the
  end-of-text token (scored)."""
  p = tokenizer.encode(prompt) if prompt else []
  c = tokenizer.encode(completion) + ([] if tokenizer.eot_id is None else [tokenizer.eot_id])
  return (np.asarray(p + c, np.int32),
          np.concatenate([np.zeros(len(p), np.int32), np.ones(len(c), np.int32)]))


def make_source(data_cfg, **layout) -> DataSource:
  if data_cfg.source != "jsonl":
    return PrefixWindowSource(lm.make_source(data_cfg, **layout),
                              data_cfg.get("prefix_fraction", 0.5))
  layout = source_layout(**layout)
  pairs = read_pairs(data_cfg)
  tokenizer = pair_tokenizer(data_cfg, pairs)
  width, policy = layout["seq_len"] + 1, ex.check_overlong(data_cfg.get("overlong", "error"))
  splits, notes = {}, []
  for split, items in pairs.items():
    encoded = [(*encode_pair(tokenizer, p, c), where) for p, c, where in items]
    kept, changed = ex.fit_examples(encoded, width, policy)
    splits[split] = Examples.of(kept)
    if changed:
      notes.append(f"{changed:,} {split} examples longer than {width} tokens "
                   f"{'dropped' if policy == 'drop' else 'truncated'}")
  return PackedSource(splits, name=f"prefix_lm {data_cfg.path}",
                      vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.to_dict(),
                      what="; ".join(["prompt -> completion", *notes]),
                      packing=data_cfg.get("packing", "best_fit"), **layout)
