"""Training tasks beyond next-token prediction: masked LM (the bert family) and
sequence-to-sequence pairs (the encdec family), deterministic by (seed, split, batch index).

    data.task = "lm"       GPT: windows of T + 1 tokens (training/data/sources.py)
                "mlm"      BERT: windows of T tokens, 15% of them chosen (80% -> mask, 10% -> a
                           random token, 10% kept); batch [B, 2T] = inputs | targets, the
                           target -1 where not chosen (no loss there)
                "reverse"  encdec: each non-empty line of the text -> the same line reversed
                           (character by character; exactly checkable)
                "denoise"  encdec: BART text infilling of windows of T - 1 tokens: spans
                           (lengths ~ Poisson(denoise_span)) covering denoise_ratio of the
                           tokens become one mask token each; the target is the window
                "tsv"      encdec: a file of `source<TAB>target` lines (data.path; data.val_path
                           or the last val_fraction of the pairs for val)
                ""         the family's default: lm (gpt), mlm (bert); encdec must choose
A seq2seq batch is [B, S + T + 1] = source (S = block_size tokens, padded) | target (bos,
the target's tokens, eos, padded; T + 1), so the loop, the sharding and checkpoints handle it
as any token batch (training/step.py splits it).

Special tokens. bert and encdec runs add four ids after the data's vocabulary V:
pad = V, bos = V + 1, eos = V + 2, mask = V + 3 (`special_ids`); the model's vocab_size is
V + 4 and its pad_id / bos_id / eos_id / mask_id say which is which (launch.sample reads
them), while the saved tokenizer is the data's own.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.errors import NotFoundError, UserError
from model.tokenizer import GPT2_VOCAB_SIZE, HF_PREFIX, get_tokenizer
from training.data import remote
from training.data.bin import check_tokenizer, read_meta
from training.data.sources import DataSource, make_source
from training.data.text import _read_text, resolve_text_paths, tiny_shakespeare_path

TASKS = ("lm", "mlm", "reverse", "denoise", "tsv")
SEQ2SEQ_TASKS = ("reverse", "denoise", "tsv")
FAMILY_TASKS = {"gpt": ("lm",), "bert": ("mlm",), "encdec": SEQ2SEQ_TASKS}
NUM_SPECIALS = 4
IGNORE = -1  # an MLM target that is not scored


def special_ids(base_vocab: int) -> dict[str, int]:
  """The special tokens appended after a vocabulary of base_vocab ids."""
  return {"pad_id": base_vocab, "bos_id": base_vocab + 1, "eos_id": base_vocab + 2,
          "mask_id": base_vocab + 3}


def resolve_task(family: str, data_cfg) -> str:
  """data.task checked against the model family ("" -> the family's default)."""
  task = data_cfg.get("task", "") or ""
  if not task:
    if family == "encdec":
      raise UserError("config.data.task must be set for model.family='encdec': one of "
                      f"{', '.join(SEQ2SEQ_TASKS)}.")
    task = FAMILY_TASKS[family][0]
  if task not in TASKS:
    raise UserError(f"config.data.task must be one of {', '.join(TASKS)}; got {task!r}.")
  if task not in FAMILY_TASKS[family]:
    raise UserError(f"config.data.task={task!r} does not train model.family={family!r}; "
                    f"use {' or '.join(FAMILY_TASKS[family])}.")
  return task


# Tasks of examples packed into rows (training/lm_inputs.py's packed layout).
PACKED_TASKS = ("prefix_lm", "chat")


def batch_layout(task: str) -> str:
  """How a step reads a batch of `task`: tokens (lm), mlm, seq2seq, or packed (three planes
  tokens | segment_ids | loss_mask; training/lm_inputs.py)."""
  if task == "mlm":
    return "mlm"
  if task in SEQ2SEQ_TASKS:
    return "seq2seq"
  return "packed" if task in PACKED_TASKS else "tokens"


def batch_width(task: str, block_size: int) -> int:
  """Tokens per row of one batch: T + 1 (lm), 2T (mlm), S + T + 1 (seq2seq; S = T),
  3 (T + 1) (packed)."""
  if task in PACKED_TASKS:
    return 3 * (block_size + 1)
  if task == "lm":
    return block_size + 1
  if task == "mlm":
    return 2 * block_size
  return 2 * block_size + 1


# ---------------------------------------------------------------------------------------------
# Masked LM


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
                     tokenizer=base.tokenizer, seq_len=base.seq_len,
                     global_batch_size=base.global_batch_size, seed=base.seed,
                     process_index=base.process_index, process_count=base.process_count)
    self.base, self.probability = base, probability
    self.specials = special_ids(base.vocab_size)
    self.max_token_id = self.vocab_size - 1

  def _rows(self, split, split_id, index, lo, hi):
    windows = self.base._rows(split, split_id, index, lo, hi)[:, :self.seq_len]  # pylint: disable=protected-access
    out = np.empty((hi - lo, 2 * self.seq_len), np.int32)
    for r, row in enumerate(range(lo, hi)):
      inputs, targets = mask_tokens(self._rng(split_id, index, row, 1), windows[r],
                                    base_vocab=self.base.vocab_size,
                                    mask_id=self.specials["mask_id"],
                                    probability=self.probability)
      out[r, :self.seq_len], out[r, self.seq_len:] = inputs, targets
    return out

  def _split_desc(self) -> str:
    return (f"{self.base._split_desc()}; masked LM, {self.probability:.0%} of tokens chosen "  # pylint: disable=protected-access
            f"(80% mask, 10% random, 10% kept)")

  def describe(self) -> str:
    return super().describe().replace(f"x {self.seq_len + 1} tokens",
                                      f"x {self.seq_len} tokens")


# ---------------------------------------------------------------------------------------------
# Sequence-to-sequence pairs


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
    from training.data.sources import _split_id  # pylint: disable=import-outside-toplevel
    return self._rng(_split_id(split), index).integers(0, len(self.pairs[split]),
                                                       size=self.global_batch_size)

  def _rows(self, split, split_id, index, lo, hi):
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

  def _split_desc(self) -> str:
    return (f"{len(self.pairs['train']):,} train / {len(self.pairs['val']):,} val pairs "
            f"({self.what})")

  def describe(self) -> str:
    return super().describe().replace(f"x {self.seq_len + 1} tokens",
                                      f"x ({self.seq_len} source + {self.seq_len + 1} target) "
                                      f"tokens")


class DenoiseSource(PairSource):
  """Windows of T - 1 tokens of a token source as targets, their infilled copies as sources,
  both drawn per row by (seed, split, index, row)."""

  def __init__(self, base: DataSource, ratio: float, span: float):
    if not 0 < ratio < 1:
      raise UserError(f"config.data.denoise_ratio must be in (0, 1), got {ratio!r}.")
    if not span > 0:
      raise UserError(f"config.data.denoise_span must be positive, got {span!r}.")
    DataSource.__init__(self, name=base.name, vocab_size=base.vocab_size + NUM_SPECIALS,
                        tokenizer=base.tokenizer, seq_len=base.seq_len,
                        global_batch_size=base.global_batch_size, seed=base.seed,
                        process_index=base.process_index, process_count=base.process_count)
    self.base, self.ratio, self.span = base, ratio, span
    self.specials = special_ids(base.vocab_size)
    self.max_token_id = self.vocab_size - 1
    self.what = f"text infilling of {ratio:.0%} in Poisson({span:g}) spans"

  def _rows(self, split, split_id, index, lo, hi):
    T = self.seq_len
    windows = self.base._rows(split, split_id, index, lo, hi)[:, :T - 1]  # pylint: disable=protected-access
    rows = []
    for r, row in enumerate(range(lo, hi)):
      src = infill(self._rng(split_id, index, row, 2), windows[r],
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

  def _split_desc(self) -> str:
    return f"{self.base._split_desc()}; {self.what}"  # pylint: disable=protected-access


def _tokenizer_for(texts: list[str], name: str):
  check_tokenizer(name)
  charset = "".join(sorted(set().union(*map(set, texts))))
  if not charset:
    raise UserError("The text is empty.")
  return get_tokenizer(name, text=charset)


def reverse_pairs(data_cfg, seq_len: int):
  """Every non-empty line -> (line, line reversed), split by characters as the text source
  splits (the first 1 - val_fraction of the text is train); lines whose source or target does
  not fit (source <= T tokens, target <= T - 1) are left out and counted."""
  paths = (resolve_text_paths(data_cfg.path) if data_cfg.path
           else [tiny_shakespeare_path(data_cfg.cache_dir)])
  texts = [_read_text(p) for p in paths]
  tokenizer = _tokenizer_for(texts, data_cfg.tokenizer)
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
  for n, line in enumerate(_read_text(path).split("\n"), start=1):
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
  tokenizer = _tokenizer_for(texts, data_cfg.tokenizer)
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


def data_vocabulary(data_cfg, task: str = "lm") -> tuple[int, str]:
  """(vocabulary size, where it comes from) of the data `make_task_source(data_cfg, task)`
  reads, found as training finds it but without tokenizing anything (for launch.benchmark and
  launch.aot, which do not read the data): synthetic data's data.vocab_size; GPT-2 BPE's
  50,257; the character table of a text source's files (a TSV task's: of its pairs); a prepared
  directory's meta.json. The special tokens of the bert / encdec tasks are not counted."""
  size, where, _ = data_tokenizer(data_cfg, task)
  return size, where


def data_tokenizer(data_cfg, task: str = "lm") -> tuple[int, str, dict[str, Any] | None]:
  """`data_vocabulary` and the tokenizer the source will record (its to_dict(); None for
  synthetic tokens)."""
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
  check_tokenizer(data_cfg.tokenizer)
  if data_cfg.tokenizer == "gpt2":
    return GPT2_VOCAB_SIZE, "GPT-2 BPE", get_tokenizer("gpt2").to_dict()
  if data_cfg.tokenizer.startswith(HF_PREFIX):
    tok = get_tokenizer(data_cfg.tokenizer)
    return tok.vocab_size, f"the tokenizer.json of {tok.directory}", tok.to_dict()
  if source == "tfds":
    raise UserError("config.model.vocab_size is unset and the character table of a tfds data "
                    "set is only known once it is read; set it (e.g. "
                    "--config.model.vocab_size=256) or prepare the data with launch.prepare "
                    "and use data.source='bin'.")
  if task == "tsv":
    texts = [s + t for s, t, _ in read_tsv(data_cfg.path)] if data_cfg.path else []
    if data_cfg.get("val_path", ""):
      texts += [s + t for s, t, _ in read_tsv(data_cfg.val_path)]
    what = data_cfg.path
  else:
    paths = (resolve_text_paths(data_cfg.path) if data_cfg.path
             else [tiny_shakespeare_path(data_cfg.cache_dir)])
    texts = [_read_text(p) for p in paths]
    what = paths[0] + (f" (+{len(paths) - 1} files)" if len(paths) > 1 else "")
  tokenizer = _tokenizer_for(texts, "char")
  return (tokenizer.vocab_size, f"the {tokenizer.vocab_size} characters of {what}",
          tokenizer.to_dict())


def make_task_source(data_cfg, task: str, *, seq_len: int, global_batch_size: int, seed: int,
                     process_index: int | None = None,
                     process_count: int | None = None) -> DataSource:
  """The DataSource of a task (see the module docstring)."""
  common = dict(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                process_index=process_index, process_count=process_count)
  if task == "lm":
    return make_source(data_cfg, **common)
  if task in ("mlm", "denoise"):
    base = make_source(data_cfg, **common)
    if task == "mlm":
      return MLMSource(base, data_cfg.get("mlm_probability", 0.15))
    return DenoiseSource(base, data_cfg.get("denoise_ratio", 0.3),
                         data_cfg.get("denoise_span", 3.0))
  if data_cfg.source != "text" and task == "reverse":
    raise UserError(f"data.task='reverse' reads lines of text files (data.source='text'), "
                    f"not data.source={data_cfg.source!r}.")
  pairs, tokenizer, name, what = (reverse_pairs if task == "reverse" else tsv_pairs)(
      data_cfg, seq_len)
  from training.data.sources import _process_layout  # pylint: disable=import-outside-toplevel
  process_index, process_count = _process_layout(global_batch_size, process_index,
                                                 process_count)
  return PairSource(pairs, name=name, base_vocab=tokenizer.vocab_size,
                    tokenizer=tokenizer.to_dict(), what=what, seq_len=seq_len,
                    global_batch_size=global_batch_size, seed=seed,
                    process_index=process_index, process_count=process_count)
