"""GPT: the decoder-only Transformer (GPT-2), from model/blocks.py.

    GPT(cfg).apply({"params": params}, tokens_BT) -> float32 logits [B, T, V]
    GPT(cfg).apply({"params": params}, tokens_BT, positions_BT=..., segment_ids_BT=...,
                   prefix_BT=...)          # packed rows (model/segments.py)
    GPT(cfg).apply({"params": params}, tokens_BT, positions_BT=..., cache=cache)
        -> (logits, new cache)             # the KV cache of model/kv_cache.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.blocks import _constrain, _mask_padded, embed, norm, output_logits, token_embedding
from model.config import ModelConfig
from model.kv_cache import CACHE_AXES, Cache
from model.moe import MoE
from model.segments import positions_from_segments
from model.stack import stack


class GPT(nn.Module):
  """GPT(cfg).apply({"params": params}, tokens_BT) -> float32 logits [B, T, V].

  With `segment_ids_BT` (int32 [B, T], 0 = padding) a row holds several segments that never
  attend to each other, at `positions_BT` (default: each token's index within its segment);
  with `prefix_BT` (bool [B, T]) the prefix-LM's prefix attends to itself both ways
  (model/segments.py has the rule). All three None: one causal sequence per row at positions
  0..T-1.

  With `cache` (from `init_cache`) it returns (logits, new_cache); `positions_BT` then gives
  each token's absolute position (default 0..T-1 for every row), and `prefix_BT` marks the
  prompt a prefix-LM's prefill sees both ways (segments are not taken). With `return_hidden` the
  final-norm hidden states [B, T, D] are returned instead of logits (for a chunked loss; see
  `logits_from_hidden`). Padded-vocabulary logits are MASK_VALUE, so they are never
  predicted and have zero probability. `cache_chunks` fixes how many cache chunks attention
  reads (see `cached_attention`; for measurements), by default up to the longest position.
  """
  cfg: ModelConfig
  cache_chunks: int | None = None

  @nn.compact
  def __call__(self, tokens_BT, *, positions_BT=None, cache: Cache | None = None,
               deterministic: bool = True, return_hidden: bool = False, segment_ids_BT=None,
               prefix_BT=None):
    cfg = self.cfg
    B, T = tokens_BT.shape
    if cache is not None:
      segment_ids_BT = None
    elif prefix_BT is not None and segment_ids_BT is None:
      segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if positions_BT is None and segment_ids_BT is not None:
      positions_BT = positions_from_segments(segment_ids_BT)
    default_positions = positions_BT is None
    if default_positions:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    wte = token_embedding(cfg)
    x_BTD = embed(cfg, wte, tokens_BT, positions_BT, deterministic=deterministic,
                  default_positions=default_positions, norm_name="ln_emb")
    if cache is None:
      kv = None
    else:
      kv = (cache["k"], cache["v"], jnp.zeros((), jnp.int32) if cfg.scan_layers else 0)
    x_BTD, kv = stack(cfg, x_BTD, kv, positions_BT, num_layers=cfg.num_layers, name="h",
                      deterministic=deterministic, cache_chunks=self.cache_chunks,
                      segment_ids_BT=segment_ids_BT, prefix_BT=prefix_BT,
                      moe=MoE if cfg.num_experts else None)
    if cfg.norm_placement == "pre":
      x_BTD = norm(cfg, "ln_f")(x_BTD)
    out = x_BTD if return_hidden else output_logits(self, wte, x_BTD)
    if cache is None:
      return out
    return out, {"k": _constrain(kv[0], CACHE_AXES), "v": _constrain(kv[1], CACHE_AXES)}


def lm_head_weight(params: dict, cfg: ModelConfig) -> jax.Array:
  """The [D, V] matrix of the LM head (the transposed token embedding when tied)."""
  if cfg.tie_embeddings:
    return params["wte"]["embedding"].T
  return params["lm_head"]["kernel"]


def logits_from_hidden(params: dict, cfg: ModelConfig, x_BTD: jax.Array) -> jax.Array:
  """The LM head applied to `return_hidden` outputs: the same float32 logits GPT returns."""
  w_DV = lm_head_weight(params, cfg).astype(cfg.compute_dtype)
  logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD.astype(cfg.compute_dtype), w_DV)
  if cfg.head_bias:
    logits_BTV = logits_BTV.astype(jnp.float32) + params["head_bias"].astype(jnp.float32)
  return _mask_padded(cfg, logits_BTV)
