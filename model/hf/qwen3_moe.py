"""Hugging Face Qwen3-MoE checkpoints (Qwen3MoeForCausalLM, model_type "qwen3_moe") <->
(ModelConfig, params).

Qwen3's attention (qwen3.py: per-head query/key RMSNorm, its own head_dim) with sparse MLPs:
num_experts SwiGLU experts of width moe_intermediate_size, routed by a softmax over all experts
and the top num_experts_per_tok probabilities, renormalised when norm_topk_prob (ModelConfig
router "softmax_topk"). Layer i is sparse when it is not in mlp_only_layers and (i + 1) %
decoder_sparse_step == 0 (ModelConfig.moe_layers); the others keep a dense SwiGLU MLP of width
intermediate_size (ModelConfig.d_mlp):

  model.layers.i.mlp.gate.weight [E, D]                     h_i/moe/router/kernel [D, E]
  model.layers.i.mlp.experts.j.{gate,up,down}_proj          h_i/moe/c_gate, c_fc, c_proj [j]
  model.layers.i.mlp.{gate,up,down}_proj (dense layers)     h_i/mlp/c_gate, c_fc, c_proj
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.decoder import (FIXED, check_decoder_shaped, check_experts_shaped,
                              decoder_hf_config, decoder_params, decoder_schema, decoder_tensors,
                              dense_mlp, put_dense_mlp, read_experts, read_experts_count,
                              write_experts)
from model.hf.fields import read_fields
from model.hf.files import CONFIG_FILE, WEIGHTS_FILE, write_checkpoint
from model.hf.qwen3 import qwen3_fields
from model.hf.tensors import HFTensors, checked_config

# The fields read from config.json, with Qwen3MoeConfig's defaults for those left out.
SCHEMA = decoder_schema(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                        num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                        head_dim=None, hidden_act="silu", max_position_embeddings=32768,
                        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                        use_sliding_window=False, sliding_window=4096, attention_dropout=0.0,
                        decoder_sparse_step=1, moe_intermediate_size=768,
                        num_experts_per_tok=8, norm_topk_prob=False,
                        router_aux_loss_coef=0.001, mlp_only_layers=None)


def moe_layers(num_layers: int, step: Any, mlp_only: Any, source: str) -> str:
  """ModelConfig.moe_layers of decoder_sparse_step and mlp_only_layers."""
  if isinstance(step, bool) or not isinstance(step, int) or step < 1:
    raise UserError(f"{source}: decoder_sparse_step must be a positive integer, got {step!r}.")
  mlp_only = set(mlp_only or ())
  if not mlp_only:
    return "all" if step == 1 else f"every:{step}"
  sparse = [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]
  if not sparse:
    raise UserError(f"{source}: no layer is sparse (decoder_sparse_step {step}, mlp_only_layers "
                    f"{sorted(mlp_only)}); load it as a dense Qwen3.")
  return ",".join(map(str, sparse))


def config_from_hf(hf_config: dict[str, Any], *, source: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  c = read_fields(hf_config, SCHEMA, source)
  c["num_experts"] = read_experts_count(hf_config, "num_experts", "num_local_experts", 128,
                                        source)
  fields = dict(qwen3_fields(c, hf_config, source), num_experts=c["num_experts"],
                num_experts_per_tok=c["num_experts_per_tok"],
                expert_d_mlp=c["moe_intermediate_size"], router="softmax_topk",
                norm_topk_prob=c["norm_topk_prob"],
                moe_layers=moe_layers(c["num_hidden_layers"], c["decoder_sparse_step"],
                                      c["mlp_only_layers"], source),
                router_aux_loss_coef=c["router_aux_loss_coef"])
  return checked_config(fields, overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:  # pylint: disable=unused-argument
  return config_from_hf(hf_config, source=source, **overrides)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any] | None = None,  # pylint: disable=unused-argument
                   source: str = WEIGHTS_FILE) -> dict:
  t = HFTensors(tensors, source, strip=("model.",))

  def feed_forward(i):
    prefix = f"layers.{i}.mlp"
    if cfg.sparse_layers[i]:
      return {"moe": read_experts(t, prefix, cfg)}
    return {"mlp": dense_mlp(t, prefix, cfg, cfg.d_mlp)}
  return decoder_params(t, cfg, feed_forward)


def check_qwen3_moe_shaped(cfg: ModelConfig, what: str = "save_hf_qwen3_moe") -> None:
  check_decoder_shaped(cfg, what, qk_norm="head")
  if not cfg.num_experts:
    raise UserError(f"{what} needs experts (model.num_experts > 0).")
  check_experts_shaped(cfg, what, dense_layers=True, norm_topk=None)
  if cfg.mlp_bias_on:
    raise UserError(f"{what} has no MLP biases; this model has mlp_bias=True.")


def hf_config_of(cfg: ModelConfig) -> dict[str, Any]:
  dense = [i for i, sparse in enumerate(cfg.sparse_layers) if not sparse]
  return {**decoder_hf_config(cfg, "Qwen3MoeForCausalLM", "qwen3_moe"),
          "intermediate_size": cfg.d_mlp, "moe_intermediate_size": cfg.expert_mlp,
          "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
          "norm_topk_prob": cfg.router == "topk_softmax" or cfg.norm_topk_prob,
          "decoder_sparse_step": 1, "mlp_only_layers": dense,
          "router_aux_loss_coef": cfg.router_aux_loss_coef, "use_sliding_window": False,
          "sliding_window": None}


def save_hf_qwen3_moe(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Writes `path`/config.json and model.safetensors that Qwen3MoeForCausalLM loads."""
  check_qwen3_moe_shaped(cfg)

  def feed_forward(t, b, pre):
    if "moe" in b:
      write_experts(t, f"{pre}.mlp", b["moe"])
    else:
      put_dense_mlp(t, f"{pre}.mlp", b["mlp"], cfg)
  write_checkpoint(path, decoder_tensors(params, cfg, feed_forward), hf_config_of(cfg))
