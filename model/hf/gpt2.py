"""Hugging Face GPT-2 checkpoints (GPT2LMHeadModel) <-> (ModelConfig, params).

`load_hf_gpt2("gpt2")` downloads openai-community/gpt2 (config.json + model.safetensors) with
huggingface_hub; `load_hf_gpt2("/path/to/dir")` reads a local checkpoint directory (what
`save_pretrained` writes); `save_hf_gpt2` writes one that transformers loads.

Hugging Face's Conv1D stores weights as [in, out]; the mapping to our layout is
  c_attn.weight [D, 3D] -> c_attn/kernel [D, 3, H, K]   c_attn.bias [3D] -> [3, H, K]
  attn.c_proj.weight [D, D] -> c_proj/kernel [H, K, D]  mlp weights [D, F], [F, D] unchanged
  wte.weight [V, D], wpe.weight [P, D]                   lm_head.weight [V, D] -> kernel [D, V]
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.fields import read_fields, read_model_type
from model.hf.files import (CONFIG_FILE, WEIGHTS_FILE, read_hf_config, read_hf_tensors,
                            resolve_checkpoint_dir, write_checkpoint)
from model.hf.tensors import ACTIVATIONS, HF_ACTIVATIONS, checked_config, map_tree, pad_rows
from model.layout import convert_layout, unstack_layers

GPT2_EOT_ID = 50256
# The fields read from config.json: (GPT2Config's default for one left out, its kind).
SCHEMA = dict(vocab_size=(50257, "int+"), n_positions=(1024, "int+"), n_embd=(768, "int+"),
              n_layer=(12, "int+"), n_head=(12, "int+"), n_inner=(None, "int+?"),
              activation_function=("gelu_new", "str"), resid_pdrop=(0.1, "prob"),
              embd_pdrop=(0.1, "prob"), attn_pdrop=(0.1, "prob"),
              layer_norm_epsilon=(1e-5, "float+"), tie_word_embeddings=(True, "bool"))
# Fields the checkpoint fixes; block_size may be lowered (wpe is cropped), padded_vocab_size
# raised (wte is padded with zero rows).
_FIXED_FIELDS = ("vocab_size", "num_layers", "num_heads", "d_model", "d_mlp", "use_bias",
                 "tie_embeddings", "position_embedding", "norm_placement", "activation")


def load_hf_gpt2(name_or_path: str | os.PathLike, *, scan_layers: bool = False,
                 dtype: str = "float32", param_dtype: str = "float32",
                 **config_overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a Hugging Face GPT-2 checkpoint directory or hub name.

  Dropout rates come from config.json (0.1 for OpenAI's GPT-2); override them, and anything
  not fixed by the weights (attention, remat, block_size <= n_positions, padded_vocab_size),
  with keyword arguments. Params are a plain nested dict of arrays in `param_dtype`, in the
  layer layout `scan_layers` asks for.
  """
  directory = resolve_checkpoint_dir(name_or_path)
  hf_config = read_hf_config(directory)
  cfg = config_from_hf(hf_config, scan_layers=scan_layers, dtype=dtype,
                       param_dtype=param_dtype, source=os.path.join(directory, CONFIG_FILE),
                       **config_overrides)
  tensors, weights_path = read_hf_tensors(directory)
  return cfg, params_from_hf(tensors, cfg, hf_config=hf_config, source=weights_path)


def config_from_hf(hf_config: dict[str, Any], *, source: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  """ModelConfig for a Hugging Face GPT2Config dict (plus overrides not fixed by weights)."""
  kind = hf_config.get("model_type") or read_model_type(hf_config, source, ("gpt2",))
  if kind != "gpt2":
    raise UserError(f"{source}: model_type {kind!r} is not a GPT-2 checkpoint "
                    f"(expected 'gpt2'); model.hf.load_hf reads the other model types too.")
  for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
    if hf_config.get(key, supported) != supported:
      raise UserError(f"{source}: {key}={hf_config[key]!r} is not supported (only "
                      f"{supported}).")
  c = read_fields(hf_config, SCHEMA, source)
  activation = ACTIVATIONS.get(c["activation_function"])
  if activation is None:
    raise UserError(f"{source}: activation_function {c['activation_function']!r} is not "
                    f"supported; supported: {', '.join(ACTIVATIONS)}.")
  fields = dict(vocab_size=c["vocab_size"], block_size=c["n_positions"],
                num_layers=c["n_layer"], num_heads=c["n_head"], d_model=c["n_embd"],
                d_mlp=c["n_inner"], activation=activation,
                norm_eps=c["layer_norm_epsilon"],
                tie_embeddings=c["tie_word_embeddings"], resid_dropout=c["resid_pdrop"],
                embd_dropout=c["embd_pdrop"], attn_dropout=c["attn_pdrop"])
  return checked_config(fields, overrides, _FIXED_FIELDS, source, "n_positions")


def checkpoint_config(directory: str, hf_config: dict[str, Any], *, source: str,
                      **overrides) -> ModelConfig:  # pylint: disable=unused-argument
  """model/hf's interface: `config_from_hf` (GPT-2 needs nothing but config.json)."""
  return config_from_hf(hf_config, source=source, **overrides)


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   hf_config: dict[str, Any] | None = None, n_positions: int | None = None,
                   source: str = WEIGHTS_FILE) -> dict:
  """Our parameter tree (layout of `cfg.scan_layers`, dtype `cfg.param_dtype`) from HF tensors;
  the position table has config.json's n_positions rows (`n_positions`, else cfg.block_size)."""
  if hf_config is not None and n_positions is None:
    n_positions = hf_config.get("n_positions", SCHEMA["n_positions"][0])  # checked in
    # config_from_hf
  D, H, K, F, L = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_mlp, cfg.num_layers
  V, P = cfg.vocab_size, n_positions or cfg.block_size
  tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}

  def get(key, shape):
    if key not in tensors:
      raise UserError(f"{source} has no tensor {key!r} (nor 'transformer.{key}').")
    x = tensors[key]
    if tuple(x.shape) != shape:
      raise UserError(f"{source}: tensor {key!r} has shape {tuple(x.shape)}, but "
                      f"{CONFIG_FILE} implies {shape}.")
    return np.asarray(x, dtype=np.float32)

  def ln(prefix):
    return {"scale": get(f"{prefix}.weight", (D,)), "bias": get(f"{prefix}.bias", (D,))}

  def dense(prefix, n_in, n_out):
    return {"kernel": get(f"{prefix}.weight", (n_in, n_out)),
            "bias": get(f"{prefix}.bias", (n_out,))}

  params = {"wte": {"embedding": pad_rows(get("wte.weight", (V, D)), cfg.padded_vocab_size)},
            "wpe": {"embedding": get("wpe.weight", (P, D))[:cfg.block_size]},
            "ln_f": ln("ln_f")}
  for i in range(L):
    p = f"h.{i}"
    c_attn = dense(f"{p}.attn.c_attn", D, 3 * D)
    c_proj = dense(f"{p}.attn.c_proj", D, D)
    params[f"h_{i}"] = {
        "ln_1": ln(f"{p}.ln_1"),
        "attn": {"c_attn": {"kernel": c_attn["kernel"].reshape(D, 3, H, K),
                            "bias": c_attn["bias"].reshape(3, H, K)},
                 "c_proj": {"kernel": c_proj["kernel"].reshape(H, K, D),
                            "bias": c_proj["bias"]}},
        "ln_2": ln(f"{p}.ln_2"),
        "mlp": {"c_fc": dense(f"{p}.mlp.c_fc", D, F), "c_proj": dense(f"{p}.mlp.c_proj", F, D)},
    }
  if not cfg.tie_embeddings:
    lm_head_VD = pad_rows(get("lm_head.weight", (V, D)), cfg.padded_vocab_size)
    params["lm_head"] = {"kernel": lm_head_VD.T}
  dtype = cfg.params_dtype
  params = {k: map_tree(lambda x: jnp.asarray(x, dtype), v) for k, v in params.items()}
  return convert_layout(params, cfg)


def _with_zero_biases(p: dict, cfg: ModelConfig) -> dict:
  """The loop-layout params of a use_bias=False model with the biases GPT-2 has, all zero."""
  D, H, K, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_mlp
  zeros = lambda *shape: np.zeros(shape, np.float32)
  p = dict(p, ln_f=dict(p["ln_f"], bias=zeros(D)))
  for i in range(cfg.num_layers):
    b = p[f"h_{i}"]
    p[f"h_{i}"] = {
        "ln_1": dict(b["ln_1"], bias=zeros(D)), "ln_2": dict(b["ln_2"], bias=zeros(D)),
        "attn": {"c_attn": dict(b["attn"]["c_attn"], bias=zeros(3, H, K)),
                 "c_proj": dict(b["attn"]["c_proj"], bias=zeros(D))},
        "mlp": {"c_fc": dict(b["mlp"]["c_fc"], bias=zeros(F)),
                "c_proj": dict(b["mlp"]["c_proj"], bias=zeros(D))}}
  return p


def check_hf_gpt2_shaped(cfg: ModelConfig, what: str = "save_hf_gpt2") -> None:
  """UserError unless Hugging Face's GPT2LMHeadModel can express the model: learned positions
  and pre-LN (a model without biases is saved with zero biases)."""
  for field, needed in (("family", "gpt"), ("position_embedding", "learned"),
                        ("norm_placement", "pre")):
    if getattr(cfg, field) != needed:
      raise UserError(f"{what} needs model.{field}={needed!r} (Hugging Face GPT-2 has no "
                      f"other), this model has {getattr(cfg, field)!r}.")


def save_hf_gpt2(params: dict, cfg: ModelConfig, path: str | os.PathLike) -> None:
  """Writes `path`/config.json and model.safetensors that transformers' GPT2LMHeadModel loads.

  Needs a GPT-2-shaped config: learned positions, pre-LN; a model without biases
  (use_bias=False) gets zero biases, which compute the same function; padded vocabulary rows
  are dropped. Weights are saved as float32.
  """
  check_hf_gpt2_shaped(cfg)
  D, V, L = cfg.d_model, cfg.vocab_size, cfg.num_layers
  p = map_tree(lambda x: np.asarray(x, np.float32), unstack_layers(params, L))
  if not cfg.use_bias:
    p = _with_zero_biases(p, cfg)
  t = {"transformer.wte.weight": p["wte"]["embedding"][:V],
       "transformer.wpe.weight": p["wpe"]["embedding"],
       "transformer.ln_f.weight": p["ln_f"]["scale"], "transformer.ln_f.bias": p["ln_f"]["bias"]}
  for i in range(L):
    b, pre = p[f"h_{i}"], f"transformer.h.{i}"
    t.update({
        f"{pre}.ln_1.weight": b["ln_1"]["scale"], f"{pre}.ln_1.bias": b["ln_1"]["bias"],
        f"{pre}.ln_2.weight": b["ln_2"]["scale"], f"{pre}.ln_2.bias": b["ln_2"]["bias"],
        f"{pre}.attn.c_attn.weight": b["attn"]["c_attn"]["kernel"].reshape(D, 3 * D),
        f"{pre}.attn.c_attn.bias": b["attn"]["c_attn"]["bias"].reshape(3 * D),
        f"{pre}.attn.c_proj.weight": b["attn"]["c_proj"]["kernel"].reshape(D, D),
        f"{pre}.attn.c_proj.bias": b["attn"]["c_proj"]["bias"],
        f"{pre}.mlp.c_fc.weight": b["mlp"]["c_fc"]["kernel"],
        f"{pre}.mlp.c_fc.bias": b["mlp"]["c_fc"]["bias"],
        f"{pre}.mlp.c_proj.weight": b["mlp"]["c_proj"]["kernel"],
        f"{pre}.mlp.c_proj.bias": b["mlp"]["c_proj"]["bias"],
    })
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = p["lm_head"]["kernel"][:, :V].T
  hf_config = {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V,
      "n_positions": cfg.block_size, "n_embd": D, "n_layer": L, "n_head": cfg.num_heads,
      "n_inner": cfg.d_mlp, "activation_function": HF_ACTIVATIONS[cfg.activation],
      "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embd_dropout,
      "attn_pdrop": cfg.attn_dropout, "scale_attn_weights": True,
      # GPT-2's <|endoftext|>; transformers' default (50256) is out of range for small vocabularies.
      "bos_token_id": GPT2_EOT_ID if V > GPT2_EOT_ID else None,
      "eos_token_id": GPT2_EOT_ID if V > GPT2_EOT_ID else None,
  }
  write_checkpoint(path, t, hf_config)
