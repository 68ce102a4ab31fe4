"""Task chat (GPT): supervised fine-tuning on conversations, the loss on the assistant's tokens
only, the conversations packed into rows (packing.py).

    data.task = "chat", data.source = "jsonl", data.path = "chats.jsonl" ("": the shipped
    shakespeare set, assets/shakespeare_chat.jsonl), data.val_path or data.val_fraction,
    data.chat_template = "" (the tokenizer's own) | "default" | a .jinja file | a template

A line is OpenAI's chat shape, {"messages": [{"role": "system" | "user" | "assistant",
"content": "..."}, ...]}, or {"prompt": "...", "completion": "..."} (a user and an assistant
message). Each is rendered by the chat template (chat_template.py) and tokenized; the loss mask
marks the assistant's tokens (its generation blocks, else what each assistant turn adds).
Conversations longer than a row follow data.overlong (examples.py). The run records the
template's text in its config (data.chat_template), so launch.sample --chat and launch.eval
--data chat:FILE render as training did.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from model.errors import UserError
from model.tokenizer import get_tokenizer
from training.data import examples as ex
from training.data.bin import check_tokenizer
from training.data.chat_template import ROLES, ChatTemplate, resolve_template
from training.data.lm import char_tokenizer_of
from training.data.packing import Examples, PackedSource
from training.data.sources import DataSource, source_layout

SHIPPED_CHATS = pathlib.Path(__file__).parent / "assets" / "shakespeare_chat.jsonl"


def add_config(cfg) -> None:
  # chat: "" the tokenizer's own template (a Hugging Face directory's) | "default" (plain
  # "User:" / "Assistant:" turns) | a .jinja file | the template itself
  cfg.chat_template = ""


def chat_path(data_cfg) -> str:
  return data_cfg.path or str(SHIPPED_CHATS)


def messages_of(value: Any, where: str, for_training: bool = True) -> list[dict[str, str]]:
  """The messages of one JSONL line, checked (one UserError sentence naming the line); for
  training it must hold an assistant message."""
  if not isinstance(value, dict):
    raise UserError(f"{where}: a line must be a JSON object with \"messages\" (or \"prompt\" "
                    f"and \"completion\"), not a {type(value).__name__}.")
  if "messages" not in value:
    if "prompt" in value and ("completion" in value or not for_training):
      value = {"messages": [{"role": "user", "content": value["prompt"]}] + (
          [{"role": "assistant", "content": value["completion"]}] if "completion" in value
          else [])}
    else:
      raise UserError(f"{where}: the line has no \"messages\" (nor \"prompt\" and "
                      f"\"completion\"); it has {', '.join(map(repr, value)) or 'no keys'}.")
  messages = value["messages"]
  if not isinstance(messages, list) or not messages:
    raise UserError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", "
                    f"\"content\"}} objects.")
  out = []
  for n, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise UserError(f"{where}: message {n} must be an object with \"role\" and "
                      f"\"content\".")
    if m["role"] not in ROLES:
      raise UserError(f"{where}: message {n} has the unknown role {m['role']!r}; use "
                      f"{', '.join(ROLES)}.")
    if not isinstance(m["content"], str):
      raise UserError(f"{where}: message {n}'s content is a {type(m['content']).__name__}, "
                      f"not a string.")
    out.append({"role": m["role"], "content": m["content"]})
  if for_training and not any(m["role"] == "assistant" for m in out):
    raise UserError(f"{where}: the conversation has no assistant message, so nothing in it "
                    f"is learned.")
  return out


def read_chats(data_cfg) -> dict[str, list[tuple[list[dict], str]]]:
  """The train and val conversations of data.path (or the shipped set), checked."""
  lines = ex.split_lines(chat_path(data_cfg), data_cfg.get("val_path", ""),
                        data_cfg.val_fraction, "chat")
  return {split: [(messages_of(v, where), where) for v, where in items]
          for split, items in lines.items()}


def chat_tokenizer(data_cfg, chats=None):
  """The tokenizer the chat data is read with: data.tokenizer; for "char", the table of the
  characters of every conversation rendered by the default template (its end-of-turn
  character included)."""
  check_tokenizer(data_cfg.tokenizer)
  if data_cfg.tokenizer != "char":
    return get_tokenizer(data_cfg.tokenizer)
  chats = read_chats(data_cfg) if chats is None else chats
  setting = data_cfg.get("chat_template", "")
  probe = get_tokenizer("char", text="x")
  template = resolve_template(setting, probe)
  texts = [template.render(m, where=w)[0] for items in chats.values() for m, w in items]
  texts.append(template.render([{"role": "user", "content": ""}],
                               add_generation_prompt=True)[0])
  return char_tokenizer_of(texts)


def chat_vocabulary(data_cfg) -> tuple[int, str, dict[str, Any]]:
  """TASKS' tokenizer entry: (vocabulary size, where, to_dict())."""
  check_source(data_cfg)
  tok = chat_tokenizer(data_cfg)
  return tok.vocab_size, f"the {tok.name} tokens of {chat_path(data_cfg)}", tok.to_dict()


def check_source(data_cfg) -> None:
  if data_cfg.source != "jsonl":
    raise UserError(f"data.task='chat' reads conversations from a JSONL file: set "
                    f"data.source='jsonl' (and data.path), not {data_cfg.source!r}.")


def encode_chats(template: ChatTemplate, tokenizer, chats: list[tuple[list[dict], str]]
                 ) -> list[tuple[np.ndarray, np.ndarray, str]]:
  """(token ids, loss mask, where) of each conversation. The loss mask is the assistant's
  tokens as targets: a token is scored when the token before it is in the same example, so
  the mask is the assistant mask as is (its first token is predicted from the header)."""
  return [(*template.encode(tokenizer, messages, where), where) for messages, where in chats]


class ChatSource(PackedSource):
  """Packed conversations; `template` and `end_of_turn` say how they were rendered."""

  def __init__(self, *args, template: ChatTemplate, end_of_turn: int | None, **kwargs):
    super().__init__(*args, **kwargs)
    self.template, self.end_of_turn = template, end_of_turn


def make_source(data_cfg, **layout) -> DataSource:
  check_source(data_cfg)
  layout = source_layout(**layout)
  chats = read_chats(data_cfg)
  tokenizer = chat_tokenizer(data_cfg, chats)
  template = resolve_template(data_cfg.get("chat_template", ""), tokenizer)
  width = layout["seq_len"] + 1
  policy = ex.check_overlong(data_cfg.get("overlong", "error"))
  splits, notes = {}, []
  for split, items in chats.items():
    kept, changed = ex.fit_examples(encode_chats(template, tokenizer, items), width, policy,
                                    "conversation")
    splits[split] = Examples.of(kept)
    if changed:
      notes.append(f"{changed:,} {split} conversations longer than {width} tokens "
                   f"{'dropped' if policy == 'drop' else 'truncated'}")
  what = "; ".join(["chats, loss on the assistant's tokens", *notes])
  return ChatSource(splits, name=f"chat {chat_path(data_cfg)}", vocab_size=tokenizer.vocab_size,
                    tokenizer=tokenizer.to_dict(), what=what,
                    packing=data_cfg.get("packing", "best_fit"), template=template,
                    end_of_turn=template.end_of_turn(tokenizer), **layout)
