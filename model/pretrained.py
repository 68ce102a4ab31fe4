"""Hugging Face checkpoints <-> (ModelConfig, params).

`load_hf(name_or_dir)` reads any family, picked by config.json's model_type: gpt2 (here),
bert (BertForMaskedLM / BertModel: model/hf_bert.py) and bart (BartForConditionalGeneration:
model/hf_bart.py). `load_hf_gpt2("gpt2")` downloads openai-community/gpt2 (config.json + model.safetensors) with
huggingface_hub; `load_hf_gpt2("/path/to/dir")` reads a local checkpoint directory (what
`save_pretrained` writes). No torch is needed for safetensors checkpoints.

Hugging Face's Conv1D stores weights as [in, out]; the mapping to our layout is
  c_attn.weight [D, 3D] -> c_attn/kernel [D, 3, H, K]   c_attn.bias [3D] -> [3, H, K]
  attn.c_proj.weight [D, D] -> c_proj/kernel [H, K, D]  mlp weights [D, F], [F, D] unchanged
  wte.weight [V, D], wpe.weight [P, D]                   lm_head.weight [V, D] -> kernel [D, V]
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.errors import NotFoundError, UserError
from model.transformer import convert_layout, unstack_layers

HF_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_ORG = "openai-community"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
GPT2_EOT_ID = 50256

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                "relu": "relu"}
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# GPT2Config's defaults, used for fields a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                    n_inner=None, activation_function="gelu_new", resid_pdrop=0.1,
                    embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
                    tie_word_embeddings=True)
# Fields the checkpoint fixes; block_size may be lowered (wpe is cropped), padded_vocab_size
# raised (wte is padded with zero rows).
_FIXED_FIELDS = ("vocab_size", "num_layers", "num_heads", "d_model", "d_mlp", "use_bias",
                 "tie_embeddings", "position_embedding", "norm_placement", "activation")


# ---------------------------------------------------------------------------------------------
# Loading


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
  n_positions = hf_config.get("n_positions", _HF_DEFAULTS["n_positions"])
  return cfg, params_from_hf(tensors, cfg, n_positions=n_positions, source=weights_path)


MODEL_TYPES = {"gpt2": "gpt", "bert": "bert", "bart": "encdec"}  # model_type -> our family


def model_type(hf_config: dict[str, Any], source: str = CONFIG_FILE) -> str:
  """config.json's model_type (GPT-2 when absent); UserError for one not in MODEL_TYPES."""
  kind = hf_config.get("model_type", "gpt2")
  if kind not in MODEL_TYPES:
    raise UserError(f"{source}: model_type {kind!r} is not supported; supported: "
                    f"{', '.join(MODEL_TYPES)}.")
  return kind


def load_hf(name_or_path: str | os.PathLike, *, scan_layers: bool = False,
            dtype: str = "float32", param_dtype: str = "float32",
            **config_overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a Hugging Face GPT-2, BERT or BART checkpoint (directory or Hub
  name), its family from config.json's model_type; arguments as for `load_hf_gpt2`."""
  directory = resolve_checkpoint_dir(name_or_path)
  hf_config = read_hf_config(directory)
  kind = model_type(hf_config, os.path.join(directory, CONFIG_FILE))
  if kind == "gpt2":
    return load_hf_gpt2(directory, scan_layers=scan_layers, dtype=dtype,
                        param_dtype=param_dtype, **config_overrides)
  cfg = checkpoint_config(directory, hf_config, scan_layers=scan_layers, dtype=dtype,
                          param_dtype=param_dtype, **config_overrides)
  tensors, weights_path = read_hf_tensors(directory)
  module = _family_module(kind)
  n_positions = hf_config.get("max_position_embeddings",
                              module.DEFAULTS["max_position_embeddings"])
  return cfg, module.params_from_hf(tensors, cfg, n_positions=n_positions, source=weights_path)


def checkpoint_config(directory: str, hf_config: dict[str, Any] | None = None,
                      **overrides) -> ModelConfig:
  """The ModelConfig of a checkpoint directory of any family, reading no weights (only the
  names of the tensors, for BERT: with or without the masked-LM head)."""
  if hf_config is None:
    hf_config = read_hf_config(directory)
  source = os.path.join(directory, CONFIG_FILE)
  kind = model_type(hf_config, source)
  if kind == "gpt2":
    return config_from_hf(hf_config, source=source, **overrides)
  from model.hf_tokenizer import special_ids  # pylint: disable=import-outside-toplevel
  ids = special_ids(directory)
  if kind == "bert":
    from model import hf_bert  # pylint: disable=import-outside-toplevel
    return hf_bert.config_from_hf(
        hf_config, has_mlm_head=hf_bert.has_mlm_head(tensor_names(directory)), special_ids=ids,
        source=source, **overrides)
  return _family_module(kind).config_from_hf(hf_config, special_ids=ids, source=source,
                                             **overrides)


def _family_module(kind: str):
  # pylint: disable=import-outside-toplevel
  if kind == "bert":
    from model import hf_bert
    return hf_bert
  from model import hf_bart
  return hf_bart


def tensor_names(directory: str) -> list[str]:
  """The tensor names of a checkpoint (safetensors headers only; a PyTorch file is read)."""
  single = os.path.join(directory, WEIGHTS_FILE)
  index = os.path.join(directory, WEIGHTS_INDEX_FILE)
  if os.path.isfile(single):
    from safetensors import SafetensorError, safe_open
    try:
      with safe_open(single, "np") as f:
        return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{single} is not a readable safetensors file ({e}).") from None
  if os.path.isfile(index):
    return list(_weight_map(index))
  return list(read_hf_tensors(directory)[0])


def resolve_checkpoint_dir(name_or_path: str | os.PathLike) -> str:
  """A local directory as is; a GPT-2 name (or "owner/repo") through the Hugging Face Hub."""
  path = os.fspath(name_or_path)
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise UserError(f"Checkpoint path {path!r} is a file; pass the directory holding "
                    f"{CONFIG_FILE} and {WEIGHTS_FILE}.")
  if path in HF_NAMES:
    return _download(f"{HF_ORG}/{path}", path)
  if _looks_like_repo_id(path):  # any family: its tokenizer files too
    return _download(path, path, TOKENIZER_PATTERNS)
  raise NotFoundError(
      f"Checkpoint directory {path!r} does not exist; pass a directory holding {CONFIG_FILE} "
      f"and {WEIGHTS_FILE}, or one of {', '.join(HF_NAMES)}.")


def _looks_like_repo_id(path: str) -> bool:
  parts = path.split("/")
  return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


# What a BERT / BART repository's tokenizer needs (model/hf_tokenizer.py).
TOKENIZER_PATTERNS = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                      "special_tokens_map.json")


def _download(repo_id: str, name: str, extra: tuple[str, ...] = ()) -> str:
  try:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors
  except ImportError:
    raise UserError(f"Loading {name!r} by name needs huggingface_hub (pip install "
                    f"'flaxgpt[hf]'); or pass a local checkpoint directory.") from None
  try:
    return snapshot_download(repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, *extra])
  except hf_errors.RepositoryNotFoundError:
    raise UserError(
        f"Unknown checkpoint {name!r}: no such local directory, and the Hugging Face Hub has "
        f"no (public) repository {repo_id!r}; use one of {', '.join(HF_NAMES)} or a local "
        f"checkpoint directory.") from None
  except Exception as e:  # no network, offline mode, ...
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise NotFoundError(
        f"Could not download {name!r} ({repo_id}) from the Hugging Face Hub, and it is no "
        f"local directory (no network? {reason}); download {CONFIG_FILE} and {WEIGHTS_FILE} "
        f"elsewhere and pass their local directory instead.") from None


def read_hf_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise NotFoundError(f"{path} not found: a Hugging Face GPT-2 checkpoint directory "
                        f"needs {CONFIG_FILE} and {WEIGHTS_FILE}.")
  try:
    with open(path, encoding="utf-8") as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}).") from None
  if not isinstance(hf_config, dict):
    raise UserError(f"{path} must hold a JSON object, got {type(hf_config).__name__}.")
  return hf_config


def config_from_hf(hf_config: dict[str, Any], *, source: str = CONFIG_FILE,
                   **overrides) -> ModelConfig:
  """ModelConfig for a Hugging Face GPT2Config dict (plus overrides not fixed by weights)."""
  kind = hf_config.get("model_type", "gpt2")
  if kind != "gpt2":
    raise UserError(f"{source}: model_type {kind!r} is not a GPT-2 checkpoint "
                    f"(expected 'gpt2'); model.pretrained.load_hf reads bert and bart too.")
  for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
    if hf_config.get(key, supported) != supported:
      raise UserError(f"{source}: {key}={hf_config[key]!r} is not supported (only "
                      f"{supported}).")
  c = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if k in _HF_DEFAULTS}}
  activation = _ACTIVATIONS.get(c["activation_function"])
  if activation is None:
    raise UserError(f"{source}: activation_function {c['activation_function']!r} is not "
                    f"supported; supported: {', '.join(_ACTIVATIONS)}.")
  fields = dict(vocab_size=c["vocab_size"], block_size=c["n_positions"],
                num_layers=c["n_layer"], num_heads=c["n_head"], d_model=c["n_embd"],
                d_mlp=c["n_inner"], activation=activation,
                layer_norm_epsilon=c["layer_norm_epsilon"],
                tie_embeddings=c["tie_word_embeddings"], resid_dropout=c["resid_pdrop"],
                embd_dropout=c["embd_pdrop"], attn_dropout=c["attn_pdrop"])
  return checked_config(fields, overrides, _FIXED_FIELDS, source, "n_positions")


def _weight_map(index: str) -> dict[str, str]:
  """A sharded checkpoint's index: tensor name -> shard file."""
  try:
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise TypeError(f"weight_map is a {type(weight_map).__name__}, not an object")
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{index} is not a valid safetensors index ({e!r}).") from None
  return weight_map


def read_hf_tensors(directory: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of the checkpoint as numpy arrays, and the weights file they came from."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  single = os.path.join(directory, WEIGHTS_FILE)
  index = os.path.join(directory, WEIGHTS_INDEX_FILE)
  torch_file = os.path.join(directory, TORCH_WEIGHTS_FILE)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    shards = sorted(set(_weight_map(index).values()))
    files = [os.path.join(directory, s) for s in shards]
  elif os.path.isfile(torch_file):
    return _read_torch_tensors(torch_file), torch_file
  else:
    raise NotFoundError(f"{single} not found: a Hugging Face GPT-2 checkpoint directory "
                        f"needs {CONFIG_FILE} and {WEIGHTS_FILE} (or {TORCH_WEIGHTS_FILE}, "
                        f"read with torch when it is installed).")
  tensors = {}
  for path in files:
    if not os.path.isfile(path):
      raise NotFoundError(f"{path} (listed in {index}) not found.")
    try:
      tensors.update(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
  return tensors, files[0] if len(files) == 1 else index


def _read_torch_tensors(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise NotFoundError(
        f"{path} is a PyTorch checkpoint and has no {WEIGHTS_FILE} next to it; install torch "
        f"to read it, or convert it with transformers "
        f"(save_pretrained(..., safe_serialization=True)).") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # corrupt or not a state dict
    raise UserError(f"{path} is not a readable PyTorch state dict ({e}).") from None
  return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
          for k, v in state.items()}


def params_from_hf(tensors: dict[str, np.ndarray], cfg: ModelConfig, *,
                   n_positions: int | None = None, source: str = WEIGHTS_FILE) -> dict:
  """Our parameter tree (layout of `cfg.scan_layers`, dtype `cfg.param_dtype`) from HF tensors."""
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
  params = {k: _map(lambda x: jnp.asarray(x, dtype), v) for k, v in params.items()}
  return convert_layout(params, cfg)


class HFTensors:
  """A checkpoint's tensors read by name, with the shape config.json implies (UserError naming
  the tensor otherwise), as float32 numpy; `strip` prefixes are removed from every key first
  (BertForMaskedLM's "bert.", BART's "model."), and TF-era LayerNorm names gamma / beta read as
  weight / bias."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str, strip: tuple[str, ...] = ()):
    self.source, self.tensors = source, {}
    for key, value in tensors.items():
      for prefix in strip:
        key = key.removeprefix(prefix)
      if key.endswith(".gamma"):
        key = key[:-len("gamma")] + "weight"
      elif key.endswith(".beta"):
        key = key[:-len("beta")] + "bias"
      self.tensors[key] = value

  def has(self, key: str) -> bool:
    return key in self.tensors

  def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in self.tensors:
      raise UserError(f"{self.source} has no tensor {key!r}.")
    x = self.tensors[key]
    if tuple(x.shape) != tuple(shape):
      raise UserError(f"{self.source}: tensor {key!r} has shape {tuple(x.shape)}, but "
                      f"{CONFIG_FILE} implies {tuple(shape)}.")
    return np.asarray(x, dtype=np.float32)

  def ln(self, prefix: str, d: int) -> dict:
    return {"scale": self.get(f"{prefix}.weight", (d,)), "bias": self.get(f"{prefix}.bias", (d,))}

  def linear(self, prefix: str, n_in: int, n_out: int) -> dict:
    """torch.nn.Linear (weight [out, in]) as a Dense: kernel [in, out], bias [out]."""
    return {"kernel": self.get(f"{prefix}.weight", (n_out, n_in)).T,
            "bias": self.get(f"{prefix}.bias", (n_out,))}

  def attention(self, q: str, k: str, v: str, out: str, D: int, H: int, K: int, *,
                cross: bool = False) -> dict:
    """Separate q / k / v / output Linears as our Attention: fused c_attn [D, 3, H, K] (or, with
    `cross`, c_q [D, H, K] and c_kv [D, 2, H, K]) and c_proj [H, K, D]."""
    qkv = [self.linear(name, D, D) for name in (q, k, v)]
    heads = lambda d: {"kernel": d["kernel"].reshape(D, H, K), "bias": d["bias"].reshape(H, K)}
    proj = self.linear(out, D, D)
    p = {"c_proj": {"kernel": proj["kernel"].reshape(H, K, D), "bias": proj["bias"]}}
    parts = [heads(d) for d in qkv]
    fuse = lambda ds: {"kernel": np.stack([d["kernel"] for d in ds], axis=1),
                       "bias": np.stack([d["bias"] for d in ds], axis=0)}
    if cross:
      p.update(c_q=parts[0], c_kv=fuse(parts[1:]))
    else:
      p["c_attn"] = fuse(parts)
    return p


def finish_params(params: dict, cfg: ModelConfig) -> dict:
  """numpy loop-layout params -> arrays of cfg.param_dtype in cfg's layer layout."""
  dtype = cfg.params_dtype
  params = {k: _map(lambda x: jnp.asarray(x, dtype), v) for k, v in params.items()}
  return convert_layout(params, cfg)


def checked_config(fields: dict[str, Any], overrides: dict[str, Any], fixed: tuple[str, ...],
                   source: str, positions: str = "max_position_embeddings") -> ModelConfig:
  """ModelConfig(**fields) with `overrides` (UserError for one that changes a `fixed` field, or
  raises block_size above the checkpoint's positions, config.json's `positions`)."""
  block = overrides.get("block_size")
  if isinstance(block, int) and block > fields["block_size"]:
    raise UserError(f"block_size {block} exceeds the checkpoint's {positions} "
                    f"{fields['block_size']}; it can only be lowered.")
  try:
    base = ModelConfig(**fields)
  except (ValueError, TypeError) as e:
    raise UserError(f"{source}: {e}") from None
  for name in fixed:
    if name in overrides and overrides[name] != getattr(base, name):
      raise UserError(f"Cannot override {name} ({overrides[name]!r}) when loading a checkpoint "
                      f"whose weights fix it to {getattr(base, name)!r}.")
  return base.replace(**overrides)


def hf_activation(name: Any, source: str) -> str:
  activation = _ACTIVATIONS.get(name)
  if activation is None:
    raise UserError(f"{source}: activation {name!r} is not supported; supported: "
                    f"{', '.join(_ACTIVATIONS)}.")
  return activation


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


def pad_rows(x_VD: np.ndarray, rows: int) -> np.ndarray:
  if rows == x_VD.shape[0]:
    return x_VD
  return np.concatenate([x_VD, np.zeros((rows - x_VD.shape[0], x_VD.shape[1]), x_VD.dtype)])


def _map(fn, tree):
  if isinstance(tree, dict):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


# ---------------------------------------------------------------------------------------------
# Saving


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
  from safetensors.numpy import save_file
  check_hf_gpt2_shaped(cfg)
  D, V, L = cfg.d_model, cfg.vocab_size, cfg.num_layers
  p = _map(lambda x: np.asarray(x, np.float32), unstack_layers(params, L))
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
      "n_inner": cfg.d_mlp, "activation_function": _HF_ACTIVATIONS[cfg.activation],
      "layer_norm_epsilon": cfg.layer_norm_epsilon, "tie_word_embeddings": cfg.tie_embeddings,
      "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embd_dropout,
      "attn_pdrop": cfg.attn_dropout, "scale_attn_weights": True,
      # GPT-2's <|endoftext|>; transformers' default (50256) is out of range for small vocabularies.
      "bos_token_id": GPT2_EOT_ID if V > GPT2_EOT_ID else None,
      "eos_token_id": GPT2_EOT_ID if V > GPT2_EOT_ID else None,
  }
  os.makedirs(path, exist_ok=True)
  weights = os.path.join(path, WEIGHTS_FILE)
  save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, weights,
            metadata={"format": "pt"})
  umask = os.umask(0)  # safetensors writes 0600; give it the permissions of any new file
  os.umask(umask)
  os.chmod(weights, 0o666 & ~umask)
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)
