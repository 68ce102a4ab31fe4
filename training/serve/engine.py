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
and inserted into a free slot (model/decode/slots.py), so a burst of arrivals cannot stall the
slots that are decoding; then one call advances every active slot `decode_steps` tokens. The
host reads the tokens back, turns them into text (training/serve/detokenize.py: whole
characters, stop strings held back and cut) and hands each sequence's new text and tokens to
its `on_event` callback. A slot is freed when its sequence samples a stop id (end-of-text,
end-of-turn) or its max_tokens (both also on the device), when a stop string appears, or when
the client goes away (`cancel`). Every program is compiled ahead of time by `compile` and
called as compiled: no request can make anything recompile, and `compiles_after_warmup` counts
the programs JAX lowered in this process since (0 unless something else does).

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
from model.decode.sampling import cache_chunks_for
from model.decode.slots import MAX_STOP_IDS, Admit, decode_chunk, init_slots, prefill_insert
from model.errors import UserError
from model.decode.logits import GREEDY, PLAIN, SORTED, TOP_K, check_settings, static_mode
from sharding import DEFAULT_RULES, activate, make_mesh, place_params
from training.serve.detokenize import IncrementalText
from training.serve.requests import (Collector, Done, Draining, EngineConfig, Output, QueueFull,
                                     Request, Result, TokenLogprob)
from training.serve.metrics import ServeMetrics

MIN_BUCKET = 16  # the smallest prompt bucket (powers of two up to max_len)
VARIANTS = (GREEDY, PLAIN, TOP_K, SORTED)


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


def prompt_buckets(max_len: int) -> list[int]:
  """Prompt lengths compiled: powers of two from MIN_BUCKET, and max_len."""
  buckets, b = [], MIN_BUCKET
  while b < max_len:
    buckets.append(b)
    b *= 2
  return buckets + [max_len]


class _CompileCounter:
  """Programs JAX lowers in this process (every compile lowers first, also a cache hit)."""
  count = 0
  _registered = False

  @classmethod
  def register(cls) -> None:
    if not cls._registered:
      jax.monitoring.register_event_duration_secs_listener(cls._on_event)
      cls._registered = True

  @classmethod
  def _on_event(cls, event: str, *_args, **_kwargs) -> None:
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      cls.count += 1


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
    self.mesh = mesh if mesh is not None else make_mesh(1, 1, 1, devices=jax.devices()[:1])
    self.rules = rules
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, cfg.compute_dtype), params)
    self.params = place_params(params, cfg, self.mesh, rules)
    self.stop_ids = tuple(int(i) for i in stop_ids if 0 <= i < cfg.vocab_size)
    self.buckets = prompt_buckets(max_len)
    self.metrics = ServeMetrics()
    self.metrics.set("slots", self.config.slots)
    self._programs: dict[Any, Any] = {}
    self._state = None
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
    self._compiles_at_ready: int | None = None
    self.error: BaseException | None = None

  # -- lifecycle ---------------------------------------------------------------------------

  def compile(self) -> float:
    """Compiles every program (the slots, a prefill per bucket with and without prompt
    log-probabilities, the decode call); returns the seconds it took."""
    _CompileCounter.register()
    start = time.perf_counter()
    cfg, c = self.cfg, self.config
    with activate(self.mesh, self.rules):
      self._state = init_slots(cfg, c.slots, c.max_len)
      admit = _admit_arrays(0, 1, Request(prompt=[0], max_tokens=1), ())
      for bucket in self.buckets:
        for scored in (False, True)[:1 + c.prompt_logprobs]:
          self._programs[bucket, scored] = prefill_insert.lower(
              self.params, self._state, np.zeros(bucket, np.int32), admit, cfg=cfg,
              top_n=c.top_n, prompt_logprobs=scored).compile()
      for mode in VARIANTS:  # the sampling variants (model/decode/logits.py), cheapest first
        self._programs["decode", mode] = decode_chunk.lower(
            self.params, self._state, np.zeros(c.slots, bool), cfg=cfg, steps=c.decode_steps,
            top_n=c.top_n, cache_chunks=cache_chunks_for("auto", c.max_len),
            mode=mode).compile()
    self.compile_seconds = time.perf_counter() - start
    self._compiles_at_ready = _CompileCounter.count
    return self.compile_seconds

  @property
  def num_programs(self) -> int:
    return len(self._programs)

  @property
  def compiles_after_warmup(self) -> int:
    return 0 if self._compiles_at_ready is None else (
        _CompileCounter.count - self._compiles_at_ready)

  def start(self) -> None:
    if self._compiles_at_ready is None:
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
          self._state, decoded = self._programs["decode", self._variant()](
              self.params, self._state, self._stop_mask)
          self._stop_mask[:] = False
          self.metrics.add("decode_calls_total")
        arrays, decoded = jax.device_get(([a for _, a in firsts], decoded))
        now = time.perf_counter()
        for (seq, _), (first, scored) in zip(firsts, arrays):
          self._deliver(seq, [(first.token, first.logprob, first.top_ids, first.top_logprobs)],
                        now, scored)
        if decoded is not None:
          self._deliver_chunk(decoded, now)
        self._update_gauges()
    except BaseException as e:  # pylint: disable=broad-except  (report it to every waiter)
      self.error = e
      self._fail_all()
      raise

  def _variant(self) -> int:
    """The cheapest sampling variant that serves every busy slot (static_mode)."""
    busy = [s.request for s in self._slots if s is not None]
    return static_mode(np.array([r.temperature for r in busy], np.float32),
                       np.array([r.top_k for r in busy], np.int32),
                       np.array([r.top_p for r in busy], np.float32))

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
      request = seq.request
      n = len(request.prompt)
      bucket = next(b for b in self.buckets if b >= n)
      tokens = np.zeros(bucket, np.int32)
      tokens[:n] = request.prompt
      admit = _admit_arrays(slot, n, request, self.stop_ids)
      scored = None
      program = self._programs[bucket, request.prompt_logprobs]
      if request.prompt_logprobs:
        self._state, first, scored = program(self.params, self._state, tokens, admit)
      else:
        self._state, first = program(self.params, self._state, tokens, admit)
      seq.slot = slot
      self._slots[slot] = seq
      self._stop_mask[slot] = False
      self.metrics.add("prefills_total")
      self.metrics.add("prompt_tokens_total", n)
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


def _admit_arrays(slot: int, length: int, request: Request, engine_stop_ids) -> Admit:
  stops = sorted(set(request.stop_ids) | set(engine_stop_ids))
  stop_E = np.full(MAX_STOP_IDS, -1, np.int32)
  stop_E[:len(stops)] = stops
  return Admit(slot=np.int32(slot), length=np.int32(length),
               max_tokens=np.int32(request.max_tokens), seed=np.uint32(request.seed),
               choice=np.int32(request.choice), temperature=np.float32(request.temperature),
               top_k=np.int32(request.top_k), top_p=np.float32(request.top_p), stop_E=stop_E)


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
