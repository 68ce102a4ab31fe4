"""Layer layouts of a parameter tree: the loop layout (one subtree per block, h_0 .. h_{L-1})
and the scan layout (one subtree "h" whose arrays carry a leading L axis, for nn.scan), and the
conversion between them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import ModelConfig

def layer_groups(cfg: ModelConfig) -> tuple[tuple[str, str, int], ...]:
  """(scan-layout name, loop-layout prefix, count) of each stack of blocks: GPT and the encoder
  h / h_<i>; the encoder-decoder enc / enc_<i> and dec / dec_<i>."""
  if cfg.family == "encdec":
    return (("enc", "enc", cfg.num_layers), ("dec", "dec", cfg.decoder_layers))
  return (("h", "h", cfg.num_layers),)


def _is_layer(key: str, prefix: str) -> bool:
  return key.startswith(f"{prefix}_") and key[len(prefix) + 1:].isdigit()


def stack_layers(params: dict, num_layers: int, name: str = "h", prefix: str = "h") -> dict:
  """Loop layout (h_0 .. h_{L-1}) -> scan layout (h with a leading L axis)."""
  if name in params:
    return params
  blocks = [params[f"{prefix}_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not _is_layer(k, prefix)}
  out[name] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def unstack_layers(params: dict, num_layers: int, name: str = "h", prefix: str = "h") -> dict:
  """Scan layout (h with a leading L axis) -> loop layout (h_0 .. h_{L-1})."""
  if name not in params:
    return params
  out = {k: v for k, v in params.items() if k != name}
  for i in range(num_layers):
    out[f"{prefix}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params[name])
  return out


def convert_layout(params: dict, cfg: ModelConfig, scan_layers: bool | None = None) -> dict:
  """Parameters in the layer layout `scan_layers` (default cfg.scan_layers) asks for."""
  scan = cfg.scan_layers if scan_layers is None else scan_layers
  for name, prefix, count in layer_groups(cfg):
    params = (stack_layers if scan else unstack_layers)(params, count, name, prefix)
  return params
