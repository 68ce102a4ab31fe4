"""OpenAI's API shapes for the server (training/serve/http.py): request bodies checked and
turned into engine Requests, and the JSON of responses and stream chunks.

    parsed = parse_completion(body, served)          # ApiError (status, OpenAI error) if bad
    parsed = parse_chat(body, served)
    completion_response(parsed, outputs)             # the non-streamed body
    completion_chunk(parsed, index, text, ...)       # one SSE chunk

Completions take `prompt` as a string, a list of strings, a list of token ids or a list of
lists of ids; `n` choices per prompt (choice index prompt * n + i, as OpenAI numbers them),
`logprobs` (0..top_n alternatives, the legacy object), `echo` (the prompt first, with its
log-probabilities when logprobs is set; max_tokens 0 then scores the prompt only, as
lm-eval-harness asks). Chat renders `messages` with the model's chat template (issue 33's
training/data/chat_template.py) plus its generation prompt and stops at its end-of-turn token;
`logprobs` / `top_logprobs` give the chat-shaped log-probabilities. Unknown fields are ignored,
as OpenAI's own server does for those it does not know.
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import uuid
from typing import Any

from model.errors import UserError
from training.data.chat import messages_of
from training.serve.requests import Request

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default
MAX_STOP_STRINGS = 4


class ApiError(Exception):
  """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, *, param: str | None = None,
               code: str | None = None, kind: str = "invalid_request_error",
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.code = status, message, param, code
    self.kind, self.headers = kind, headers or {}

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                      "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Served:
  """What a request is checked against: the model's name, tokenizer, chat template (None: no
  chat), sequence length and limits."""
  model: str
  tokenizer: Any
  max_len: int
  max_n: int
  top_n: int
  chat_template: Any = None
  end_of_turn: int | None = None
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))


@dataclasses.dataclass
class Parsed:
  kind: str                    # "text_completion" or "chat.completion"
  id: str
  model: str
  requests: list[Request]      # prompt-major: choice i of prompt p is requests[p * n + i]
  prompt_texts: list[str]      # for echo
  n: int
  stream: bool
  include_usage: bool
  echo: bool
  logprobs: int | None
  created: int


def _bad(message: str, param: str | None = None) -> ApiError:
  return ApiError(400, message, param=param)


def _field(body: dict, name: str, kinds, default=None, *, allow_none: bool = True):
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  value = body.get(name, default)
  if value is None and allow_none:
    return default
  if isinstance(value, bool) and bool not in kinds:
    raise _bad(f"'{name}' must be {_words(kinds)}, got {json.dumps(value)}.", name)
  if not isinstance(value, kinds):
    raise _bad(f"'{name}' must be {_words(kinds)}, got {json.dumps(value)[:60]}.", name)
  return value


def _words(kinds) -> str:
  names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
           list: "a list", dict: "an object"}
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  if float in kinds:
    kinds = tuple(k for k in kinds if k is not int)
  return " or ".join(names[k] for k in kinds)


def _sampling(body: dict, served: Served, max_tokens_names=("max_tokens",)) -> dict[str, Any]:
  """The fields both endpoints share, checked."""
  temperature = _field(body, "temperature", (int, float), 1.0)
  if not math.isfinite(temperature) or temperature < 0:
    raise _bad(f"'temperature' must be a number >= 0 (0 is greedy), got {temperature}.",
               "temperature")
  top_p = _field(body, "top_p", (int, float), 1.0)
  if not 0 < top_p <= 1:
    raise _bad(f"'top_p' must be in (0, 1], got {top_p}.", "top_p")
  top_k = _field(body, "top_k", int, 0)
  if top_k < 0 and top_k != -1:
    raise _bad(f"'top_k' must be >= 0 (0 or -1: off), got {top_k}.", "top_k")
  n = _field(body, "n", int, 1)
  if not 1 <= n <= served.max_n:
    raise _bad(f"'n' must be in [1, {served.max_n}] on this server, got {n}.", "n")
  seed = _field(body, "seed", int, None)
  if seed is not None and not 0 <= seed < 2**32:
    raise _bad(f"'seed' must be in [0, 2**32), got {seed}.", "seed")
  max_tokens = None
  for name in max_tokens_names:
    value = _field(body, name, int, None)
    if value is not None:
      max_tokens, param = value, name
  if max_tokens is not None and max_tokens < 0:
    raise _bad(f"'{param}' must be >= 0, got {max_tokens}.", param)
  stop = body.get("stop")
  if stop is None:
    stop = []
  elif isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
    raise _bad("'stop' must be a string or a list of strings.", "stop")
  if len(stop) > MAX_STOP_STRINGS:
    raise _bad(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}.", "stop")
  stream = _field(body, "stream", bool, False)
  options = _field(body, "stream_options", dict, {})
  include_usage = options.get("include_usage", False)
  if not isinstance(include_usage, bool):
    raise _bad("'stream_options.include_usage' must be a boolean.", "stream_options")
  return dict(temperature=float(temperature), top_p=float(top_p), top_k=max(top_k, 0), n=n,
              seed=seed, max_tokens=max_tokens, stop=tuple(stop), stream=stream,
              include_usage=include_usage)


def _check_model(body: dict, served: Served) -> None:
  model = body.get("model")
  if model is not None and not isinstance(model, str):
    raise _bad(f"'model' must be a string, got {json.dumps(model)[:60]}.", "model")
  if model not in (None, "", served.model):
    raise ApiError(404, f"The model '{model}' does not exist; this server serves "
                        f"'{served.model}'.", param="model", code="model_not_found")


def _prompts(value: Any, served: Served) -> tuple[list[list[int]], list[str]]:
  """(token ids, text) of each prompt of a completions request."""
  tok = served.tokenizer
  if isinstance(value, str):
    value = [value]
  elif isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in value):
    value = [value]
  if not isinstance(value, list) or not value:
    raise _bad("'prompt' must be a non-empty string, a list of strings, a list of token ids "
               "or a list of lists of token ids.", "prompt")
  ids, texts = [], []
  for i, p in enumerate(value):
    if isinstance(p, str):
      try:
        encoded = tok.encode(p)
      except UserError as e:
        raise _bad(f"Prompt {i} cannot be encoded: {e}", "prompt") from None
      ids.append(encoded)
      texts.append(p)
    elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
      bad = [t for t in p if not 0 <= t < tok.vocab_size]
      if bad:
        raise _bad(f"Prompt {i} has token id {bad[0]}, outside [0, {tok.vocab_size}).",
                   "prompt")
      ids.append(list(p))
      texts.append(tok.decode(p))
    else:
      raise _bad(f"Prompt {i} must be a string or a list of token ids.", "prompt")
    if not ids[-1]:
      raise _bad(f"Prompt {i} is empty; a prompt needs at least one token.", "prompt")
  return ids, texts


def _requests(prompts: list[list[int]], s: dict[str, Any], served: Served, *,
              logprobs: int | None, prompt_logprobs: bool, stop_ids=()) -> list[Request]:
  seed = s["seed"] if s["seed"] is not None else secrets.randbits(32)
  out = []
  for p, ids in enumerate(prompts):
    max_tokens = s["max_tokens"]
    if max_tokens is None:
      max_tokens = min(DEFAULT_MAX_TOKENS, served.max_len - len(ids)) if s["kind"] == (
          "text_completion") else served.max_len - len(ids)
    if len(ids) + max_tokens > served.max_len:
      raise _bad(f"Prompt {p} ({len(ids)} tokens) plus max_tokens ({max_tokens}) is "
                 f"{len(ids) + max_tokens} tokens, more than the {served.max_len} this server "
                 f"holds per sequence.", "max_tokens")
    for i in range(s["n"]):
      out.append(Request(prompt=ids, max_tokens=max_tokens, temperature=s["temperature"],
                         top_k=s["top_k"], top_p=s["top_p"], seed=seed, choice=p * s["n"] + i,
                         stop_ids=tuple(stop_ids), stop=s["stop"], logprobs=logprobs,
                         prompt_logprobs=prompt_logprobs))
  return out


def parse_completion(body: Any, served: Served) -> Parsed:
  if not isinstance(body, dict):
    raise _bad("The request body must be a JSON object.")
  _check_model(body, served)
  if "prompt" not in body:
    raise _bad("'prompt' is required.", "prompt")
  s = _sampling(body, served) | {"kind": "text_completion"}
  echo = _field(body, "echo", bool, False)
  logprobs = _field(body, "logprobs", int, None)
  if logprobs is not None and not 0 <= logprobs <= served.top_n:
    raise _bad(f"'logprobs' must be in [0, {served.top_n}], got {logprobs}.", "logprobs")
  if s["max_tokens"] == 0 and not echo:
    raise _bad("'max_tokens' 0 needs 'echo' (scoring the prompt); give max_tokens >= 1.",
               "max_tokens")
  ids, texts = _prompts(body["prompt"], served)
  requests = _requests(ids, s, served, logprobs=logprobs,
                       prompt_logprobs=echo and logprobs is not None)
  return Parsed("text_completion", f"cmpl-{uuid.uuid4().hex}", served.model, requests, texts,
                s["n"], s["stream"], s["include_usage"], echo, logprobs, int(time.time()))


def _message_list(value: Any) -> list[dict]:
  """OpenAI messages with text content (a string, or a list of text parts joined)."""
  if not isinstance(value, list) or not value:
    raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects.",
               "messages")
  out = []
  for n, m in enumerate(value):
    if isinstance(m, dict) and isinstance(m.get("content"), list):
      parts = m["content"]
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"),
                                                                                 str)
                 for p in parts):
        raise _bad(f"Message {n}'s content parts must be text parts ({{\"type\": \"text\", "
                   f"\"text\": ...}}).", "messages")
      m = dict(m, content="".join(p["text"] for p in parts))
    out.append(m)
  try:
    return messages_of({"messages": out}, "messages", for_training=False)
  except UserError as e:
    raise _bad(str(e), "messages") from None


def parse_chat(body: Any, served: Served) -> Parsed:
  if not isinstance(body, dict):
    raise _bad("The request body must be a JSON object.")
  _check_model(body, served)
  messages = _message_list(body.get("messages"))
  if served.chat_template is None:
    raise _bad(f"The model '{served.model}' has no chat template; start the server with "
               f"--chat_template default (or a .jinja file).", "messages")
  s = _sampling(body, served, ("max_tokens", "max_completion_tokens")) | {
      "kind": "chat.completion"}
  want = _field(body, "logprobs", bool, False)
  top = _field(body, "top_logprobs", int, None)
  if top is not None and not 0 <= top <= served.top_n:
    raise _bad(f"'top_logprobs' must be in [0, {served.top_n}], got {top}.", "top_logprobs")
  if top is not None and not want:
    raise _bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
  if s["max_tokens"] == 0:
    raise _bad("'max_tokens' must be at least 1 for chat, got 0.", "max_tokens")
  try:
    ids = served.chat_template.generation_prompt(served.tokenizer, messages, where="messages")
  except UserError as e:
    raise _bad(str(e), "messages") from None
  stop_ids = () if served.end_of_turn is None else (served.end_of_turn,)
  requests = _requests([ids], s, served, logprobs=(top or 0) if want else None,
                       prompt_logprobs=False, stop_ids=stop_ids)
  return Parsed("chat.completion", f"chatcmpl-{uuid.uuid4().hex}", served.model, requests, [""],
                s["n"], s["stream"], s["include_usage"], False, (top or 0) if want else None,
                int(time.time()))


# ---------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def _piece(tokenizer, token: int) -> str:
  return tokenizer.decode([token])


def legacy_logprobs(tokenizer, entries, offset: int = 0) -> dict:
  """Completions' logprobs object: `entries` are TokenLogprobs, or a bare token id for the
  prompt's first token (which has no log-probability); text offsets count from `offset`."""
  out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  for entry in entries:
    token = entry if isinstance(entry, int) else entry.token
    piece = _piece(tokenizer, token)
    out["tokens"].append(piece)
    out["token_logprobs"].append(None if isinstance(entry, int) else entry.logprob)
    out["top_logprobs"].append(None if isinstance(entry, int) else
                               {_piece(tokenizer, i): lp for i, lp in entry.top})
    out["text_offset"].append(offset)
    offset += len(piece)
  return out


def chat_logprobs(tokenizer, entries) -> dict:
  """Chat's logprobs object ({"content": [{token, logprob, bytes, top_logprobs}]})."""
  def one(token, logprob):
    piece = _piece(tokenizer, token)
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}
  return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(i, lp) for i, lp in e.top]}
                      for e in entries]}
