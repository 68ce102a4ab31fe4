"""The encoder-decoder Transformer (Vaswani et al. 2017; BART): an encoder over the source, a
causal decoder over the target whose blocks also attend to the encoder output.

    EncoderDecoder(cfg).apply({"params": p}, src_BS, tgt_BT, src_padding_mask_BS=None)
        -> float32 logits [B, T, V] of the next target token at every target position

Built from model/blocks.py's blocks (cfg.family == "encdec"); one token embedding "wte"
is shared by the source, the target and the output (tied, times sqrt(D) with embed_scale).
  encoder  positions "wpe" (learned) or sinusoidal, "ln_emb" (embed_norm), bidirectional
           Blocks enc_<i> (scan: enc), "ln_enc" when pre-LN
  decoder  positions "wpe_dec", "ln_dec_emb", Blocks dec_<i> (scan: dec) of causal
           self-attention, cross-attention to the encoder output ("cross", "ln_x") and the
           MLP, "ln_f" when pre-LN, then the tied head (+ "head_bias": BART's
           final_logits_bias); its own heads and MLP width where num_decoder_heads /
           decoder_d_mlp say so (cfg.decoder())
The 2017 paper: sinusoidal positions, post-LN, ReLU, embed_scale; BART: learned positions with
position_offset 2, GELU, embed_norm, post-LN. src_padding_mask_BS is True / 1 at real source
tokens (Hugging Face's attention_mask); padded source tokens are never attended to.

Cached decoding (model/decode/seq2seq.py): `start_cache` encodes the source once, projects every
decoder layer's cross-attention keys and values once ("ck", "cv" [L, B, S, H * K]), and makes
the self-attention KV cache ("k", "v" [L, B, T, H * K], as GPT's); `decode` runs target tokens
at given positions through the decoder with that cache.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.errors import UserError
from model.kv_cache import CACHE_AXES, Cache, init_cache
from model.blocks import _constrain, embed, norm, output_logits, token_embedding
from model.stack import stack


def _positions(B: int, T: int):
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))


def cross_kv(c_kv: dict, cfg: ModelConfig, enc_BSD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A cross-attention layer's keys and values [B, S, H, K] from its c_kv parameters (kernel
  [..., D, 2, H, K], bias [..., 2, H, K]; a leading L axis for the scan layout gives [L, B, S,
  H, K]): the same projection Attention(kind="cross") applies to the encoder output."""
  dt = cfg.compute_dtype
  kernel = c_kv["kernel"].astype(dt)
  if kernel.ndim == 5:
    kv = jnp.einsum("BSD,LDCHK->LBSCHK", enc_BSD.astype(dt), kernel)
  else:
    kv = jnp.einsum("BSD,DCHK->BSCHK", enc_BSD.astype(dt), kernel)
  if cfg.qkv_bias_on:
    bias = c_kv["bias"].astype(dt)
    kv = kv + (bias[:, None, None] if kernel.ndim == 5 else bias)
  return kv[..., 0, :, :], kv[..., 1, :, :]


class EncoderDecoder(nn.Module):
  """See the module docstring. With tgt_BT None the encoder output [B, S, D] is returned; with
  `cache` (from `start_cache`) src_BS is not read, the decoder runs tgt_BT at positions_BT
  (default 0..T-1) and (logits, new cache) are returned."""
  cfg: ModelConfig
  cache_chunks: int | None = None

  @nn.compact
  def __call__(self, src_BS, tgt_BT=None, src_padding_mask_BS=None, *, positions_BT=None,
               cache: Cache | None = None, deterministic: bool = True,
               return_hidden: bool = False):
    cfg = self.cfg
    wte = token_embedding(cfg)
    if cache is None:
      B, S = src_BS.shape
      src_positions = _positions(B, S)
      x_BSD = embed(cfg, wte, src_BS, src_positions, deterministic=deterministic,
                    default_positions=True, norm_name="ln_emb")
      x_BSD, _ = stack(cfg, x_BSD, None, src_positions, num_layers=cfg.num_layers, name="enc",
                       deterministic=deterministic, kind="bidirectional",
                       key_mask_BS=src_padding_mask_BS)
      if cfg.norm_placement == "pre":
        x_BSD = norm(cfg, "ln_enc")(x_BSD)
      if tgt_BT is None:
        return x_BSD
      memory, memory_mask_BS, kv = x_BSD, src_padding_mask_BS, None
    else:
      L, B, S, _ = cache["ck"].shape
      H, K = cfg.decoder().num_heads, cfg.decoder().head_dim
      memory = (cache["ck"].reshape(L, B, S, H, K), cache["cv"].reshape(L, B, S, H, K))
      memory_mask_BS = cache["src_mask"]
      kv = (cache["k"], cache["v"], jnp.zeros((), jnp.int32) if cfg.scan_layers else 0)
    B, T = tgt_BT.shape
    default_positions = positions_BT is None
    if default_positions:
      positions_BT = _positions(B, T)
    y_BTD = embed(cfg, wte, tgt_BT, positions_BT, deterministic=deterministic,
                  default_positions=default_positions, wpe_name="wpe_dec",
                  norm_name="ln_dec_emb")
    y_BTD, kv = stack(cfg.decoder(), y_BTD, kv, positions_BT, num_layers=cfg.decoder_layers,
                      name="dec", deterministic=deterministic, cache_chunks=self.cache_chunks,
                      cross=True, memory=memory, memory_mask_BS=memory_mask_BS)
    if cfg.norm_placement == "pre":
      y_BTD = norm(cfg, "ln_f")(y_BTD)
    out = y_BTD if return_hidden else output_logits(self, wte, y_BTD)
    if cache is None:
      return out
    return out, dict(cache, k=_constrain(kv[0], CACHE_AXES), v=_constrain(kv[1], CACHE_AXES))


def encode(params, cfg: ModelConfig, src_BS, src_padding_mask_BS=None) -> jax.Array:
  """The encoder output [B, S, D] (no dropout)."""
  return EncoderDecoder(cfg).apply({"params": params}, src_BS, None, src_padding_mask_BS)


def cross_cache(params, cfg: ModelConfig, enc_BSD) -> tuple[jax.Array, jax.Array]:
  """Every decoder layer's cross-attention keys and values of the encoder output, computed once:
  ([L, B, S, H * K], [L, B, S, H * K])."""
  dec = cfg.decoder()
  if cfg.scan_layers:
    k, v = cross_kv(params["dec"]["cross"]["c_kv"], dec, enc_BSD)
  else:
    pairs = [cross_kv(params[f"dec_{i}"]["cross"]["c_kv"], dec, enc_BSD)
             for i in range(cfg.decoder_layers)]
    k, v = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
  L, B, S, H, K = k.shape
  return k.reshape(L, B, S, H * K), v.reshape(L, B, S, H * K)


def start_cache(params, cfg: ModelConfig, src_BS, src_padding_mask_BS, max_len: int,
                dtype=None) -> Cache:
  """The decoding cache of a batch of sources: the self-attention cache of max_len target
  slots (zeros), the cross-attention keys and values, and the source padding mask [B, S]."""
  B, S = src_BS.shape
  if cfg.position_embedding == "learned" and S > cfg.block_size:
    raise UserError(f"The source has {S} tokens, more than the model's {cfg.block_size} "
                    f"positions.")
  if src_padding_mask_BS is None:
    src_padding_mask_BS = jnp.ones((B, S), bool)
  enc_BSD = encode(params, cfg, src_BS, src_padding_mask_BS)
  ck, cv = cross_cache(params, cfg, enc_BSD)
  cache = init_cache(cfg, B, max_len, dtype)
  dt = cache["k"].dtype
  return dict(cache, ck=_constrain(ck.astype(dt), CACHE_AXES),
              cv=_constrain(cv.astype(dt), CACHE_AXES),
              src_mask=src_padding_mask_BS.astype(bool))


def decode(params, cfg: ModelConfig, tgt_BT, positions_BT, cache: Cache, *,
           cache_chunks: int | None = None, return_hidden: bool = False):
  """(logits [B, T, V] (or hidden states), new cache) of target tokens at positions_BT."""
  return EncoderDecoder(cfg, cache_chunks=cache_chunks).apply(
      {"params": params}, None, tgt_BT, positions_BT=positions_BT, cache=cache,
      return_hidden=return_hidden)
