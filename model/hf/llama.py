"""Hugging Face Llama checkpoints (LlamaForCausalLM, model_type "llama") <-> (ModelConfig, params).

Llama is model/gpt.py's GPT with the four switches of ModelConfig that make a decoder of
today: rotary positions (rope_theta; the Llama 3 rope scaling), RMSNorm, SwiGLU and grouped-
query attention (num_kv_heads), no biases (attention_bias / mlp_bias turn them on), and a head
tied or not (tie_word_embeddings). The mapping (torch Linear weights are [out, in]):

  model.embed_tokens.weight [V, D]              wte/embedding
  model.layers.i.input_layernorm.weight         h_i/ln_1/scale
  model.layers.i.self_attn.q_proj [H*K, D]      h_i/attn/c_attn [D, 3, H, K] with k, v when
  model.layers.i.self_attn.{k,v}_proj [G*K, D]    G = H; else c_q [D, H, K] and c_kv [D, 2, G, K]
  model.layers.i.self_attn.o_proj [D, H*K]      h_i/attn/c_proj [H, K, D]
  model.layers.i.post_attention_layernorm       h_i/ln_2/scale
  model.layers.i.mlp.gate_proj, up_proj [F, D]  h_i/mlp/c_gate, c_fc [D, F]
  model.layers.i.mlp.down_proj [D, F]           h_i/mlp/c_proj [F, D]
  model.norm.weight                             ln_f/scale
  lm_head.weight [V, D] (untied only)           lm_head/kernel [D, V]

Hugging Face's q_proj / k_proj rows are already in the rotate-half order its rotary embedding
uses (each head's first K/2 dimensions pair with its last K/2), which is ours: no permutation.
`save_hf_llama` writes the other way; transformers' LlamaForCausalLM loads the directory.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.decoder import (FIXED, LLAMA3_ROPE, check_decoder_shaped, decoder_fields,
                              decoder_hf_config, decoder_params, decoder_schema, decoder_tensors,
                              dense_mlp, put_dense_mlp, rope_fields)
from model.hf.fields import read_fields
from model.hf.files import CONFIG_FILE, WEIGHTS_FILE, write_checkpoint
from model.hf.tensors import HFTensors, checked_config

__all__ = ["FIXED", "LLAMA3_ROPE", "SCHEMA", "check_llama_shaped", "checkpoint_config",
           "config_from_hf", "hf_config_of", "params_from_hf", "rope_fields", "save_hf_llama"]

# The fields read from config.json, with LlamaConfig's defaults for those left out.
SCHEMA = decoder_schema(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                        head_dim=None, hidden_act="silu", max_position_embeddings=2048,
                        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                        mlp_bias=False, attention_dropout=0.0, pretraining_tp=1)


def config_from_hf(hf_config: dict[str, Any], *, source: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  """ModelConfig for a LlamaConfig dict (plus overrides the weights do not fix)."""
  c = read_fields(hf_config, SCHEMA, source)
  if c["hidden_act"] != "silu":
    raise UserError(f"{source}: hidden_act {c['hidden_act']!r} is not supported; Llama's MLP "
                    f"here is SwiGLU (hidden_act 'silu').")
  if c["pretraining_tp"] not in (1, None):
    raise UserError(f"{source}: pretraining_tp={c['pretraining_tp']!r} is not supported "
                    f"(only 1).")
  fields = decoder_fields(c, hf_config, source, any_head_dim=False)
  return checked_config(fields, overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:  # pylint: disable=unused-argument
  """model/hf's interface: `config_from_hf` (the ids of its tokenizer are not model fields)."""
  return config_from_hf(hf_config, source=source, **overrides)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any] | None = None,  # pylint: disable=unused-argument
                   source: str = WEIGHTS_FILE) -> dict:
  t = HFTensors(tensors, source, strip=("model.",))
  return decoder_params(t, cfg, lambda i: {"mlp": dense_mlp(t, f"layers.{i}.mlp", cfg,
                                                            cfg.d_mlp)})


def check_llama_shaped(cfg: ModelConfig, what: str = "save_hf_llama") -> None:
  """UserError unless transformers' LlamaForCausalLM can express the model."""
  check_decoder_shaped(cfg, what)
  if cfg.num_experts:
    raise UserError(f"{what} has no experts; this model has num_experts={cfg.num_experts}.")


def hf_config_of(cfg: ModelConfig) -> dict[str, Any]:
  """The LlamaConfig (config.json) of a Llama-shaped ModelConfig."""
  rope_scaling = None
  if cfg.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", **{name: getattr(cfg, field)
                                             for name, field in LLAMA3_ROPE}}
  return {**decoder_hf_config(cfg, "LlamaForCausalLM", "llama"),
          "intermediate_size": cfg.d_mlp, "rope_scaling": rope_scaling,
          "mlp_bias": cfg.mlp_bias_on}


def save_hf_llama(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Writes `path`/config.json and model.safetensors that transformers' LlamaForCausalLM loads
  (float32; padded vocabulary rows dropped)."""
  check_llama_shaped(cfg)
  t = decoder_tensors(params, cfg,
                      lambda t, b, pre: put_dense_mlp(t, f"{pre}.mlp", b["mlp"], cfg))
  write_checkpoint(path, t, hf_config_of(cfg))
