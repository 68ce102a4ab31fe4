"""The serving engine: continuous batching over a fixed number of decode slots, in one thread
that owns the device. HTTP (training/serve/http.py) is a thin layer over it; tests and scripts
call it directly.

    engine = Engine(params, cfg, tokenizer, EngineConfig(slots=8, max_len=256))
    engine.compile()                 # every program, before any request (the ready line's time)
    engine.start()
    result = engine.generate(Request(prompt=ids, max_tokens=32, temperature=0))   # blocking
    ticket = engine.submit([Request(...), ...], on_event)    # events: Output, Done
    engine.cancel(ticket); engine.drain(); engine.stop()

Each loop iteration of the engine's thread: sequences that arrived join a FIFO queue; up to
`max_prefills` of them are prefilled, each in the smallest length bucket that holds its prompt,
and inserted into a free slot, so a burst of arrivals cannot stall the slots that are decoding;
then one call advances every active slot `decode_steps` tokens (training/serve/programs.py runs
the programs, model/decode/slots.py is what they do). While that call runs, the host reads the
new sequences' first tokens back; then the call's tokens. It turns them into text
(training/serve/detokenize.py: whole characters, stop strings held back and cut) and hands each
sequence's new text and tokens to its `on_event` callback. A slot is freed when its sequence
samples a stop id (end-of-text, end-of-turn) or its max_tokens (both also on the device), when
a stop string appears, or when the client goes away (`cancel`). Every program is compiled
ahead of time by `compile` and called as compiled: no request can make anything recompile, and
`compiles_after_warmup` counts the programs JAX lowered in this process since (0 unless
something else does).

The KV cache is one contiguous row of `max_len` positions per slot (not paged): XLA updates it
in place, attention reads it in chunks up to the longest active position (model/kv_cache.py),
and a request needs prompt + max_tokens <= max_len. docs/performance.md has the measurements
behind that choice.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from model.config import ModelConfig
from model.decode.logits import check_settings
from model.decode.slots import MAX_STOP_IDS
from model.errors import UserError
from sharding import DEFAULT_RULES, make_mesh
from training.serve.detokenize import IncrementalText
from training.serve.programs import SlotPrograms, check_sampling
from training.serve.requests import (Collector, Done, Draining, EngineConfig, Output, QueueFull,
                                     Request, Result, TokenLogprob)
from training.serve.metrics import ServeMetrics

class Ticket:
  """A submitted group of sequences (the choices of one API request)."""

  def __init__(self, requests: Sequence[Request], on_event: Callable[[Any], None]):
    self.requests = list(requests)
    self.on_event = on_event
    self.arrived = time.perf_counter()
    self.cancelled = False
    self.unfinished = len(self.requests)


@dataclasses.dataclass
class _Sequence:
  ticket: Ticket
  index: int
  request: Request
  text: IncrementalText
  slot: int = -1
  tokens: int = 0
  last_time: float = 0.0


class Engine:
  """Continuous batching over decode slots (module docstring). `params` may be host or device
  arrays; they are placed on `mesh` (default: the first device) in the compute dtype."""

  def __init__(self, params, cfg: ModelConfig, tokenizer, config: EngineConfig = EngineConfig(),
               *, mesh=None, rules=DEFAULT_RULES, stop_ids: Sequence[int] = ()):
    max_len = config.max_len or cfg.block_size
    self.config = dataclasses.replace(config, max_len=max_len)
    check_engine_config(self.config, cfg)
    if cfg.family != "gpt":
      raise UserError(f"Serving needs a decoder-only (model.family='gpt') model, got "
                      f"{cfg.family!r}.")
    self.cfg, self.tokenizer = cfg, tokenizer
    mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.programs = SlotPrograms(params, cfg, self.config, mesh=mesh, rules=rules,
                                 stop_ids=stop_ids)
    self.stop_ids = self.programs.stop_ids
    self.buckets = self.programs.buckets
    self.metrics = ServeMetrics()
    self.metrics.set("slots", self.config.slots)
    self._lock = threading.Condition()
    self._arrivals: collections.deque[_Sequence] = collections.deque()
    self._waiting: collections.deque[_Sequence] = collections.deque()
    self._slots: list[_Sequence | None] = [None] * self.config.slots
    self._stop_mask = np.zeros(self.config.slots, bool)
    self._thread: threading.Thread | None = None
    self._running = False
    self.draining = False
    self.peak_active = 0
    self.compile_seconds = 0.0
    self.error: BaseException | None = None

  # -- lifecycle ---------------------------------------------------------------------------

  def compile(self) -> float:
    """Compiles every program (training/serve/programs.py); returns the seconds it took."""
    self.compile_seconds = self.programs.compile()
    return self.compile_seconds

  @property
  def num_programs(self) -> int:
    return self.programs.num_programs

  @property
  def compiles_after_warmup(self) -> int:
    return self.programs.compiles_after_warmup

  def start(self) -> None:
    if not self.programs.compiled:
      self.compile()
    self._running = True
    self._thread = threading.Thread(target=self._loop, name="serve-engine", daemon=True)
    self._thread.start()

  def drain(self) -> None:
    """Refuse new requests (Draining); those in flight go on."""
    with self._lock:
      self.draining = True

  @property
  def idle(self) -> bool:
    with self._lock:
      return not (self._arrivals or self._waiting or any(self._slots))

  def stop(self, timeout: float = 30.0) -> None:
    with self._lock:
      self._running = False
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)

  # -- requests ----------------------------------------------------------------------------

  def check(self, request: Request) -> None:
    """UserError naming what in `request` this engine cannot serve."""
    n, limit = len(request.prompt), self.config.max_len
    if n == 0:
      raise UserError("The prompt is empty; a prompt needs at least one token.")
    bad = [t for t in request.prompt if not 0 <= int(t) < self.cfg.vocab_size]
    if bad:
      raise UserError(f"The prompt has token id {bad[0]}, outside [0, {self.cfg.vocab_size}), "
                      f"the model's vocabulary.")
    if request.max_tokens < 0:
      raise UserError(f"max_tokens must be >= 0, got {request.max_tokens}.")
    if n + request.max_tokens > limit:
      raise UserError(f"The prompt ({n} tokens) plus max_tokens ({request.max_tokens}) is "
                      f"{n + request.max_tokens} tokens, more than the {limit} this server "
                      f"holds per sequence; shorten the prompt or lower max_tokens.")
    check_settings(request.temperature, request.top_k, request.top_p, seed=request.seed)
    if request.prompt_logprobs and not self.config.prompt_logprobs:
      raise UserError("This server does not score prompts (prompt log-probabilities).")
    if request.logprobs is not None and not 0 <= request.logprobs <= self.config.top_n:
      raise UserError(f"logprobs must be in [0, {self.config.top_n}], got {request.logprobs}.")
    if len(set(request.stop_ids) | set(self.stop_ids)) > MAX_STOP_IDS:
      raise UserError(f"At most {MAX_STOP_IDS} stop token ids, got {len(request.stop_ids)}.")

  def submit(self, requests: Sequence[Request], on_event: Callable[[Any], None]) -> Ticket:
    """Queues the sequences; `on_event` gets their Output and Done events (from the engine's
    thread). Raises UserError (a request it cannot serve), QueueFull or Draining."""
    for request in requests:
      self.check(request)
    if len(requests) > self.config.max_queue:
      raise UserError(f"{len(requests)} sequences in one request, more than the "
                      f"{self.config.max_queue} this server queues.")
    ticket = Ticket(requests, on_event)
    with self._lock:
      if self.draining or not self._running:
        raise Draining("The server is shutting down.")
      if len(self._arrivals) + len(self._waiting) + len(requests) > self.config.max_queue:
        raise QueueFull(f"{len(self._waiting) + len(self._arrivals)} sequences are waiting, "
                        f"the most this server queues is {self.config.max_queue}.")
      for i, request in enumerate(requests):
        self._arrivals.append(_Sequence(ticket, i, request, IncrementalText(
            self.tokenizer, request.prompt, request.stop)))
      self._lock.notify_all()
    return ticket

  def cancel(self, ticket: Ticket) -> None:
    """The client went away: its sequences leave the queue and their slots."""
    with self._lock:
      ticket.cancelled = True
      self._lock.notify_all()

  def generate(self, request: Request, timeout: float | None = None) -> Result:
    """Submits one request and waits for it (engine started)."""
    collected = Collector()
    self.submit([request], collected)
    if not collected.done.wait(timeout):
      raise TimeoutError(f"no answer within {timeout} s")
    if self.error is not None:
      raise RuntimeError("the engine failed") from self.error
    outputs = collected.outputs
    return Result(text="".join(o.text for o in outputs),
                  token_ids=[t for o in outputs for t in o.token_ids],
                  finish_reason=collected.finish.finish_reason,
                  logprobs=([lp for o in outputs for lp in o.logprobs]
                            if request.logprobs is not None else None),
                  prompt_logprobs=(list(outputs[0].prompt_logprobs)
                                   if request.prompt_logprobs else None))

  # -- the engine's thread -----------------------------------------------------------------

  def _loop(self) -> None:
    try:
      while True:
        with self._lock:
          while self._running and not (self._arrivals or self._waiting or any(self._slots)):
            self._lock.wait()
          if not self._running:
            return
          self._waiting.extend(self._arrivals)
          self._arrivals.clear()
        self._drop_cancelled()
        firsts = self._admit()
        decoded = None
        if any(self._slots):
          decoded = self.programs.decode(self._stop_mask,
                                         [s.request for s in self._slots if s is not None])
          self._stop_mask[:] = False
          self.metrics.add("decode_calls_total")
        # Each first token goes out as soon as its prefill is done, while the decode call
        # (dispatched after the prefills) runs.
        for seq, arrays in firsts:
          first, scored = jax.device_get(arrays)
          self._deliver(seq, [(first.token, first.logprob, first.top_ids, first.top_logprobs)],
                        time.perf_counter(), scored)
        if decoded is not None:
          self._deliver_chunk(jax.device_get(decoded), time.perf_counter())
        self._update_gauges()
    except BaseException as e:  # pylint: disable=broad-except  (report it to every waiter)
      self.error = e
      self._fail_all()
      raise

  def _drop_cancelled(self) -> None:
    with self._lock:
      self._waiting = collections.deque(s for s in self._waiting if not s.ticket.cancelled)
    for slot, seq in enumerate(self._slots):
      if seq is not None and seq.ticket.cancelled:
        self._finish(seq, "cancelled")

  def _admit(self) -> list:
    """Prefills up to max_prefills waiting sequences into free slots: [(seq, (first token,
    prompt log-probabilities or None))], device arrays."""
    out = []
    while self._waiting and len(out) < self.config.max_prefills and None in self._slots:
      with self._lock:
        seq = self._waiting.popleft()
      slot = self._slots.index(None)
      seq.slot = slot
      self._slots[slot] = seq  # first: should the prefill fail, _fail_all answers it too
      first, scored = self.programs.prefill(slot, seq.request)
      self._stop_mask[slot] = False
      self.metrics.add("prefills_total")
      self.metrics.add("prompt_tokens_total", len(seq.request.prompt))
      out.append((seq, (first, scored)))
    return out

  def _deliver_chunk(self, decoded, now: float) -> None:
    for slot, seq in enumerate(list(self._slots)):
      if seq is None:
        continue
      emitted = decoded.emitted[slot]
      steps = [(decoded.token[slot, c], decoded.logprob[slot, c], decoded.top_ids[slot, c],
                decoded.top_logprobs[slot, c]) for c in np.flatnonzero(emitted)]
      if steps:
        self._deliver(seq, steps, now, None)

  def _deliver(self, seq: _Sequence, steps, now: float, scored) -> None:
    """Hands the sampled tokens `steps` [(token, logprob, top ids, top logprobs)] of `seq` to
    its client, up to where it finishes, and frees its slot if it does."""
    request, ticket = seq.request, seq.ticket
    k = request.logprobs
    text, ids, logprobs, finish = [], [], [], None
    if request.max_tokens == 0:  # scoring the prompt only: the sampled token is dropped
      steps, finish = [], "length"
    for token, logprob, top_ids, top_lps in steps:
      token = int(token)
      seq.tokens += 1
      ids.append(token)
      if k is not None:
        logprobs.append(_token_logprob(token, logprob, top_ids[:k], top_lps[:k]))
      if token in request.stop_ids or token in self.stop_ids:
        finish = "stop"
        break
      text.append(seq.text.push(token))
      if seq.text.stopped:
        finish = "stop"
        break
      if seq.tokens >= request.max_tokens:
        finish = "length"
        break
    if finish is not None:
      text.append(seq.text.finish())
    if seq.last_time == 0.0:
      self.metrics.observe("time_to_first_token_seconds", now - ticket.arrived)
    elif ids:
      self.metrics.observe("inter_token_latency_seconds", (now - seq.last_time) / len(ids),
                           len(ids))
    seq.last_time = now
    self.metrics.add("generated_tokens_total", len(ids))
    prompt_lps = None
    if scored is not None:
      prompt_lps = (None,) + tuple(
          _token_logprob(t, lp, top_i[:k or 0], top_v[:k or 0]) for t, lp, top_i, top_v in zip(
              request.prompt[1:], scored.logprob_P, scored.top_ids_PN, scored.top_logprobs_PN))
    if not ticket.cancelled:
      ticket.on_event(Output(seq.index, "".join(text), tuple(ids),
                             tuple(logprobs) if k is not None else None, prompt_lps))
    if finish is not None:
      self._finish(seq, finish)

  def _finish(self, seq: _Sequence, reason: str) -> None:
    if seq.slot >= 0 and self._slots[seq.slot] is seq:
      self._slots[seq.slot] = None
      self._stop_mask[seq.slot] = True
    ticket = seq.ticket
    ticket.unfinished -= 1
    self.metrics.add("requests_total", reason=reason)
    if ticket.unfinished == 0 and reason != "cancelled":
      self.metrics.observe("request_latency_seconds", time.perf_counter() - ticket.arrived)
    if not ticket.cancelled:
      ticket.on_event(Done(seq.index, reason, len(seq.request.prompt), seq.tokens))

  def _update_gauges(self) -> None:
    active = sum(s is not None for s in self._slots)
    self.peak_active = max(self.peak_active, active)
    self.metrics.set("active_slots", active)
    self.metrics.set("peak_active_slots", self.peak_active)
    with self._lock:
      self.metrics.set("queue_depth", len(self._waiting) + len(self._arrivals))
    self.metrics.add("compiles_after_warmup_total",
                     self.compiles_after_warmup - self.metrics.value(
                         "compiles_after_warmup_total"))

  def _fail_all(self) -> None:
    with self._lock:
      waiting = list(self._waiting) + list(self._arrivals)
      self._waiting.clear()
      self._arrivals.clear()
      self._running = False
    for seq in waiting + [s for s in self._slots if s is not None]:
      if not seq.ticket.cancelled:
        seq.ticket.on_event(Done(seq.index, "error", len(seq.request.prompt), seq.tokens))
    self._slots = [None] * self.config.slots


def _token_logprob(token, logprob, top_ids, top_logprobs) -> TokenLogprob:
  return TokenLogprob(int(token), float(logprob),
                      tuple((int(i), float(lp)) for i, lp in zip(top_ids, top_logprobs)))


def check_engine_config(config: EngineConfig, cfg: ModelConfig) -> None:
  """UserError naming a setting outside what the model allows."""
  for name in ("slots", "decode_steps", "max_prefills", "max_queue"):
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"{name} must be a positive integer, got {value!r}.")
  if not 2 <= config.max_len <= cfg.block_size:
    raise UserError(f"max_len must be in [2, block_size = {cfg.block_size}], got "
                    f"{config.max_len}.")
  if not 1 <= config.top_n <= min(cfg.vocab_size, 100):
    raise UserError(f"top_n must be in [1, {min(cfg.vocab_size, 100)}], got {config.top_n}.")
  check_sampling(config.sampling)
