"""What the converters of model/hf/ share: tensors read by name with the shape config.json implies,
a ModelConfig checked against the overrides a caller may give, and the finishing of a parameter
tree (dtype, layer layout)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.errors import UserError
from model.hf.files import CONFIG_FILE
from model.layout import convert_layout

# Hugging Face activation names -> ModelConfig.activation
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu"}
HF_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


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

  def linear(self, prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict:
    """torch.nn.Linear (weight [out, in]) as a Dense: kernel [in, out], bias [out] (if `bias`)."""
    p = {"kernel": self.get(f"{prefix}.weight", (n_out, n_in)).T}
    if bias:
      p["bias"] = self.get(f"{prefix}.bias", (n_out,))
    return p

  def attention(self, q: str, k: str, v: str, out: str, D: int, H: int, K: int, *,
                cross: bool = False, kv_heads: int | None = None, qkv_bias: bool = True,
                out_bias: bool = True) -> dict:
    """Separate q / k / v / output Linears as our Attention: fused c_attn [D, 3, H, K], or with
    `cross` or G = kv_heads < H key/value heads c_q [D, H, K] and c_kv [D, 2, G, K]; c_proj
    [H, K, D]. Biases of q / k / v with qkv_bias, of the output with out_bias."""
    G = H if kv_heads is None else kv_heads
    heads = lambda d, n: {key: x.reshape(*x.shape[:-1], n, K) for key, x in d.items()}
    q_part = heads(self.linear(q, D, H * K, qkv_bias), H)
    k_part, v_part = (heads(self.linear(name, D, G * K, qkv_bias), G) for name in (k, v))
    proj = self.linear(out, H * K, D, out_bias)
    p = {"c_proj": dict(proj, kernel=proj["kernel"].reshape(H, K, D))}
    fuse = lambda ds: {key: np.stack([d[key] for d in ds], axis=1 if key == "kernel" else 0)
                       for key in ds[0]}
    if cross or G != H:
      p.update(c_q=q_part, c_kv=fuse([k_part, v_part]))
    else:
      p["c_attn"] = fuse([q_part, k_part, v_part])
    return p


def finish_params(params: dict, cfg: ModelConfig) -> dict:
  """numpy loop-layout params -> arrays of cfg.param_dtype in cfg's layer layout."""
  dtype = cfg.params_dtype
  params = {k: map_tree(lambda x: jnp.asarray(x, dtype), v) for k, v in params.items()}
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
  activation = ACTIVATIONS.get(name)
  if activation is None:
    raise UserError(f"{source}: activation {name!r} is not supported; supported: "
                    f"{', '.join(ACTIVATIONS)}.")
  return activation


def pad_rows(x_VD: np.ndarray, rows: int) -> np.ndarray:
  if rows == x_VD.shape[0]:
    return x_VD
  return np.concatenate([x_VD, np.zeros((rows - x_VD.shape[0], x_VD.shape[1]), x_VD.dtype)])


def map_tree(fn, tree):
  if isinstance(tree, dict):
    return {k: map_tree(fn, v) for k, v in tree.items()}
  return fn(tree)
