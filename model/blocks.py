"""The blocks every family of the Transformer is built from (Flax Linen): LayerNorm, attention
(causal / bidirectional / cross; model/attention.py picks the kernel, model/kv_cache.py holds
the cache), the MLP, a Block, the embeddings, the output head (model/stack.py stacks the
blocks; model/moe.py is the sparse MLP a Block may hold instead of the dense one).
Positions enter through model/positions.py (sinusoidal, rotary) or the learned table; packed
rows' segment ids and the prefix-LM's prefix (model/segments.py) reach every causal
self-attention as explicit arguments, like the KV cache.
model/gpt.py, model/encoder.py and model/encdec.py assemble them; model/families.py picks one by
cfg.family.

Shape letters used in names and einsums throughout the codebase:

  B  batch                 T  query length           S  key length (KV-cache slots)
  D  model width           H  attention heads        K  head dimension (D = H * K)
  F  MLP hidden width      V  (padded) vocabulary    L  layers
  A  micro-batches of a step (gradient accumulation, training/step.py)
  P  padded prompt length    M  sampled-token buffer length (both model/decode/sampling.py)
  r  LoRA rank (model/lora.py)
  E  experts  J  experts per token  N  tokens routed together  Q  N * J assignments
  C  slots per expert (capacity)    (the mixture of experts, model/moe.py)

Parameter names follow GPT-2 / nanoGPT (wte, wpe, h_<i>/{ln_1, attn/c_attn, attn/c_proj, ln_2,
mlp/c_fc, mlp/c_proj}, ln_f); with `scan_layers` the blocks are one module "h" whose parameters
carry a leading L axis (model/layout.py converts between the two layouts). Every parameter
carries logical axis names; activations are constrained with logical names prefixed "act_".
The mapping to mesh axes lives only in sharding/rules.py.

Grouped-query attention (cfg.num_kv_heads = G < H): keys and values have G heads; query head h
reads key/value head h // R, R = H / G (letters G and R in einsums).

The KV cache is an explicit pytree {"k": [L, B, S, G * K], "v": [L, B, S, G * K]} (see
`model.kv_cache.init_cache`), passed in and returned. Each layer writes its new keys and values
into the carried arrays in place (one scatter: row b's tokens go to slots positions_BT[b, :]),
so a decode step never copies the cache, and attends to the slots <= each query's position by
reading the cache in chunks of CACHE_CHUNK slots up to the longest row's position
(`cached_attention`, an online softmax): a step reads only the filled part of the cache.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import attention
from model.attention import MASK_VALUE, causal_mask, reference_attention  # re-exported
from model.config import ModelConfig
from model.lora import dense_args, lora_delta
from model.positions import rotary, sinusoidal_positions  # the latter re-exported
from model.kv_cache import cached_attention, write_cache

ACT_BTD = ("act_batch", "act_length", "act_embed")
ACT_BTHK = ("act_batch", "act_length", "act_heads", "act_kv")
ACT_BTGK = ("act_batch", "act_length", "act_kv_heads", "act_kv")  # keys, values of G heads
ACT_BTF = ("act_batch", "act_length", "act_mlp")
ACT_BTV = ("act_batch", "act_length", "act_vocab")
# The collection a sparse MLP sows its routing statistics into (model/moe.py); scanned layers
# stack it like their parameters.
MOE_COLLECTION = "moe"

def _normal(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


def _constrain_if_divisible(x, axes):
  """_constrain, unless a mesh axis the rules give one of x's dimensions does not divide it (a
  model with 2 key/value heads on tensor=4): then XLA places x as it sees fit."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    try:
      spec = nn.logical_to_mesh_axes(axes)
    except (ValueError, TypeError):  # no rules in context
      return x
    for dim, entry in zip(x.shape, tuple(spec) + (None,) * (x.ndim - len(spec))):
      names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      if dim % math.prod(mesh.shape[n] for n in names):
        return x
  return _constrain(x, axes)


# Tables with at most this many rows are read with a one-hot matmul instead of a gather: the
# values are the same, and the gradient is a small matmul instead of a scatter-add, which
# XLA:CPU runs slowly (a quarter of the quick start's step on 2 cores; docs/performance.md).
ONE_HOT_LOOKUP_ROWS = 1024


def _lookup(table: nn.Embed, ids_BT, rows_axis: str | None):
  """table(ids_BT), with the table constrained to whole rows first (only its rows may stay split,
  over `rows_axis`). Under FSDP the embed axis of the table is split over the same mesh axis as
  the batch, and XLA cannot gather from such a table straight into batch-split rows (it warns of
  an "involuntary full rematerialization"); gathering the table's embed axis first is the usual
  just-in-time FSDP all-gather. The values are exactly those of table(ids_BT)."""
  table_RD = _constrain(table.embedding, (rows_axis, "act_embed")).astype(table.dtype)
  R = table_RD.shape[0]
  if R <= ONE_HOT_LOOKUP_ROWS:
    one_hot_BTR = jax.nn.one_hot(ids_BT, R, dtype=table_RD.dtype)
    return jnp.einsum("BTR,RD->BTD", one_hot_BTR, table_RD,
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.take(table_RD, ids_BT, axis=0)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis, statistics in float32 (Zhang and
  Sennrich 2019; Llama's, as Hugging Face's LlamaRMSNorm: no mean, no bias)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    scale_D = self.param("scale", _ones(("norm",)), (x_BTD.shape[-1],), cfg.params_dtype)
    x_BTD = x_BTD.astype(jnp.float32)
    ms_BT1 = jnp.mean(x_BTD * x_BTD, axis=-1, keepdims=True)
    y_BTD = x_BTD * jax.lax.rsqrt(ms_BT1 + cfg.norm_eps) * scale_D.astype(jnp.float32)
    return y_BTD.astype(cfg.compute_dtype)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
  """The normalisation cfg.norm names (LayerNorm or RMSNorm), as module `name`."""
  return RMSNorm(cfg, name=name) if cfg.norm == "rmsnorm" else LayerNorm(cfg, name=name)


class LayerNorm(nn.Module):
  """(x - mean) / sqrt(var + eps) * scale (+ bias) over the last axis, statistics in float32.

  The same function and parameters ("scale", "bias") as nn.LayerNorm(use_fast_variance=False),
  written out because nn.LayerNorm's backward compiles to slower code on XLA:CPU: the quick
  start's training step took ~15% less time on one core with this (docs/performance.md).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    D = x_BTD.shape[-1]
    scale_D = self.param("scale", _ones(("norm",)), (D,), cfg.params_dtype)
    x_BTD = x_BTD.astype(jnp.float32)
    centred_BTD = x_BTD - jnp.mean(x_BTD, axis=-1, keepdims=True)
    var_BT1 = jnp.mean(centred_BTD * centred_BTD, axis=-1, keepdims=True)
    y_BTD = centred_BTD * jax.lax.rsqrt(var_BT1 + cfg.norm_eps)
    y_BTD = y_BTD * scale_D.astype(jnp.float32)
    if cfg.use_bias:
      bias_D = self.param("bias", _zeros(("norm",)), (D,), cfg.params_dtype)
      y_BTD = y_BTD + bias_D.astype(jnp.float32)
    return y_BTD.astype(cfg.compute_dtype)


def _residual_std(cfg: ModelConfig) -> float:
  """GPT-2 / nanoGPT: output projections into the residual stream use 0.02 / sqrt(2 L)."""
  return 0.02 / math.sqrt(2 * cfg.num_layers)


class EinsumDense(nn.Module):
  """y = einsum(spec, x, kernel) + bias, where the bias covers the kernel's output axes (those
  after the input axes that the spec contracts). Kernel and bias carry logical axis names.
  With `lora` (the adapted parts: model/lora.py's dense_args) a LoRA adapter's output is added,
  its dropout on unless `deterministic`."""
  cfg: ModelConfig
  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  std: float
  bias: bool = True  # and cfg.use_bias
  lora: tuple[str, ...] = ()
  fused: tuple[str, ...] = ()
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, self.cfg.compute_dtype
    kernel = self.param("kernel", _normal(self.std, self.kernel_axes), self.kernel_shape,
                        cfg.params_dtype)
    y = jnp.einsum(self.spec, x.astype(dt), kernel.astype(dt))
    if cfg.use_bias and self.bias:
      in_letters, out_letters = self.spec.split("->")
      x_letters, k_letters = in_letters.split(",")
      n_out = sum(1 for c in k_letters if c not in x_letters)
      bias = self.param("bias", _zeros(self.kernel_axes[-n_out:]), self.kernel_shape[-n_out:],
                        cfg.params_dtype)
      y = y + bias.astype(dt)
    if self.lora:
      y = y + lora_delta(self, x, self.spec, self.kernel_shape, self.kernel_axes, self.lora,
                         self.fused, self.deterministic)
    return y


class Attention(nn.Module):
  """Multi-head attention, one module for every use in the family (`kind`):

    causal         self-attention, query t seeing keys <= t (GPT, the encdec decoder); with a
                   KV cache (k_LBSD, v_LBSD, layer) the new keys and values are written into
                   layer `layer` of the whole-model cache arrays and attention reads them back
                   from there (see `cached_attention`; `cache_chunks` as its num_chunks)
    bidirectional  self-attention to every key whose key_mask_BS entry is True (all when
                   None): the encoder, padding masked
    cross          queries from x_BTD, keys and values from `memory`: the encoder output
                   enc_BSD (projected here by c_kv), or the already projected (k_BSHK, v_BSHK)
                   of a cross-attention cache (model/encdec.py's `cross_kv`, computed once per source); keys
                   masked by key_mask_BS (the source padding)

  Self-attention projects q, k, v with one fused c_attn [D, 3, H, K] (GPT-2's names), or with
  grouped-query attention (G = cfg.kv_heads < H) c_q [D, H, K] and c_kv [D, 2, G, K];
  cross-attention with c_q [D, H, K] and c_kv [D, 2, H, K]; the output with c_proj [H, K, D].
  Rotary positions (cfg.position_embedding) turn self-attention's queries and keys by
  positions_BT before they are used or cached. Causal self-attention without a cache keeps to
  the segments of segment_ids_BT and sees the prefix of prefix_BT both ways (model/segments.py);
  with a cache, prefix_BT (a prefix-LM's prompt in the prefill) sees the whole prompt.
  """
  cfg: ModelConfig
  deterministic: bool = True
  cache_chunks: int | None = None
  kind: str = "causal"

  @nn.compact
  def __call__(self, x_BTD, positions_BT=None, kv_cache=None, key_mask_BS=None, memory=None,
               segment_ids_BT=None, prefix_BT=None):
    cfg = self.cfg
    H, K, G = cfg.num_heads, cfg.head_dim, cfg.kv_heads
    qkv_bias = cfg.qkv_bias_on
    if self.kind == "cross":
      G = H
      q_BTHK = EinsumDense(cfg, "BTD,DHK->BTHK", (cfg.d_model, H, K), ("embed", "heads", "kv"),
                           0.02, qkv_bias, name="c_q")(x_BTD)
      if isinstance(memory, tuple):
        k_BTGK, v_BTGK = memory
      else:
        kv_BS2HK = EinsumDense(cfg, "BSD,DCHK->BSCHK", (cfg.d_model, 2, H, K),
                               ("embed", "qkv", "heads", "kv"), 0.02, qkv_bias,
                               name="c_kv")(memory)
        k_BTGK, v_BTGK = kv_BS2HK[:, :, 0], kv_BS2HK[:, :, 1]
    elif G == H:
      qkv_BT3HK = EinsumDense(cfg, "BTD,DCHK->BTCHK", (cfg.d_model, 3, H, K),
                              ("embed", "qkv", "heads", "kv"), 0.02, qkv_bias,
                              name="c_attn", **self._lora("c_attn"))(x_BTD)
      q_BTHK, k_BTGK, v_BTGK = (qkv_BT3HK[:, :, i] for i in range(3))
    else:
      q_BTHK = EinsumDense(cfg, "BTD,DHK->BTHK", (cfg.d_model, H, K), ("embed", "heads", "kv"),
                           0.02, qkv_bias, name="c_q", **self._lora("c_q"))(x_BTD)
      kv_BT2GK = EinsumDense(cfg, "BTD,DCGK->BTCGK", (cfg.d_model, 2, G, K),
                             ("embed", "qkv", "kv_heads", "kv"), 0.02, qkv_bias,
                             name="c_kv", **self._lora("c_kv"))(x_BTD)
      k_BTGK, v_BTGK = kv_BT2GK[:, :, 0], kv_BT2GK[:, :, 1]
    if cfg.qk_norm != "none" and self.kind != "cross":
      q_BTHK, k_BTGK = qk_norm(cfg, q_BTHK, "q_norm"), qk_norm(cfg, k_BTGK, "k_norm")
    if cfg.position_embedding == "rotary" and self.kind != "cross":  # GPT: positions given
      q_BTHK, k_BTGK = rotary(q_BTHK, positions_BT, cfg), rotary(k_BTGK, positions_BT, cfg)
    q_BTHK = _constrain(q_BTHK, ACT_BTHK)
    kv_axes = ACT_BTHK if G == H else ACT_BTGK
    k_BTGK = _constrain_if_divisible(k_BTGK, kv_axes)
    v_BTGK = _constrain_if_divisible(v_BTGK, kv_axes)

    attn_dropout = cfg.attn_dropout > 0 and not self.deterministic
    dropout = nn.Dropout(cfg.attn_dropout, deterministic=False) if attn_dropout else None
    if self.kind != "causal":
      B, T, S = q_BTHK.shape[0], q_BTHK.shape[1], k_BTGK.shape[1]
      mask_B1TS = (jnp.ones((B, 1, T, S), bool) if key_mask_BS is None
                   else jnp.broadcast_to(key_mask_BS.astype(bool)[:, None, None, :],
                                         (B, 1, T, S)))
      out_BTHK = reference_attention(q_BTHK, k_BTGK, v_BTGK, mask_B1TS, dropout)
    elif kv_cache is None:
      T = x_BTD.shape[1]
      # model/attention.py; init only needs shapes (and traces a short dummy sequence)
      impl = "xla" if self.is_initializing() else attention.implementation(
          cfg, T, attn_dropout, segments=segment_ids_BT is not None, prefix=prefix_BT is not None)
      out_BTHK = attention.self_attention(q_BTHK, k_BTGK, v_BTGK, impl, dropout=dropout,
                                          segment_ids_BT=segment_ids_BT, prefix_BT=prefix_BT)
    else:
      k_LBSD, v_LBSD, layer = kv_cache
      k_LBSD = write_cache(k_LBSD, layer, positions_BT, k_BTGK)
      v_LBSD = write_cache(v_LBSD, layer, positions_BT, v_BTGK)
      kv_cache = (k_LBSD, v_LBSD, layer)
      seen_BT = positions_BT  # the last slot each query sees
      if prefix_BT is not None:  # a prefix-LM's prompt (the prefill) sees itself both ways
        last_B1 = jnp.max(jnp.where(prefix_BT, positions_BT, -1), axis=1, keepdims=True)
        seen_BT = jnp.where(prefix_BT, last_B1, positions_BT)
      out_BTHK = cached_attention(q_BTHK, k_LBSD, v_LBSD, layer, seen_BT,
                                  num_chunks=self.cache_chunks)
    out_BTHK = _constrain(out_BTHK.astype(cfg.compute_dtype), ACT_BTHK)
    y_BTD = EinsumDense(cfg, "BTHK,HKD->BTD", (H, K, cfg.d_model), ("heads", "kv", "embed"),
                        _residual_std(cfg), cfg.proj_bias_on, name="c_proj",
                        **self._lora("c_proj"))(out_BTHK)
    y_BTD = nn.Dropout(cfg.resid_dropout)(y_BTD, deterministic=self.deterministic)
    return y_BTD, kv_cache

  def _lora(self, module: str) -> dict:
    """The LoRA arguments of one of self-attention's projections (none for cross-attention)."""
    if self.kind == "cross" or not self.cfg.lora_rank:
      return {}
    return dict(dense_args(self.cfg, f"attn/{module}"), deterministic=self.deterministic)


def qk_norm(cfg: ModelConfig, x_BTNK, name: str):
  """RMSNorm `name` of queries or keys [B, T, N, K] (inside Attention's compact method): over
  each head's K (cfg.qk_norm "head", Qwen3) or over all N * K of a position ("full", OLMoE)."""
  if cfg.qk_norm == "head":
    return RMSNorm(cfg, name=name)(x_BTNK)
  B, T, N, K = x_BTNK.shape
  return RMSNorm(cfg, name=name)(x_BTNK.reshape(B, T, N * K)).reshape(B, T, N, K)


def activate(cfg: ModelConfig, h):
  """cfg.activation: GELU (tanh approximation: GPT-2's gelu_new), exact GELU, or ReLU (SwiGLU's
  gate is applied by the MLP)."""
  if cfg.activation == "gelu_tanh":
    return jax.nn.gelu(h, approximate=True)
  if cfg.activation == "gelu":
    return jax.nn.gelu(h, approximate=False)
  return jax.nn.relu(h)


class MLP(nn.Module):
  """c_proj(act(c_fc(x))), or with SwiGLU c_proj(silu(c_gate(x)) * c_fc(x)) (Llama's gate_proj,
  up_proj and down_proj)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    bias = cfg.mlp_bias_on
    lora = lambda name: (dict(dense_args(cfg, f"mlp/{name}"), deterministic=self.deterministic)
                         if cfg.lora_rank else {})
    dense_DF = lambda name: EinsumDense(cfg, "BTD,DF->BTF", (cfg.d_model, cfg.d_mlp),
                                        ("embed", "mlp"), 0.02, bias, name=name, **lora(name))
    h_BTF = _constrain(dense_DF("c_fc")(x_BTD), ACT_BTF)
    if cfg.activation == "swiglu":
      gate_BTF = _constrain(dense_DF("c_gate")(x_BTD), ACT_BTF)
      h_BTF = jax.nn.silu(gate_BTF) * h_BTF
    else:
      h_BTF = activate(cfg, h_BTF)
    y_BTD = EinsumDense(cfg, "BTF,FD->BTD", (cfg.d_mlp, cfg.d_model), ("mlp", "embed"),
                        _residual_std(cfg), bias, name="c_proj", **lora("c_proj"))(h_BTF)
    return nn.Dropout(cfg.resid_dropout)(y_BTD, deterministic=self.deterministic)


class Block(nn.Module):
  """One transformer block; (x, kv_cache, positions) -> (x, new kv_cache). kv_cache is None or
  (k_LBSD, v_LBSD, layer): the whole-model cache arrays and this block's layer index, returned
  as (updated k, updated v, layer + 1) for the next block.

  `kind` is its self-attention's (causal: GPT and the decoder; bidirectional: the encoder, keys
  masked by key_mask_BS). With `cross` (the encdec decoder) a cross-attention sub-block
  ("cross", normed by "ln_x") follows the self-attention, attending to `memory` (see Attention)
  with the source padding memory_mask_BS. With `moe` (a sparse layer: the module class of
  model/moe.py, which the family passes) the MLP is that mixture of experts, named "moe"."""
  cfg: ModelConfig
  deterministic: bool = True
  cache_chunks: int | None = None
  kind: str = "causal"
  cross: bool = False
  moe: Any = None

  @nn.compact
  def __call__(self, x_BTD, kv_cache, positions_BT, key_mask_BS=None, memory=None,
               memory_mask_BS=None, segment_ids_BT=None, prefix_BT=None):
    cfg = self.cfg
    attn = Attention(cfg, self.deterministic, self.cache_chunks, self.kind, name="attn")
    if self.moe is None:
      ffn = MLP(cfg, self.deterministic, name="mlp")
    else:  # the experts leave packed rows' padding out (model/moe.py)
      ffn = functools.partial(self.moe(cfg, self.deterministic, name="moe"),
                              segment_ids_BT=segment_ids_BT)
    ln_1, ln_2 = norm(cfg, "ln_1"), norm(cfg, "ln_2")
    cross = ln_x = None
    if self.cross:
      cross = Attention(cfg, self.deterministic, kind="cross", name="cross")
      ln_x = norm(cfg, "ln_x")
    if cfg.norm_placement == "pre":
      y_BTD, kv_cache = attn(ln_1(x_BTD), positions_BT, kv_cache, key_mask_BS, None,
                             segment_ids_BT, prefix_BT)
      x_BTD = x_BTD + y_BTD
      if cross is not None:
        x_BTD = x_BTD + cross(ln_x(x_BTD), key_mask_BS=memory_mask_BS, memory=memory)[0]
      x_BTD = x_BTD + ffn(ln_2(x_BTD))
    else:  # post-LN, as in the original Transformer
      y_BTD, kv_cache = attn(x_BTD, positions_BT, kv_cache, key_mask_BS, None, segment_ids_BT,
                             prefix_BT)
      x_BTD = ln_1(x_BTD + y_BTD)
      if cross is not None:
        x_BTD = ln_x(x_BTD + cross(x_BTD, key_mask_BS=memory_mask_BS, memory=memory)[0])
      x_BTD = ln_2(x_BTD + ffn(x_BTD))
    if kv_cache is not None:
      kv_cache = (kv_cache[0], kv_cache[1], kv_cache[2] + 1)
    return _constrain(x_BTD, ACT_BTD), kv_cache


def embed(cfg: ModelConfig, wte: nn.Embed, tokens_BT, positions_BT, *, deterministic: bool,
          default_positions: bool, wpe_name: str = "wpe", norm_name: str | None = None,
          token_types_BT=None):
  """Token (+ position, + token-type) embeddings [B, T, D], called inside a module's compact
  method (the tables it creates belong to that module): token rows times sqrt(D) with
  `embed_scale`; learned positions read rows position_offset + p of the table `wpe_name`, or
  sinusoidal ones are added; token types (type_vocab_size > 0) from "wtt"; a LayerNorm named
  `norm_name` when cfg.embed_norm; then embedding dropout."""
  T = tokens_BT.shape[1]
  x_BTD = _lookup(wte, tokens_BT, "act_vocab")
  if cfg.embed_scale:
    x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), x_BTD.dtype)
  if cfg.position_embedding == "learned":
    wpe = nn.Embed(cfg.block_size + cfg.position_offset, cfg.d_model, dtype=cfg.compute_dtype,
                   param_dtype=cfg.params_dtype,
                   embedding_init=_normal(0.02, ("position", "embed")), name=wpe_name)
    off = cfg.position_offset
    if default_positions:  # rows 0..T-1 for every sequence: a slice, no lookup
      wpe_TD = _constrain(wpe.embedding, (None, "act_embed"))[off:off + T].astype(wpe.dtype)
      x_BTD = x_BTD + wpe_TD[None]
    else:
      x_BTD = x_BTD + _lookup(wpe, positions_BT + off, None)
  elif cfg.position_embedding == "sinusoidal":
    x_BTD = x_BTD + sinusoidal_positions(positions_BT, cfg.d_model).astype(x_BTD.dtype)
  # rotary positions are applied to queries and keys in Attention
  if cfg.type_vocab_size:
    wtt = nn.Embed(cfg.type_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                   param_dtype=cfg.params_dtype,
                   embedding_init=_normal(0.02, ("token_types", "embed")), name="wtt")
    types_BT = (jnp.zeros_like(tokens_BT) if token_types_BT is None
                else token_types_BT.astype(jnp.int32))
    x_BTD = x_BTD + _lookup(wtt, types_BT, None)
  if cfg.embed_norm:
    x_BTD = norm(cfg, norm_name)(x_BTD)
  x_BTD = nn.Dropout(cfg.embd_dropout)(x_BTD, deterministic=deterministic)
  return _constrain(x_BTD, ACT_BTD)


def output_logits(module: nn.Module, wte: nn.Embed, x_BTD):
  """The LM head inside `module`'s compact method (its parameters are module's): the tied token
  embedding (or an untied "lm_head"), plus the "head_bias" [V] with cfg.head_bias; float32,
  padded rows MASK_VALUE."""
  cfg = module.cfg
  if cfg.tie_embeddings:
    logits_BTV = wte.attend(x_BTD)
  else:
    logits_BTV = nn.Dense(cfg.padded_vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                          param_dtype=cfg.params_dtype,
                          kernel_init=_normal(0.02, ("embed", "vocab")), name="lm_head")(x_BTD)
  if cfg.head_bias:
    bias_V = module.param("head_bias", _zeros(("vocab",)), (cfg.padded_vocab_size,),
                          cfg.params_dtype)
    logits_BTV = logits_BTV.astype(jnp.float32) + bias_V.astype(jnp.float32)
  return _mask_padded(cfg, logits_BTV)


def token_embedding(cfg: ModelConfig) -> nn.Embed:
  return nn.Embed(cfg.padded_vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                  param_dtype=cfg.params_dtype, embedding_init=_normal(0.02, ("vocab", "embed")),
                  name="wte")


def _mask_padded(cfg: ModelConfig, logits_BTV):
  logits_BTV = _constrain(logits_BTV.astype(jnp.float32), ACT_BTV)
  if cfg.padded_vocab_size > cfg.vocab_size:
    valid_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    logits_BTV = jnp.where(valid_V, logits_BTV, MASK_VALUE)
  return logits_BTV
