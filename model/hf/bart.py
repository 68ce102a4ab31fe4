"""Hugging Face BART checkpoints (BartForConditionalGeneration) -> (ModelConfig, params).

Read through model/hf's `load_hf` (config.json + model.safetensors; model_type
"bart"). BART is model/encdec.py's EncoderDecoder with learned positions whose tables start at
row 2 (position_offset 2), GELU, post-LN, a LayerNorm after the embeddings, and the logits bias
final_logits_bias; token embeddings times sqrt(D) only with scale_embedding. The mapping
(torch Linear weights are [out, in]; keys may start with "model."):

  shared [V, D] (or encoder.embed_tokens)    wte/embedding, tied to the output
  encoder.embed_positions [P + 2, D]         wpe/embedding      decoder's: wpe_dec
  encoder.layernorm_embedding                ln_emb             decoder's: ln_dec_emb
  encoder.layers.i.self_attn.{q,k,v,out}_proj  enc_i/attn/c_attn [D, 3, H, K], c_proj
  (the decoder's layers with its own heads and MLP width: decoder_attention_heads and
  decoder_ffn_dim may differ from the encoder's; ModelConfig.num_decoder_heads, decoder_d_mlp)
  encoder.layers.i.self_attn_layer_norm      enc_i/ln_1
  encoder.layers.i.fc1, fc2                  enc_i/mlp/c_fc, c_proj
  encoder.layers.i.final_layer_norm          enc_i/ln_2
  decoder.layers.i.self_attn / _layer_norm   dec_i/attn, dec_i/ln_1
  decoder.layers.i.encoder_attn.q_proj       dec_i/cross/c_q [D, H, K]
  decoder.layers.i.encoder_attn.{k,v}_proj   dec_i/cross/c_kv [D, 2, H, K]
  decoder.layers.i.encoder_attn_layer_norm   dec_i/ln_x
  decoder.layers.i.fc1, fc2, final_layer_norm  dec_i/mlp, dec_i/ln_2
  final_logits_bias [1, V]                   head_bias

Generation starts the target with decoder_start_token_id (bos_id here) and stops at
eos_token_id; forced_bos_token_id / forced_eos_token_id and activation_dropout are not modelled
(the first changes what bart-large generates first: pass the token as the target's start).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.fields import read_fields
from model.hf.tensors import HFTensors, checked_config, finish_params, hf_activation, pad_rows
from model.hf.tokenizer import special_ids

# The fields read from config.json: (BartConfig's default for one left out, its kind).
SCHEMA = dict(vocab_size=(50265, "int+"), max_position_embeddings=(1024, "int+"),
              encoder_layers=(12, "int+"), encoder_ffn_dim=(4096, "int+"),
              encoder_attention_heads=(16, "int+"), decoder_layers=(12, "int+"),
              decoder_ffn_dim=(4096, "int+"), decoder_attention_heads=(16, "int+"),
              d_model=(1024, "int+"), activation_function=("gelu", "str"),
              dropout=(0.1, "prob"), attention_dropout=(0.0, "prob"),
              scale_embedding=(False, "bool"), pad_token_id=(1, "id?"),
              bos_token_id=(0, "id?"), eos_token_id=(2, "id?"),
              decoder_start_token_id=(2, "id?"), tie_word_embeddings=(True, "bool"))
FIXED = ("family", "vocab_size", "num_layers", "num_decoder_layers", "num_heads",
         "num_decoder_heads", "d_model", "d_mlp", "decoder_d_mlp", "position_embedding",
         "position_offset", "norm_placement", "activation",
         "embed_norm", "embed_scale", "head_bias", "tie_embeddings")
OFFSET = 2  # BartLearnedPositionalEmbedding's


def config_from_hf(hf_config: dict[str, Any], *, special_ids: dict[str, int], source: str,
                   **overrides) -> ModelConfig:
  c = read_fields(hf_config, SCHEMA, source)
  if not c["tie_word_embeddings"]:
    raise UserError(f"{source}: tie_word_embeddings=False is not supported (BART ties the "
                    f"output to the shared embedding).")
  ids = {k: (-1 if c[v] is None else c[v]) for k, v in (
      ("pad_id", "pad_token_id"), ("bos_id", "decoder_start_token_id"),
      ("eos_id", "eos_token_id"))}
  fields = dict(
      family="encdec", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
      num_layers=c["encoder_layers"], num_decoder_layers=c["decoder_layers"],
      num_heads=c["encoder_attention_heads"], d_model=c["d_model"], d_mlp=c["encoder_ffn_dim"],
      # the decoder's own, where they differ (0: the encoder's)
      num_decoder_heads=_differs(c["decoder_attention_heads"], c["encoder_attention_heads"]),
      decoder_d_mlp=_differs(c["decoder_ffn_dim"], c["encoder_ffn_dim"]),
      activation=hf_activation(c["activation_function"], source), norm_eps=1e-5,
      position_embedding="learned", position_offset=OFFSET, norm_placement="post",
      embed_norm=True, embed_scale=bool(c["scale_embedding"]), head_bias=True,
      embd_dropout=c["dropout"], resid_dropout=c["dropout"], attn_dropout=c["attention_dropout"],
      mask_id=special_ids.get("mask_id", -1), **ids)
  return checked_config(fields, overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:
  """model/hf's interface: the config, with the tokenizer files' special ids."""
  return config_from_hf(hf_config, special_ids=special_ids(directory), source=source,
                        **overrides)


def _differs(decoder: int, encoder: int) -> int:
  return 0 if decoder == encoder else decoder


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any], source: str) -> dict:
  t = HFTensors(tensors, source, strip=("model.",))
  n_positions = hf_config.get("max_position_embeddings", SCHEMA["max_position_embeddings"][0])
  D, V = cfg.d_model, cfg.vocab_size
  shared = "shared.weight" if t.has("shared.weight") else "encoder.embed_tokens.weight"
  positions = lambda side: t.get(f"{side}.embed_positions.weight",
                                 (n_positions + OFFSET, D))[:cfg.block_size + OFFSET]
  params = {
      "wte": {"embedding": pad_rows(t.get(shared, (V, D)), cfg.padded_vocab_size)},
      "wpe": {"embedding": positions("encoder")},
      "wpe_dec": {"embedding": positions("decoder")},
      "ln_emb": t.ln("encoder.layernorm_embedding", D),
      "ln_dec_emb": t.ln("decoder.layernorm_embedding", D),
  }
  bias = (t.get("final_logits_bias", (1, V))[0] if t.has("final_logits_bias")
          else np.zeros((V,), np.float32))
  params["head_bias"] = pad_rows(bias[:, None], cfg.padded_vocab_size)[:, 0]

  def attention(prefix, half: ModelConfig, cross=False):
    return t.attention(f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj",
                       f"{prefix}.out_proj", D, half.num_heads, half.head_dim, cross=cross)

  def mlp(prefix, half: ModelConfig):
    return {"c_fc": t.linear(f"{prefix}.fc1", D, half.d_mlp),
            "c_proj": t.linear(f"{prefix}.fc2", half.d_mlp, D)}

  dec = cfg.decoder()  # the decoder's heads and MLP width
  for i in range(cfg.num_layers):
    p = f"encoder.layers.{i}"
    params[f"enc_{i}"] = {"attn": attention(f"{p}.self_attn", cfg),
                          "ln_1": t.ln(f"{p}.self_attn_layer_norm", D),
                          "mlp": mlp(p, cfg), "ln_2": t.ln(f"{p}.final_layer_norm", D)}
  for i in range(cfg.decoder_layers):
    p = f"decoder.layers.{i}"
    params[f"dec_{i}"] = {"attn": attention(f"{p}.self_attn", dec),
                          "ln_1": t.ln(f"{p}.self_attn_layer_norm", D),
                          "cross": attention(f"{p}.encoder_attn", dec, cross=True),
                          "ln_x": t.ln(f"{p}.encoder_attn_layer_norm", D),
                          "mlp": mlp(p, dec), "ln_2": t.ln(f"{p}.final_layer_norm", D)}
  return finish_params(params, cfg)
