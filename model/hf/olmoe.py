"""Hugging Face OLMoE checkpoints (OlmoeForCausalLM, model_type "olmoe") <-> (ModelConfig,
params).

OLMoE is a Llama (model/hf/decoder.py) with an RMSNorm of the whole query and key projections
(self_attn.q_norm [H*K], k_norm [G*K]: ModelConfig.qk_norm "full") and sparse MLPs in every
layer: num_experts SwiGLU experts of width intermediate_size, a softmax over all experts and
the top num_experts_per_tok probabilities, renormalised only with norm_topk_prob (the published
model does not):

  model.layers.i.mlp.gate.weight [E, D]                     h_i/moe/router/kernel [D, E]
  model.layers.i.mlp.experts.j.{gate,up,down}_proj          h_i/moe/c_gate, c_fc, c_proj [j]

clip_qkv (clipping the projections) is not implemented and must be null.
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

# The fields read from config.json, with OlmoeConfig's defaults for those left out.
SCHEMA = decoder_schema(vocab_size=50304, hidden_size=2048, intermediate_size=2048,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=None,
                        hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
                        clip_qkv=None, num_experts_per_tok=8, router_aux_loss_coef=0.01,
                        norm_topk_prob=False)


def config_from_hf(hf_config: dict[str, Any], *, source: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  c = read_fields(hf_config, SCHEMA, source)
  c["num_experts"] = read_experts_count(hf_config, "num_experts", "num_local_experts", 64, source)
  if c["clip_qkv"] is not None:
    raise UserError(f"{source}: clip_qkv {c['clip_qkv']} is not implemented here (only "
                    f"null).")
  fields = dict(decoder_fields(c, hf_config, source, any_head_dim=False), qk_norm="full",
                num_experts=c["num_experts"], num_experts_per_tok=c["num_experts_per_tok"],
                router="softmax_topk", norm_topk_prob=c["norm_topk_prob"],
                router_aux_loss_coef=c["router_aux_loss_coef"])
  return checked_config(fields, overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:  # pylint: disable=unused-argument
  return config_from_hf(hf_config, source=source, **overrides)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any] | None = None,  # pylint: disable=unused-argument
                   source: str = WEIGHTS_FILE) -> dict:
  t = HFTensors(tensors, source, strip=("model.",))
  return decoder_params(t, cfg, lambda i: {"moe": read_experts(t, f"layers.{i}.mlp", cfg)})


def check_olmoe_shaped(cfg: ModelConfig, what: str = "save_hf_olmoe") -> None:
  check_decoder_shaped(cfg, what, qk_norm="full")
  if not cfg.num_experts:
    raise UserError(f"{what} needs experts (model.num_experts > 0).")
  check_experts_shaped(cfg, what, dense_layers=False, norm_topk=None)
  if cfg.mlp_bias_on or cfg.head_size:
    raise UserError(f"{what} has experts without biases and heads of hidden / heads "
                    f"dimensions; this model has mlp_bias={cfg.mlp_bias_on}, head_size="
                    f"{cfg.head_size}.")


def hf_config_of(cfg: ModelConfig) -> dict[str, Any]:
  out = {**decoder_hf_config(cfg, "OlmoeForCausalLM", "olmoe"),
         "intermediate_size": cfg.expert_mlp, "num_experts": cfg.num_experts,
         "num_experts_per_tok": cfg.num_experts_per_tok,
         "norm_topk_prob": cfg.router == "topk_softmax" or cfg.norm_topk_prob,
         "router_aux_loss_coef": cfg.router_aux_loss_coef, "clip_qkv": None}
  out.pop("head_dim")
  return out


def save_hf_olmoe(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Writes `path`/config.json and model.safetensors that OlmoeForCausalLM loads."""
  check_olmoe_shaped(cfg)
  t = decoder_tensors(params, cfg,
                      lambda t, b, pre: write_experts(t, f"{pre}.mlp", b["moe"]))
  write_checkpoint(path, t, hf_config_of(cfg))
