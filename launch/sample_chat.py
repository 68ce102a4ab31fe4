"""launch.sample --chat: conversations rendered with the model's chat template and its
generation prompt; a reply stops at the template's end-of-turn token.

  --chat '[{"role": "user", "content": "..."}]'     one conversation (a JSON list of messages,
                                                    or {"messages": [...]} / {"prompt": ...})
  --chat chats.jsonl                                one conversation per line
  --chat_template default|FILE                      instead of the model's own template

The template: a chat run's (the text its config.json recorded, data.chat_template), a Hugging
Face directory's own (chat_template.jinja or tokenizer_config.json), or --chat_template's. A
conversation may end with an assistant message; the reply continues after the generation
prompt that follows the last message.
"""

from __future__ import annotations

import json
import os
from typing import Any

from model.errors import UserError
from training.data.chat import messages_of
from training.data.chat_template import ChatTemplate, hf_template, resolve_template
from training.data.examples import read_jsonl
from training.run import CONFIG_NAME


def read_conversations(value: str) -> list[tuple[list[dict], str]]:
  """(messages, where) of --chat: a JSON value, or a JSONL file (one conversation a line)."""
  text = value.strip()
  if text.startswith(("[", "{")):
    try:
      parsed = json.loads(text)
    except json.JSONDecodeError as e:
      raise UserError(f"--chat is not valid JSON ({e.msg} at column {e.colno}); give a list of "
                      f"messages or a JSONL file.") from None
    if isinstance(parsed, list):
      parsed = {"messages": parsed}
    return [(messages_of(parsed, "--chat", for_training=False), "--chat")]
  if not os.path.isfile(os.path.expanduser(value)):
    raise UserError(f"--chat {value!r} is neither a JSON list of messages nor an existing "
                    f"JSONL file.")
  return [(messages_of(v, where, for_training=False), where)
          for v, where in read_jsonl(value)]


def run_template(workdir: str) -> str | None:
  """The chat template a training run recorded (its config.json's data.chat_template)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = epath.Path(workdir) / CONFIG_NAME
  try:
    config = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  template = (config.get("data") or {}).get("chat_template")
  return template or None


def chat_template(tokenizer, *, workdir: str | None, hf_dir: str | None,
                  override: str | None) -> ChatTemplate:
  """The template to render with (module docstring)."""
  if override:
    return resolve_template(override, tokenizer)
  if workdir is not None:
    text = run_template(workdir)
    if text is None:
      raise UserError(f"The run in {workdir} was not trained on chats (its config.json has no "
                      f"data.chat_template); give --chat_template default or a .jinja file.")
    specials = hf_template(tokenizer.directory)[1] if hasattr(tokenizer, "directory") else {}
    if tokenizer.name == "gpt2":
      specials = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
    return ChatTemplate(text, special_tokens=specials, source=f"the chat template of {workdir}")
  own, specials = hf_template(hf_dir) if hf_dir else (None, {})
  if own is None:
    raise UserError(f"{hf_dir or 'The model'} has no chat template; give --chat_template "
                    f"default or a .jinja file.")
  return ChatTemplate(own, special_tokens=specials, source=f"the chat template of {hf_dir}")


def chat_rows(template: ChatTemplate, tokenizer,
              conversations: list[tuple[list[dict], str]]) -> tuple[list[str], list[list[int]]]:
  """(the rendered prompts, their ids) of each conversation with the generation prompt."""
  texts, rows = [], []
  for messages, where in conversations:
    texts.append(template.render(messages, add_generation_prompt=True, where=where)[0])
    try:
      rows.append(template.generation_prompt(tokenizer, messages, where=where))
    except UserError as e:
      raise UserError(f"{where}: the conversation cannot be encoded: {e}") from None
  return texts, rows


def end_of_turn(template: ChatTemplate, tokenizer, vocab_size: int) -> Any:
  eot = template.end_of_turn(tokenizer)
  if eot is None or eot >= vocab_size:
    raise UserError(f"{template.source} ends an assistant turn with no token of the model's "
                    f"vocabulary, so a reply could not stop; use another template.")
  return eot
