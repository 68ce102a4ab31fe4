"""Hugging Face checkpoints <-> (ModelConfig, params), one file per model type:

    cfg, params = load_hf("path/to/checkpoint")   # or a Hub name; the family from model_type

  gpt2.py       GPT2LMHeadModel (load_hf_gpt2, save_hf_gpt2)
  bert.py       BertForMaskedLM / BertModel
  bart.py       BartForConditionalGeneration
  llama.py      LlamaForCausalLM (load, and save_hf_llama)
  qwen3.py      Qwen3ForCausalLM (Llama with per-head query/key norms)
  mixtral.py, qwen3_moe.py, olmoe.py   MixtralForCausalLM, Qwen3MoeForCausalLM,
                OlmoeForCausalLM: mixtures of experts (model/moe.py)
  decoder.py    what the Llama-shaped converters share
  files.py      where a checkpoint is and what it holds (config.json, safetensors, a Hub name)
  tensors.py    what the converters share (tensors by name and shape, checked configs)
  fields.py     config.json's values, each checked for type and range (file and field named)
  tokenizer.py  tokenizer files: GPT-2's made from the packaged ranks; BERT / BART's read

A new model type is one file with `checkpoint_config(directory, hf_config, source=...,
**overrides)` and `params_from_hf(tensors, cfg, hf_config=..., source=...)`, and a row of
MODEL_TYPES.
"""

from __future__ import annotations

import os
from typing import Any

from model.config import ModelConfig
from model.errors import UserError
from model.hf import bart, bert, gpt2, llama, mixtral, olmoe, qwen3, qwen3_moe
from model.hf.fields import read_model_type
from model.hf.files import (CONFIG_FILE, HF_NAMES, WEIGHTS_FILE, read_hf_config, read_hf_tensors,
                            resolve_checkpoint_dir)
from model.hf.gpt2 import check_hf_gpt2_shaped, load_hf_gpt2, save_hf_gpt2
from model.hf.llama import check_llama_shaped, save_hf_llama

# config.json's model_type -> (our family, its converter)
MODEL_TYPES = {"gpt2": ("gpt", gpt2), "bert": ("bert", bert), "bart": ("encdec", bart),
               "llama": ("gpt", llama), "qwen3": ("gpt", qwen3), "mixtral": ("gpt", mixtral),
               "qwen3_moe": ("gpt", qwen3_moe), "olmoe": ("gpt", olmoe)}
# The decoders a model_type is written as (save_hf), and their transformers classes.
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
_SAVERS = {"gpt2": save_hf_gpt2, "llama": save_hf_llama, "qwen3": qwen3.save_hf_qwen3,
           "mixtral": mixtral.save_hf_mixtral, "qwen3_moe": qwen3_moe.save_hf_qwen3_moe,
           "olmoe": olmoe.save_hf_olmoe}
# Mixtures of experts whose router is not one of model/moe.py's, in words.
UNSUPPORTED_ROUTERS = {
    "deepseek_v2": "DeepSeek-V2's group-limited top-k routing (n_group / topk_group)",
    "deepseek_v3": "DeepSeek-V3's group-limited top-k of sigmoid scores with a correction bias "
                   "(n_group / topk_group, e_score_correction_bias)",
    "qwen2_moe": "Qwen2-MoE's sigmoid-gated shared expert",
}

__all__ = ["CONFIG_FILE", "HF_CLASSES", "HF_NAMES", "MODEL_TYPES", "UNSUPPORTED_ROUTERS",
           "WEIGHTS_FILE", "check_hf_gpt2_shaped", "check_llama_shaped", "checkpoint_config", "export_type", "load_hf", "load_hf_gpt2",
           "model_type", "read_hf_config", "resolve_checkpoint_dir", "save_hf",
           "save_hf_gpt2", "save_hf_llama"]


def model_type(hf_config: dict[str, Any], source: str = CONFIG_FILE) -> str:
  """config.json's model_type; UserError when it is absent (no guess), not in MODEL_TYPES, or
  a mixture of experts whose router is not implemented here (UNSUPPORTED_ROUTERS)."""
  kind = hf_config.get("model_type")
  if kind in UNSUPPORTED_ROUTERS:
    raise UserError(f"{source}: model_type {kind!r} routes its experts with "
                    f"{UNSUPPORTED_ROUTERS[kind]}, which is not implemented here; the routers "
                    f"here are Mixtral's (a softmax over the top-k logits) and Qwen3-MoE's / "
                    f"OLMoE's (a softmax, then the top-k, renormalised or not).")
  return read_model_type(hf_config, source, tuple(MODEL_TYPES))


def load_hf(name_or_path: str | os.PathLike, *, scan_layers: bool = False,
            dtype: str = "float32", param_dtype: str = "float32",
            **config_overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a Hugging Face checkpoint (directory or Hub name) of any model
  type in MODEL_TYPES, read by its converter. Dropout rates come from config.json; override
  them, and anything the weights do not fix (attention, remat, block_size up to the
  checkpoint's positions, padded_vocab_size), with keyword arguments. Params are a plain nested
  dict of arrays in `param_dtype`, in the layer layout `scan_layers` asks for."""
  directory = resolve_checkpoint_dir(name_or_path)
  hf_config = read_hf_config(directory)
  cfg = checkpoint_config(directory, hf_config, scan_layers=scan_layers, dtype=dtype,
                          param_dtype=param_dtype, **config_overrides)
  tensors, weights_path = read_hf_tensors(directory)
  converter = MODEL_TYPES[model_type(hf_config)][1]
  return cfg, converter.params_from_hf(tensors, cfg, hf_config=hf_config, source=weights_path)


def checkpoint_config(directory: str, hf_config: dict[str, Any] | None = None,
                      **overrides) -> ModelConfig:
  """The ModelConfig of a checkpoint directory of any model type, reading no weights (at most
  the names of its tensors and its tokenizer files' special tokens)."""
  if hf_config is None:
    hf_config = read_hf_config(directory)
  source = os.path.join(directory, CONFIG_FILE)
  converter = MODEL_TYPES[model_type(hf_config, source)][1]
  return converter.checkpoint_config(directory, hf_config, source=source, **overrides)


def export_type(cfg: ModelConfig, what: str = "Exporting to Hugging Face") -> str:
  """The model_type a decoder is written as: with experts "mixtral" (no query/key norm),
  "qwen3_moe" (per-head query/key norm) or "olmoe" (the whole projections normed); else
  "qwen3" with a per-head query/key norm, "llama" when it has any of Llama's switches (rotary
  positions, RMSNorm, SwiGLU, fewer key/value heads), else "gpt2"; UserError when that class
  cannot express the model."""
  if cfg.num_experts:
    kind = {"none": "mixtral", "head": "qwen3_moe", "full": "olmoe"}[cfg.qk_norm]
  elif cfg.qk_norm != "none":
    kind = "qwen3"
  elif (cfg.position_embedding == "rotary" or cfg.norm == "rmsnorm"
        or cfg.activation == "swiglu" or cfg.kv_heads != cfg.num_heads):
    kind = "llama"
  else:
    check_hf_gpt2_shaped(cfg, f"{what} GPT-2")
    return "gpt2"
  check = {"llama": check_llama_shaped, "qwen3": qwen3.check_qwen3_shaped,
           "mixtral": mixtral.check_mixtral_shaped, "qwen3_moe": qwen3_moe.check_qwen3_moe_shaped,
           "olmoe": olmoe.check_olmoe_shaped}[kind]
  check(cfg, f"{what} {HF_CLASSES[kind]}")
  return kind


def save_hf(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> str:
  """Writes a decoder as the Hugging Face model its shape is (`export_type`: HF_CLASSES)
  (config.json + model.safetensors). Returns the model_type."""
  kind = export_type(cfg)
  _SAVERS[kind](params, cfg, path)
  return kind
