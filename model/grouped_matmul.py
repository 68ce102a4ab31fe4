"""The grouped matmul of a mixture of experts' dropless routing (model/moe.py): rows sorted by
expert, sizes_E rows for each in order, each group times its own expert's matrix,

    y[Q, F] = x[rows of group e] @ w[e]     for every group e (rows past sum(sizes_E): 0)

by one of three kernels (ModelConfig.moe_kernel; `kernel` resolves "auto" per platform):
  ragged_dot  jax.lax.ragged_dot: the TPU and GPU compilers have native ones; XLA:CPU expands
              it into a dense matmul over all rows per group (E times the FLOPs, and slow).
  megablox    the Pallas kernel that ships with JAX (TPU; the CPU runs it in Pallas interpret
              mode, for checking numerics): it visits only the filled row tiles.
  tiled       megablox's scheme written in XLA: each group padded to whole tiles of TM rows,
              one batched matmul of the [tiles, TM, D] rows with each tile's expert's matrix
              (gathered, [tiles, D, F]). At most E - 1 tiles of padding: on the CPU about 6x
              faster than ragged_dot (model/moe.py's layer, README: Mixture of experts).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.attention import backend
from model.config import ModelConfig
from model.errors import UserError

TM = 128  # rows per tile (megablox's default; fewer when a group is smaller)


def kernel(cfg: ModelConfig, platform: str | None = None) -> str:
  """The grouped matmul dropless routing runs on `platform` (default: the computation's):
  cfg.moe_kernel, "auto" being megablox on TPU, tiled on the CPU and ragged_dot on GPUs.
  UserError for megablox on a GPU (a TPU kernel; the CPU runs it in Pallas interpret mode)."""
  platform = backend() if platform is None else platform
  if cfg.moe_kernel == "megablox" and platform not in ("tpu", "cpu"):
    raise UserError(f"model.moe_kernel='megablox' needs a TPU (or the CPU, in Pallas interpret "
                    f"mode), not {platform}; use model.moe_kernel=auto.")
  if cfg.moe_kernel == "auto":
    return {"tpu": "megablox", "cpu": "tiled"}.get(platform, "ragged_dot")
  return cfg.moe_kernel


def grouped_matmul(cfg: ModelConfig):
  """The grouped matmul (x [Q, D], w [E, D, F], group sizes [E]) -> [Q, F] of `kernel`."""
  platform = backend()
  name = kernel(cfg, platform)
  if name == "ragged_dot":
    return lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes)
  if name == "tiled":
    return tiled

  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=import-outside-toplevel

  def gmm(x_QD, w_EDF, sizes_E):
    Q = x_QD.shape[0]
    tm = TM if Q >= TM else -(-Q // 16) * 16  # rows per tile: whole sublanes of bf16
    x = jnp.pad(x_QD, ((0, -Q % tm), (0, 0)))
    tiling = (tm, min(128, x.shape[1]), min(128, w_EDF.shape[2]))
    return megablox.gmm(x, w_EDF, sizes_E, x.dtype, tiling, interpret=platform != "tpu")[:Q]
  return gmm


def tiled(x_QD: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array) -> jax.Array:
  """The "tiled" kernel (module docstring). Padded row r of tile r // tm belongs to group e_R
  (the groups laid out one after another, each rounded up to whole tiles); row q of x sits at
  padded row p_Q. Rows past the groups (another device's experts) and the tiles' padding are
  0 and get no gradient."""
  Q, D = x_QD.shape
  E, _, F = w_EDF.shape
  tm = min(TM, max(8, 1 << (-(-Q // E) - 1).bit_length()))  # about Q / E, a power of 2
  G = -(-Q // tm) + E - 1  # tiles: the worst case of E groups each padded by tm - 1 rows
  ends_E = jnp.cumsum(sizes_E)
  pends_E = jnp.cumsum(-(-sizes_E // tm) * tm)
  starts_E, pstarts_E = ends_E - sizes_E, pends_E - (-(-sizes_E // tm) * tm)
  r_R = jnp.arange(G * tm)
  e_R = jnp.minimum(jnp.searchsorted(pends_E, r_R, side="right"), E - 1)
  offset_R = r_R - pstarts_E[e_R]
  filled_R = (r_R < pends_E[-1]) & (offset_R < sizes_E[e_R])
  rows_R = jnp.where(filled_R, starts_E[e_R] + offset_R, 0)
  x_GmD = jnp.where(filled_R[:, None], jnp.take(x_QD, rows_R, axis=0), 0).reshape(G, tm, D)
  w_GDF = jnp.take(w_EDF, e_R[::tm], axis=0)
  y_RF = jnp.einsum("GmD,GDF->GmF", x_GmD, w_GDF).reshape(G * tm, F)
  q_Q = jnp.arange(Q)
  mine_Q = q_Q < ends_E[-1]
  e_Q = jnp.minimum(jnp.searchsorted(ends_E, q_Q, side="right"), E - 1)
  p_Q = jnp.where(mine_Q, pstarts_E[e_Q] + q_Q - starts_E[e_Q], 0)
  return jnp.where(mine_Q[:, None], jnp.take(y_RF, p_Q, axis=0), 0)
