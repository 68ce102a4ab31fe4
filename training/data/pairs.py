"""Tasks reverse, denoise and tsv (the encdec family): sequence-to-sequence pairs,
deterministic by (seed, split, batch index).

    "reverse"  each non-empty line of the text -> the same line reversed (character by
               character; exactly checkable)
    "denoise"  BART text infilling of windows of T - 1 tokens of the lm stream (lm.py): spans
               (lengths ~ Poisson(denoise_span)) covering denoise_ratio of the tokens become one
               mask token each; the target is the window
    "tsv"      a file of `source<TAB>target` lines (data.path; data.val_path or the last
               val_fraction of the pairs for val)
A seq2seq batch is [B, S + T + 1] = source (S = block_size tokens, padded) | target (bos, the
target's tokens, eos, padded; T + 1), so the loop, the sharding and checkpoints handle it as any
token batch (training/step.py splits it). The special ids come after the data's vocabulary
(sources.py: special_ids).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.errors import NotFoundError, UserError
from training.data import lm
from training.data.lm import char_tokenizer_of
from training.data.sources import (NUM_SPECIALS, DataSource, source_layout, special_ids,
                                   split_id)
from training.data.text import read_text, text_paths


def add_config(cfg) -> None:
  cfg.denoise_ratio = 0.3  # denoise: share of tokens in masked spans
  cfg.denoise_span = 3.0  # denoise: mean span length (Poisson)
  cfg.val_path = ""  # tsv, chat, prefix_lm examples: the val file ("": the last val_fraction)


def pack_pair(src: np.ndarray | list[int], tgt: np.ndarray | list[int], S: int, T: int,
              specials: dict[str, int]) -> np.ndarray:
  """One row [S + T + 1]: src padded to S | bos, tgt, eos padded to T + 1."""
  pad = specials["pad_id"]
  row = np.full(S + T + 1, pad, np.int32)
  row[:len(src)] = src
  target = [specials["bos_id"], *tgt, specials["eos_id"]]
  row[S:S + len(target)] = target
  return row


def infill(rng: np.random.Generator, tokens: np.ndarray, *, mask_id: int, ratio: float,
           span: float) -> np.ndarray:
  """BART's text infilling: spans with Poisson(span) lengths, together about `ratio` of the
  tokens, each replaced by one mask token (a length-0 span inserts a mask)."""
  n = len(tokens)
  masked = np.zeros(n, bool)
  inserts = np.zeros(n + 1, bool)
  goal = int(round(ratio * n))
  while masked.sum() < goal:
    length = int(rng.poisson(span))
    start = int(rng.integers(0, n))
    if length == 0:
      inserts[start] = True
      goal -= 1  # an insertion counts as one noised position
      continue
    masked[start:start + length] = True
  out = []
  for i in range(n):
    if inserts[i]:
      out.append(mask_id)
    if masked[i]:
      if i == 0 or not masked[i - 1]:  # a run of masked tokens becomes one mask
        out.append(mask_id)
    else:
      out.append(int(tokens[i]))
  return np.asarray(out, np.int32)


class PairSource(DataSource):
  """Fixed (source, target) pairs per split; batch `index` draws global_batch_size of them
  uniformly by (seed, split, index)."""

  def __init__(self, pairs: dict[str, list[tuple[list[int], list[int]]]], *, name: str,
               base_vocab: int, tokenizer: dict[str, Any] | None, what: str, **kwargs):
    super().__init__(name=name, vocab_size=base_vocab + NUM_SPECIALS, tokenizer=tokenizer,
                     **kwargs)
    for split in ("train", "val"):
      if not pairs[split]:
        raise UserError(f"{name}: no {split} pairs that fit the model's {self.seq_len} "
                        f"positions.")
    self.pairs, self.what = pairs, what
    self.specials = special_ids(base_vocab)
    self.max_token_id = self.vocab_size - 1

  def pair_indices(self, split: str, index: int) -> np.ndarray:
    return self.rng(split_id(split), index).integers(0, len(self.pairs[split]),
                                                       size=self.global_batch_size)

  def rows(self, split, sid, index, lo, hi):
    T = self.seq_len
    picks = self.pair_indices(split, index)[lo:hi]
    return np.stack([pack_pair(*self.pairs[split][i], T, T, self.specials) for i in picks])

  def eval_pairs(self, count: int) -> list[tuple[list[int], list[int]]]:
    """A fixed sample of `count` val pairs (all of them for count <= 0 or more than there
    are), the same for every step and every resume: the exact-match set."""
    val = self.pairs["val"]
    if count <= 0 or count >= len(val):
      return list(val)
    picks = np.random.default_rng([self.seed, 1, 7]).choice(len(val), count, replace=False)
    return [val[i] for i in sorted(picks)]

  def split_desc(self) -> str:
    return (f"{len(self.pairs['train']):,} train / {len(self.pairs['val']):,} val pairs "
            f"({self.what})")

  def row_desc(self) -> str:
    return f"({self.seq_len} source + {self.seq_len + 1} target) tokens"


class DenoiseSource(PairSource):
  """Windows of T - 1 tokens of a token source as targets, their infilled copies as sources,
  both drawn per row by (seed, split, index, row)."""

  def __init__(self, base: DataSource, ratio: float, span: float):
    if not 0 < ratio < 1:
      raise UserError(f"config.data.denoise_ratio must be in (0, 1), got {ratio!r}.")
    if not span > 0:
      raise UserError(f"config.data.denoise_span must be positive, got {span!r}.")
    DataSource.__init__(self, name=base.name, vocab_size=base.vocab_size + NUM_SPECIALS,
                        tokenizer=base.tokenizer, **base.layout())
    self.base, self.ratio, self.span = base, ratio, span
    self.specials = special_ids(base.vocab_size)
    self.max_token_id = self.vocab_size - 1
    self.what = f"text infilling of {ratio:.0%} in Poisson({span:g}) spans"

  def rows(self, split, sid, index, lo, hi):
    T = self.seq_len
    windows = self.base.rows(split, sid, index, lo, hi)[:, :T - 1]
    rows = []
    for r, row in enumerate(range(lo, hi)):
      src = infill(self.rng(sid, index, row, 2), windows[r],
                   mask_id=self.specials["mask_id"], ratio=self.ratio, span=self.span)
      rows.append(pack_pair(src[:T], windows[r], T, T, self.specials))
    return np.stack(rows)

  def eval_pairs(self, count: int) -> list[tuple[list[int], list[int]]]:
    rows = self.get_batch("val", 0)[:max(count, 1)]
    T = self.seq_len
    out = []
    for row in rows:
      src = [int(t) for t in row[:T] if t != self.specials["pad_id"]]
      tgt = [int(t) for t in row[T + 1:] if t not in (self.specials["pad_id"],
                                                      self.specials["eos_id"])]
      out.append((src, tgt))
    return out

  def split_desc(self) -> str:
    return f"{self.base.split_desc()}; {self.what}"


def reverse_pairs(data_cfg, seq_len: int):
  """Every non-empty line -> (line, line reversed), split by characters as the text source
  splits (the first 1 - val_fraction of the text is train); lines whose source or target does
  not fit (source <= T tokens, target <= T - 1) are left out and counted."""
  paths = text_paths(data_cfg.path, data_cfg.cache_dir)
  texts = [read_text(p) for p in paths]
  tokenizer = char_tokenizer_of(texts, data_cfg.tokenizer)
  text = "\n".join(texts)
  cut = int(len(text) * (1 - data_cfg.val_fraction))
  pairs, skipped = {"train": [], "val": []}, 0
  for split, part in (("train", text[:cut]), ("val", text[cut:])):
    lines = [line for line in part.split("\n") if line.strip()]
    srcs = tokenizer.encode_batch(lines)
    tgts = tokenizer.encode_batch([line[::-1] for line in lines])
    for src, tgt in zip(srcs, tgts):
      if len(src) > seq_len or len(tgt) > seq_len - 1:
        skipped += 1
        continue
      pairs[split].append((src, tgt))
  what = "reverse each line" + (f"; {skipped:,} lines longer than the model's positions left "
                                f"out" if skipped else "")
  return pairs, tokenizer, f"reverse {paths[0]}", what


def read_tsv(path: str) -> list[tuple[str, str, int]]:
  """(source, target, line number) of a TSV file; a line without exactly one tab is a
  UserError naming the line. Blank lines are skipped."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise NotFoundError(f"TSV file {path!r} does not exist.")
  out = []
  for n, line in enumerate(read_text(path).split("\n"), start=1):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    if line.count("\t") != 1:
      found = "no tab" if "\t" not in line else f"{line.count(chr(9))} tabs"
      raise UserError(f"{path}:{n}: a line must be source<TAB>target, found {found} in "
                      f"{line[:60]!r}.")
    src, tgt = line.split("\t")
    out.append((src, tgt, n))
  if not out:
    raise UserError(f"TSV file {path!r} holds no source<TAB>target lines.")
  return out


def tsv_pairs(data_cfg, seq_len: int):
  """Pairs of data.path (and data.val_path, else its last val_fraction); a pair that does not
  fit the model (source <= T tokens, target <= T - 1) is a UserError naming its line."""
  if not data_cfg.path:
    raise UserError("config.data.path must name a TSV file of source<TAB>target lines for "
                    "data.task='tsv'.")
  rows = {"train": read_tsv(data_cfg.path)}
  val_path = data_cfg.get("val_path", "")
  if val_path:
    rows["val"] = read_tsv(val_path)
  else:
    cut = int(round(len(rows["train"]) * (1 - data_cfg.val_fraction)))
    if cut == 0 or cut == len(rows["train"]):
      raise UserError(f"{data_cfg.path} has {len(rows['train'])} pairs, too few to split off "
                      f"a val_fraction of {data_cfg.val_fraction}; give data.val_path.")
    rows["train"], rows["val"] = rows["train"][:cut], rows["train"][cut:]
  texts = [s + t for split in rows.values() for s, t, _ in split]
  tokenizer = char_tokenizer_of(texts, data_cfg.tokenizer)
  pairs = {}
  for split, items in rows.items():
    path = data_cfg.path if split == "train" or not val_path else val_path
    srcs = tokenizer.encode_batch([s for s, _, _ in items])
    tgts = tokenizer.encode_batch([t for _, t, _ in items])
    for (_, _, n), src, tgt in zip(items, srcs, tgts):
      if len(src) > seq_len:
        raise UserError(f"{path}:{n}: the source has {len(src)} tokens, more than the "
                        f"model's {seq_len} positions (model.block_size).")
      if len(tgt) > seq_len - 1:
        raise UserError(f"{path}:{n}: the target has {len(tgt)} tokens, more than the "
                        f"{seq_len - 1} that fit with its start and end tokens "
                        f"(model.block_size {seq_len}).")
    pairs[split] = list(zip(srcs, tgts))
  return pairs, tokenizer, f"tsv {data_cfg.path}", "source<TAB>target pairs"


def make_denoise_source(data_cfg, **layout) -> DataSource:
  return DenoiseSource(lm.make_source(data_cfg, **layout), data_cfg.get("denoise_ratio", 0.3),
                       data_cfg.get("denoise_span", 3.0))


def _pair_source(data_cfg, make_pairs, layout) -> DataSource:
  layout = source_layout(**layout)
  pairs, tokenizer, name, what = make_pairs(data_cfg, layout["seq_len"])
  return PairSource(pairs, name=name, base_vocab=tokenizer.vocab_size,
                    tokenizer=tokenizer.to_dict(), what=what, **layout)


def make_reverse_source(data_cfg, **layout) -> DataSource:
  if data_cfg.source != "text":
    raise UserError(f"data.task='reverse' reads lines of text files (data.source='text'), "
                    f"not data.source={data_cfg.source!r}.")
  return _pair_source(data_cfg, reverse_pairs, layout)


def make_tsv_source(data_cfg, **layout) -> DataSource:
  return _pair_source(data_cfg, tsv_pairs, layout)


def tsv_tokenizer(data_cfg) -> tuple[int, str, dict[str, Any] | None]:
  """lm.stream_tokenizer for a TSV task: a named tokenizer, or the characters of its pairs."""
  named = lm.named_tokenizer(data_cfg.tokenizer)
  if named is not None:
    return named
  texts = [s + t for s, t, _ in read_tsv(data_cfg.path)] if data_cfg.path else []
  if data_cfg.get("val_path", ""):
    texts += [s + t for s, t, _ in read_tsv(data_cfg.val_path)]
  return lm.char_vocabulary(texts, data_cfg.path)
