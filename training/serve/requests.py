"""What goes in and out of the serving engine (training/serve/engine.py): its settings, a
Request (one sequence), the Output and Done events it hands to a request's callback, and the
two refusals (QueueFull: HTTP 429, Draining: HTTP 503)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Sequence


class QueueFull(Exception):
  """More sequences wait than the engine queues (HTTP 429)."""


class Draining(Exception):
  """The engine takes no new requests (it is shutting down: HTTP 503)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  slots: int = 8            # sequences decoded at once
  max_len: int = 0          # KV-cache positions per slot: prompt + max_tokens (0: block_size)
  decode_steps: int = 8     # tokens every active slot advances per device call
  max_prefills: int = 16    # prompts prefilled per loop iteration (then one decode call)
  max_queue: int = 256      # sequences waiting for a slot before submit raises QueueFull
  top_n: int = 20           # most alternatives per token (logprobs)
  prompt_logprobs: bool = True  # compile the prefills that score the prompt (echo + logprobs)
  # decode variants compiled (model/decode/logits.py VARIANTS; "sorted" serves any request, the
  # others are cheaper calls for the requests they serve)
  sampling: tuple[str, ...] = ("greedy", "plain", "top_k", "sorted")


@dataclasses.dataclass(frozen=True)
class Request:
  """One sequence to generate (a prompt's choice)."""
  prompt: Sequence[int]
  max_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  choice: int = 0                       # folded into the seed's key (n samples of a prompt)
  stop_ids: tuple[int, ...] = ()        # token ids that end the sequence (not in its text)
  stop: tuple[str, ...] = ()            # strings that end it (not in its text)
  logprobs: int | None = None           # None: none; k: each token's and k alternatives
  prompt_logprobs: bool = False         # the prompt's tokens' log-probabilities too


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  token: int
  logprob: float
  top: tuple[tuple[int, float], ...]    # (id, logprob) of the likeliest, likeliest first


@dataclasses.dataclass(frozen=True)
class Output:
  """New text and tokens of sequence `index` (text may lag tokens: held-back characters)."""
  index: int
  text: str
  token_ids: tuple[int, ...]
  logprobs: tuple[TokenLogprob, ...] | None
  prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first Output only


@dataclasses.dataclass(frozen=True)
class Done:
  index: int
  finish_reason: str        # "stop" (stop id or string), "length", "cancelled"
  prompt_tokens: int
  completion_tokens: int


@dataclasses.dataclass
class Result:
  """What `generate` returns for one Request."""
  text: str
  token_ids: list[int]
  finish_reason: str
  logprobs: list[TokenLogprob] | None
  prompt_logprobs: list[TokenLogprob | None] | None


class Collector:
  """An on_event callback that keeps the events of one sequence (Engine.generate)."""

  def __init__(self):
    self.outputs: list[Output] = []
    self.finish: Done | None = None
    self.done = threading.Event()

  def __call__(self, event) -> None:
    if isinstance(event, Output):
      self.outputs.append(event)
    else:
      self.finish = event
      self.done.set()
