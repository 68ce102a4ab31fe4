"""The stack of transformer blocks inside a family's module: a Python loop of modules
`name`_0 .. `name`_{L-1}, or one nn.scan module `name` whose parameters carry a leading L axis
(cfg.scan_layers; model/layout.py converts between the two), each block under jax.checkpoint per
cfg.remat. A mixture of experts' dense / sparse pattern (cfg.sparse_layers) picks each block's
MLP; in the scan layout a pattern of period p > 1 scans L / p groups of p blocks.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from model.blocks import MOE_COLLECTION, Block
from model.config import ModelConfig


class _ScannedBlock(Block):
  """Block as an nn.scan body: the carry is (x, kv_cache), so the cache arrays are carried and
  updated in place instead of being split per layer and restacked. `memory` is scanned over
  (a cross-attention cache's per-layer keys and values) or broadcast (the encoder output)."""

  def __call__(self, carry, positions_BT, key_mask_BS=None, memory=None,  # pylint: disable=arguments-differ
               memory_mask_BS=None, segment_ids_BT=None, prefix_BT=None):
    x_BTD, kv_cache = carry
    return Block.__call__(self, x_BTD, kv_cache, positions_BT, key_mask_BS, memory,
                          memory_mask_BS, segment_ids_BT, prefix_BT), None


class _ScannedGroup(nn.Module):
  """p blocks b_0 .. b_{p-1} (the j-th sparse with moes[j]) as one nn.scan body: the scan
  layout of layers whose dense / sparse pattern repeats every p layers (cfg.layer_period)."""
  cfg: ModelConfig
  deterministic: bool = True
  cache_chunks: int | None = None
  kind: str = "causal"
  cross: bool = False
  moes: tuple = ()

  @nn.compact
  def __call__(self, carry, positions_BT, key_mask_BS=None, memory=None, memory_mask_BS=None,
               segment_ids_BT=None, prefix_BT=None):
    x_BTD, kv_cache = carry
    for j, moe in enumerate(self.moes):
      x_BTD, kv_cache = Block(self.cfg, self.deterministic, self.cache_chunks, self.kind,
                              self.cross, moe, name=f"b_{j}")(
                                  x_BTD, kv_cache, positions_BT, key_mask_BS, memory,
                                  memory_mask_BS, segment_ids_BT, prefix_BT)
    return (x_BTD, kv_cache), None


def _remat_policy(name: str):
  return {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }[name]


def stack(cfg: ModelConfig, x_BTD, kv, positions_BT, *, num_layers: int, name: str,
          deterministic: bool, cache_chunks: int | None = None, kind: str = "causal",
          cross: bool = False, key_mask_BS=None, memory=None, memory_mask_BS=None,
          segment_ids_BT=None, prefix_BT=None, moe=None):
  """num_layers Blocks (kind, cross) applied in turn, inside a module's compact method: one
  nn.scan module `name` with cfg.scan_layers (parameters with a leading L axis), else modules
  `name`_0 .. `name`_{L-1}; each under jax.checkpoint per cfg.remat. `memory` is the encoder
  output (every layer) or a cross-attention cache's ([L, B, S, H, K] keys, values): layer i
  reads its slice; segment_ids_BT and prefix_BT go to every layer's causal self-attention.
  `moe`: the sparse MLP's module for the layers cfg.sparse_layers marks; a pattern of period
  p > 1 scans L / p groups of p blocks (`name`/b_j, leading axis L / p).
  Returns (x, kv)."""
  def maybe_remat(cls):
    if cfg.remat == "none":
      return cls
    return nn.remat(cls, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)

  per_layer = isinstance(memory, tuple)
  moes = ((None,) * num_layers if moe is None
          else tuple(moe if sparse else None for sparse in cfg.sparse_layers))
  if cfg.scan_layers:
    period = cfg.layer_period if moe is not None else 1
    body, last = (_ScannedBlock, moes[0]) if period == 1 else (_ScannedGroup, moes[:period])
    blocks = nn.scan(maybe_remat(body), variable_axes={"params": 0, MOE_COLLECTION: 0},
                     split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast, 0 if per_layer else nn.broadcast,
                              nn.broadcast, nn.broadcast, nn.broadcast),
                     length=num_layers // period, metadata_params={nn.PARTITION_NAME: "layers"})
    (x_BTD, kv), _ = blocks(cfg, deterministic, cache_chunks, kind, cross, last, name=name)(
        (x_BTD, kv), positions_BT, key_mask_BS, memory, memory_mask_BS, segment_ids_BT,
        prefix_BT)
    return x_BTD, kv
  block_cls = maybe_remat(Block)
  for i in range(num_layers):
    layer_memory = (memory[0][i], memory[1][i]) if per_layer else memory
    x_BTD, kv = block_cls(cfg, deterministic, cache_chunks, kind, cross, moes[i],
                          name=f"{name}_{i}")(
        x_BTD, kv, positions_BT, key_mask_BS, layer_memory, memory_mask_BS, segment_ids_BT,
        prefix_BT)
  return x_BTD, kv
