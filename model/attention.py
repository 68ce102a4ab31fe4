"""Causal self-attention without a cache, through the kernel `ModelConfig.attention` picks.

  xla     the reference einsum attention (model/blocks.py's reference_attention)
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"), the cuDNN flash kernel (GPU)
  splash  the Pallas splash-attention kernel that ships with JAX
          (jax.experimental.pallas.ops.tpu.splash_attention): flash attention for TPU that
          never materialises the [B, H, T, T] scores and skips the blocks above the diagonal.
          On the CPU it runs in Pallas interpret mode (slow; for checking its numerics).
  auto    splash on TPU (when T is a multiple of 128), cuDNN on GPU in bf16/fp16, else
          jax.nn.dot_product_attention's XLA path

The backend is that of the mesh in context (jax.sharding.get_abstract_mesh()), so a step
compiled ahead of time for a TPU topology on a CPU machine (launch.aot) picks splash too.
Splash runs per device under shard_map: batch and heads split as the logical axes
ACT_BTHK ("act_batch", "act_length", "act_heads", "act_kv") are mapped by the rules in
context (sharding/rules.py); length and head dimension stay whole on every device.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from model.config import ModelConfig
from model.errors import UserError

ACT_BTHK = ("act_batch", "act_length", "act_heads", "act_kv")

# Splash works on blocks of query / key positions; its kernels need multiples of 128 (the TPU's
# lane width). Larger blocks mean fewer grid steps; 512 is MaxText's default.
SPLASH_BLOCK = 128
SPLASH_BLOCK_CHOICES = (512, 256, 128)


def backend() -> str:
  """The platform the current computation is for: the context mesh's devices, else JAX's
  default backend ("cpu", "gpu", "tpu")."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def splash_block_size(seq_len: int) -> int:
  """The largest block in SPLASH_BLOCK_CHOICES that divides seq_len (which must be a multiple
  of SPLASH_BLOCK)."""
  return next(b for b in SPLASH_BLOCK_CHOICES if seq_len % b == 0)


def check_splash_length(seq_len: int) -> None:
  if seq_len % SPLASH_BLOCK:
    raise UserError(f"model.attention='splash' needs a sequence length that is a multiple of "
                    f"{SPLASH_BLOCK}, got {seq_len}; use model.attention=auto or xla.")


def implementation(cfg: ModelConfig, seq_len: int, dropout: bool,
                   platform: str | None = None) -> str:
  """Which kernel the no-cache attention uses on `platform` (default: backend()): "xla"
  (reference einsums), "splash", "cudnn" or "dot_product" (jax.nn.dot_product_attention's XLA
  path). Attention dropout always takes the reference path (the only one that applies it)."""
  if dropout or cfg.attention == "xla":
    return "xla"
  platform = backend() if platform is None else platform
  if cfg.attention == "splash":
    if platform not in ("tpu", "cpu"):
      raise UserError(f"model.attention='splash' needs a TPU (or the CPU, in Pallas interpret "
                      f"mode), not {platform}; use model.attention=auto.")
    check_splash_length(seq_len)
    return "splash"
  if cfg.attention == "cudnn":
    if platform != "gpu":
      raise UserError(f"model.attention='cudnn' needs a GPU (cuDNN's flash attention), not "
                      f"{platform}; use model.attention=auto.")
    return "cudnn"
  if platform == "tpu" and seq_len % SPLASH_BLOCK == 0:
    return "splash"
  if platform == "gpu" and cfg.dtype in ("bfloat16", "float16"):
    return "cudnn"
  return "dot_product"


def _kernel(num_heads: int, seq_len: int, interpret: bool, mqa: bool = False):
  """Splash for num_heads query heads: each with its own key/value head, or with `mqa` all
  sharing one (make_splash_mqa: q [h, T, K], k and v [T, K])."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  b = splash_block_size(seq_len)
  blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                         block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
  make = sa.make_splash_mqa if mqa else sa.make_splash_mha
  return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q_BTHK, k_BTGK, v_BTGK, interpret: bool):
  """Splash on one device's shard: [b, T, h, K] -> [b, T, h, K]; keys and values [b, T, g, K]
  (g < h: grouped-query attention, each key/value head an MQA kernel over its h / g queries)."""
  B, T, H, K = q_BTHK.shape
  G = k_BTGK.shape[2]
  # The kernel does not scale the scores: scale q (exact in bf16 for power-of-two head dims).
  q_BTHK = q_BTHK * jnp.asarray(1.0 / math.sqrt(K), q_BTHK.dtype)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [b, h, T, K], what the kernel takes per row
  if G == H:
    out_BHTK = jax.vmap(_kernel(H, T, interpret))(heads_first(q_BTHK), heads_first(k_BTGK),
                                                  heads_first(v_BTGK))
    return jnp.swapaxes(out_BHTK, 1, 2)
  R = H // G
  q_BGRTK = jnp.transpose(q_BTHK.reshape(B, T, G, R, K), (0, 2, 3, 1, 4))
  kernel = jax.vmap(jax.vmap(_kernel(R, T, interpret, mqa=True)))  # over b, then g
  out_BGRTK = kernel(q_BGRTK, heads_first(k_BTGK), heads_first(v_BTGK))
  return jnp.transpose(out_BGRTK, (0, 3, 1, 2, 4)).reshape(B, T, H, K)


def _fit(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
  """The batch and heads entries of `spec` (length and head dim whole), each keeping only the
  mesh axes whose product divides its dimension (others replicate it: same values)."""
  entries = tuple(spec) + (None,) * (4 - len(spec))
  out = []
  for i, (dim, entry) in enumerate(zip(shape, entries)):
    names = () if entry is None or i in (1, 3) else (
        (entry,) if isinstance(entry, str) else tuple(entry))
    kept, split = [], 1
    for name in names:
      size = mesh.shape[name]
      if size > 1 and dim % (split * size) == 0:
        kept.append(name)
        split *= size
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*out)


def splash_attention(q_BTHK, k_BTGK, v_BTGK):
  """Causal softmax(q k^T / sqrt(K)) v by the splash kernel, [B, T, H, K] in and out (the
  dtype of q); keys and values may have G < H heads (grouped-query attention). Under a mesh it
  runs per device with shard_map over batch and heads (heads split only where both the H query
  and the G key/value heads divide, so each device holds whole groups)."""
  interpret = backend() != "tpu"
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _splash_local(q_BTHK, k_BTGK, v_BTGK, interpret)
  spec = _fit(nn.logical_to_mesh_axes(ACT_BTHK), q_BTHK.shape, mesh)
  kv_spec = _fit(spec, k_BTGK.shape, mesh)
  if kv_spec[2] != spec[2]:  # the key/value heads cannot be split as the queries are
    spec = kv_spec = PartitionSpec(spec[0], None, None, None)
  local = jax.shard_map(lambda q, k, v: _splash_local(q, k, v, interpret), mesh=mesh,
                        in_specs=(spec, kv_spec, kv_spec), out_specs=spec, check_vma=False)
  return local(q_BTHK, k_BTGK, v_BTGK)
