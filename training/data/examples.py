"""Examples from JSONL files, for the tasks whose data is examples (chat, prefix_lm): reading
lines with their numbers, the validation split, and examples longer than a row.

    lines = read_jsonl("chats.jsonl")                 # [(object, "chats.jsonl:3"), ...]
    splits = split_lines(path, val_path, 0.1, "chat")  # {"train": [...], "val": [...]}
    kept, note = fit_examples(encoded, width, data_cfg.overlong)

Every mistake is one UserError naming the file and line. data.overlong says what an example
longer than a row (T + 1 tokens) does: "error" (the default: one sentence naming it), "drop"
(left out) or "truncate" (cut to the row; dropped if no scored token is left); either way the
count is reported in the source's description.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from model.errors import NotFoundError, UserError
from training.data.text import read_text

OVERLONG = ("error", "drop", "truncate")


def add_config(cfg) -> None:
  # chat, prefix_lm: an example longer than a row (block_size + 1 tokens): error | drop | truncate
  cfg.overlong = "error"
  cfg.packing = "best_fit"  # chat, prefix_lm: best_fit (rows of several examples) | none


def read_jsonl(path: str) -> list[tuple[Any, str]]:
  """(the JSON value, "path:line") of every non-blank line of a JSONL file."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    what = "is a directory" if os.path.isdir(path) else "does not exist"
    raise NotFoundError(f"JSONL file {path!r} {what}.")
  out = []
  for n, line in enumerate(read_text(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      out.append((json.loads(line), f"{path}:{n}"))
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{n}: not a JSON object ({e.msg} at column {e.colno}).") from None
  if not out:
    raise UserError(f"JSONL file {path!r} holds no lines.")
  return out


def split_lines(path: str, val_path: str, val_fraction: float,
                task: str) -> dict[str, list[tuple[Any, str]]]:
  """The train and val lines: `path`'s and `val_path`'s, or the last val_fraction of `path`'s
  lines for val."""
  if not path:
    raise UserError(f"config.data.path must name a JSONL file for data.task={task!r}.")
  lines = read_jsonl(path)
  if val_path:
    return {"train": lines, "val": read_jsonl(val_path)}
  cut = int(round(len(lines) * (1 - val_fraction)))
  if cut == 0 or cut == len(lines):
    raise UserError(f"{path} has {len(lines)} lines, too few to split off a val_fraction of "
                    f"{val_fraction}; give data.val_path.")
  return {"train": lines[:cut], "val": lines[cut:]}


def check_overlong(policy: Any) -> str:
  if policy not in OVERLONG:
    raise UserError(f"config.data.overlong must be one of {', '.join(OVERLONG)}; got "
                    f"{policy!r}.")
  return policy


def fit_examples(items: list[tuple[np.ndarray, np.ndarray, str]], width: int, policy: str,
                 what: str = "example") -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
  """(tokens, loss mask) of the examples that fit a row of `width` tokens by data.overlong
  (module docstring), and how many were dropped or truncated."""
  check_overlong(policy)
  kept, changed = [], 0
  for tokens, loss, where in items:
    if len(tokens) <= width:
      kept.append((tokens, loss))
      continue
    if policy == "error":
      raise UserError(f"{where}: the {what} is {len(tokens):,} tokens, longer than a row of "
                      f"block_size + 1 = {width:,}; set data.overlong=drop or truncate, or a "
                      f"larger model.block_size.")
    changed += 1
    if policy == "truncate" and loss[:width].any():
      kept.append((tokens[:width], loss[:width]))
  return kept, changed
