"""Logits processing: temperature, top-k, top-p, and drawing a token.

`filter_logits` / `sample_token` are pure and jittable. Their temperature, top_k and top_p may
be Python numbers (the filtering mode is then chosen while tracing) or traced scalars (the
mode is a `lax.switch`, so changing them does not recompile). decode/sampling.py's generate loop
uses the same functions per row.

Top-k (with or without top-p) takes the TOP_K_BOUND largest logits with `lax.top_k` when
0 < top_k <= TOP_K_BOUND (a `lax.cond` on the traced value), and only top-p without top-k, or a
larger top_k, sorts the whole vocabulary. Both rank equal logits by index (lower first) and keep
the same set.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.errors import UserError

# Filtering modes of `filter_logits`, chosen from (temperature, top_k, top_p).
_PLAIN, _GREEDY, _SORTED = 0, 1, 2
# The largest top_k served by `lax.top_k` of that many logits instead of a full sort.
TOP_K_BOUND = 128


def is_python_number(*values) -> bool:
  return all(isinstance(v, (int, float, np.integer, np.floating)) for v in values)


def _is_int(value) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
      isinstance(value, (float, np.floating)) and math.isfinite(value) and int(value) == value)


def check_settings(temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0, *,
                   max_new_tokens: Any = None, seed: Any = None, prefix: str = "") -> None:
  """Raises UserError naming the first setting outside what sampling accepts: temperature a
  finite number >= 0, top_k an integer >= 0, top_p in (0, 1], max_new_tokens >= 1 and seed in
  [0, 2**32) (the last two when given). `prefix` goes before each name ("--" on the command
  line, which checks its flags with this before loading a model). Traced (jax) values cannot be
  checked and are let through."""
  def name(setting: str) -> str:
    return prefix + setting

  if max_new_tokens is not None:
    if not _is_int(max_new_tokens):
      raise UserError(f"{name('max_new_tokens')} must be an integer, got {max_new_tokens!r}.")
    if max_new_tokens < 1:
      raise UserError(f"{name('max_new_tokens')} must be at least 1, got {max_new_tokens}.")
  if is_python_number(temperature) and not (math.isfinite(temperature) and temperature >= 0):
    raise UserError(f"{name('temperature')} must be a finite number >= 0 (0 means greedy), "
                    f"got {temperature}.")
  if is_python_number(top_k) and not _is_int(top_k):
    raise UserError(f"{name('top_k')} must be an integer >= 0 (0 means off), got {top_k!r}.")
  if is_python_number(top_k) and top_k < 0:
    raise UserError(f"{name('top_k')} must be >= 0 (0 means off), got {top_k}.")
  if is_python_number(top_p) and not 0 < top_p <= 1:  # also refuses NaN
    raise UserError(f"{name('top_p')} must be in (0, 1] (1 means off), got {top_p}.")
  if seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
    raise UserError(f"{name('seed')} must be an integer in [0, 2**32), got {seed!r}.")


def static_mode(temperature, top_k, top_p) -> int | None:
  """For Python-number settings: _GREEDY if temperature is 0, else _SORTED if top-k or top-p is
  on, else _PLAIN. None for traced settings (see `_traced_mode`)."""
  if not is_python_number(temperature, top_k, top_p):
    return None
  if temperature <= 0:
    return _GREEDY
  return _SORTED if top_k > 0 or top_p < 1 else _PLAIN


def _traced_mode(temperature, top_k, top_p) -> jax.Array:
  greedy = jnp.asarray(temperature) <= 0
  sort = (jnp.asarray(top_k) > 0) | (jnp.asarray(top_p) < 1)
  return jnp.where(greedy, _GREEDY, jnp.where(sort, _SORTED, _PLAIN)).astype(jnp.int32)


def _switch(mode, branches, *args):
  if isinstance(mode, (bool, int)):
    return branches[mode](*args)
  return jax.lax.switch(mode, branches, *args)


def _keep_argmax(logits_V: jax.Array) -> jax.Array:
  """Only the largest entry (the lowest index among equal maxima) stays finite."""
  best = jnp.argmax(logits_V, axis=-1, keepdims=True)
  return jnp.where(jnp.arange(logits_V.shape[-1]) == best, logits_V, -jnp.inf)


def _keep_ranked(ranked_N: jax.Array, top_k, top_p) -> jax.Array:
  """Which of the N largest logits, ranked (descending, equal logits lower index first), survive:
  ranks < top_k (all when top_k is 0), then the shortest prefix whose probability (softmax over
  the top-k survivors) reaches top_p; rank 0 always survives."""
  rank_N = jnp.arange(ranked_N.shape[-1])
  keep_N = (top_k <= 0) | (rank_N < top_k)
  probs_N = jax.nn.softmax(jnp.where(keep_N, ranked_N, -jnp.inf), axis=-1)
  mass_before_N = jnp.concatenate(
      [jnp.zeros((*probs_N.shape[:-1], 1), probs_N.dtype),
       jnp.cumsum(probs_N, axis=-1)[..., :-1]], axis=-1)
  keep_N &= (top_p >= 1) | (mass_before_N < top_p)
  return keep_N | (rank_N == 0)


def _put(keep_N: jax.Array, order_N: jax.Array, logits_V: jax.Array) -> jax.Array:
  """logits_V where order_N[keep_N] points, -inf elsewhere."""
  keep_V = jnp.zeros(logits_V.shape, bool).at[order_N].set(keep_N, unique_indices=True)
  return jnp.where(keep_V, logits_V, -jnp.inf)


def _sorted_1d(logits_V: jax.Array, top_k, top_p) -> jax.Array:
  """Top-k then top-p over a stable sort of the whole row (index breaks ties)."""
  V = logits_V.shape[0]
  neg_sorted_V, order_V = jax.lax.sort_key_val(-logits_V, jnp.arange(V), is_stable=True)
  return _put(_keep_ranked(-neg_sorted_V, top_k, top_p), order_V, logits_V)


def _top_k_1d(logits_V: jax.Array, top_k, top_p) -> jax.Array:
  """The same for 0 < top_k <= N = min(TOP_K_BOUND, V): only the N largest are ranked
  (`lax.top_k` orders equal values by index, lower first, as the stable sort does)."""
  ranked_N, order_N = jax.lax.top_k(logits_V, min(TOP_K_BOUND, logits_V.shape[0]))
  return _put(_keep_ranked(ranked_N, top_k, top_p), order_N, logits_V)


def _top_k_top_p(logits: jax.Array, top_k, top_p) -> jax.Array:
  bound = min(TOP_K_BOUND, logits.shape[-1])
  sorted_rows = jnp.vectorize(_sorted_1d, signature="(v),(),()->(v)")
  top_k_rows = jnp.vectorize(_top_k_1d, signature="(v),(),()->(v)")
  if is_python_number(top_k):
    return (top_k_rows if 0 < top_k <= bound else sorted_rows)(logits, top_k, top_p)
  return jax.lax.cond((top_k > 0) & (top_k <= bound), top_k_rows, sorted_rows,
                      logits, top_k, top_p)


def _filter(logits, temperature, top_k, top_p, mode: int | None, vocab_size: int | None):
  logits = jnp.asarray(logits, jnp.float32)
  V = logits.shape[-1]
  if vocab_size is not None and vocab_size < V:
    logits = jnp.where(jnp.arange(V) < vocab_size, logits, -jnp.inf)
  branches = (
      lambda x: x / temperature,
      _keep_argmax,
      lambda x: _top_k_top_p(x / temperature, top_k, top_p),
  )
  if mode is None:
    mode = _traced_mode(temperature, top_k, top_p)
  return _switch(mode, branches, logits)


def sample_filtered(rng, logits, temperature, top_k, top_p, mode: int | None,
                    vocab_size: int | None):
  """`sample_token` with the mode given (static_mode's value, or None to trace it)."""
  filtered = _filter(logits, temperature, top_k, top_p, mode, vocab_size)
  draw = lambda x: jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)
  pick = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)
  if mode is None:
    return jax.lax.cond(jnp.asarray(temperature) <= 0, pick, draw, filtered)
  return pick(filtered) if mode == _GREEDY else draw(filtered)


# Jitted whole (inlined when called under an outer jit), so eager calls compile one program
# per (shape, mode) instead of one per operation.
_filter_jit = jax.jit(_filter, static_argnames=("mode", "vocab_size"))
_sample_jit = jax.jit(sample_filtered, static_argnames=("mode", "vocab_size"))


def filter_logits(logits: jax.Array, temperature: Any = 1.0, top_k: Any = 0, top_p: Any = 1.0,
                  vocab_size: int | None = None) -> jax.Array:
  """float32 logits [..., V] with temperature applied and filtered-out entries at -inf.

  In order: entries at index >= vocab_size (a padded vocabulary) are removed; logits are
  divided by `temperature`; top-k keeps the k largest (0 = off); top-p keeps the smallest set of
  most likely tokens whose probability (after top-k, renormalised) sums to at least `top_p`
  (1.0 = off). The most likely token is always kept. Ties are broken by index: among equal
  logits the lower index ranks first, so top-k keeps exactly k entries. `temperature == 0`
  (or <= 0 when traced) is greedy: only the argmax (lowest index on ties) stays, with its
  logit unscaled. Python-number settings are validated and pick the computation while
  tracing; traced scalars select it with `lax.switch` (no recompilation when they change).
  """
  check_settings(temperature, top_k, top_p)
  return _filter_jit(logits, temperature, top_k, top_p,
                     mode=static_mode(temperature, top_k, top_p), vocab_size=vocab_size)


def sample_token(rng: jax.Array, logits: jax.Array, temperature: Any = 1.0, top_k: Any = 0,
                 top_p: Any = 1.0, vocab_size: int | None = None) -> jax.Array:
  """int32 token ids [...] drawn from `filter_logits(logits, ...)` [..., V] with one key for
  the whole array (jax.random.categorical). Greedy settings take the argmax and draw no
  random numbers."""
  check_settings(temperature, top_k, top_p)
  return _sample_jit(rng, logits, temperature, top_k, top_p,
                     mode=static_mode(temperature, top_k, top_p), vocab_size=vocab_size)
