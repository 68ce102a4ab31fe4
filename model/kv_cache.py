"""The KV cache of model/gpt.py's GPT: its layout, the in-place write, and attention that
reads only the filled part.

A cache is the pytree {"k": [L, B, S, G * K], "v": [L, B, S, G * K]} (`init_cache`; G = the
key/value heads, num_heads / G times fewer bytes with grouped-query attention), passed into
GPT.apply and returned (never a hidden mutable collection). Layer l of a forward pass writes its
new keys and values for row b at slots positions_BT[b, :] of index l (`write_cache`: one scatter
into the carried arrays, in place inside a jitted loop, so no step copies the cache) and attends
to them with `cached_attention`, which reads chunks of CACHE_CHUNK slots only up to the longest
row's position.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.errors import UserError

Cache = dict[str, jax.Array]
# Logical axes of the KV cache arrays [L, B, S, G * K] (the last axis split like the heads).
CACHE_AXES = ("cache_layers", "act_batch", "cache_length", "act_heads")

# Slots per chunk that `cached_attention` reads from the KV cache (the whole cache if shorter, or
# if its length is not a multiple).
CACHE_CHUNK = 128


def write_cache(cache_LBSD, layer, positions_BT, new_BTHK):
  """cache_LBSD with layer `layer`'s slots positions_BT[b, t] of row b set to new_BTHK[b, t]:
  one scatter into the carried array, which XLA does in place (no copy of the cache)."""
  B, T, H, K = new_BTHK.shape
  rows_BT = jnp.broadcast_to(jnp.arange(B, dtype=positions_BT.dtype)[:, None], (B, T))
  new_BTD = new_BTHK.reshape(B, T, H * K).astype(cache_LBSD.dtype)
  return cache_LBSD.at[layer, rows_BT, positions_BT].set(
      new_BTD, unique_indices=True, mode="promise_in_bounds")


def cache_chunk_size(cache_len: int) -> int:
  return CACHE_CHUNK if cache_len % CACHE_CHUNK == 0 else cache_len


def cached_attention(q_BTHK, k_LBSD, v_LBSD, layer, positions_BT,
                     num_chunks: int | None = None):
  """Softmax attention of q_BTHK to layer `layer` of the cache, query (b, t) seeing the slots
  <= positions_BT[b, t]; scores, softmax and the sum in float32.

  The cache is read in chunks of C = cache_chunk_size(S) slots with an online softmax (running
  maximum, normaliser and weighted sum), up to the chunk holding the largest position: a
  `fori_loop` with that many iterations, so the bytes read grow with the filled length, not
  with S. `num_chunks` (static) reads exactly that many chunks instead, unrolled (for a cost
  analysis that counts every chunk: XLA counts a loop body once). Hidden slots score -inf; slot 0
  is in every query's view, so every row has a finite maximum after the first chunk and later
  fully masked chunks add nothing."""
  B, T, H, K = q_BTHK.shape
  S, G = k_LBSD.shape[2], k_LBSD.shape[3] // K
  R = H // G  # query heads per key/value head (grouped-query attention)
  C = cache_chunk_size(S)
  scale = 1.0 / math.sqrt(K)
  q_BTGRK = q_BTHK.astype(k_LBSD.dtype).reshape(B, T, G, R, K)

  def chunk(c, carry):
    max_BHT, norm_BHT, acc_BTHK = carry
    start = c * C
    k_BCGK = jax.lax.dynamic_slice(k_LBSD, (layer, 0, start, 0), (1, B, C, G * K)).reshape(
        B, C, G, K)
    v_BCGK = jax.lax.dynamic_slice(v_LBSD, (layer, 0, start, 0), (1, B, C, G * K)).reshape(
        B, C, G, K)
    scores_BHTC = jnp.einsum("BTGRK,BCGK->BGRTC", q_BTGRK, k_BCGK,
                             preferred_element_type=jnp.float32).reshape(B, H, T, C) * scale
    visible_BTC = start + jnp.arange(C)[None, None, :] <= positions_BT[:, :, None]
    scores_BHTC = jnp.where(visible_BTC[:, None], scores_BHTC, -jnp.inf)
    new_max_BHT = jnp.maximum(max_BHT, jnp.max(scores_BHTC, axis=-1))
    probs_BHTC = jnp.exp(scores_BHTC - new_max_BHT[..., None])
    rescale_BHT = jnp.exp(max_BHT - new_max_BHT)
    norm_BHT = norm_BHT * rescale_BHT + jnp.sum(probs_BHTC, axis=-1)
    acc_BTHK = acc_BTHK * jnp.transpose(rescale_BHT, (0, 2, 1))[..., None] + jnp.einsum(
        "BGRTC,BCGK->BTGRK", probs_BHTC.astype(v_BCGK.dtype).reshape(B, G, R, T, C), v_BCGK,
        preferred_element_type=jnp.float32).reshape(B, T, H, K)
    return new_max_BHT, norm_BHT, acc_BTHK

  carry = (jnp.full((B, H, T), -jnp.inf, jnp.float32), jnp.zeros((B, H, T), jnp.float32),
           jnp.zeros((B, T, H, K), jnp.float32))
  if num_chunks is None:
    num_chunks = jnp.max(positions_BT) // C + 1
    _, norm_BHT, acc_BTHK = jax.lax.fori_loop(0, num_chunks, chunk, carry)
  else:
    for c in range(num_chunks):
      carry = chunk(c, carry)
    _, norm_BHT, acc_BTHK = carry
  return acc_BTHK / jnp.transpose(norm_BHT, (0, 2, 1))[..., None]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
  """A zeroed KV cache {"k", "v"} of shape [L, B, max_len, G * K] in the compute dtype (G =
  cfg.kv_heads, the key/value heads; heads
  and head dimension merged: the TPU's default layout of that shape keeps a slot's H * K values
  contiguous, the layout the write and the chunked reads want, so no step relayouts the cache)."""
  if max_len <= 0 or batch_size <= 0:
    raise UserError(f"KV cache needs positive batch_size and max_len, got {batch_size}, "
                    f"{max_len}.")
  if cfg.position_embedding == "learned" and max_len > cfg.block_size:
    raise UserError(f"KV cache length {max_len} exceeds the model's block_size "
                    f"{cfg.block_size} (learned positions stop there).")
  shape = (cfg.cache_layers, batch_size, max_len, cfg.kv_heads * cfg.head_dim)
  dtype = cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
