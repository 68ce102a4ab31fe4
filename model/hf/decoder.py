"""What the converters of Llama-shaped decoders share (llama.py, mixtral.py, qwen3.py, olmoe.py):
the tensors of embeddings, attention (with Qwen3's / OLMoE's query and key RMSNorm), norms and
head, read and written by one function each, with the feed-forward part of each layer left to
the model type: a dense SwiGLU MLP (Llama's gate_proj, up_proj, down_proj) or experts.

  model.embed_tokens.weight [V, D]               wte/embedding
  model.layers.i.input_layernorm.weight          h_i/ln_1/scale
  model.layers.i.self_attn.{q,k,v,o}_proj        h_i/attn/c_attn or c_q + c_kv, c_proj
  model.layers.i.self_attn.{q,k}_norm.weight     h_i/attn/q_norm, k_norm/scale [K] or [H*K]
  model.layers.i.post_attention_layernorm        h_i/ln_2/scale
  model.layers.i.<mlp>                           h_i/mlp or h_i/moe (the model type's)
  model.norm.weight                              ln_f/scale
  lm_head.weight [V, D] (untied only)            lm_head/kernel [D, V]

Experts (`read_experts`, `write_experts`): a router `<prefix>.gate.weight` [E, D] (router/kernel
[D, E]) and per expert j `<prefix>.experts.j.<gate>, <up>, <down>.weight` ([F, D], [F, D],
[D, F]; Mixtral's w1, w3, w2, Qwen3-MoE's and OLMoE's gate_proj, up_proj, down_proj) stacked as
c_gate, c_fc [E, D, F] and c_proj [E, F, D].
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from model.config import ROPE_SCALINGS, ModelConfig
from model.errors import UserError
from model.hf.fields import read_fields
from model.hf.tensors import HFTensors, finish_params, map_tree, pad_rows
from model.layout import convert_layout

DENSE_NAMES = ("gate_proj", "up_proj", "down_proj")
# Fields every Llama-shaped checkpoint fixes (its converter adds its own).
FIXED = ("family", "vocab_size", "num_layers", "num_heads", "num_kv_heads", "d_model", "d_mlp",
         "head_size", "position_embedding", "rope_theta", "rope_scaling", "rope_factor",
         "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_positions", "norm",
         "norm_placement", "activation", "use_bias", "qkv_bias", "proj_bias", "mlp_bias",
         "tie_embeddings", "qk_norm", "num_experts", "num_experts_per_tok", "expert_d_mlp",
         "num_shared_experts", "moe_layers", "router", "norm_topk_prob")
# The kind (model/hf/fields.py) of each config.json field the Llama-shaped classes read.
FIELD_KINDS = dict(
    vocab_size="int+", hidden_size="int+", intermediate_size="int+", num_hidden_layers="int+",
    num_attention_heads="int+", num_key_value_heads="int+?", head_dim="int+?", hidden_act="str",
    max_position_embeddings="int+", rms_norm_eps="float+", tie_word_embeddings="bool",
    attention_bias="bool", mlp_bias="bool", attention_dropout="prob", pretraining_tp="int+?",
    sliding_window="int+?", use_sliding_window="bool", num_experts_per_tok="int+",
    num_local_experts="int+", num_experts="int+", moe_intermediate_size="int+",
    router_aux_loss_coef="float0", router_jitter_noise="float0", clip_qkv="float+?",
    norm_topk_prob="bool", decoder_sparse_step="int+", mlp_only_layers="ints?")
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


def decoder_schema(**defaults: Any) -> dict[str, tuple[Any, str]]:
  """A converter's read_fields schema: its class's default of each field it reads (one left out
  of a config.json), with the field's kind from FIELD_KINDS."""
  return {name: (default, FIELD_KINDS[name]) for name, default in defaults.items()}


def read_experts_count(hf_config: dict[str, Any], name: str, alias: str, default: int,
                       source: str) -> int:
  """The number of experts under `name`, or under `alias` when only that is there (transformers
  5 renamed Mixtral's num_local_experts num_experts, and Qwen3-MoE's num_experts the other way)."""
  key = alias if alias in hf_config and name not in hf_config else name
  return read_fields(hf_config, {key: (default, FIELD_KINDS[key])}, source)[key]


def decoder_fields(c: dict[str, Any], hf_config: dict[str, Any], source: str, *,
                   any_head_dim: bool = True) -> dict[str, Any]:
  """The ModelConfig fields of a Llama-shaped config.json `c` (read_fields of its schema):
  shapes, rotary positions, RMSNorm, SwiGLU, biases, tying. UserError for an activation other
  than silu, a sliding window, or (without any_head_dim) a head_dim other than hidden / heads."""
  if c.get("hidden_act", "silu") != "silu":
    raise UserError(f"{source}: hidden_act {c['hidden_act']!r} is not supported; the MLP here "
                    f"is SwiGLU (hidden_act 'silu').")
  if c.get("sliding_window") and c.get("use_sliding_window", True):
    raise UserError(f"{source}: sliding-window attention (sliding_window "
                    f"{c['sliding_window']}) is not implemented here; every layer attends to "
                    f"all earlier positions.")
  D, H = c["hidden_size"], c["num_attention_heads"]
  head_dim = c.get("head_dim")
  if not any_head_dim and (head_dim not in (None, D // H) or D % H):
    raise UserError(f"{source}: head_dim {head_dim} is not hidden_size / "
                    f"num_attention_heads ({D} / {H}); only that head size is supported.")
  head_size = 0 if head_dim in (None, D // H) and not D % H else head_dim
  bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
  return dict(
      family="gpt", vocab_size=c["vocab_size"], block_size=c["max_position_embeddings"],
      num_layers=c["num_hidden_layers"], num_heads=H, d_model=D, d_mlp=c["intermediate_size"],
      head_size=head_size, num_kv_heads=c.get("num_key_value_heads") or H,
      position_embedding="rotary", norm="rmsnorm", norm_eps=c["rms_norm_eps"],
      activation="swiglu", use_bias=bias or mlp_bias, qkv_bias=bias, proj_bias=bias,
      mlp_bias=mlp_bias, tie_embeddings=c["tie_word_embeddings"],
      attn_dropout=c.get("attention_dropout", 0.0), embd_dropout=0.0, resid_dropout=0.0,
      **rope_fields(hf_config, source))


def dense_mlp(t: HFTensors, prefix: str, cfg: ModelConfig, width: int) -> dict:
  D, bias = cfg.d_model, cfg.mlp_bias_on
  return {"c_gate": t.linear(f"{prefix}.gate_proj", D, width, bias),
          "c_fc": t.linear(f"{prefix}.up_proj", D, width, bias),
          "c_proj": t.linear(f"{prefix}.down_proj", width, D, bias)}


def read_experts(t: HFTensors, prefix: str, cfg: ModelConfig,
                 names: tuple[str, str, str] = DENSE_NAMES) -> dict:
  """The experts of one sparse layer (module docstring) as our MoE's parameters."""
  D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_mlp
  gate, up, down = names
  stack = lambda name, n_in, n_out: {"kernel": np.stack(
      [t.get(f"{prefix}.experts.{j}.{name}.weight", (n_out, n_in)).T for j in range(E)])}
  return {"router": {"kernel": t.get(f"{prefix}.gate.weight", (E, D)).T},
          "c_gate": stack(gate, D, F), "c_fc": stack(up, D, F), "c_proj": stack(down, F, D)}


def decoder_params(t: HFTensors, cfg: ModelConfig, feed_forward: Callable[[int], dict]) -> dict:
  """Our parameters of a Llama-shaped checkpoint; feed_forward(i) gives layer i's {"mlp": ...}
  or {"moe": ...}."""
  D, V, K = cfg.d_model, cfg.vocab_size, cfg.head_dim
  params = {"wte": {"embedding": pad_rows(t.get("embed_tokens.weight", (V, D)),
                                          cfg.padded_vocab_size)},
            "ln_f": {"scale": t.get("norm.weight", (D,))}}
  norm_size = {"head": (K, K), "full": (cfg.num_heads * K, cfg.kv_heads * K)}.get(cfg.qk_norm)
  for i in range(cfg.num_layers):
    p, a = f"layers.{i}", f"layers.{i}.self_attn"
    attn = t.attention(f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.o_proj", D,
                       cfg.num_heads, K, kv_heads=cfg.kv_heads, qkv_bias=cfg.qkv_bias_on,
                       out_bias=cfg.proj_bias_on)
    if norm_size:
      attn["q_norm"] = {"scale": t.get(f"{a}.q_norm.weight", (norm_size[0],))}
      attn["k_norm"] = {"scale": t.get(f"{a}.k_norm.weight", (norm_size[1],))}
    params[f"h_{i}"] = {"ln_1": {"scale": t.get(f"{p}.input_layernorm.weight", (D,))},
                        "attn": attn,
                        "ln_2": {"scale": t.get(f"{p}.post_attention_layernorm.weight", (D,))},
                        **feed_forward(i)}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": pad_rows(t.get("lm_head.weight", (V, D)),
                                            cfg.padded_vocab_size).T}
  return finish_params(params, cfg)


def put_linear(t: dict, name: str, dense: dict, n_out: int) -> None:
  """A Dense (kernel [..., n_out], bias) as torch Linear tensors name.weight [out, in], .bias."""
  t[f"{name}.weight"] = dense["kernel"].reshape(-1, n_out).T
  if "bias" in dense:
    t[f"{name}.bias"] = dense["bias"].reshape(n_out)


def put_dense_mlp(t: dict, prefix: str, mlp: dict, cfg: ModelConfig) -> None:
  width = mlp["c_fc"]["kernel"].shape[-1]
  put_linear(t, f"{prefix}.gate_proj", mlp["c_gate"], width)
  put_linear(t, f"{prefix}.up_proj", mlp["c_fc"], width)
  put_linear(t, f"{prefix}.down_proj", mlp["c_proj"], cfg.d_model)


def write_experts(t: dict, prefix: str, moe: dict,
                  names: tuple[str, str, str] = DENSE_NAMES) -> None:
  """One sparse layer's experts as Hugging Face tensors (read_experts the other way)."""
  t[f"{prefix}.gate.weight"] = moe["router"]["kernel"].T
  for key, name in zip(("c_gate", "c_fc", "c_proj"), names):
    for j, kernel in enumerate(moe[key]["kernel"]):
      t[f"{prefix}.experts.{j}.{name}.weight"] = kernel.T


def decoder_tensors(params: dict, cfg: ModelConfig,
                    feed_forward: Callable[[dict, dict, str], None]) -> dict[str, np.ndarray]:
  """Hugging Face tensors (float32, padded vocabulary rows dropped) of a Llama-shaped model;
  feed_forward(tensors, block i's params, "model.layers.i") writes its MLP or experts."""
  H, G, K, V = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.vocab_size
  p = map_tree(lambda x: np.asarray(x, np.float32), convert_layout(params, cfg, False))
  t = {"model.embed_tokens.weight": p["wte"]["embedding"][:V],
       "model.norm.weight": p["ln_f"]["scale"]}
  # part j of a fused c_attn [D, 3, H, K] / c_kv [D, 2, G, K] (bias [3, H, K] / [2, G, K])
  part = lambda x, j: {key: (val[:, j] if key == "kernel" else val[j]) for key, val in x.items()}
  for i in range(cfg.num_layers):
    b, pre = p[f"h_{i}"], f"model.layers.{i}"
    a = b["attn"]
    if "c_attn" in a:
      q, k, v = (part(a["c_attn"], j) for j in range(3))
    else:
      q, (k, v) = a["c_q"], (part(a["c_kv"], j) for j in range(2))
    put_linear(t, f"{pre}.self_attn.q_proj", q, H * K)
    put_linear(t, f"{pre}.self_attn.k_proj", k, G * K)
    put_linear(t, f"{pre}.self_attn.v_proj", v, G * K)
    put_linear(t, f"{pre}.self_attn.o_proj", a["c_proj"], cfg.d_model)
    for name in ("q_norm", "k_norm"):
      if name in a:
        t[f"{pre}.self_attn.{name}.weight"] = a[name]["scale"]
    t[f"{pre}.input_layernorm.weight"] = b["ln_1"]["scale"]
    t[f"{pre}.post_attention_layernorm.weight"] = b["ln_2"]["scale"]
    feed_forward(t, b, pre)
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = p["lm_head"]["kernel"][:, :V].T
  return t


def check_decoder_shaped(cfg: ModelConfig, what: str, qk_norm: str = "none") -> None:
  """UserError unless a Llama-shaped Hugging Face class (rotary, RMSNorm, SwiGLU, pre-norm,
  query/key norm `qk_norm`) can express the model."""
  for field, needed in (("family", "gpt"), ("position_embedding", "rotary"), ("norm", "rmsnorm"),
                        ("activation", "swiglu"), ("norm_placement", "pre"),
                        ("embed_norm", False), ("embed_scale", False), ("head_bias", False),
                        ("qk_norm", qk_norm)):
    if getattr(cfg, field) != needed:
      raise UserError(f"{what} needs model.{field}={needed!r} (the Hugging Face class has no "
                      f"other), this model has {getattr(cfg, field)!r}.")
  if cfg.qkv_bias_on != cfg.proj_bias_on:
    raise UserError(f"{what} needs the same bias setting on q/k/v and the output projection "
                    f"(attention_bias), this model has qkv_bias={cfg.qkv_bias_on} and "
                    f"proj_bias={cfg.proj_bias_on}.")


def check_experts_shaped(cfg: ModelConfig, what: str, *, dense_layers: bool,
                         norm_topk: bool | None) -> None:
  """UserError unless the experts fit a Hugging Face MoE class: no shared experts, every layer
  sparse unless the class has dense layers, and a router it has (norm_topk: the renormalisation
  it applies, None: either, as config.json's norm_topk_prob)."""
  if cfg.num_shared_experts:
    raise UserError(f"{what} has no shared experts; this model has num_shared_experts="
                    f"{cfg.num_shared_experts}.")
  if not dense_layers and not all(cfg.sparse_layers):
    raise UserError(f"{what} makes every layer sparse; this model has moe_layers="
                    f"{cfg.moe_layers!r}.")
  renormalised = cfg.router == "topk_softmax" or cfg.norm_topk_prob
  if norm_topk is not None and renormalised != norm_topk:
    raise UserError(f"{what} routes with a softmax then the top-k probabilities "
                    f"{'renormalised' if norm_topk else 'as they are'}; this model's router "
                    f"is {cfg.router!r} with norm_topk_prob={cfg.norm_topk_prob}.")


def decoder_hf_config(cfg: ModelConfig, architecture: str, model_type: str) -> dict[str, Any]:
  """The config.json fields every Llama-shaped class shares."""
  return {
      "architectures": [architecture], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "attention_bias": cfg.qkv_bias_on,
      "attention_dropout": cfg.attn_dropout, "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
      "torch_dtype": "float32",
  }
