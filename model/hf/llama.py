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

from model.config import ROPE_SCALINGS, ModelConfig
from model.errors import UserError
from model.hf.fields import read_fields
from model.hf.files import CONFIG_FILE, WEIGHTS_FILE, write_checkpoint
from model.hf.tensors import HFTensors, checked_config, finish_params, map_tree, pad_rows
from model.layout import unstack_layers

# The fields read from config.json: (LlamaConfig's default for one left out, its kind).
SCHEMA = dict(vocab_size=(32000, "int+"), hidden_size=(4096, "int+"),
              intermediate_size=(11008, "int+"), num_hidden_layers=(32, "int+"),
              num_attention_heads=(32, "int+"), num_key_value_heads=(None, "int+?"),
              head_dim=(None, "int+?"), hidden_act=("silu", "str"),
              max_position_embeddings=(2048, "int+"), rms_norm_eps=(1e-6, "float+"),
              tie_word_embeddings=(False, "bool"), attention_bias=(False, "bool"),
              mlp_bias=(False, "bool"), attention_dropout=(0.0, "prob"),
              pretraining_tp=(1, "int+?"))
FIXED = ("family", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "d_model", "d_mlp",
         "position_embedding", "rope_theta", "rope_scaling", "rope_factor",
         "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_positions", "norm",
         "norm_placement", "activation", "use_bias", "qkv_bias", "proj_bias", "mlp_bias",
         "tie_embeddings")
# The Llama 3 rope scaling's parameters in config.json -> ModelConfig's fields.
LLAMA3_ROPE = (("factor", "rope_factor"), ("low_freq_factor", "rope_low_freq_factor"),
               ("high_freq_factor", "rope_high_freq_factor"),
               ("original_max_position_embeddings", "rope_original_positions"))


def rope_fields(hf_config: dict[str, Any], source: str) -> dict[str, Any]:
  """rope_theta and the rope scaling of a config.json, as ModelConfig fields: transformers 4's
  `rope_theta` + `rope_scaling`, or transformers 5's `rope_parameters` (with `rope_type`).
  UserError for a scaling other than none / default / llama3, or a bad value."""
  params = hf_config.get("rope_parameters")
  scaling = hf_config.get("rope_scaling")
  if params is not None and not isinstance(params, dict):
    raise UserError(f"{source}: rope_parameters must be null or an object, got {params!r}.")
  if isinstance(params, dict) and "rope_theta" in params:
    fields = read_fields(params, {"rope_theta": (None, "float+")}, source, "rope_parameters.")
  else:
    fields = read_fields(hf_config, {"rope_theta": (10000.0, "float+")}, source)
  if isinstance(params, dict):
    scaling = params if params.get("rope_type", params.get("type", "default")) != "default" \
        else scaling
  where = "rope_parameters." if scaling is params and params is not None else "rope_scaling."
  if scaling is None:
    return fields
  if not isinstance(scaling, dict):
    raise UserError(f"{source}: rope_scaling must be null or an object, got {scaling!r}.")
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return fields
  if kind != "llama3":
    raise UserError(f"{source}: rope scaling {kind!r} is not implemented here; supported: "
                    f"null (none) and 'llama3' (ModelConfig.rope_scaling: "
                    f"{', '.join(ROPE_SCALINGS)}).")
  missing = [name for name, _ in LLAMA3_ROPE if name not in scaling]
  if missing:
    raise UserError(f"{source}: the llama3 rope scaling needs {missing[0]!r} (in "
                    f"{where.rstrip('.')}).")
  values = read_fields(scaling, {name: (None, "int+" if field == "rope_original_positions"
                                            else "float+") for name, field in LLAMA3_ROPE},
                       source, where)
  fields["rope_scaling"] = "llama3"
  fields.update({field: values[name] for name, field in LLAMA3_ROPE})
  return fields


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
  D, H = c["hidden_size"], c["num_attention_heads"]
  if c["head_dim"] not in (None, D // H) or D % H:
    raise UserError(f"{source}: head_dim {c['head_dim']} is not hidden_size / "
                    f"num_attention_heads ({D} / {H}); only that head size is supported.")
  bias = bool(c["attention_bias"])
  fields = dict(
      family="gpt", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
      num_layers=c["num_hidden_layers"], num_heads=H, d_model=D, d_mlp=c["intermediate_size"],
      num_kv_heads=c["num_key_value_heads"] or H, position_embedding="rotary", norm="rmsnorm",
      norm_eps=c["rms_norm_eps"], activation="swiglu",
      use_bias=bias or c["mlp_bias"], qkv_bias=bias, proj_bias=bias, mlp_bias=c["mlp_bias"],
      tie_embeddings=c["tie_word_embeddings"], attn_dropout=c["attention_dropout"],
      embd_dropout=0.0, resid_dropout=0.0, **rope_fields(hf_config, source))
  return checked_config(fields, overrides, FIXED, source)


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:  # pylint: disable=unused-argument
  """model/hf's interface: `config_from_hf` (the ids of its tokenizer are not model fields)."""
  return config_from_hf(hf_config, source=source, **overrides)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any] | None = None,  # pylint: disable=unused-argument
                   source: str = WEIGHTS_FILE) -> dict:
  t = HFTensors(tensors, source, strip=("model.",))
  D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size

  params = {"wte": {"embedding": pad_rows(t.get("embed_tokens.weight", (V, D)),
                                          cfg.padded_vocab_size)},
            "ln_f": {"scale": t.get("norm.weight", (D,))}}
  for i in range(cfg.num_layers):
    p = f"layers.{i}"
    a = f"{p}.self_attn"
    attn = t.attention(f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj", D,
                       cfg.num_heads, cfg.head_dim, kv_heads=cfg.kv_heads,
                       qkv_bias=cfg.qkv_bias_on, out_bias=cfg.proj_bias_on)
    params[f"h_{i}"] = {
        "ln_1": {"scale": t.get(f"{p}.input_layernorm.weight", (D,))},
        "attn": attn,
        "ln_2": {"scale": t.get(f"{p}.post_attention_layernorm.weight", (D,))},
        "mlp": {"c_gate": t.linear(f"{p}.mlp.gate_proj", D, F, cfg.mlp_bias_on),
                "c_fc": t.linear(f"{p}.mlp.up_proj", D, F, cfg.mlp_bias_on),
                "c_proj": t.linear(f"{p}.mlp.down_proj", F, D, cfg.mlp_bias_on)},
    }
  if not cfg.tie_embeddings:
    head_VD = t.get("lm_head.weight", (V, D))
    params["lm_head"] = {"kernel": pad_rows(head_VD, cfg.padded_vocab_size).T}
  return finish_params(params, cfg)


def check_llama_shaped(cfg: ModelConfig, what: str = "save_hf_llama") -> None:
  """UserError unless transformers' LlamaForCausalLM can express the model."""
  for field, needed in (("family", "gpt"), ("position_embedding", "rotary"), ("norm", "rmsnorm"),
                        ("activation", "swiglu"), ("norm_placement", "pre"),
                        ("embed_norm", False), ("embed_scale", False), ("head_bias", False)):
    if getattr(cfg, field) != needed:
      raise UserError(f"{what} needs model.{field}={needed!r} (Hugging Face Llama has no "
                      f"other), this model has {getattr(cfg, field)!r}.")
  if cfg.qkv_bias_on != cfg.proj_bias_on:
    raise UserError(f"{what} needs the same bias setting on q/k/v and the output projection "
                    f"(Llama's attention_bias), this model has qkv_bias={cfg.qkv_bias_on} and "
                    f"proj_bias={cfg.proj_bias_on}.")


def hf_config_of(cfg: ModelConfig) -> dict[str, Any]:
  """The LlamaConfig (config.json) of a Llama-shaped ModelConfig."""
  rope_scaling = None
  if cfg.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", **{name: getattr(cfg, field)
                                             for name, field in LLAMA3_ROPE}}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_mlp, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
      "attention_bias": cfg.qkv_bias_on, "mlp_bias": cfg.mlp_bias_on,
      "attention_dropout": cfg.attn_dropout, "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
      "torch_dtype": "float32",
  }


def save_hf_llama(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Writes `path`/config.json and model.safetensors that transformers' LlamaForCausalLM loads
  (float32; padded vocabulary rows dropped)."""
  check_llama_shaped(cfg)
  D, H, G, K, V = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
  p = map_tree(lambda x: np.asarray(x, np.float32), unstack_layers(params, cfg.num_layers))
  t = {"model.embed_tokens.weight": p["wte"]["embedding"][:V],
       "model.norm.weight": p["ln_f"]["scale"]}

  def put(name, dense, n_out):
    t[f"{name}.weight"] = dense["kernel"].reshape(-1, n_out).T
    if "bias" in dense:
      t[f"{name}.bias"] = dense["bias"].reshape(n_out)

  for i in range(cfg.num_layers):
    b, pre = p[f"h_{i}"], f"model.layers.{i}"
    a = b["attn"]
    # part j of a fused c_attn [D, 3, H, K] / c_kv [D, 2, G, K] (bias [3, H, K] / [2, G, K])
    part = lambda x, j: {key: (val[:, j] if key == "kernel" else val[j]) for key, val in x.items()}
    if "c_attn" in a:
      q, k, v = (part(a["c_attn"], j) for j in range(3))
    else:
      q, (k, v) = a["c_q"], (part(a["c_kv"], j) for j in range(2))
    put(f"{pre}.self_attn.q_proj", q, H * K)
    put(f"{pre}.self_attn.k_proj", k, G * K)
    put(f"{pre}.self_attn.v_proj", v, G * K)
    put(f"{pre}.self_attn.o_proj", a["c_proj"], D)
    t[f"{pre}.input_layernorm.weight"] = b["ln_1"]["scale"]
    t[f"{pre}.post_attention_layernorm.weight"] = b["ln_2"]["scale"]
    put(f"{pre}.mlp.gate_proj", b["mlp"]["c_gate"], cfg.d_mlp)
    put(f"{pre}.mlp.up_proj", b["mlp"]["c_fc"], cfg.d_mlp)
    put(f"{pre}.mlp.down_proj", b["mlp"]["c_proj"], D)
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = p["lm_head"]["kernel"][:, :V].T
  write_checkpoint(path, t, hf_config_of(cfg))
