"""Chat templates: a conversation rendered to text with Jinja the way transformers'
`apply_chat_template` renders it, and which characters of that text the assistant wrote.

    template = ChatTemplate(text, special_tokens={"bos_token": "<s>", ...}, source="DIR")
    text, spans = template.assistant_spans(messages, where="chats.jsonl:3")
    ids, mask = template.encode(tokenizer, messages, where="chats.jsonl:3")

Rendering: an ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loop
controls, `raise_exception(message)` (the error becomes one UserError sentence naming the
line), `strftime_now(format)`, a `tojson` filter that does not escape HTML (json.dumps with
ensure_ascii, indent, separators and sort_keys as options) and the `{% generation %} ...
{% endgeneration %}` block, whose output is the assistant's. The template sees `messages`,
`add_generation_prompt`, `tools` and `documents` (None) and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...), as transformers passes them.

The assistant's characters: those inside generation blocks where the template has them; else
what each assistant turn adds to the rendered conversation before it (the render of messages
[:i] with the generation prompt is a prefix of the render of messages[:i + 1], and the rest up
to there is turn i's; a template for which that does not hold needs generation blocks). A token
is the assistant's when its characters overlap those spans (transformers' rule for
return_assistant_tokens_mask).

`default_template(end_of_turn)` is the plain template for tokenizers without one of their own
(GPT-2 BPE: <|endoftext|> ends a turn; characters: DEFAULT_CHAR_END_OF_TURN).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
from typing import Any

import numpy as np

from model.errors import UserError

ROLES = ("system", "user", "assistant")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use marks around a generation block's output
DEFAULT_CHAR_END_OF_TURN = "\u2404"  # SYMBOL FOR END OF TRANSMISSION, one character
# The plain template: "User:" / "Assistant:" / "System:" headers, each message ended by the
# end-of-turn token (written in place of END_OF_TURN) and a newline.
END_OF_TURN = "<<end of turn>>"
DEFAULT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{{- message['role'] | capitalize }}:\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}<<end of turn>>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<<end of turn>>{% endif %}\n\n"
    "{% endfor %}\n"
    "{%- if add_generation_prompt %}Assistant:\n{% endif %}")


def default_template(end_of_turn: str) -> str:
  """DEFAULT_TEMPLATE with `end_of_turn` (a token's text) ending each turn."""
  return DEFAULT_TEMPLATE.replace(END_OF_TURN, end_of_turn)


def _raise_exception(message):
  import jinja2  # pylint: disable=import-outside-toplevel
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


@functools.cache
def environment():
  """The sandboxed Jinja environment chat templates render in (module docstring)."""
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
    import jinja2.ext  # pylint: disable=import-outside-toplevel
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("Chat templates need jinja2 (pip install jinja2).") from None

  class Generation(jinja2.ext.Extension):
    """{% generation %} ... {% endgeneration %}: its output, between private-use marks that
    `split_marks` turns into character spans."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("mark"), [], [], body).set_lineno(lineno)

    def mark(self, caller):
      return _OPEN + caller() + _CLOSE

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env


def split_marks(text: str) -> tuple[str, list[tuple[int, int]]]:
  """(text without the generation marks, the character spans they enclosed; nested blocks
  count once)."""
  out, spans, depth, start = [], [], 0, 0
  at = 0
  for ch in text:
    if ch == _OPEN:
      if depth == 0:
        start = at
      depth += 1
    elif ch == _CLOSE:
      depth -= 1
      if depth == 0 and at > start:
        spans.append((start, at))
    else:
      out.append(ch)
      at += 1
  return "".join(out), spans


def _plain(value):
  """Message content with the private-use marks removed (they would forge spans)."""
  if isinstance(value, str):
    return value.replace(_OPEN, "").replace(_CLOSE, "")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  return value


class ChatTemplate:
  """A compiled chat template with the tokenizer's special tokens (module docstring)."""

  def __init__(self, text: str, *, special_tokens: dict[str, str] | None = None,
               source: str = "the chat template"):
    import jinja2  # pylint: disable=import-outside-toplevel
    self.text, self.source = text, source
    self.special_tokens = dict(special_tokens or {})
    try:
      self._template = environment().from_string(text)
    except jinja2.TemplateSyntaxError as e:
      raise UserError(f"{source} is not a valid Jinja template ({e.message}, line "
                      f"{e.lineno}).") from None
    self.has_generation = bool(GENERATION_TAG.search(text))

  def render(self, messages: list[dict], *, add_generation_prompt: bool = False,
             where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(the text, the generation blocks' character spans)."""
    import jinja2  # pylint: disable=import-outside-toplevel
    here = f"{where}: " if where else ""
    try:
      out = self._template.render(messages=_plain(messages), tools=None, documents=None,
                                  add_generation_prompt=add_generation_prompt,
                                  **self.special_tokens)
    except jinja2.TemplateError as e:
      raise UserError(f"{here}{self.source} raised an error: {e.message or e}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
      raise UserError(f"{here}{self.source} failed ({type(e).__name__}: {e}).") from None
    return split_marks(out)

  def assistant_spans(self, messages: list[dict],
                      where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the assistant's character spans: module docstring)."""
    text, spans = self.render(messages, where=where)
    if self.has_generation:
      return text, spans
    spans = []
    for i, message in enumerate(messages):
      if message.get("role") != "assistant":
        continue
      before, _ = self.render(messages[:i], add_generation_prompt=True, where=where)
      upto, _ = self.render(messages[:i + 1], where=where)
      if not (text.startswith(upto) and upto.startswith(before)):
        raise UserError(f"{where + ': ' if where else ''}{self.source} does not render the "
                        f"conversation up to assistant turn {i} as a prefix of the whole, so "
                        f"the assistant's tokens cannot be told apart; use a template with "
                        f"{{% generation %}} blocks.")
      if len(upto) > len(before):
        spans.append((len(before), len(upto)))
    return text, spans

  def encode(self, tokenizer, messages: list[dict],
             where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(token ids, assistant mask 0 / 1) of the rendered conversation."""
    text, spans = self.assistant_spans(messages, where)
    ids, offsets = tokenizer.encode_offsets(text)
    return np.asarray(ids, np.int32), token_mask(offsets, spans)

  def generation_prompt(self, tokenizer, messages: list[dict], where: str = "") -> list[int]:
    """The ids of the conversation followed by the template's generation prompt."""
    text, _ = self.render(messages, add_generation_prompt=True, where=where)
    return list(tokenizer.encode_offsets(text)[0])

  def end_of_turn(self, tokenizer) -> int | None:
    """The id of the first token the template writes after an assistant message (the token
    a reply ends with: <|im_end|>, <|eot_id|>, </s>, ...); None if it writes nothing."""
    probe = "\ue002"
    text, _ = self.render([{"role": "user", "content": "Hi."},
                           {"role": "assistant", "content": probe}])
    after = text[text.rfind(probe) + 1:] if probe in text else ""
    if not after:
      return None
    return int(tokenizer.encode_offsets(after)[0][0])


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
  """int32 0 / 1 per token: 1 where the token's characters [start, end) overlap a span."""
  mask = np.zeros(len(offsets), np.int32)
  k = 0
  for i, (start, end) in enumerate(offsets):
    while k < len(spans) and start >= spans[k][1]:
      k += 1
    if k == len(spans):
      break
    if end > spans[k][0]:
      mask[i] = 1
  return mask


# ---------------------------------------------------------------------------------------------
# Where a tokenizer's template comes from

TEMPLATE_FILE, CONFIG_FILE = "chat_template.jinja", "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")


def _token_text(value) -> str | None:
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def hf_template(directory: str) -> tuple[str | None, dict[str, str]]:
  """(a Hugging Face tokenizer directory's chat template or None, its special tokens' texts):
  chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
  {name, template} of which "default")."""
  config = {}
  path = os.path.join(directory, CONFIG_FILE)
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path} is not valid JSON ({e}).") from None
  specials = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k)))}
  file = os.path.join(directory, TEMPLATE_FILE)
  if os.path.isfile(file):
    with open(file, encoding="utf-8") as f:
      return f.read(), specials
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return (template if isinstance(template, str) else None), specials


def resolve_template(setting: str, tokenizer) -> ChatTemplate:
  """data.chat_template for a tokenizer: "" the tokenizer's own (a Hugging Face directory's);
  "default" the plain template (its end of turn: the tokenizer's end-of-text token, for
  characters DEFAULT_CHAR_END_OF_TURN); a template itself (it holds "{{" or "{%"); else a
  .jinja file."""
  directory = getattr(tokenizer, "directory", None)
  own, specials = hf_template(directory) if directory else (None, {})
  if tokenizer.name == "gpt2":
    specials = {k: "<|endoftext|>" for k in ("bos_token", "eos_token", "unk_token")}
  if not isinstance(setting, str):
    raise UserError(f"config.data.chat_template must be a string, got {setting!r}.")
  if setting == "":
    if own is None:
      raise UserError(f"The tokenizer {tokenizer.name} has no chat template of its own; set "
                      f"data.chat_template='default' (the plain template) or a .jinja file.")
    return ChatTemplate(own, special_tokens=specials, source=f"the chat template of {directory}")
  if setting == "default":
    eot = specials.get("eos_token") if directory else None
    if tokenizer.name == "gpt2":
      eot = "<|endoftext|>"
    elif tokenizer.name == "char":
      eot = DEFAULT_CHAR_END_OF_TURN
    if eot is None:
      raise UserError(f"The tokenizer {tokenizer.name} has no end-of-text token to end a "
                      f"turn of the default chat template with; give a chat template.")
    return ChatTemplate(default_template(eot), special_tokens=specials,
                        source="the default chat template")
  if "{{" in setting or "{%" in setting:
    return ChatTemplate(setting, special_tokens=specials, source="data.chat_template")
  path = os.path.expanduser(setting)
  if not os.path.isfile(path):
    raise UserError(f"config.data.chat_template={setting!r} is neither 'default', '', a "
                    f"template nor an existing file.")
  with open(path, encoding="utf-8") as f:
    return ChatTemplate(f.read(), special_tokens=specials, source=f"the chat template {path}")
