"""Decode slots: the device side of a serving engine (training/serve/engine.py drives it).

A fixed number B of slots share one KV cache {"k", "v"} [L, B, S, G * K] (model/kv_cache.py;
one contiguous row of S positions per slot). Everything a slot needs to decode lives in arrays
of the `SlotState`, one entry per slot: its last token and position, how many tokens it has
sampled and may still sample, its PRNG key, its temperature / top-k / top-p and its stop token
ids. So requests with any settings share the compiled programs: nothing recompiles per request.

    state = init_slots(cfg, slots=B, cache_len=S)
    state, first = prefill_insert(params, state, tokens_P, admit, cfg=cfg, top_n=N)
    state, out = decode_chunk(params, state, stop_B, cfg=cfg, steps=C, top_n=N)

`prefill_insert` runs one prompt (right-padded to a length bucket P) through the model, writes
its keys and values into slot `admit.slot` of the shared cache (the slot's row 0..P-1; the
padding's garbage at positions >= the prompt length is overwritten by each position's own token
before any query reads it, as in model/decode/sampling.py) and samples the first token.
`decode_chunk` advances every active slot C tokens in one device call (a `lax.scan`): each step
feeds every slot's last token at its own position and samples the next with the slot's own
settings; a slot stops on device at one of its stop ids or when its token budget is spent, and
the host stops others before a call (`stop_B`: a stop string, a client gone). A stopped slot's
position goes to 0, so attention (which reads the cache up to the largest position) does not
keep reading a finished request's cache.

Randomness: the token a slot samples at step i (0 is the prefill's) uses
fold_in(fold_in(key(seed), choice), i): the same keys `generate` gives row `choice` of a call
with that seed, so a request sampled alone or among others gives the same tokens, and those of
`generate` (launch.sample --seed) with the same settings.

Log-probabilities are the model's own (log-softmax of the raw logits, before temperature and
filtering), float32: of each sampled token, and the `top_n` most likely tokens at each step.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.decode.logits import sample_filtered
from model.gpt import GPT, logits_from_hidden
from model.kv_cache import CACHE_AXES, Cache, init_cache

# Stop token ids a slot can hold (end-of-text, end-of-turn, ...); unused entries are -1.
MAX_STOP_IDS = 4


class SlotState(NamedTuple):
  cache: Cache              # {"k", "v"}: [L, B, S, G*K]
  token_B: jax.Array        # int32: the last sampled token (fed at the next step)
  position_B: jax.Array     # int32: where token_B goes in the cache
  step_B: jax.Array         # int32: tokens sampled so far (the next one's key index)
  remaining_B: jax.Array    # int32: tokens the slot may still sample
  active_B: jax.Array       # bool: the slot is decoding
  key_B: jax.Array          # uint32 [B, 2]: key data of fold_in(key(seed), choice)
  temperature_B: jax.Array  # float32 (<= 0: greedy)
  top_k_B: jax.Array        # int32 (0: off)
  top_p_B: jax.Array        # float32 (1: off)
  stop_BE: jax.Array        # int32 [B, MAX_STOP_IDS], -1 unused


class Admit(NamedTuple):
  """One request (one choice of it) entering a slot: scalars, traced."""
  slot: jax.Array         # int32
  length: jax.Array       # int32: prompt tokens (<= the bucket P)
  max_tokens: jax.Array   # int32: tokens to sample at most (0: score the prompt only)
  seed: jax.Array         # uint32
  choice: jax.Array       # int32: folded into the seed's key
  temperature: jax.Array  # float32
  top_k: jax.Array        # int32
  top_p: jax.Array        # float32
  stop_E: jax.Array       # int32 [MAX_STOP_IDS]


class Sampled(NamedTuple):
  """Tokens sampled by one call, with their log-probabilities; leading axes [B, C] from
  decode_chunk (valid where `emitted`), [] from prefill_insert."""
  token: jax.Array        # int32
  emitted: jax.Array      # bool: the slot was active, so this token is real
  logprob: jax.Array      # float32: log p(token)
  top_ids: jax.Array      # int32 [..., N]: the N likeliest tokens, likeliest first
  top_logprobs: jax.Array  # float32 [..., N]


class PromptLogprobs(NamedTuple):
  """For each prompt position p >= 1 (entry p - 1): log p(token p | tokens < p) and the N
  likeliest tokens there."""
  logprob_P: jax.Array      # float32 [P - 1]
  top_ids_PN: jax.Array     # int32 [P - 1, N]
  top_logprobs_PN: jax.Array  # float32 [P - 1, N]


def constrain_state(state: SlotState) -> SlotState:
  """The state laid out as every program takes and returns it (under sharding.activate): the
  slots split like a batch, the cache's heads like attention heads. Each program ends with
  it, so what one call returns is what the next was compiled for (on a data-parallel mesh,
  propagation alone would hand back per-slot arrays split differently than they came in)."""
  def per_slot(x):
    return nn.with_logical_constraint(x, ("act_batch",) + (None,) * (x.ndim - 1))
  return state._replace(
      cache={k: nn.with_logical_constraint(v, CACHE_AXES) for k, v in state.cache.items()},
      **{name: per_slot(getattr(state, name)) for name in SlotState._fields if name != "cache"})


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "cache_len"))
def init_slots(cfg: ModelConfig, slots: int, cache_len: int) -> SlotState:
  """Every slot free, the cache zeroed (call under sharding.activate to lay it out:
  constrain_state)."""
  zeros = jnp.zeros((slots,), jnp.int32)
  return constrain_state(SlotState(
      cache=init_cache(cfg, slots, cache_len), token_B=zeros, position_B=zeros, step_B=zeros,
      remaining_B=zeros, active_B=jnp.zeros((slots,), bool),
      key_B=jnp.zeros((slots, 2), jnp.uint32), temperature_B=jnp.zeros((slots,), jnp.float32),
      top_k_B=zeros, top_p_B=jnp.ones((slots,), jnp.float32),
      stop_BE=jnp.full((slots, MAX_STOP_IDS), -1, jnp.int32)))


def _log_softmax(logits_V: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(logits_V.astype(jnp.float32), axis=-1)


def _top(logprobs_V: jax.Array, top_n: int):
  return jax.lax.top_k(logprobs_V, top_n)  # ties: lower index first


def sample_rows(keys_B, logits_BV, temperature_B, top_k_B, top_p_B, vocab_size: int,
                mode: int | None = None):
  """Row b's token from logits_BV[b] with key keys_B[b] and the row's own settings (what
  `sample_token` gives that row alone). `mode`: model.decode.logits' variant that serves every
  row (static_mode of the rows' settings; None: SORTED, which serves any)."""
  sample = functools.partial(sample_filtered, mode=mode, vocab_size=vocab_size)
  return jax.vmap(sample)(keys_B, logits_BV, temperature_B, top_k_B, top_p_B)


def _sample(keys_B, logits_BV, temperature_B, top_k_B, top_p_B, emitted_B, cfg: ModelConfig,
            top_n: int, mode: int | None = None) -> Sampled:
  token_B = sample_rows(keys_B, logits_BV, temperature_B, top_k_B, top_p_B, cfg.vocab_size,
                        mode)
  logprobs_BV = _log_softmax(logits_BV)
  top_lp, top_ids = _top(logprobs_BV, top_n)
  return Sampled(token_B, emitted_B,
                 jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0],
                 top_ids.astype(jnp.int32), top_lp)


def _stops(token_B, remaining_B, stop_BE):
  """Whether a slot that sampled token_B and has remaining_B tokens left stops."""
  return jnp.any(token_B[:, None] == stop_BE, axis=-1) | (remaining_B <= 0)


@functools.partial(jax.jit, static_argnames=("cfg", "top_n", "prompt_logprobs"),
                   donate_argnames=("state",))
def prefill_insert(params, state: SlotState, tokens_P: jax.Array, admit: Admit, *,
                   cfg: ModelConfig, top_n: int, prompt_logprobs: bool = False):
  """(state with the prompt tokens_P[:admit.length] in slot admit.slot and its first token
  sampled, that token as a Sampled of scalars [, PromptLogprobs with `prompt_logprobs`]). A
  request with max_tokens 0 leaves the slot free (it only scores the prompt)."""
  P = tokens_P.shape[0]
  hidden_1PD, cache_1 = GPT(cfg).apply({"params": params}, tokens_P[None],
                                       cache=init_cache(cfg, 1, P), return_hidden=True)
  cache = {name: jax.lax.dynamic_update_slice(state.cache[name], cache_1[name],
                                               (0, admit.slot, 0, 0)) for name in state.cache}
  key_data = jax.random.key_data(jax.random.fold_in(jax.random.key(admit.seed), admit.choice))
  last_1D = jax.lax.dynamic_slice_in_dim(hidden_1PD[0], admit.length - 1, 1)
  logits_1V = logits_from_hidden(params, cfg, last_1D[None])[0]
  wants = admit.max_tokens > 0
  first = _sample(jax.random.fold_in(jax.random.wrap_key_data(key_data), 0)[None], logits_1V,
                  admit.temperature[None], admit.top_k[None], admit.top_p[None], wants[None],
                  cfg, top_n)
  remaining = admit.max_tokens - 1
  active = wants & ~_stops(first.token, remaining[None], admit.stop_E[None])[0]
  put = lambda array, value: array.at[admit.slot].set(value)
  state = constrain_state(state._replace(
      cache=cache, token_B=put(state.token_B, first.token[0]),
      position_B=put(state.position_B, jnp.where(active, admit.length, 0)),
      step_B=put(state.step_B, 1), remaining_B=put(state.remaining_B, remaining),
      active_B=put(state.active_B, active), key_B=put(state.key_B, key_data),
      temperature_B=put(state.temperature_B, admit.temperature),
      top_k_B=put(state.top_k_B, admit.top_k), top_p_B=put(state.top_p_B, admit.top_p),
      stop_BE=put(state.stop_BE, admit.stop_E)))
  first = jax.tree_util.tree_map(lambda x: x[0], first)
  if not prompt_logprobs:
    return state, first
  logprobs_PV = _log_softmax(logits_from_hidden(params, cfg, hidden_1PD)[0])[:-1]
  top_lp, top_ids = _top(logprobs_PV, top_n)
  chosen = jnp.take_along_axis(logprobs_PV, tokens_P[1:, None], axis=-1)[:, 0]
  return state, first, PromptLogprobs(chosen, top_ids.astype(jnp.int32), top_lp)


def decode_step(params, state: SlotState, *, cfg: ModelConfig, top_n: int,
                cache_chunks: int | None = None,
                mode: int | None = None) -> tuple[SlotState, Sampled]:
  """Every slot's last token through the model at its position (inactive slots too: they
  write into their own row, which no active slot reads), one sampled token per slot."""
  logits_B1V, cache = GPT(cfg, cache_chunks=cache_chunks).apply(
      {"params": params}, state.token_B[:, None], positions_BT=state.position_B[:, None],
      cache=state.cache)
  keys_B = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(state.key_B), state.step_B)
  sampled = _sample(keys_B, logits_B1V[:, 0], state.temperature_B, state.top_k_B,
                    state.top_p_B, state.active_B, cfg, top_n, mode)
  active = state.active_B
  remaining = state.remaining_B - active
  still = active & ~_stops(sampled.token, remaining, state.stop_BE)
  return state._replace(
      cache=cache, token_B=jnp.where(active, sampled.token, state.token_B),
      position_B=jnp.where(still, state.position_B + 1, 0),
      step_B=state.step_B + active, remaining_B=remaining, active_B=still), sampled


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "top_n", "cache_chunks", "mode"),
                   donate_argnames=("state",))
def decode_chunk(params, state: SlotState, stop_B: jax.Array, *, cfg: ModelConfig, steps: int,
                 top_n: int, cache_chunks: int | None = None,
                 mode: int | None = None) -> tuple[SlotState, Sampled]:
  """`steps` decode steps in one call, after stopping the slots stop_B [B] (bool) says: (the
  state, Sampled with leading axes [B, steps]). `mode` is the sampling variant compiled in
  (model.decode.logits: GREEDY, PLAIN, TOP_K, SORTED); it must serve every active slot."""
  state = state._replace(active_B=state.active_B & ~stop_B,
                         position_B=jnp.where(stop_B, 0, state.position_B))

  def step(s, _):
    return decode_step(params, s, cfg=cfg, top_n=top_n, cache_chunks=cache_chunks, mode=mode)

  state, sampled_CB = jax.lax.scan(step, state, None, length=steps)
  return constrain_state(state), jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 0, 1), sampled_CB)
