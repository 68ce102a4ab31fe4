"""The BERT-style encoder: bidirectional self-attention over the whole sequence, a masked-LM head.

    Encoder(cfg).apply({"params": p}, tokens_BT, padding_mask_BT=None, token_types_BT=None)
        -> float32 MLM logits [B, T, V]       (return_hidden=True: hidden states [B, T, D])

Built from model/blocks.py's blocks (cfg.family == "bert"): token + learned position (+
token-type, cfg.type_vocab_size) embeddings and their LayerNorm "ln_emb" (cfg.embed_norm),
Blocks of kind "bidirectional" (h_<i>, or h with scan_layers; post-LN for BERT), a final
"ln_f" only for pre-LN, then the MLM head "mlm" (dense D -> D, the activation, LayerNorm) whose
decoder is the token embedding (tied) plus "head_bias". padding_mask_BT is Hugging Face's
attention_mask: True / 1 where a token is real, False / 0 where it is padding; padded keys are
never attended to, so padding never changes the outputs at real positions. With
cfg.mlm_head False (an imported BertModel) only return_hidden=True is possible.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.errors import UserError
from model.blocks import (ACT_BTD, _constrain, _normal, _zeros, activate, embed, norm,
                          output_logits, token_embedding)
from model.stack import stack


class Encoder(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, padding_mask_BT=None, token_types_BT=None, *,
               deterministic: bool = True, return_hidden: bool = False):
    cfg = self.cfg
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    wte = token_embedding(cfg)
    x_BTD = embed(cfg, wte, tokens_BT, positions_BT, deterministic=deterministic,
                  default_positions=True, norm_name="ln_emb", token_types_BT=token_types_BT)
    x_BTD, _ = stack(cfg, x_BTD, None, positions_BT, num_layers=cfg.num_layers, name="h",
                     deterministic=deterministic, kind="bidirectional",
                     key_mask_BS=padding_mask_BT)
    if cfg.norm_placement == "pre":
      x_BTD = norm(cfg, "ln_f")(x_BTD)
    if return_hidden:
      return x_BTD
    if not cfg.mlm_head:
      raise UserError("This encoder has no masked-LM head (an imported BertModel): call it "
                      "with return_hidden=True for its hidden states.")
    return output_logits(self, wte, MLMTransform(cfg, name="mlm")(x_BTD))


class MLMTransform(nn.Module):
  """BERT's cls.predictions.transform: dense D -> D, the activation, LayerNorm."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    h_BTD = nn.Dense(cfg.d_model, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
                     param_dtype=cfg.params_dtype, kernel_init=_normal(0.02, ("embed", "mlp")),
                     bias_init=_zeros(("mlp",)), name="dense")(x_BTD)
    h_BTD = _constrain(activate(cfg, h_BTD), ACT_BTD)
    return norm(cfg, "ln")(h_BTD)


def hidden_states(params, cfg: ModelConfig, tokens_BT, padding_mask_BT=None,
                  token_types_BT=None) -> jax.Array:
  """The final hidden states [B, T, D] (no dropout)."""
  return Encoder(cfg).apply({"params": params}, tokens_BT, padding_mask_BT, token_types_BT,
                            return_hidden=True)
