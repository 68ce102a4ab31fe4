"""The module of a config's family, and its parameters:

    build(cfg)                       GPT (model/gpt.py), Encoder (model/encoder.py) or
                                     EncoderDecoder (model/encdec.py), by cfg.family
    init_params(cfg, rng)            parameters on the default device (tests, small models)
    abstract_params(cfg)             their shapes and dtypes, nothing allocated
    count_params(cfg), num_params(tree)
    count_params(cfg, active=True)   a mixture of experts' parameters one token uses
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.encdec import EncoderDecoder
from model.encoder import Encoder
from model.gpt import GPT

# cfg.family -> its module
FAMILY_MODULES = {"gpt": GPT, "bert": Encoder, "encdec": EncoderDecoder}

def init_params(cfg: ModelConfig, rng: jax.Array, *, batch_size: int = 1,
                seq_len: int | None = None, unbox: bool = True):
  """Parameters on the default device (for tests and small models; sharding/ creates them
  already sharded for real runs). With unbox=False the logical-axis metadata is kept."""
  seq_len = min(cfg.block_size, 8) if seq_len is None else seq_len
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  if cfg.family == "encdec":
    variables = build(cfg).init(rng, tokens, tokens)
  else:
    variables = build(cfg).init(rng, tokens)
  return nn.unbox(variables["params"]) if unbox else variables["params"]


def build(cfg: ModelConfig, **kwargs) -> nn.Module:
  """The Flax module of cfg.family (FAMILY_MODULES): GPT, Encoder or EncoderDecoder."""
  return FAMILY_MODULES[cfg.family](cfg, **kwargs)


def abstract_params(cfg: ModelConfig, *, unbox: bool = True):
  """Parameter shapes and dtypes (jax.ShapeDtypeStruct), nothing allocated."""
  return jax.eval_shape(lambda rng: init_params(cfg, rng, unbox=unbox), jax.random.key(0))


def num_params(params: Any) -> int:
  """Number of parameters in a tree of arrays or ShapeDtypeStructs (e.g. TrainState.params)."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def inactive_expert_params(cfg: ModelConfig) -> int:
  """Parameters of the routed experts a token does not use: (E - J) / E of every sparse
  layer's expert matrices (model/moe.py)."""
  E, J = cfg.num_experts, cfg.num_experts_per_tok
  per_expert = (3 if cfg.activation == "swiglu" else 2) * cfg.d_model * cfg.expert_mlp
  return sum(cfg.sparse_layers) * (E - J) * per_expert


def count_params(cfg: ModelConfig, *, non_embedding: bool = False, active: bool = False) -> int:
  """Number of parameters (from abstract shapes). non_embedding drops the position tables (wpe,
  wpe_dec), the token-type table (wtt) and, when the head is untied, wte (the convention of
  nanoGPT's get_num_params subtracts wpe only). active (a mixture of experts) counts only the
  num_experts_per_tok routed experts a token goes through (inactive_expert_params), as the
  published "active parameters" do."""
  # the scan layout has the same arrays, stacked, and traces one block instead of L
  shapes = abstract_params(cfg if cfg.scan_layers else cfg.replace(scan_layers=True))
  total = num_params(shapes) - (inactive_expert_params(cfg) if active else 0)
  if non_embedding:
    for table in ("wpe", "wpe_dec", "wtt"):  # lookups (positions, token types)
      if table in shapes:
        total -= math.prod(shapes[table]["embedding"].shape)
    if not cfg.tie_embeddings:
      total -= math.prod(shapes["wte"]["embedding"].shape)
  return total
