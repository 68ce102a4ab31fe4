"""The jitted KV-cache generate loop (logits processing: model/decode/logits.py).

`generate` right-pads the prompts, prefills them in one forward pass into a fixed-size KV cache
(`model.kv_cache.init_cache`), then runs the whole decode loop as one jitted
`lax.while_loop` that stops when every row has produced `eot_id` or `max_new_tokens` tokens.
Each iteration samples DECODE_CHUNK tokens (a static inner loop, so the loop's test, which a GPU
copies to the host, runs once per chunk; steps after the work is done change nothing), each a
`decode_step`: one token per row through the model, whose layers write their keys and values
into the carried cache in place and read back the filled chunks (model/kv_cache.py's
`cached_attention`; on a GPU every chunk, a fixed count: `cache_reads`), then one sampled token
per row.
Row b's prompt fills cache slots 0..n_b-1 (its padding fills n_b..P-1 with garbage); its first
new token is fed at position n_b, whose cache write overwrites the garbage slot before any query
attends to it, and a query at position t only attends to slots <= t, so the padding is never
seen. Shapes are rounded up to buckets (`choose_buckets`, or fixed ones passed as `buckets`)
so that new prompts, batch sizes or token counts within a bucket reuse the compiled prefill and
decode functions. The sampling mode (greedy, temperature only, or with top-k / top-p) is
compiled in (at most three variants per bucket); within a mode the temperature, top_k, top_p
values, the seed, eot_id and max_new_tokens are traced and never recompile.
`generate_stream` runs the same compiled decode loop in chunks. A prefix-LM (cfg.prefix_lm)
prefills each prompt seeing itself both ways, as its prefix in training (a moved window below is
re-read causally).

Randomness: row b's token at step i is drawn with fold_in(fold_in(key(seed), b), i), so a row's
samples depend on (seed, row index, step) and not on the bucket sizes.

Past the context window. A prompt must fit in the block size T, but max_new_tokens need not.
Until a row's prompt + new tokens reach T, every token sees all the tokens before it. After
that, with W = `window_shift` (default T // 4; 1 is nanoGPT's rule):

    the token at index n of the row's sequence (prompt + new tokens) is predicted from the
    tokens [w, n), where w starts at 0 and, whenever n - w would exceed T, becomes
    n - (T - W + 1).

So each token sees between T - W + 1 and T tokens, and with W = 1 exactly the last T (what
nanoGPT's sample.py does by cropping to the last block_size tokens). Learned and sinusoidal
positions are absolute, so a cache written at one window's positions cannot serve the next:
when a row's window moves (its next position would be T), `_restart` re-reads its last
T - W + 1 tokens at positions 0.. into its cache rows (a prefill) and samples from them, in the
same step in which the other rows decode as usual; the W - 1 tokens after it reuse that cache.
The decode loop stops at such a step, so the generation is one jitted loop per window.
`window_start` is the rule as a function. `check_settings` and `check_prompt` are the checks
`generate` makes; `launch.sample` makes the same ones (with "--" before each name) before it
loads any weights.
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
from model.decode.logits import (check_settings, filter_logits, is_python_number,
                                 sample_filtered, sample_token, static_mode)
from model.gpt import GPT, logits_from_hidden
from model.kv_cache import Cache, cache_chunk_size, init_cache
from model.layout import convert_layout

__all__ = ["Buckets", "GenerateResult", "check_prompt", "check_settings", "check_window_shift",
           "choose_buckets", "filter_logits", "generate", "generate_stream", "sample_token",
           "window_start"]

# Smallest buckets (powers of two) for the padded prompt and the output buffer.
MIN_PROMPT_BUCKET = 8
MIN_OUTPUT_BUCKET = 8


def _tokens(n: int) -> str:
  return f"{n} token" if n == 1 else f"{n} tokens"


def check_prompt(ids: Sequence[int], *, vocab_size: int, block_size: int,
                 name: str = "The prompt") -> None:
  """Raises UserError if the token ids `ids` cannot be continued: empty, an id outside
  [0, vocab_size), or longer than block_size (generation may run past block_size; the prompt
  must fit). `name` says which prompt ("Prompt 2", "The prompt 'ROMEO:'")."""
  ids = np.asarray(ids)
  if ids.size == 0:
    raise UserError(f"{name} is empty; a prompt needs at least one token.")
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise UserError(f"{name} has token id {int(bad[0])}, outside [0, {vocab_size}), the "
                    f"model's vocabulary.")
  n = int(ids.size)
  if n > block_size:
    raise UserError(f"{name} ({_tokens(n)}) is longer than the model's block_size "
                    f"({block_size}); shorten it (new tokens may go past block_size, the prompt "
                    f"must fit).")


def check_window_shift(window_shift: Any, block_size: int, prefix: str = "") -> int:
  """The window shift W (default: block_size // 4, at least 1); UserError unless
  1 <= W <= block_size."""
  if window_shift is None:
    return max(1, block_size // 4)
  if (isinstance(window_shift, bool) or not isinstance(window_shift, (int, np.integer))
      or not 1 <= window_shift <= block_size):
    raise UserError(f"{prefix}window_shift must be an integer in [1, block_size = {block_size}], "
                    f"got {window_shift!r}.")
  return int(window_shift)


def window_start(n: int, w: int, block_size: int, window_shift: int) -> int:
  """Where the context of the token at index n of a sequence starts, given the start w used
  for the token before it (0 for the first): see the module docstring."""
  return n - (block_size - window_shift + 1) if n - w > block_size else w


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
  """Powers of two (at least MIN_*_BUCKET), the cache capped at block_size (a longer
  generation slides its window) and the prompt at the cache."""
  cache_len = min(_next_pow2(max_prompt_len + max_new_tokens), block_size)
  return Buckets(
      batch=_next_pow2(batch_size),
      prompt_len=min(_next_pow2(max(max_prompt_len, MIN_PROMPT_BUCKET)), cache_len),
      cache_len=cache_len,
      out_len=_next_pow2(max(max_new_tokens, MIN_OUTPUT_BUCKET)))


class SamplingSettings(NamedTuple):
  """Traced scalars of a generate call (changing them does not recompile)."""
  temperature: jax.Array  # float32
  top_k: jax.Array        # int32
  top_p: jax.Array        # float32
  eot_id: jax.Array       # int32, -1 for none


class DecodeState(NamedTuple):
  cache: Cache           # {"k", "v"}: [L, B, S, H*K] (model/kv_cache.py)
  token_B: jax.Array     # the last sampled token of each row (fed at the next step)
  position_B: jax.Array  # where token_B goes in the cache (frozen once the row is done)
  done_B: jax.Array      # row has produced eot (or is a batch-padding dummy)
  out_BM: jax.Array      # sampled tokens; columns >= step are unused
  step: jax.Array        # number of tokens sampled so far (prefill samples the first)
  row_keys_B: jax.Array  # per-row PRNG keys


def _sample_rows(row_keys_B, step, logits_BV, settings: SamplingSettings, mode: int,
                 vocab_size: int):
  """Row b's token from logits_BV[b] with key fold_in(row_keys_B[b], step)."""
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, step)
  sample = functools.partial(sample_filtered, temperature=settings.temperature,
                             top_k=settings.top_k,
                             top_p=settings.top_p, mode=mode, vocab_size=vocab_size)
  return jax.vmap(sample)(keys_B, logits_BV)


@functools.partial(jax.jit, static_argnames=("cfg", "mode", "cache_len", "out_len"))
def _prefill(params, tokens_BP, lengths_B, active_B, seed, settings: SamplingSettings, *,
             cfg: ModelConfig, mode: int, cache_len: int, out_len: int) -> DecodeState:
  """Runs the right-padded prompts through the model and samples each row's first token. A
  prefix-LM (cfg.prefix_lm) sees each prompt both ways, as its prefix in training."""
  B, P = tokens_BP.shape
  cache = init_cache(cfg, B, cache_len)
  prefix_BP = jnp.arange(P)[None, :] < lengths_B[:, None] if cfg.prefix_lm else None
  hidden_BPD, cache = GPT(cfg).apply({"params": params}, tokens_BP, cache=cache,
                                     return_hidden=True, prefix_BT=prefix_BP)
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
  model.gpt.GPT (static, for measurements; by default attention reads the cache up to
  the longest row's position)."""
  logits_B1V, cache = GPT(cfg, cache_chunks=cache_chunks).apply(
      {"params": params}, state.token_B[:, None], positions_BT=state.position_B[:, None],
      cache=state.cache)
  token_B = _sample_rows(state.row_keys_B, state.step, logits_B1V[:, 0], settings, mode,
                         cfg.vocab_size)
  return _next_state(state, cache, token_B, state.position_B + 1, settings)


def _next_state(state: DecodeState, cache: Cache, token_B, position_B,
                settings: SamplingSettings) -> DecodeState:
  """The state after one step that sampled token_B (ignored for rows already done, whose
  position stays) and moved the rows' positions to position_B."""
  token_B = jnp.where(state.done_B, 0, token_B)
  return DecodeState(
      cache=cache, token_B=token_B,
      position_B=jnp.where(state.done_B, state.position_B, position_B),
      done_B=state.done_B | (token_B == settings.eot_id),
      out_BM=jax.lax.dynamic_update_slice(state.out_BM, token_B[:, None], (0, state.step)),
      step=state.step + 1, row_keys_B=state.row_keys_B)


def _needs_restart(state: DecodeState):
  """Rows whose next position is past the cache (their window moves: `_restart`)."""
  return ~state.done_B & (state.position_B >= state.cache["k"].shape[2])


@functools.partial(jax.jit, static_argnames=("cfg", "mode"), donate_argnames=("state",))
def _restart(params, state: DecodeState, window_BN, settings: SamplingSettings, *,
             cfg: ModelConfig, mode: int) -> DecodeState:
  """One step in which the rows that need it (`_needs_restart`) re-read their last N tokens
  window_BN[b] at positions 0..N-1 into their cache rows and sample from them, while the other
  rows decode as usual (their window_BN rows are ignored)."""
  restart_B = _needs_restart(state)
  N = window_BN.shape[1]
  decoded = decode_step(params, state._replace(
      position_B=jnp.where(restart_B, 0, state.position_B)), settings, cfg=cfg, mode=mode)
  fresh = init_cache(cfg, window_BN.shape[0], state.cache["k"].shape[2])
  hidden_BND, fresh = GPT(cfg).apply({"params": params}, window_BN, cache=fresh,
                                     return_hidden=True)
  logits_BV = logits_from_hidden(params, cfg, hidden_BND[:, -1:])[:, 0]
  token_B = _sample_rows(state.row_keys_B, state.step, logits_BV, settings, mode,
                         cfg.vocab_size)
  pick = lambda a, b: jnp.where(restart_B[None, :, None, None], a, b)
  cache = jax.tree_util.tree_map(pick, fresh, decoded.cache)
  return _next_state(state, cache, jnp.where(restart_B, token_B, decoded.token_B),
                     jnp.where(restart_B, N, decoded.position_B), settings)


def _masked_step(params, state: DecodeState, go, settings: SamplingSettings, *,
                 cfg: ModelConfig, mode: int, cache_chunks: int | None) -> DecodeState:
  """decode_step when `go`; otherwise the same state (only its cache is written: each row's
  pending token at its own position, the values the step that feeds it will write again, or,
  for a row done or whose window must move, into its own last slot, which it never reads)."""
  S = state.cache["k"].shape[2]
  fed = state._replace(position_B=jnp.minimum(state.position_B, S - 1))
  new = decode_step(params, fed, settings, cfg=cfg, mode=mode, cache_chunks=cache_chunks)
  new = new._replace(position_B=jnp.where(state.done_B, state.position_B, new.position_B))
  keep = lambda a, b: jnp.where(go, a, b)
  return DecodeState(cache=new.cache, token_B=keep(new.token_B, state.token_B),
                     position_B=keep(new.position_B, state.position_B),
                     done_B=keep(new.done_B, state.done_B), out_BM=keep(new.out_BM, state.out_BM),
                     step=keep(new.step, state.step), row_keys_B=state.row_keys_B)


# Tokens each iteration of the decode loop samples (a static inner loop). The loop's test runs
# once per chunk: on a GPU, XLA copies a while loop's predicate to the host every iteration, so
# this divides the host round trips per token by DECODE_CHUNK. Steps past the end of a chunk's
# work (the last rows done, max_new_tokens reached, a window to move) change nothing.
DECODE_CHUNK = 8


@functools.partial(jax.jit, static_argnames=("cfg", "mode", "cache_chunks"),
                   donate_argnames=("state",))
def _decode(params, state: DecodeState, stop_at, settings: SamplingSettings, *,
            cfg: ModelConfig, mode: int, cache_chunks: int | None = None) -> DecodeState:
  """Samples tokens until `state.step == stop_at`, every row is done, or a row's window must
  move (`_restart`): one while_loop whose body samples DECODE_CHUNK tokens (a static loop).
  `cache_chunks` (static) makes each step read that many cache chunks (`cached_attention`):
  with every chunk, a step has no loop of its own, so the only test left on the host's path
  is the outer loop's, once per chunk of tokens."""
  def keep_going(s: DecodeState):
    return (s.step < stop_at) & ~jnp.all(s.done_B) & ~jnp.any(_needs_restart(s))

  def chunk(s: DecodeState) -> DecodeState:
    def one(_, s):
      return _masked_step(params, s, keep_going(s), settings, cfg=cfg, mode=mode,
                          cache_chunks=cache_chunks)
    return jax.lax.fori_loop(0, DECODE_CHUNK, one, s)

  return jax.lax.while_loop(keep_going, chunk, state)


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
    check_prompt(row, vocab_size=cfg.vocab_size, block_size=cfg.block_size, name=f"Prompt {b}")
    rows.append(row.astype(np.int32))
  if eot_id is not None and not 0 <= eot_id < cfg.vocab_size:
    raise UserError(f"eot_id must be a token id in [0, {cfg.vocab_size}), got {eot_id!r}.")
  return rows


def _check_buckets(buckets: Buckets, cfg: ModelConfig, batch: int, longest: int,
                   max_new_tokens: int) -> None:
  needed = Buckets(batch, longest, min(longest + max_new_tokens, cfg.block_size), max_new_tokens)
  small = [f"{name} {have} < {need}" for name, have, need in zip(Buckets._fields, buckets, needed)
           if have < need]
  if small:
    raise UserError(f"buckets {tuple(buckets)} are too small for this request: "
                    f"{', '.join(small)}.")
  if buckets.cache_len > cfg.block_size or buckets.prompt_len > buckets.cache_len:
    raise UserError(f"buckets {tuple(buckets)} need prompt_len <= cache_len <= block_size "
                    f"({cfg.block_size}).")


# How each decode step reads the KV cache (model/kv_cache.py's cached_attention):
#   filled  the chunks up to the longest row's position (a loop whose length the step computes:
#           the fewest bytes; on a GPU each such loop is a host round trip per layer and token)
#   all     every chunk, a fixed number (no loop left in the step: one host round trip per
#           DECODE_CHUNK tokens on a GPU; reads up to cache_len slots every step)
#   auto    all on a GPU, filled elsewhere (TPU and CPU run device-side loops without the host)
CACHE_READS = ("auto", "filled", "all")


def cache_chunks_for(cache_reads: str, cache_len: int, platform: str | None = None) -> int | None:
  """The static chunk count a decode step reads (None: up to the filled position)."""
  if cache_reads not in CACHE_READS:
    raise UserError(f"cache_reads must be one of {', '.join(CACHE_READS)}; got "
                    f"{cache_reads!r}.")
  if cache_reads == "auto":
    cache_reads = "all" if (platform or jax.default_backend()) == "gpu" else "filled"
  return -(-cache_len // cache_chunk_size(cache_len)) if cache_reads == "all" else None


class _Run(NamedTuple):
  state: DecodeState
  settings: SamplingSettings
  mode: int
  buckets: Buckets
  batch: int  # real rows
  rows: list[np.ndarray]  # the prompts
  window_len: int  # N = T - W + 1: the tokens a moved window starts with
  cache_chunks: int | None  # cache_chunks_for(cache_reads, ...)


def _start(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
           buckets, window_shift=None, cache_reads: str = "auto") -> _Run:
  """Validates, pads to buckets and prefills. `params` are already in cfg's layer layout."""
  rows = _validate(cfg, prompts, max_new_tokens, eot_id, temperature, top_k, top_p, seed)
  cache_chunks_for(cache_reads, 1)  # checked before anything runs
  window_shift = check_window_shift(window_shift, cfg.block_size)
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
  return _Run(state, settings, mode, buckets, len(rows), rows,
              cfg.block_size - window_shift + 1,
              cache_chunks_for(cache_reads, buckets.cache_len))


def _run_until(params, cfg: ModelConfig, run: _Run, state: DecodeState,
               stop_at: int) -> DecodeState:
  """Decodes until step `stop_at` or every row is done, moving windows where rows need it:
  one `_decode` loop per window, a `_restart` step between them."""
  while int(state.step) < stop_at and not bool(jnp.all(state.done_B)):
    if bool(jnp.any(_needs_restart(state))):
      out_BM, step = np.asarray(state.out_BM), int(state.step)
      window_BN = np.zeros((run.buckets.batch, run.window_len), np.int32)
      for b, prompt in enumerate(run.rows):
        seq = np.concatenate([prompt, out_BM[b, :step]])
        if len(seq) >= run.window_len:
          window_BN[b] = seq[-run.window_len:]
      state = _restart(params, state, window_BN, run.settings, cfg=cfg, mode=run.mode)
    else:
      state = _decode(params, state, jnp.asarray(stop_at, jnp.int32), run.settings, cfg=cfg,
                      mode=run.mode, cache_chunks=run.cache_chunks)
  return state


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
             buckets: Buckets | None = None, window_shift: int | None = None,
             cache_reads: str = "auto") -> GenerateResult:
  """Continues each prompt (a list of token ids; lengths may differ) by up to max_new_tokens.

  temperature 0 is greedy; top_k / top_p as in `filter_logits`. A row stops after it produces
  `eot_id` (kept in its tokens if include_eot), and the loop ends once every row has stopped.
  `params` may be in either layer layout (converted to `cfg.scan_layers`' if needed).
  `buckets` fixes the padded shapes (e.g. `choose_buckets` of the largest request a server
  expects, so that it compiles once); by default `choose_buckets` picks them per call.
  Past cfg.block_size the context window slides by `window_shift` (module docstring).
  `cache_reads` (CACHE_READS) is how much of the KV cache each step reads; the tokens are the
  same whichever it is. Raises UserError for empty prompts, a prompt longer than
  cfg.block_size, or buckets too
  small.
  """
  start = time.perf_counter()
  params = convert_layout(params, cfg)
  run = _start(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
               buckets, window_shift, cache_reads)
  state = _run_until(params, cfg, run, run.state, max_new_tokens)
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
                    buckets: Buckets | None = None, window_shift: int | None = None,
                    cache_reads: str = "auto") -> Iterator[list[list[int]]]:
  """Like `generate`, but yields each row's tokens that are new since the last yield (an
  empty list for rows with nothing new): once after the prefill, then after every
  `chunk_size` decode steps (one call each of the same compiled loop as `generate`). The
  concatenated chunks equal `generate`'s tokens for the same arguments."""
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise UserError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
  params = convert_layout(params, cfg)
  # Validation and prefill happen here, before the first next().
  run = _start(params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, eot_id,
               buckets, window_shift, cache_reads)
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
    state = _run_until(params, cfg, run, state, min(step + chunk_size, max_new_tokens))
