"""Self-attention without a cache, through the kernel `ModelConfig.attention` picks, with or
without segments (model/segments.py: packed rows whose documents never see each other, and the
prefix-LM's bidirectional prefix).

  xla     the reference einsum attention (`reference_attention`, a [B, 1, T, T] mask)
  cudnn   cuDNN's flash kernel (GPU): jax.nn.dot_product_attention(implementation="cudnn"); with
          segments JAX's cuDNN packed layout (jax._src.cudnn's dot_product_attention with
          per-segment lengths and offsets, `cudnn_packed_layout`; Hopper or later). It cannot
          take the prefix-LM mask.
  splash  the Pallas splash-attention kernel that ships with JAX
          (jax.experimental.pallas.ops.tpu.splash_attention): flash attention for TPU that
          never materialises the [B, H, T, T] scores and skips the blocks above the diagonal;
          segments as its SegmentIds. The prefix-LM runs it twice (causal, and bidirectional
          over each segment's prefix) and takes each query's row from the one it needs. On the
          CPU it runs in Pallas interpret mode (slow; for checking its numerics).
  auto    splash on TPU (when T is a multiple of 128), cuDNN on GPU in bf16/fp16 (with segments
          on Hopper or later, without the prefix-LM mask), else jax.nn.dot_product_attention's
          XLA path (`dot_product`, segments as its boolean mask)

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

from model import segments
from model.config import ModelConfig
from model.errors import UserError

ACT_BTHK = ("act_batch", "act_length", "act_heads", "act_kv")

# Splash works on blocks of query / key positions; its kernels need multiples of 128 (the TPU's
# lane width). Larger blocks mean fewer grid steps; 512 is MaxText's default.
SPLASH_BLOCK = 128
SPLASH_BLOCK_CHOICES = (512, 256, 128)
# Added to masked attention scores (computed in float32) and written into padded logits.
MASK_VALUE = -1e30


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


def cudnn_takes_segments() -> bool:
  """Whether cuDNN's packed layout can run here: it needs a Hopper or later GPU (compute
  capability 9.0). True where no GPU is visible to ask (a program compiled for elsewhere)."""
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    return True
  capability = getattr(gpus[0], "compute_capability", None)
  return capability is None or tuple(int(x) for x in str(capability).split(".")) >= (9, 0)


def implementation(cfg: ModelConfig, seq_len: int, dropout: bool,
                   platform: str | None = None, *, segments: bool = False,
                   prefix: bool = False) -> str:
  """Which kernel the no-cache attention uses on `platform` (default: backend()): "xla"
  (reference einsums), "splash", "cudnn" or "dot_product" (jax.nn.dot_product_attention's XLA
  path), for rows with `segments` (packed documents) and the prefix-LM's `prefix`. Attention
  dropout always takes the reference path (the only one that applies it). An explicit kernel
  that cannot run here, or cannot take the mask, is a UserError; `auto` picks one that can
  (`fallback` says why it left the platform's usual one)."""
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
    if prefix:
      raise UserError("model.attention='cudnn' cannot take the prefix-LM mask (a prefix "
                      "seen both ways); use model.attention=auto or xla.")
    if segments and not cudnn_takes_segments():
      raise UserError("model.attention='cudnn' takes packed segments on Hopper or later GPUs "
                      "only (cuDNN's packed layout); use model.attention=auto or xla.")
    return "cudnn"
  if platform == "tpu" and seq_len % SPLASH_BLOCK == 0:
    return "splash"
  if platform == "gpu" and cfg.dtype in ("bfloat16", "float16") and not fallback(
      cfg, platform, segments=segments, prefix=prefix):
    return "cudnn"
  return "dot_product"


def fallback(cfg: ModelConfig, platform: str, *, segments: bool = False,
             prefix: bool = False) -> str:
  """Why model.attention=auto leaves the platform's usual kernel for these rows ("" when it
  does not): cuDNN cannot take the prefix-LM mask, or packed segments before Hopper."""
  if cfg.attention != "auto" or platform != "gpu" or cfg.dtype not in ("bfloat16", "float16"):
    return ""
  if prefix:
    return "cuDNN cannot take the prefix-LM mask"
  if segments and not cudnn_takes_segments():
    return "cuDNN's packed layout needs a Hopper or later GPU"
  return ""


def describe(cfg: ModelConfig, seq_len: int, dropout: bool, platform: str, *,
             segments: bool = False, prefix: bool = False) -> str:
  """The kernel line of launch.benchmark and launch.aot: "splash, with segment ids" or
  "dot_product, with segment ids (auto: cuDNN cannot take the prefix-LM mask)"."""
  impl = implementation(cfg, seq_len, dropout, platform, segments=segments, prefix=prefix)
  what = (", with segment ids and the prefix-LM mask" if prefix
          else ", with segment ids" if segments else "")
  why = fallback(cfg, platform, segments=segments, prefix=prefix)
  return f"{impl}{what}" + (f" (auto: {why})" if why and impl != "xla" else "")


def causal_mask(positions_BT: jax.Array, num_slots: int) -> jax.Array:
  """[B, 1, T, S] boolean: query (b, t) may attend to key slot s iff s <= positions_BT[b, t]."""
  return (jnp.arange(num_slots)[None, None, :] <= positions_BT[:, :, None])[:, None]


def reference_attention(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, dropout: nn.Dropout | None = None):
  """Plain softmax attention, scores and softmax in float32; keys and values may have fewer
  heads G than the queries (grouped-query attention: query head h reads head h // (H / G))."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  scale = 1.0 / math.sqrt(K)
  if G != H:
    q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
    scores_BHTS = jnp.einsum("BTGRK,BSGK->BGRTS", q_BTGRK, k_BSGK,
                             preferred_element_type=jnp.float32).reshape(B, H, T, S) * scale
  else:
    scores_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q_BTHK, k_BSGK,
                             preferred_element_type=jnp.float32) * scale
  scores_BHTS = jnp.where(mask_B1TS, scores_BHTS, MASK_VALUE)
  probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
  if dropout is not None:
    probs_BHTS = dropout(probs_BHTS)
  probs_BHTS = probs_BHTS.astype(v_BSGK.dtype)
  if G != H:
    return jnp.einsum("BGRTS,BSGK->BTGRK", probs_BHTS.reshape(B, G, H // G, T, S),
                      v_BSGK).reshape(B, T, H, K)
  return jnp.einsum("BHTS,BSHK->BTHK", probs_BHTS, v_BSGK)


def self_attention(q_BTHK, k_BTGK, v_BTGK, impl: str, *, segment_ids_BT=None, prefix_BT=None,
                   dropout: nn.Dropout | None = None):
  """Causal self-attention [B, T, H, K] by kernel `impl` (`implementation`), within the
  segments of segment_ids_BT and with the prefix of prefix_BT seen both ways when given
  (model/segments.py's rule; a prefix needs segment ids). `dropout` only on the "xla" path."""
  T = q_BTHK.shape[1]
  if impl == "xla":
    mask_B1TS = (causal_mask(jnp.arange(T)[None, :], T) if segment_ids_BT is None
                 else segments.visible(segment_ids_BT, prefix_BT))
    return reference_attention(q_BTHK, k_BTGK, v_BTGK, mask_B1TS, dropout)
  if impl == "splash":
    return splash_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, prefix_BT)
  if segment_ids_BT is None:
    return jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, is_causal=True,
                                        implementation="cudnn" if impl == "cudnn" else None)
  if impl == "cudnn":
    return cudnn_packed_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)
  return jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK,
                                      mask=segments.visible(segment_ids_BT, prefix_BT))


def cudnn_packed_layout(segment_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """JAX's cuDNN packed layout of rows of segments: (lengths [B, M], offsets [B, M + 1]),
  int32, M = T (a row has at most T runs). Each run of equal ids (a padding run too) is one
  sequence: its length, and its first token's index in the row; entries past a row's last run
  are -1 (jax._src.cudnn.fused_attention_stablehlo.dot_product_attention's q_seqlen and
  q_offsets)."""
  B, T = segment_ids_BT.shape
  starts_BT = segments.segment_starts(segment_ids_BT)
  run_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32) - 1  # the run each token is in
  rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  runs_B1 = run_BT[:, -1:] + 1
  lengths_BM = jnp.zeros((B, T), jnp.int32).at[rows_BT, run_BT].add(1)
  lengths_BM = jnp.where(t_BT < runs_B1, lengths_BM, -1)
  offsets_BM = jnp.full((B, T), -1, jnp.int32).at[rows_BT, jnp.where(starts_BT, run_BT, T)].set(
      t_BT, mode="drop")
  return lengths_BM, jnp.concatenate([offsets_BM, jnp.full((B, 1), -1, jnp.int32)], axis=1)


def cudnn_packed_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT):
  """Causal attention within segments by cuDNN's flash kernel in JAX's packed layout (each
  run of a row one sequence: `cudnn_packed_layout`; mask PADDING_CAUSAL). Grouped key/value
  heads are repeated to the query heads first: JAX (0.10.2 to 0.11.2) strides the key offsets
  by the query heads."""
  # pylint: disable=import-outside-toplevel  (a private module; only a GPU run reaches it)
  from jax._src.cudnn.fused_attention_stablehlo import MaskType
  from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
  H, G, K = q_BTHK.shape[2], k_BTGK.shape[2], q_BTHK.shape[3]
  if G != H:
    k_BTGK, v_BTGK = (jnp.repeat(x, H // G, axis=2) for x in (k_BTGK, v_BTGK))
  lengths_BM, offsets_BM1 = cudnn_packed_layout(segment_ids_BT)
  return cudnn_attention(q_BTHK, k_BTGK, v_BTGK, q_seqlen=lengths_BM, kv_seqlen=lengths_BM,
                         q_offsets=offsets_BM1, kv_offsets=offsets_BM1,
                         scale=1.0 / math.sqrt(K), mask_type=MaskType.PADDING_CAUSAL,
                         qkv_layout="BTNH")


def _kernel(num_heads: int, seq_len: int, interpret: bool, mqa: bool = False,
            causal: bool = True):
  """Splash for num_heads query heads: each with its own key/value head, or with `mqa` all
  sharing one (make_splash_mqa: q [h, T, K], k and v [T, K]); causal, or with no mask."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  b = splash_block_size(seq_len)
  blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                         block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  shape = (seq_len, seq_len)
  one = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  mask = sa.MultiHeadMask([one for _ in range(num_heads)])
  make = sa.make_splash_mqa if mqa else sa.make_splash_mha
  return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _call(q_BTHK, k_BTGK, v_BTGK, ids_BT, interpret: bool, causal: bool):
  """One splash call on one device's rows: [b, T, h, K] -> [b, T, h, K]; keys and values
  [b, T, g, K] (g < h: grouped-query attention, each key/value head an MQA kernel over its
  h / g queries); ids_BT (or None) the segment ids of both queries and keys."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  B, T, H, K = q_BTHK.shape
  G = k_BTGK.shape[2]
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [b, h, T, K], what the kernel takes per row
  ids = None if ids_BT is None else sa.SegmentIds(q=ids_BT, kv=ids_BT)
  if G == H:
    kernel = _kernel(H, T, interpret, causal=causal)
    out_BHTK = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i))(
        heads_first(q_BTHK), heads_first(k_BTGK), heads_first(v_BTGK), ids)
    return jnp.swapaxes(out_BHTK, 1, 2)
  R = H // G
  q_BGRTK = jnp.transpose(q_BTHK.reshape(B, T, G, R, K), (0, 2, 3, 1, 4))
  kernel = _kernel(R, T, interpret, mqa=True, causal=causal)
  per_group = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i),
                       in_axes=(0, 0, 0, None))  # over g: one row's segment ids for all
  out_BGRTK = jax.vmap(per_group)(q_BGRTK, heads_first(k_BTGK), heads_first(v_BTGK), ids)
  return jnp.transpose(out_BGRTK, (0, 3, 1, 2, 4)).reshape(B, T, H, K)


def _splash_local(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, prefix_BT, interpret: bool):
  """Splash on one device's shard (module docstring): causal, within segments when
  segment_ids_BT is given, the prefix-LM's prefix bidirectional when prefix_BT is."""
  K = q_BTHK.shape[-1]
  # The kernel does not scale the scores: scale q (exact in bf16 for power-of-two head dims).
  q_BTHK = q_BTHK * jnp.asarray(1.0 / math.sqrt(K), q_BTHK.dtype)
  out_BTHK = _call(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, interpret, causal=True)
  if prefix_BT is None:
    return out_BTHK
  # a segment's prefix and its continuation as two groups: 2s and 2s + 1
  groups_BT = 2 * segment_ids_BT + (~prefix_BT).astype(segment_ids_BT.dtype)
  both_BTHK = _call(q_BTHK, k_BTGK, v_BTGK, groups_BT, interpret, causal=False)
  return jnp.where(prefix_BT[:, :, None, None], both_BTHK, out_BTHK)


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


def splash_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT=None, prefix_BT=None):
  """Causal softmax(q k^T / sqrt(K)) v by the splash kernel, [B, T, H, K] in and out (the
  dtype of q); keys and values may have G < H heads (grouped-query attention). With
  segment_ids_BT [B, T] a query sees its own segment only; with prefix_BT [B, T] (and segment
  ids) the prefix-LM's prefix also sees itself both ways. Under a mesh it runs per device with
  shard_map over batch and heads (heads split only where both the H query and the G key/value
  heads divide, so each device holds whole groups)."""
  interpret = backend() != "tpu"
  if prefix_BT is not None and segment_ids_BT is None:
    segment_ids_BT = jnp.ones(prefix_BT.shape, jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _splash_local(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, prefix_BT, interpret)
  spec = _fit(nn.logical_to_mesh_axes(ACT_BTHK), q_BTHK.shape, mesh)
  kv_spec = _fit(spec, k_BTGK.shape, mesh)
  if kv_spec[2] != spec[2]:  # the key/value heads cannot be split as the queries are
    spec = kv_spec = PartitionSpec(spec[0], None, None, None)
  row_spec = PartitionSpec(spec[0], None)
  args = [a for a in (segment_ids_BT, prefix_BT) if a is not None]

  def local(q, k, v, *rows):
    rows = list(rows)
    seg = rows.pop(0) if segment_ids_BT is not None else None
    prefix = rows.pop(0) if prefix_BT is not None else None
    return _splash_local(q, k, v, seg, prefix, interpret)

  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(spec, kv_spec, kv_spec) + (row_spec,) * len(args),
                          out_specs=spec, check_vma=False)
  return sharded(q_BTHK, k_BTGK, v_BTGK, *args)
