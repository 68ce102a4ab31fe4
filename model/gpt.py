"""GPT: the decoder-only Transformer (GPT-2), from model/blocks.py.

    GPT(cfg).apply({"params": params}, tokens_BT) -> float32 logits [B, T, V]
    GPT(cfg).apply({"params": params}, tokens_BT, positions_BT=..., cache=cache)
        -> (logits, new cache)             # the KV cache of model/kv_cache.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.blocks import (_constrain, _mask_padded, embed, norm, output_logits, stack,
                          token_embedding)
from model.config import ModelConfig
from model.kv_cache import CACHE_AXES, Cache
from model.moe import MoE


class GPT(nn.Module):
  """GPT(cfg).apply({"params": params}, tokens_BT) -> float32 logits [B, T, V].

  With `cache` (from `init_cache`) it returns (logits, new_cache); `positions_BT` then gives
  each token's absolute position (default 0..T-1 for every row). With `return_hidden` the
  final-norm hidden states [B, T, D] are returned instead of logits (for a chunked loss; see
  `logits_from_hidden`). Padded-vocabulary logits are MASK_VALUE, so they are never
  predicted and have zero probability. `cache_chunks` fixes how many cache chunks attention
  reads (see `cached_attention`; for measurements), by default up to the longest position.
  """
  cfg: ModelConfig
  cache_chunks: int | None = None

  @nn.compact
  def __call__(self, tokens_BT, *, positions_BT=None, cache: Cache | None = None,
               deterministic: bool = True, return_hidden: bool = False):
    cfg = self.cfg
    B, T = tokens_BT.shape
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
