"""The device side of a serving engine: the decode slots' state (model/decode/slots.py) and every
program that advances it, compiled before the first request. training/serve/engine.py decides
which sequence goes where and when; this file only runs what it is told.

    programs = SlotPrograms(params, cfg, config, mesh=mesh, stop_ids=(eot,))
    seconds = programs.compile()
    first, scored = programs.prefill(slot, request)   # device arrays; scored: None unless the
                                                       # request scores its prompt
    decoded = programs.decode(stop_B, busy_requests)  # Sampled [slots, decode_steps]

The programs: a prefill per prompt-length bucket (powers of two from MIN_BUCKET, and max_len),
without and (config.prompt_logprobs) with the prompt's log-probabilities, and the decode call in
each sampling variant of config.sampling (model/decode/logits.py: greedy, plain, top_k, sorted;
sorted serves any request). `decode` runs the cheapest compiled variant that serves every busy
slot. They are called as compiled, so no request can make anything recompile;
`compiles_after_warmup` counts the programs JAX lowered in this process since `compile` (0
unless something does).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import numpy as np

from model.config import ModelConfig
from model.decode.logits import SORTED, VARIANTS, static_mode
from model.decode.sampling import cache_chunks_for
from model.decode.slots import MAX_STOP_IDS, Admit, decode_chunk, init_slots, prefill_insert
from model.errors import UserError
from sharding import DEFAULT_RULES, activate, place_params
from sharding.mesh import is_cpu
from training.serve.requests import EngineConfig, Request

MIN_BUCKET = 16  # the smallest prompt bucket (powers of two up to max_len)


def prompt_buckets(max_len: int) -> list[int]:
  """Prompt lengths compiled: powers of two from MIN_BUCKET, and max_len."""
  buckets, b = [], MIN_BUCKET
  while b < max_len:
    buckets.append(b)
    b *= 2
  return buckets + [max_len]


def check_sampling(sampling: Sequence[str], name: str = "sampling") -> None:
  """UserError unless `sampling` names decode variants including "sorted" (which serves any
  request, so every request has a compiled variant)."""
  unknown = [v for v in sampling if v not in VARIANTS]
  if unknown or VARIANTS[SORTED] not in sampling:
    raise UserError(f"{name} must name some of the decode variants {', '.join(VARIANTS)}, "
                    f"{VARIANTS[SORTED]} among them (it serves any request), got "
                    f"{','.join(sampling) or '(none)'!r}.")


class CompileCounter:
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


class SlotPrograms:
  """The slots' state and programs (module docstring). `params` (host or device arrays) are
  placed on `mesh` in the compute dtype; the slots split over its data axis like a batch."""

  def __init__(self, params, cfg: ModelConfig, config: EngineConfig, *, mesh,
               rules=DEFAULT_RULES, stop_ids: Sequence[int] = ()):
    self.cfg, self.config, self.mesh, self.rules = cfg, config, mesh, rules
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, cfg.compute_dtype), params)
    self.params = place_params(params, cfg, mesh, rules)
    self.stop_ids = tuple(int(i) for i in stop_ids if 0 <= i < cfg.vocab_size)
    self.buckets = prompt_buckets(config.max_len)
    self.variants = sorted(VARIANTS.index(v) for v in config.sampling)
    # Several CPU devices in one process: one program at a time (XLA:CPU can deadlock when
    # queued programs' collectives meet out of order; training/loop.py does the same).
    self._one_at_a_time = is_cpu(mesh) and mesh.devices.size > 1
    self._programs: dict[Any, Any] = {}
    self._state = None
    self._compiles_at_ready: int | None = None

  def compile(self) -> float:
    """Compiles every program; returns the seconds it took."""
    CompileCounter.register()
    start = time.perf_counter()
    cfg, c = self.cfg, self.config
    with activate(self.mesh, self.rules):
      self._state = init_slots(cfg, c.slots, c.max_len)
      admit = admit_arrays(0, 1, Request(prompt=[0], max_tokens=1), ())
      for bucket in self.buckets:
        for scored in (False, True)[:1 + c.prompt_logprobs]:
          self._programs[bucket, scored] = prefill_insert.lower(
              self.params, self._state, np.zeros(bucket, np.int32), admit, cfg=cfg,
              top_n=c.top_n, prompt_logprobs=scored).compile()
      for mode in self.variants:
        self._programs["decode", mode] = decode_chunk.lower(
            self.params, self._state, np.zeros(c.slots, bool), cfg=cfg, steps=c.decode_steps,
            top_n=c.top_n, cache_chunks=cache_chunks_for("auto", c.max_len),
            mode=mode).compile()
    self._compiles_at_ready = CompileCounter.count
    return time.perf_counter() - start

  @property
  def compiled(self) -> bool:
    return self._compiles_at_ready is not None

  @property
  def num_programs(self) -> int:
    return len(self._programs)

  @property
  def compiles_after_warmup(self) -> int:
    return 0 if self._compiles_at_ready is None else (
        CompileCounter.count - self._compiles_at_ready)

  def prefill(self, slot: int, request: Request):
    """Prefills `request`'s prompt into `slot` and samples its first token: (Sampled of
    scalars, PromptLogprobs or None), device arrays."""
    n = len(request.prompt)
    bucket = next(b for b in self.buckets if b >= n)
    tokens = np.zeros(bucket, np.int32)
    tokens[:n] = request.prompt
    program = self._programs[bucket, request.prompt_logprobs]
    out = program(self.params, self._state, tokens, admit_arrays(slot, n, request,
                                                                 self.stop_ids))
    self._state, first, scored = out if request.prompt_logprobs else (*out, None)
    self._wait(first)
    return first, scored

  def decode(self, stop_B: np.ndarray, busy: Sequence[Request]):
    """Stops the slots stop_B says, then advances every active slot decode_steps tokens with
    the cheapest compiled variant that serves every request in `busy`: Sampled [slots, steps],
    device arrays."""
    need = static_mode(np.array([r.temperature for r in busy], np.float32),
                       np.array([r.top_k for r in busy], np.int32),
                       np.array([r.top_p for r in busy], np.float32))
    mode = next(m for m in self.variants if m >= need)
    self._state, decoded = self._programs["decode", mode](self.params, self._state, stop_B)
    self._wait(decoded)
    return decoded

  def _wait(self, out) -> None:
    if self._one_at_a_time:
      jax.block_until_ready(out)


def admit_arrays(slot: int, length: int, request: Request, engine_stop_ids) -> Admit:
  stops = sorted(set(request.stop_ids) | set(engine_stop_ids))
  stop_E = np.full(MAX_STOP_IDS, -1, np.int32)
  stop_E[:len(stops)] = stops
  return Admit(slot=np.int32(slot), length=np.int32(length),
               max_tokens=np.int32(request.max_tokens), seed=np.uint32(request.seed),
               choice=np.int32(request.choice), temperature=np.float32(request.temperature),
               top_k=np.int32(request.top_k), top_p=np.float32(request.top_p), stop_E=stop_E)
