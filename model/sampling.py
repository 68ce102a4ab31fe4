"""The jitted KV-cache generate loop (logits processing: model/logits.py).

`generate` right-pads the prompts, prefills them in one forward pass into a fixed-size KV cache
(`model.transformer.init_cache`), then runs the whole decode loop as one jitted
`lax.while_loop` that stops when every row has produced `eot_id` or `max_new_tokens` tokens.
Each iteration is `decode_step`: one token per row through the model, whose layers write their
keys and values into the carried cache in place and read back only the filled chunks
(model/transformer.py's `cached_attention`), then one sampled token per row.
Row b's prompt fills cache slots 0..n_b-1 (its padding fills n_b..P-1 with garbage); its first
new token is fed at position n_b, whose cache write overwrites the garbage slot before any query
attends to it, and a query at position t only attends to slots <= t, so the padding is never
seen. Shapes are rounded up to buckets (`choose_buckets`, or fixed ones passed as `buckets`)
so that new prompts, batch sizes or token counts within a bucket reuse the compiled prefill and
decode functions. The sampling mode (greedy, temperature only, or with top-k / top-p) is
compiled in (at most three variants per bucket); within a mode the temperature, top_k, top_p
values, the seed, eot_id and max_new_tokens are traced and never recompile.
`generate_stream` runs the same compiled decode loop in chunks.

Randomness: row b's token at step i is drawn with fold_in(fold_in(key(seed), b), i), so a row's
samples depend on (seed, row index, step) and not on the bucket sizes.
There is no sliding window: prompt + max_new_tokens must fit in cfg.block_size (crop the
prompt yourself if needed). `check_settings` and `check_prompt` are the checks `generate` makes;
`launch.sample` makes the same ones (with "--" before each name) before it loads any weights.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.logits import (is_python_number, check_settings, filter_logits, sample_filtered,
                          sample_token, static_mode)
from model.transformer import GPT, Cache, convert_layout, init_cache, logits_from_hidden

__all__ = ["Buckets", "GenerateResult", "check_prompt", "check_settings", "choose_buckets",
           "filter_logits", "generate", "generate_stream", "sample_token"]

# Smallest buckets (powers of two) for the padded prompt and the output buffer.
MIN_PROMPT_BUCKET = 8
MIN_OUTPUT_BUCKET = 8


def _tokens(n: int) -> str:
  return f"{n} token" if n == 1 else f"{n} tokens"


def check_prompt(ids: Sequence[int], *, vocab_size: int, block_size: int,
                 max_new_tokens: int | None, name: str = "The prompt", prefix: str = "") -> None:
  """Raises UserError if the token ids `ids` cannot be continued: empty, an id outside
  [0, vocab_size), or prompt + max_new_tokens beyond block_size (with max_new_tokens None: no
  room for one new token). `name` says which prompt ("Prompt 2", "The prompt 'ROMEO:'")."""
  ids = np.asarray(ids)
  if ids.size == 0:
    raise UserError(f"{name} is empty; a prompt needs at least one token.")
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise UserError(f"{name} has token id {int(bad[0])}, outside [0, {vocab_size}), the "
                    f"model's vocabulary.")
  n = int(ids.size)
  if max_new_tokens is None and n >= block_size:
    raise UserError(f"{name} ({_tokens(n)}) leaves no room for new tokens in the model's "
                    f"block_size ({block_size}).")
  if max_new_tokens is not None and n + max_new_tokens > block_size:
    raise UserError(f"{name} ({_tokens(n)}) plus {prefix}max_new_tokens ({max_new_tokens}) is "
                    f"{n + max_new_tokens}, more than the model's block_size ({block_size}); "
                    f"shorten the prompt or ask for fewer tokens (there is no sliding window).")


# ---------------------------------------------------------------------------------------------
# Generation


class Buckets(NamedTuple):
  """Padded shapes of one generate call: the compiled functions are reused for all calls with
  the same buckets (and the same model and params shapes)."""
  batch: int       # rows (extra rows are dummies, stopped from the start)
  prompt_len: int  # P: prompt tokens fed to the prefill
  cache_len: int   # S: KV-cache slots
  out_len: int     # M: output buffer length (>= max_new_tokens)


def _next_pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def choose_buckets(batch_size: int, max_prompt_len: int, max_new_tokens: int,
                   block_size: int) -> Buckets:
  """Powers of two (at least MIN_*_BUCKET), the cache capped at block_size and the prompt at
  the cache, so that prompt + new tokens always fit."""
  cache_len = min(_next_pow2(max_prompt_len + max_new_tokens), block_size)
  return Buckets(
      batch=_next_pow2(batch_size),
      prompt_len=min(_next_pow2(max(max_prompt_len, MIN_PROMPT_BUCKET)), cache_len),
      cache_len=cache_len,
      out_len=min(_next_pow2(max(max_new_tokens, MIN_OUTPUT_BUCKET)), block_size))


class SamplingSettings(NamedTuple):
  """Traced scalars of a generate call (changing them does not recompile)."""
  temperature: jax.Array  # float32
  top_k: jax.Array        # int32
  top_p: jax.Array        # float32
  eot_id: jax.Array       # int32, -1 for none


class DecodeState(NamedTuple):
  cache: Cache           # {"k", "v"}: [L, B, S, H*K] (model/kv_cache.py)
  token_B: jax.Array     # the last sampled token of each row (fed at the next step)
  position_B: jax.Array  # where token_B goes in the cache
  done_B: jax.Array      # row has produced eot (or is a batch-padding dummy)
  out_BM: jax.Array      # sampled tokens; columns >= step are unused
  step: jax.Array        # number of tokens sampled so far (prefill samples the first)
  row_keys_B: jax.Array  # per-row PRNG keys


def _sample_rows(row_keys_B, step, logits_BV, settings: SamplingSettings, mode: int,
                 vocab_size: int):
  """Row b's token from logits_BV[b] with key fold_in(row_keys_B[b], step)."""
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, step)
  sample = functools.partial(sample_filtered, temperature=settings.temperature, top_k=settings.top_k,
                             top_p=settings.top_p, mode=mode, vocab_size=vocab_size)
  return jax.vmap(sample)(keys_B, logits_BV)


@functools.partial(jax.jit, static_argnames=("cfg", "mode", "cache_len", "out_len"))
def _prefill(params, tokens_BP, lengths_B, active_B, seed, settings: SamplingSettings, *,
             cfg: ModelConfig, mode: int, cache_len: int, out_len: int) -> DecodeState:
  """Runs the right-padded prompts through the model and samples each row's first token."""
  B = tokens_BP.shape[0]
  cache = init_cache(cfg, B, cache_len)
  hidden_BPD, cache = GPT(cfg).apply({"params": params}, tokens_BP, cache=cache,
                                     return_hidden=True)
  last_B1D = jnp.take_along_axis(hidden_BPD, (lengths_B - 1)[:, None, None], axis=1)
  logits_BV = logits_from_hidden(params, cfg, last_B1D)[:, 0]
  row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      jax.random.key(seed), jnp.arange(B))
  token_B = _sample_rows(row_keys_B, 0, logits_BV, settings, mode, cfg.vocab_size)
  return DecodeState(
      cache=cache, token_B=token_B, position_B=lengths_B,
      done_B=~active_B | (token_B == settings.eot_id),
      out_BM=jnp.zeros((B, out_len), jnp.int32).at[:, 0].set(token_B),
      step=jnp.ones((), jnp.int32), row_keys_B=row_keys_B)


def decode_step(params, state: DecodeState, settings: SamplingSettings, *, cfg: ModelConfig,
                mode: int, cache_chunks: int | None = None) -> DecodeState:
  """One decode-loop iteration: feeds each row's last token at its position (its keys and
  values written into state.cache in place) and samples the next. `cache_chunks` as in
  model.transformer.GPT (static, for measurements; by default attention reads the cache up to
  the longest row's position)."""
  logits_B1V, cache = GPT(cfg, cache_chunks=cache_chunks).apply(
      {"params": params}, state.token_B[:, None], positions_BT=state.position_B[:, None],
      cache=state.cache)
  token_B = _sample_rows(state.row_keys_B, state.step, logits_B1V[:, 0], settings, mode,
                         cfg.vocab_size)
  token_B = jnp.where(state.done_B, 0, token_B)
  return DecodeState(
      cache=cache, token_B=token_B, position_B=state.position_B + 1,
      done_B=state.done_B | (token_B == settings.eot_id),
      out_BM=jax.lax.dynamic_update_slice(state.out_BM, token_B[:, None], (0, state.step)),
      step=state.step + 1, row_keys_B=state.row_keys_B)


@functools.partial(jax.jit, static_argnames=("cfg", "mode"), donate_argnames=("state",))
def _decode(params, state: DecodeState, stop_at, settings: SamplingSettings, *,
            cfg: ModelConfig, mode: int) -> DecodeState:
  """Samples tokens until `state.step == stop_at` or every row is done: one while_loop."""
  def keep_going(s: DecodeState):
    return (s.step < stop_at) & ~jnp.all(s.done_B)

  step = functools.partial(decode_step, params, settings=settings, cfg=cfg, mode=mode)
  return jax.lax.while_loop(keep_going, step, state)


@dataclasses.dataclass(frozen=True)
class GenerateResult:
  tokens: list[list[int]]  # per row: the new tokens, cut at the first eot_id
  stopped: list[bool]      # per row: whether it produced eot_id
  decode_steps: int        # decode-loop iterations run (forward passes after the prefill)
  seconds: float           # wall time of prefill + decode (including compilation, if any)
  buckets: Buckets

  @property
  def num_tokens(self) -> int:
    return sum(len(t) for t in self.tokens)


def _validate(cfg: ModelConfig, prompts, max_new_tokens, eot_id, temperature, top_k, top_p,
              seed):
  for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
    if not is_python_number(value):
      raise UserError(f"{name} must be a Python number, got {value!r}.")
  check_settings(temperature, top_k, top_p, max_new_tokens=max_new_tokens, seed=seed)
  if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or not len(prompts):
    raise UserError("prompts must be a non-empty list of token-id lists.")
  rows = []
  for b, prompt in enumerate(prompts):
    row = np.asarray(prompt)
    if row.ndim != 1:
      raise UserError(f"Prompt {b} is not a flat list of token ids.")
    if row.size and not np.issubdtype(row.dtype, np.integer):
      raise UserError(f"Prompt {b} must hold integer token ids, got dtype {row.dtype}.")
    check_prompt(row, vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                 max_new_tokens=max_new_tokens, name=f"Prompt {b}")
    rows.append(row.astype(np.int32))
  if eot_id is not None and not 0 <= eot_id < cfg.vocab_size:
    raise UserError(f"eot_id must be a token id in [0, {cfg.vocab_size}), got {eot_id!r}.")
  return rows


def _check_buckets(buckets: Buckets, cfg: ModelConfig, batch: int, longest: int,
                   max_new_tokens: int) -> None:
  needed = Buckets(batch, longest, longest + max_new_tokens, max_new_tokens)
  small = [f"{name} {have} < {need}" for name, have, need in zip(Buckets._fields, buckets, needed)
           if have < need]
  if small:
    raise UserError(f"buckets {tuple(buckets)} are too small for this request: "
                    f"{', '.join(small)}.")
  if buckets.cache_len > cfg.block_size or buckets.prompt_len > buckets.cache_len:
    raise UserError(f"buckets {tuple(buckets)} need prompt_len <= cache_len <= block_size "
                    f"({cfg.block_size}).")


class _Run(NamedTuple):
  state: DecodeState
  settings: SamplingSettings
  mode: int
  buckets: Buckets
  batch: int  # real rows


def _start(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
           buckets) -> _Run:
  """Validates, pads to buckets and prefills. `params` are already in cfg's layer layout."""
  rows = _validate(cfg, prompts, max_new_tokens, eot_id, temperature, top_k, top_p, seed)
  longest = max(len(r) for r in rows)
  if buckets is None:
    buckets = choose_buckets(len(rows), longest, max_new_tokens, cfg.block_size)
  buckets = Buckets(*buckets)
  _check_buckets(buckets, cfg, len(rows), longest, max_new_tokens)
  tokens_BP = np.zeros((buckets.batch, buckets.prompt_len), np.int32)
  lengths_B = np.ones(buckets.batch, np.int32)  # dummy rows: one token 0
  for b, row in enumerate(rows):
    tokens_BP[b, :len(row)] = row
    lengths_B[b] = len(row)
  active_B = np.arange(buckets.batch) < len(rows)
  settings = SamplingSettings(
      temperature=jnp.asarray(temperature, jnp.float32), top_k=jnp.asarray(top_k, jnp.int32),
      top_p=jnp.asarray(top_p, jnp.float32),
      eot_id=jnp.asarray(-1 if eot_id is None else eot_id, jnp.int32))
  mode = static_mode(temperature, top_k, top_p)
  state = _prefill(params, tokens_BP, lengths_B, active_B, jnp.asarray(seed, jnp.uint32),
                   settings, cfg=cfg, mode=mode, cache_len=buckets.cache_len,
                   out_len=buckets.out_len)
  return _Run(state, settings, mode, buckets, len(rows))


def _cut_rows(out_bm: np.ndarray, eot_id, include_eot: bool):
  """Host side: each row's tokens up to its first eot_id, and whether it had one."""
  tokens, stopped = [], []
  for row in out_bm.tolist():
    if eot_id is not None and eot_id in row:
      row = row[:row.index(eot_id) + int(include_eot)]
      stopped.append(True)
    else:
      stopped.append(False)
    tokens.append(row)
  return tokens, stopped


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eot_id: int | None = None, include_eot: bool = False,
             buckets: Buckets | None = None) -> GenerateResult:
  """Continues each prompt (a list of token ids; lengths may differ) by up to max_new_tokens.

  temperature 0 is greedy; top_k / top_p as in `filter_logits`. A row stops after it produces
  `eot_id` (kept in its tokens if include_eot), and the loop ends once every row has stopped.
  `params` may be in either layer layout (converted to `cfg.scan_layers`' if needed).
  `buckets` fixes the padded shapes (e.g. `choose_buckets` of the largest request a server
  expects, so that it compiles once); by default `choose_buckets` picks them per call.
  Raises ValueError for empty prompts, when the longest prompt + max_new_tokens exceeds
  cfg.block_size, or when given buckets are too small.
  """
  start = time.perf_counter()
  params = convert_layout(params, cfg)
  run = _start(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
               buckets)
  state = _decode(params, run.state, jnp.asarray(max_new_tokens, jnp.int32), run.settings,
                  cfg=cfg, mode=run.mode)
  step = int(state.step)
  out_bm = np.asarray(state.out_BM[:run.batch, :step])
  seconds = time.perf_counter() - start
  tokens, stopped = _cut_rows(out_bm, eot_id, include_eot)
  return GenerateResult(tokens=tokens, stopped=stopped, decode_steps=step - 1, seconds=seconds,
                        buckets=run.buckets)


def generate_stream(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, chunk_size: int = 16, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    eot_id: int | None = None, include_eot: bool = False,
                    buckets: Buckets | None = None) -> Iterator[list[list[int]]]:
  """Like `generate`, but yields each row's tokens that are new since the last yield (an
  empty list for rows with nothing new): once after the prefill, then after every
  `chunk_size` decode steps (one call each of the same compiled loop as `generate`). The
  concatenated chunks equal `generate`'s tokens for the same arguments."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise UserError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
  params = convert_layout(params, cfg)
  # Validation and prefill happen here, before the first next().
  run = _start(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
               buckets)
  return _stream(params, cfg, run, max_new_tokens, chunk_size, eot_id, include_eot)


def _stream(params, cfg, run: _Run, max_new_tokens, chunk_size, eot_id,
            include_eot) -> Iterator[list[list[int]]]:
  state, emitted = run.state, [0] * run.batch
  while True:
    step = int(state.step)
    tokens, _ = _cut_rows(np.asarray(state.out_BM[:run.batch, :step]), eot_id, include_eot)
    yield [row[n:] for row, n in zip(tokens, emitted)]
    emitted = [len(row) for row in tokens]
    if step >= max_new_tokens or bool(jnp.all(state.done_B)):
      return
    stop_at = jnp.asarray(min(step + chunk_size, max_new_tokens), jnp.int32)
    state = _decode(params, state, stop_at, run.settings, cfg=cfg, mode=run.mode)
