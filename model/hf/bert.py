"""Hugging Face BERT checkpoints (BertForMaskedLM, BertModel) -> (ModelConfig, params).

Read through model/hf's `load_hf` (config.json + model.safetensors; model_type
"bert"). The mapping to model/encoder.py's Encoder (torch Linear weights are [out, in]):

  embeddings.word_embeddings [V, D]        wte/embedding (rows padded to padded_vocab_size)
  embeddings.position_embeddings [P, D]    wpe/embedding (cropped to block_size)
  embeddings.token_type_embeddings         wtt/embedding
  embeddings.LayerNorm                     ln_emb
  encoder.layer.i.attention.self.{query,key,value}   h_i/attn/c_attn [D, 3, H, K], [3, H, K]
  encoder.layer.i.attention.output.dense   h_i/attn/c_proj [H, K, D]
  encoder.layer.i.attention.output.LayerNorm   h_i/ln_1   (post-LN: after the residual add)
  encoder.layer.i.intermediate.dense, output.dense   h_i/mlp/c_fc, c_proj
  encoder.layer.i.output.LayerNorm         h_i/ln_2
  cls.predictions.transform.dense, .LayerNorm   mlm/dense, mlm/ln
  cls.predictions.bias [V]                 head_bias (the decoder is the tied word embedding)

BertForMaskedLM keys start with "bert." (BertModel's do not); BertModel's pooler is not read.
A checkpoint without cls.predictions (BertModel) gives mlm_head=False: hidden states only. The
[MASK] / [PAD] ids come from the checkpoint's tokenizer files when it has them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.fields import read_fields
from model.hf.files import tensor_names
from model.hf.tensors import HFTensors, checked_config, finish_params, hf_activation, pad_rows
from model.hf.tokenizer import special_ids

# The fields read from config.json: (BertConfig's default for one left out, its kind).
SCHEMA = dict(vocab_size=(30522, "int+"), hidden_size=(768, "int+"),
              num_hidden_layers=(12, "int+"), num_attention_heads=(12, "int+"),
              intermediate_size=(3072, "int+"), hidden_act=("gelu", "str"),
              hidden_dropout_prob=(0.1, "prob"), attention_probs_dropout_prob=(0.1, "prob"),
              max_position_embeddings=(512, "int+"), type_vocab_size=(2, "int0"),
              layer_norm_eps=(1e-12, "float+"), pad_token_id=(0, "id?"),
              position_embedding_type=("absolute", "str"), tie_word_embeddings=(True, "bool"))
FIXED = ("family", "vocab_size", "num_layers", "num_heads", "d_model", "d_mlp", "type_vocab_size",
         "position_embedding", "norm_placement", "activation", "mlm_head", "head_bias",
         "tie_embeddings", "embed_norm")
MLM_PREFIX = "cls.predictions"


def config_from_hf(hf_config: dict[str, Any], *, has_mlm_head: bool, special_ids: dict[str, int],
                   source: str, **overrides) -> ModelConfig:
  c = read_fields(hf_config, SCHEMA, source)
  for key, supported in (("position_embedding_type", "absolute"), ("is_decoder", False),
                         ("add_cross_attention", False)):
    if hf_config.get(key, supported) != supported:
      raise UserError(f"{source}: {key}={hf_config[key]!r} is not supported (only "
                      f"{supported!r}).")
  pad = c["pad_token_id"] if c["pad_token_id"] is not None else -1
  fields = dict(
      family="bert", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
      num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
      d_model=c["hidden_size"], d_mlp=c["intermediate_size"],
      activation=hf_activation(c["hidden_act"], source), norm_eps=c["layer_norm_eps"],
      type_vocab_size=c["type_vocab_size"], embed_norm=True, norm_placement="post",
      tie_embeddings=c["tie_word_embeddings"], mlm_head=has_mlm_head, head_bias=has_mlm_head,
      embd_dropout=c["hidden_dropout_prob"], resid_dropout=c["hidden_dropout_prob"],
      attn_dropout=c["attention_probs_dropout_prob"],
      pad_id=special_ids.get("pad_id", pad), mask_id=special_ids.get("mask_id", -1))
  return checked_config(fields, overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:
  """model/hf's interface: the config, with the tokenizer files' special ids and whether the
  weights hold the masked-LM head (from the tensor names, no weights read)."""
  return config_from_hf(hf_config, has_mlm_head=has_mlm_head(tensor_names(directory)),
                        special_ids=special_ids(directory), source=source, **overrides)


def has_mlm_head(tensor_names) -> bool:
  return any(k.startswith(MLM_PREFIX + ".transform") for k in tensor_names)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any], source: str) -> dict:
  t = HFTensors(tensors, source, strip=("bert.",))
  n_positions = hf_config.get("max_position_embeddings", SCHEMA["max_position_embeddings"][0])
  D, H, K, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_mlp, cfg.vocab_size
  e = "embeddings"
  params = {
      "wte": {"embedding": pad_rows(t.get(f"{e}.word_embeddings.weight", (V, D)),
                                    cfg.padded_vocab_size)},
      "wpe": {"embedding": t.get(f"{e}.position_embeddings.weight",
                                 (n_positions, D))[:cfg.block_size]},
      "ln_emb": t.ln(f"{e}.LayerNorm", D),
  }
  if cfg.type_vocab_size:
    params["wtt"] = {"embedding": t.get(f"{e}.token_type_embeddings.weight",
                                        (cfg.type_vocab_size, D))}
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}"
    a = f"{p}.attention"
    params[f"h_{i}"] = {
        "attn": t.attention(f"{a}.self.query", f"{a}.self.key", f"{a}.self.value",
                            f"{a}.output.dense", D, H, K),
        "ln_1": t.ln(f"{a}.output.LayerNorm", D),
        "mlp": {"c_fc": t.linear(f"{p}.intermediate.dense", D, F),
                "c_proj": t.linear(f"{p}.output.dense", F, D)},
        "ln_2": t.ln(f"{p}.output.LayerNorm", D),
    }
  if cfg.mlm_head:
    m = MLM_PREFIX
    params["mlm"] = {"dense": t.linear(f"{m}.transform.dense", D, D),
                     "ln": t.ln(f"{m}.transform.LayerNorm", D)}
    bias = (t.get(f"{m}.bias", (V,)) if t.has(f"{m}.bias")
            else t.get(f"{m}.decoder.bias", (V,)))
    params["head_bias"] = pad_rows(bias[:, None], cfg.padded_vocab_size)[:, 0]
    if not cfg.tie_embeddings:
      decoder_VD = pad_rows(t.get(f"{m}.decoder.weight", (V, D)), cfg.padded_vocab_size)
      params["lm_head"] = {"kernel": decoder_VD.T}
  return finish_params(params, cfg)
