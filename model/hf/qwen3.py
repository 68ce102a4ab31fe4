"""Hugging Face Qwen3 checkpoints (Qwen3ForCausalLM, model_type "qwen3") <-> (ModelConfig,
params).

Qwen3 is a Llama (model/hf/decoder.py) with an RMSNorm of each head's queries and keys before
the rotary positions (self_attn.q_norm / k_norm [K]: ModelConfig.qk_norm "head"), a head_dim
that need not be hidden / heads (ModelConfig.head_size) and, in the small models, a tied head.
Sliding-window attention (use_sliding_window) is not implemented. Qwen3-MoE (qwen3_moe.py)
has the same attention.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.decoder import (FIXED, check_decoder_shaped, decoder_fields, decoder_hf_config,
                              decoder_params, decoder_schema, decoder_tensors, dense_mlp,
                              put_dense_mlp)
from model.hf.fields import read_fields
from model.hf.files import CONFIG_FILE, WEIGHTS_FILE, write_checkpoint
from model.hf.tensors import HFTensors, checked_config

# The fields read from config.json, with Qwen3Config's defaults for those left out.
SCHEMA = decoder_schema(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                        use_sliding_window=False, sliding_window=4096, attention_dropout=0.0)


def qwen3_fields(c: dict[str, Any], hf_config: dict[str, Any], source: str) -> dict[str, Any]:
  """decoder_fields with Qwen3's per-head query/key norm (c holds the class's defaults)."""
  return dict(decoder_fields(c, hf_config, source), qk_norm="head")


def config_from_hf(hf_config: dict[str, Any], *, source: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  c = read_fields(hf_config, SCHEMA, source)
  return checked_config(qwen3_fields(c, hf_config, source), overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:  # pylint: disable=unused-argument
  return config_from_hf(hf_config, source=source, **overrides)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any] | None = None,  # pylint: disable=unused-argument
                   source: str = WEIGHTS_FILE) -> dict:
  t = HFTensors(tensors, source, strip=("model.",))
  return decoder_params(t, cfg, lambda i: {"mlp": dense_mlp(t, f"layers.{i}.mlp", cfg,
                                                            cfg.d_mlp)})


def check_qwen3_shaped(cfg: ModelConfig, what: str = "save_hf_qwen3") -> None:
  check_decoder_shaped(cfg, what, qk_norm="head")
  if cfg.num_experts:
    raise UserError(f"{what} has no experts (Qwen3-MoE has); this model has num_experts="
                    f"{cfg.num_experts}.")
  if cfg.mlp_bias_on:
    raise UserError(f"{what} has no MLP biases; this model has mlp_bias=True.")


def hf_config_of(cfg: ModelConfig) -> dict[str, Any]:
  return {**decoder_hf_config(cfg, "Qwen3ForCausalLM", "qwen3"),
          "intermediate_size": cfg.d_mlp, "use_sliding_window": False, "sliding_window": None}


def save_hf_qwen3(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Writes `path`/config.json and model.safetensors that Qwen3ForCausalLM loads."""
  check_qwen3_shaped(cfg)
  t = decoder_tensors(params, cfg,
                      lambda t, b, pre: put_dense_mlp(t, f"{pre}.mlp", b["mlp"], cfg))
  write_checkpoint(path, t, hf_config_of(cfg))
