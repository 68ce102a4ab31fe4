"""Task preference (GPT, DPO: training/dpo.py): pairs of completions of one prompt, the chosen
one preferred, packed with segment ids.

    data.task = "preference", data.source = "jsonl", data.path = "pairs.jsonl" ("": the
    shipped set, assets/shakespeare_preference.jsonl), data.val_path or data.val_fraction

A line is {"prompt": ..., "chosen": ..., "rejected": ...}: text (the completions follow the
prompt directly), or chat messages: "prompt" a list of {"role", "content"} messages rendered
with the chat template (data.chat_template, chat_template.py) and its generation prompt,
"chosen" / "rejected" the assistant's reply (a string, or a list of one assistant message),
rendered as the template writes an assistant turn after the prompt. Prompt and completion are
tokenized apart, ids = prompt ids + completion ids (TRL's DataCollatorForPreference on its
tokenized columns).

A pair is one unit of packing (packing.py): its two sequences, prompt + chosen and prompt +
rejected, are consecutive segments 2k - 1 and 2k of a row, the loss mask on the completions'
tokens. A pair longer than a row follows data.overlong: error (one sentence naming the line) or
drop; "truncate" is refused (a cut pair compares unequal things).
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from model.errors import UserError
from model.tokenizer import get_tokenizer
from training.data import examples as ex
from training.data.bin import check_tokenizer
from training.data.chat import messages_of
from training.data.chat_template import resolve_template
from training.data.lm import char_tokenizer_of
from training.data.packing import Examples, PackedSource
from training.data.sources import DataSource, source_layout

SHIPPED_PAIRS = pathlib.Path(__file__).parent / "assets" / "shakespeare_preference.jsonl"
KEYS = ("prompt", "chosen", "rejected")


def pairs_path(data_cfg) -> str:
  return data_cfg.path or str(SHIPPED_PAIRS)


def check_line(value: Any, where: str) -> dict[str, Any]:
  """One line's prompt, chosen and rejected, checked (one sentence naming file and line)."""
  if not isinstance(value, dict):
    raise UserError(f"{where}: a line must be a JSON object with \"prompt\", \"chosen\" and "
                    f"\"rejected\", not a {type(value).__name__}.")
  missing = [k for k in KEYS if k not in value]
  if missing:
    raise UserError(f"{where}: the line has no {' and no '.join(map(repr, missing))}; a "
                    f"preference line needs \"prompt\", \"chosen\" and \"rejected\".")
  chat = isinstance(value["prompt"], list)
  for key in KEYS:
    item = value[key]
    ok = isinstance(item, str) or (chat and isinstance(item, list))
    if not ok:
      raise UserError(f"{where}: \"{key}\" must be {'a list of messages or ' if chat else ''}"
                      f"a string, not a {type(item).__name__}.")
    if key != "prompt" and isinstance(item, str) and not item:
      raise UserError(f"{where}: \"{key}\" is empty; both completions need text.")
  return value


def read_pairs(data_cfg) -> dict[str, list[tuple[dict, str]]]:
  lines = ex.split_lines(pairs_path(data_cfg), data_cfg.get("val_path", ""),
                        data_cfg.val_fraction, "preference")
  return {split: [(check_line(v, where), where) for v, where in items]
          for split, items in lines.items()}


def _reply(value, where: str) -> str:
  if isinstance(value, str):
    return value
  messages = messages_of({"messages": value}, where)
  if len(messages) != 1 or messages[0]["role"] != "assistant":
    raise UserError(f"{where}: a chat completion must be one assistant message.")
  return messages[0]["content"]


def texts_of(line: dict, where: str, template) -> tuple[str, str, str]:
  """(prompt, chosen, rejected) as text: chat lines rendered with `template`."""
  if not isinstance(line["prompt"], list):
    return line["prompt"], line["chosen"], line["rejected"]
  prompt_msgs = messages_of({"messages": line["prompt"]}, where, for_training=False)
  prompt = template.render(prompt_msgs, add_generation_prompt=True, where=where)[0]
  out = []
  for key in ("chosen", "rejected"):
    full = template.render(prompt_msgs + [{"role": "assistant",
                                           "content": _reply(line[key], where)}], where=where)[0]
    if not full.startswith(prompt):
      raise UserError(f"{where}: the chat template writes the {key} reply's turn differently "
                      f"from its generation prompt; use a template whose prompt is a prefix.")
    out.append(full[len(prompt):])
  return prompt, out[0], out[1]


def pair_tokenizer(data_cfg, pairs=None):
  """data.tokenizer; for "char", the table of every prompt's and completion's characters."""
  check_tokenizer(data_cfg.tokenizer)
  if data_cfg.tokenizer != "char":
    return get_tokenizer(data_cfg.tokenizer)
  pairs = read_pairs(data_cfg) if pairs is None else pairs
  template = resolve_template(data_cfg.get("chat_template", "") or "default",
                              get_tokenizer("char", text="x"))
  texts = [t for items in pairs.values() for line, w in items for t in texts_of(line, w, template)]
  return char_tokenizer_of([t for t in texts if t] or ["x"])


def vocabulary(data_cfg) -> tuple[int, str, dict[str, Any]]:
  """TASKS' tokenizer entry: (vocabulary size, where, to_dict())."""
  check_source(data_cfg)
  tok = pair_tokenizer(data_cfg)
  return tok.vocab_size, f"the {tok.name} tokens of {pairs_path(data_cfg)}", tok.to_dict()


def check_source(data_cfg) -> None:
  if data_cfg.source != "jsonl":
    raise UserError(f"data.task='preference' reads pairs from a JSONL file: set "
                    f"data.source='jsonl' (and data.path), not {data_cfg.source!r}.")


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, where: str):
  """(tokens, loss mask) of the pair's two sequences end to end, and the chosen one's length."""
  p = np.asarray(tokenizer.encode(prompt), np.int32)
  if not len(p):
    raise UserError(f"{where}: the prompt is empty; the first completion token needs one to be "
                    f"predicted from.")
  seqs = []
  for key, text in (("chosen", chosen), ("rejected", rejected)):
    c = np.asarray(tokenizer.encode(text), np.int32)
    if not len(c):
      raise UserError(f"{where}: \"{key}\" has no tokens.")
    seqs.append((np.concatenate([p, c]), np.concatenate([np.zeros(len(p), np.int32),
                                                         np.ones(len(c), np.int32)])))
  (ct, cm), (rt, rm) = seqs
  return np.concatenate([ct, rt]), np.concatenate([cm, rm]), len(ct)


class PreferenceSource(PackedSource):
  """Packed pairs: each example is a pair, written as two segments (module docstring)."""

  def __init__(self, examples: dict[str, Examples], chosen_len: dict[str, np.ndarray], **kw):
    self.chosen_len = chosen_len
    super().__init__(examples, **kw)

  def rows(self, split, sid, index, lo, hi):
    """Train: epoch after epoch. Val: each pair once, then empty rows (no pairs), so that the
    eval.batches cover the held-out pairs exactly once when they hold enough rows."""
    R, width = self.rows_per_epoch[split], self.seq_len + 1
    out = []
    for g in range(index * self.global_batch_size + lo, index * self.global_batch_size + hi):
      if split == "val" and g >= R:
        out.append(np.zeros(3 * width, np.int32))
        continue
      out.append(self.pair_row(split, self.epoch(split, g // R)[g % R], width))
    return np.stack(out)

  def pair_row(self, split: str, members: list[int], width: int) -> np.ndarray:
    row = np.zeros((3, width), np.int32)
    at = 0
    for k, m in enumerate(members):
      tokens, loss = self.examples[split].get(m)
      n, c = len(tokens), int(self.chosen_len[split][m])
      row[0, at:at + n], row[2, at:at + n] = tokens, loss
      row[1, at:at + c], row[1, at + c:at + n] = 2 * k + 1, 2 * k + 2
      at += n
    return row.reshape(-1)

  def row_desc(self) -> str:
    return (f"3 x {self.seq_len + 1} (tokens | segment ids: 2k - 1 chosen, 2k rejected | loss "
            f"mask)")


def make_source(data_cfg, **layout) -> DataSource:
  check_source(data_cfg)
  layout = source_layout(**layout)
  pairs = read_pairs(data_cfg)
  tokenizer = pair_tokenizer(data_cfg, pairs)
  template = resolve_template(data_cfg.get("chat_template", "") or "default", tokenizer)
  width = layout["seq_len"] + 1
  policy = ex.check_overlong(data_cfg.get("overlong", "error"))
  if policy == "truncate":
    raise UserError("config.data.overlong=truncate would cut a pair's completions unequally; "
                    "use error or drop for data.task=preference.")
  splits, chosen, notes = {}, {}, []
  for split, items in pairs.items():
    encoded = [(*encode_pair(tokenizer, *texts_of(line, where, template), where), where)
               for line, where in items]
    kept, lengths, dropped = [], [], 0
    for tokens, loss, c, where in encoded:
      if len(tokens) > width:
        if policy == "error":
          raise UserError(f"{where}: the pair is {len(tokens):,} tokens (prompt twice and both "
                          f"completions), longer than a row of block_size + 1 = {width:,}; "
                          f"set data.overlong=drop or a larger model.block_size.")
        dropped += 1
        continue
      kept.append((tokens, loss))
      lengths.append(c)
    splits[split], chosen[split] = Examples.of(kept), np.asarray(lengths, np.int64)
    if dropped:
      notes.append(f"{dropped:,} {split} pairs longer than {width} tokens dropped")
  what = "; ".join(["preference pairs, DPO on the completions", *notes])
  return PreferenceSource(splits, chosen, name=f"preference {pairs_path(data_cfg)}",
                          vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.to_dict(),
                          what=what, packing=data_cfg.get("packing", "best_fit"), **layout)
