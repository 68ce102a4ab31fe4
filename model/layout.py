"""Layer layouts of a parameter tree: the loop layout (one subtree per block, h_0 .. h_{L-1})
and the scan layout (one subtree "h" whose arrays carry a leading L axis, for nn.scan), and the
conversion between them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import ModelConfig

def layer_groups(cfg: ModelConfig) -> tuple[tuple[str, str, int, int], ...]:
  """(scan-layout name, loop-layout prefix, count, period) of each stack of blocks: GPT and the
  encoder h / h_<i>; the encoder-decoder enc / enc_<i> and dec / dec_<i>. The period p is
  cfg.layer_period (dense and sparse layers alternating, model/moe.py): the scan layout then
  holds p stacks h/b_0 .. h/b_{p-1}, block i in b_{i % p} at index i // p."""
  if cfg.family == "encdec":
    return (("enc", "enc", cfg.num_layers, 1), ("dec", "dec", cfg.decoder_layers, 1))
  return (("h", "h", cfg.num_layers, cfg.layer_period),)


def _is_layer(key: str, prefix: str) -> bool:
  return key.startswith(f"{prefix}_") and key[len(prefix) + 1:].isdigit()


def stack_layers(params: dict, num_layers: int, name: str = "h", prefix: str = "h",
                 period: int = 1) -> dict:
  """Loop layout (h_0 .. h_{L-1}) -> scan layout (h with a leading L axis; with period p > 1,
  h/b_j with a leading L / p axis: blocks j, j + p, ...)."""
  if name in params:
    return params
  blocks = [params[f"{prefix}_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not _is_layer(k, prefix)}
  stacked = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
  out[name] = (stacked(blocks) if period == 1
               else {f"b_{j}": stacked(blocks[j::period]) for j in range(period)})
  return out


def unstack_layers(params: dict, num_layers: int, name: str = "h", prefix: str = "h",
                   period: int = 1) -> dict:
  """Scan layout (h with a leading L axis, or h/b_j with period p) -> loop layout (h_0 ..
  h_{L-1})."""
  if name not in params:
    return params
  out = {k: v for k, v in params.items() if k != name}
  for i in range(num_layers):
    group = params[name] if period == 1 else params[name][f"b_{i % period}"]
    out[f"{prefix}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i // period], group)
  return out


def convert_layout(params: dict, cfg: ModelConfig, scan_layers: bool | None = None) -> dict:
  """Parameters in the layer layout `scan_layers` (default cfg.scan_layers) asks for."""
  scan = cfg.scan_layers if scan_layers is None else scan_layers
  for name, prefix, count, period in layer_groups(cfg):
    params = (stack_layers if scan else unstack_layers)(params, count, name, prefix, period)
  return params
