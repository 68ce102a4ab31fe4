"""Logits processing: temperature, top-k, top-p, and drawing a token.

`filter_logits` / `sample_token` are pure and jittable. Their temperature, top_k and top_p may
be Python numbers, traced scalars, or arrays with one value per row of the logits (numpy or
jax). Nothing in them is a `lax.cond` or `lax.switch` on a setting: every row takes the same
ops and picks its result with `jnp.where` (on a GPU a conditional's predicate is copied to the
host, once per token in a decode loop). What is computed is one of four VARIANTS, chosen while
tracing from what the rows may need (`static_mode`: Python numbers or numpy arrays; traced
settings get SORTED, which serves every row):

  GREEDY  every row greedy: the argmax only
  PLAIN   rows greedy or temperature only (the logits divided by it)
  TOP_K   also rows with 0 < top_k <= TOP_K_BOUND, with or without top-p: `lax.top_k` of the
          TOP_K_BOUND largest logits ranks them (no sort of the vocabulary)
  SORTED  also top-p without top-k and larger top_k: a stable sort of the whole row

Each variant gives every row it serves the same result as the larger ones. Both rankings put
equal logits in index order (lower first) and keep the same set. decode/sampling.py's generate
loop compiles the variant of its settings (their values are traced: changing them within a
variant does not recompile).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.errors import UserError

# The filtering variants, smallest first (module docstring).
GREEDY, PLAIN, TOP_K, SORTED = 0, 1, 2, 3
VARIANTS = ("greedy", "plain", "top_k", "sorted")
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
  """The smallest variant that serves every row, for settings known on the host (Python
  numbers, or numpy arrays of per-row values); None for traced settings (SORTED is used)."""
  if not all(is_python_number(v) or isinstance(v, np.ndarray)
             for v in (temperature, top_k, top_p)):
    return None
  t, k, p = (np.asarray(v) for v in (temperature, top_k, top_p))
  need = np.where(t <= 0, GREEDY,
                  np.where((k > 0) & (k <= TOP_K_BOUND), TOP_K,
                           np.where((k > 0) | (p < 1), SORTED, PLAIN)))
  return int(need.max(initial=GREEDY))


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


_sorted_rows = jnp.vectorize(_sorted_1d, signature="(v),(),()->(v)")
_top_k_rows = jnp.vectorize(_top_k_1d, signature="(v),(),()->(v)")


def _row_setting(value) -> jax.Array:
  """A setting (a scalar, or one value per row [...]) as [..., 1], to broadcast over [..., V]."""
  return jnp.asarray(value)[..., None]


def _filter(logits, temperature, top_k, top_p, mode: int | None, vocab_size: int | None):
  logits = jnp.asarray(logits, jnp.float32)
  V = logits.shape[-1]
  if vocab_size is not None and vocab_size < V:
    logits = jnp.where(jnp.arange(V) < vocab_size, logits, -jnp.inf)
  if mode == GREEDY:
    return _keep_argmax(logits)
  greedy_1 = _row_setting(temperature) <= 0
  scaled = logits / jnp.where(greedy_1, 1.0, _row_setting(temperature))
  if mode == PLAIN:
    filtered = scaled
  elif mode == TOP_K:  # rows with top_k 0 are plain here (top-p alone needs SORTED)
    filtered = jnp.where(_row_setting(top_k) > 0, _top_k_rows(scaled, top_k, top_p), scaled)
  else:  # SORTED, or None: traced settings, any row
    filtered = _sorted_rows(scaled, top_k, top_p)
  return jnp.where(greedy_1, _keep_argmax(logits), filtered)


def sample_filtered(rng, logits, temperature, top_k, top_p, mode: int | None,
                    vocab_size: int | None):
  """`sample_token` with the variant given (static_mode's value, or None: SORTED)."""
  filtered = _filter(logits, temperature, top_k, top_p, mode, vocab_size)
  if mode == GREEDY:
    return jnp.argmax(filtered, axis=-1).astype(jnp.int32)
  # A greedy row's filtered logits have one finite entry: the draw is that entry.
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


# Jitted whole (inlined when called under an outer jit), so eager calls compile one program
# per (shape, variant) instead of one per operation.
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
  logit unscaled. Each setting is one value for all rows or one per row (shape [...]).
  Python-number settings are validated; settings known on the host pick the variant while
  tracing (`static_mode`), traced ones take SORTED (no recompilation when they change).
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
