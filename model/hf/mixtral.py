"""Hugging Face Mixtral checkpoints (MixtralForCausalLM, model_type "mixtral") <-> (ModelConfig,
params).

Mixtral is a Llama (model/hf/decoder.py: rotary positions, RMSNorm, grouped-query attention)
whose every MLP is num_local_experts SwiGLU experts, each token routed to num_experts_per_tok of
them by a softmax over the top-k router logits (ModelConfig.router "topk_softmax"):

  model.layers.i.block_sparse_moe.gate.weight [E, D]       h_i/moe/router/kernel [D, E]
  model.layers.i.block_sparse_moe.experts.j.w1 [F, D]      h_i/moe/c_gate/kernel[j] [D, F]
  model.layers.i.block_sparse_moe.experts.j.w3 [F, D]      h_i/moe/c_fc/kernel[j] [D, F]
  model.layers.i.block_sparse_moe.experts.j.w2 [D, F]      h_i/moe/c_proj/kernel[j] [F, D]

(the layout transformers' save_pretrained writes and the Hub's checkpoints have).
router_aux_loss_coef is read and written; router_jitter_noise (training-time noise on the
hidden states) is not implemented and must be 0.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.decoder import (FIXED, check_decoder_shaped, check_experts_shaped, decoder_fields,
                              decoder_hf_config, decoder_params, decoder_schema, decoder_tensors,
                              read_experts, read_experts_count, write_experts)
from model.hf.fields import read_fields
from model.hf.files import CONFIG_FILE, WEIGHTS_FILE, write_checkpoint
from model.hf.tensors import HFTensors, checked_config

# The fields read from config.json, with MixtralConfig's defaults for those left out.
SCHEMA = decoder_schema(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=None, hidden_act="silu", max_position_embeddings=4096 * 32,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                        attention_dropout=0.0, num_experts_per_tok=2,
                        router_aux_loss_coef=0.001, router_jitter_noise=0.0)
EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


def config_from_hf(hf_config: dict[str, Any], *, source: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  c = read_fields(hf_config, SCHEMA, source)
  c["num_local_experts"] = read_experts_count(hf_config, "num_local_experts", "num_experts", 8,
                                              source)
  if c["router_jitter_noise"]:
    raise UserError(f"{source}: router_jitter_noise {c['router_jitter_noise']} is not "
                    f"implemented here (only 0).")
  fields = dict(decoder_fields(c, hf_config, source), num_experts=c["num_local_experts"],
                num_experts_per_tok=c["num_experts_per_tok"], router="topk_softmax",
                router_aux_loss_coef=c["router_aux_loss_coef"])
  return checked_config(fields, overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:  # pylint: disable=unused-argument
  return config_from_hf(hf_config, source=source, **overrides)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any] | None = None,  # pylint: disable=unused-argument
                   source: str = WEIGHTS_FILE) -> dict:
  t = HFTensors(tensors, source, strip=("model.",))
  return decoder_params(t, cfg, lambda i: {"moe": read_experts(
      t, f"layers.{i}.block_sparse_moe", cfg, EXPERT_NAMES)})


def check_mixtral_shaped(cfg: ModelConfig, what: str = "save_hf_mixtral") -> None:
  """UserError unless transformers' MixtralForCausalLM can express the model."""
  check_decoder_shaped(cfg, what)
  if not cfg.num_experts:
    raise UserError(f"{what} needs experts (model.num_experts > 0).")
  check_experts_shaped(cfg, what, dense_layers=False, norm_topk=True)
  if cfg.mlp_bias_on:
    raise UserError(f"{what} has experts without biases; this model has mlp_bias=True.")


def hf_config_of(cfg: ModelConfig) -> dict[str, Any]:
  return {**decoder_hf_config(cfg, "MixtralForCausalLM", "mixtral"),
          "intermediate_size": cfg.expert_mlp, "num_local_experts": cfg.num_experts,
          "num_experts_per_tok": cfg.num_experts_per_tok, "sliding_window": None,
          "router_aux_loss_coef": cfg.router_aux_loss_coef, "router_jitter_noise": 0.0}


def save_hf_mixtral(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Writes `path`/config.json and model.safetensors that MixtralForCausalLM loads."""
  check_mixtral_shaped(cfg)
  t = decoder_tensors(params, cfg, lambda t, b, pre: write_experts(
      t, f"{pre}.block_sparse_moe", b["moe"], EXPERT_NAMES))
  write_checkpoint(path, t, hf_config_of(cfg))
