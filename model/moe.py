"""Mixture of experts (Shazeer et al. 2017; GShard; Switch; Mixtral): the sparse MLP of a decoder
layer, beside model/blocks.py's dense MLP. A sparse layer (cfg.sparse_layers) has

  router [D, E]                       the routing logits of each token
  c_gate, c_fc [E, D, F], c_proj [E, F, D]   E experts (SwiGLU: Mixtral's w1, w3, w2; without
                                      SwiGLU c_gate is absent), no biases, F = cfg.expert_mlp
  shared                              with num_shared_experts S: a dense MLP of width S * F that
                                      every token goes through (DeepSeek's shared experts)

Letters (beside model/blocks.py's): N tokens routed together (B * T), E experts, J experts per
token (top-J routing), Q = N * J (token, expert) assignments, C slots per expert (capacity).

Routers (cfg.router), from float32 logits: "topk_softmax" (Mixtral) takes the J largest logits
and a softmax over them; "softmax_topk" (Qwen3-MoE, OLMoE) a softmax over all E, the J largest
probabilities, renormalised to sum 1 with cfg.norm_topk_prob. The two agree when renormalised.

Dispatch, two ways (the same function of the routing up to dropped assignments):
  dropless (capacity_factor 0)  the Q assignments sorted by expert (a stable argsort), the
      tokens gathered in that order, one grouped matmul per projection over the E groups
      (cfg.moe_kernel, model/grouped_matmul.py: jax.lax.ragged_dot, the megablox Pallas
      kernel on TPU, or the same tiling in XLA on the CPU), the rows put back in token order
      and summed with the routing weights. The TPU compiler's native ragged_dot has a weight
      gradient (a ragged contraction) XLA counts at E times the FLOPs.
  capacity (capacity_factor c > 0)  each expert has C = ceil(c Q / E) slots, filled in the order
      (j, n): every token's first choice before any token's second, in token order; the
      assignments past an expert's C slots are dropped (the token loses that expert's share,
      keeping its residual). The [E, C, D] slots go through batched matmuls.

Under a mesh (the rules put "expert" on a mesh axis, sharding/rules.py) the layer runs in
jax.shard_map: each device routes its own tokens; with an expert axis of size P each device
holds E / P experts, gathers the tokens of its expert group (all_gather over that axis), runs
the assignments of its own experts, and the partial outputs go back to the tokens' devices
summed (psum_scatter): tokens reach their experts and come back, nothing dropped. The experts'
weights may be split over the tensor axis (F; the partial sums add up) and stored split over
fsdp (all-gathered before use, as every FSDP weight).

Packed rows (segment ids, model/segments.py): padding (segment 0) goes to no routed expert,
takes no capacity and is not counted, so each document is routed as it is alone (the router is
per token). Each sparse layer sows into the "moe" collection (MOE_COLLECTION) its routing
statistics over the tokens it routed (averaged over devices, weighted by their tokens): tokens_per_expert f_E (assignments / tokens),
router_prob P_E (mean probability), z (mean squared logsumexp of the logits), dropped (share of
assignments dropped). `moe_metrics` turns them into the load-balancing loss E * sum_e f_e P_e
with f and P averaged over the sparse layers (transformers' load_balancing_loss_func: Switch's
loss with J choices), the router z-loss (ST-MoE), the dropped share and each expert's load.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.blocks import MLP, MOE_COLLECTION, activate
from model.config import ModelConfig
from model.grouped_matmul import grouped_matmul, kernel
ACT_ND = ("act_batch", "act_embed")


def route(logits_NE: jax.Array, cfg: ModelConfig):
  """(weights [N, J] float32, experts [N, J] int32, probabilities [N, E] float32) of router
  logits, by cfg.router (module docstring)."""
  logits_NE = logits_NE.astype(jnp.float32)
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  J = cfg.num_experts_per_tok
  if cfg.router == "topk_softmax":
    top_NJ, experts_NJ = jax.lax.top_k(logits_NE, J)
    weights_NJ = jax.nn.softmax(top_NJ, axis=-1)
  else:
    weights_NJ, experts_NJ = jax.lax.top_k(probs_NE, J)
    if cfg.norm_topk_prob:
      weights_NJ = weights_NJ / jnp.sum(weights_NJ, axis=-1, keepdims=True)
  return weights_NJ, experts_NJ.astype(jnp.int32), probs_NE


def routing_stats(logits_NE, probs_NE, experts_NJ, num_experts: int,
                  valid_N=None) -> dict[str, jax.Array]:
  """The statistics of one routing the losses need, over the tokens valid_N marks (default:
  all; padding does not count): tokens_per_expert [E] (assignments per token: sums to J),
  router_prob [E] (mean probability), z (mean logsumexp^2)."""
  N, J = experts_NJ.shape
  v_N = jnp.ones((N,), jnp.float32) if valid_N is None else valid_N.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v_N), 1.0)
  counts_E = jnp.zeros((num_experts,), jnp.float32).at[experts_NJ.reshape(-1)].add(
      jnp.repeat(v_N, J))
  lse_N = jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)
  return {"tokens_per_expert": counts_E / n,
          "router_prob": jnp.sum(probs_NE * v_N[:, None], axis=0) / n,
          "z": jnp.sum(lse_N * lse_N * v_N) / n}


def capacity(num_tokens: int, cfg: ModelConfig) -> int:
  """C: the slots of each expert for num_tokens tokens routed together (capacity_factor > 0)."""
  Q = num_tokens * cfg.num_experts_per_tok
  return max(1, math.ceil(cfg.capacity_factor * Q / cfg.num_experts))


def expert_mlp(x_QD, sizes_E, w: dict[str, jax.Array], cfg: ModelConfig):
  """The experts' MLP of rows sorted by expert (sizes_E rows each, in order): one grouped
  matmul per projection. Rows past sum(sizes_E) are zero, and so are their gradients (a kernel
  may leave them unwritten, megablox does: every matmul's input and output is masked)."""
  filled_Q1 = (jnp.arange(x_QD.shape[0]) < jnp.sum(sizes_E))[:, None]
  gmm = grouped_matmul(cfg)
  mm = lambda a, w_: jnp.where(filled_Q1, gmm(jnp.where(filled_Q1, a, 0), w_, sizes_E), 0)
  h_QF = mm(x_QD, w["c_fc"])
  if cfg.activation == "swiglu":
    h_QF = jax.nn.silu(mm(x_QD, w["c_gate"])) * h_QF
  else:
    h_QF = activate(cfg, h_QF)
  return mm(h_QF, w["c_proj"])


def _combine(y_NJD, weights_NJ, dtype):
  """sum_j weights[n, j] y[n, j] in float32."""
  return jnp.einsum("NJ,NJD->ND", weights_NJ, y_NJD,
                    preferred_element_type=jnp.float32).astype(dtype)


def dropless(x_ND, weights_NJ, experts_NJ, w: dict[str, jax.Array], cfg: ModelConfig,
             first_expert=0, valid_N=None):
  """sum_j weights[n, j] expert_{experts[n, j]}(x[n]) over the experts w holds (E_w of them,
  numbered from first_expert; other assignments add nothing), by sorting the assignments by
  expert and grouped matmuls. Tokens valid_N does not mark (padding) go to no expert: 0."""
  N, J = experts_NJ.shape
  E_w = w["c_fc"].shape[0]
  local_Q = experts_NJ.reshape(-1) - first_expert
  mine_Q = (local_Q >= 0) & (local_Q < E_w)
  if valid_N is not None:
    mine_Q = mine_Q & jnp.repeat(valid_N, J)
  key_Q = jnp.where(mine_Q, local_Q, E_w)  # others sort last
  order_Q = jnp.argsort(key_Q, stable=True)
  sizes_E = jnp.zeros((E_w + 1,), jnp.int32).at[key_Q].add(1)[:E_w]
  x_QD = jnp.take(x_ND, order_Q // J, axis=0)
  y_QD = expert_mlp(x_QD, sizes_E, w, cfg)
  inverse_Q = jnp.zeros_like(order_Q).at[order_Q].set(jnp.arange(N * J, dtype=order_Q.dtype))
  y_NJD = jnp.take(y_QD, inverse_Q, axis=0).reshape(N, J, -1)
  weights_NJ = jnp.where(mine_Q.reshape(N, J), weights_NJ, 0.0)
  return _combine(y_NJD, weights_NJ, x_ND.dtype)


def slot_positions(experts_NJ, num_experts: int):
  """Each assignment's place in its expert's queue, [N, J]: the assignments in the order
  (j, n) (every first choice before any second choice, then token order), counted per
  expert from 0."""
  N, J = experts_NJ.shape
  e_Q = experts_NJ.T.reshape(-1)  # q = j * N + n
  order_Q = jnp.argsort(e_Q, stable=True)
  sizes_E = jnp.zeros((num_experts,), jnp.int32).at[e_Q].add(1)
  starts_E = jnp.cumsum(sizes_E) - sizes_E
  rank_Q = jnp.arange(N * J, dtype=jnp.int32) - starts_E[e_Q[order_Q]]
  pos_Q = jnp.zeros((N * J,), jnp.int32).at[order_Q].set(rank_Q)
  return pos_Q.reshape(J, N).T


def with_capacity(x_ND, weights_NJ, experts_NJ, w: dict[str, jax.Array], cfg: ModelConfig,
                  first_expert=0, valid_N=None):
  """(the dropless sum with each expert's assignments past its C = capacity(N) slots dropped,
  the share of the valid tokens' assignments dropped). w holds E_w experts numbered from
  first_expert. Tokens valid_N does not mark (padding) take no slot and go to no expert."""
  N, J = experts_NJ.shape
  D, E_w, C = x_ND.shape[1], w["c_fc"].shape[0], capacity(N, cfg)
  valid_N1 = jnp.ones((N, 1), bool) if valid_N is None else valid_N[:, None]
  E = cfg.num_experts  # padding queues for a virtual expert E, after every real one
  pos_NJ = slot_positions(jnp.where(valid_N1, experts_NJ, E), E + 1)
  kept_NJ = (pos_NJ < C) & valid_N1
  local_NJ = experts_NJ - first_expert
  mine_NJ = kept_NJ & (local_NJ >= 0) & (local_NJ < E_w)
  slot_Q = jnp.where(mine_NJ, local_NJ * C + pos_NJ, E_w * C).reshape(-1)  # E_w * C: none
  x_QD = jnp.repeat(x_ND, J, axis=0)
  slots_ECD = jnp.zeros((E_w * C, D), x_ND.dtype).at[slot_Q].set(x_QD, mode="drop").reshape(
      E_w, C, D)
  dt = x_ND.dtype
  h_ECF = jnp.einsum("ECD,EDF->ECF", slots_ECD, w["c_fc"])
  if cfg.activation == "swiglu":
    h_ECF = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", slots_ECD, w["c_gate"])) * h_ECF
  else:
    h_ECF = activate(cfg, h_ECF)
  y_ECD = jnp.einsum("ECF,EFD->ECD", h_ECF.astype(dt), w["c_proj"])
  y_QD = jnp.take(y_ECD.reshape(E_w * C, D), slot_Q, axis=0, mode="fill", fill_value=0)
  y = _combine(y_QD.reshape(N, J, D), jnp.where(mine_NJ, weights_NJ, 0.0), dt)
  assigned = J * jnp.maximum(jnp.sum(valid_N1.astype(jnp.float32)), 1.0)
  return y, jnp.sum((valid_N1 & ~kept_NJ).astype(jnp.float32)) / assigned


def _mesh_axes(logical: str, mesh) -> tuple[str, ...]:
  """The mesh axes (of size > 1) the active rules give a logical axis; () without rules."""
  try:
    entry = nn.logical_to_mesh_axes((logical,))[0]
  except (ValueError, TypeError):
    return ()
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return tuple(n for n in names if n in mesh.shape and mesh.shape[n] > 1)


def _dividing(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...]:
  """The longest prefix of `axes` whose product divides `size`."""
  kept = []
  for name in axes:
    if size % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]):
      break
    kept.append(name)
  return tuple(kept)


def routed_experts(x_ND, router_DE, w: dict[str, jax.Array], cfg: ModelConfig, valid_N):
  """(y [N, D], statistics) of the routed experts for the tokens valid_N marks (bool [N]; the
  others, padding, get 0 and are not counted); under a mesh in jax.shard_map (module
  docstring), else on this device."""
  E, F = cfg.num_experts, cfg.expert_mlp
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _local(x_ND, valid_N, router_DE, w, cfg, (), (), (), ())
  batch = _dividing(_mesh_axes("act_batch", mesh), x_ND.shape[0], mesh)
  experts = _dividing(_mesh_axes("expert", mesh), E, mesh)
  tensor = _dividing(_mesh_axes("mlp", mesh), F, mesh)
  gather = tuple(a for a in experts if a in batch)  # token groups gathered over these
  summed = tuple(a for a in experts if a not in batch)
  P = jax.sharding.PartitionSpec
  e_spec, t_spec = experts or None, tensor or None
  w_specs = {name: P(e_spec, None, t_spec) for name in ("c_gate", "c_fc") if name in w}
  w_specs["c_proj"] = P(e_spec, t_spec, None)
  fn = jax.shard_map(
      lambda x, v, r, ws: _local(x, v, r, ws, cfg, gather, summed, tensor, batch),
      in_specs=(P(batch or None, None), P(batch or None), P(), w_specs),
      out_specs=(P(batch or None, None), P()),
      check_vma=kernel(cfg) != "megablox")  # pallas_call's outputs carry no varying axes
  return fn(x_ND, valid_N, router_DE, w)


def _local(x_nD, valid_n, router_DE, w, cfg: ModelConfig, gather, summed, tensor, batch):
  """One device's part of routed_experts: the tokens of its group (gathered over `gather`),
  its experts (split over gather + summed), its slice of F (split over `tensor`); the
  statistics averaged over the valid tokens of the devices the tokens are split over
  (`batch`)."""
  x_ND = jax.lax.all_gather(x_nD, gather, axis=0, tiled=True) if gather else x_nD
  valid_N = jax.lax.all_gather(valid_n, gather, axis=0, tiled=True) if gather else valid_n
  logits_NE = jnp.einsum("ND,DE->NE", x_ND, router_DE.astype(x_ND.dtype),
                         preferred_element_type=jnp.float32)
  weights_NJ, experts_NJ, probs_NE = route(logits_NE, cfg)
  first = 0
  if gather or summed:
    first = jax.lax.axis_index(gather + summed) * w["c_fc"].shape[0]
  ws = {k: v.astype(cfg.compute_dtype) for k, v in w.items()}
  stats = routing_stats(logits_NE, probs_NE, experts_NJ, cfg.num_experts, valid_N)
  if cfg.capacity_factor:
    y_ND, stats["dropped"] = with_capacity(x_ND, weights_NJ, experts_NJ, ws, cfg, first,
                                           valid_N)
  else:
    y_ND = dropless(x_ND, weights_NJ, experts_NJ, ws, cfg, first, valid_N)
    stats["dropped"] = jnp.zeros((), jnp.float32)
  if tensor or summed:
    y_ND = jax.lax.psum(y_ND, tensor + summed)
  if gather:
    y_ND = jax.lax.psum_scatter(y_ND, gather, scatter_dimension=0, tiled=True)
  if batch:  # means over each device's valid tokens -> over all of them
    n = jnp.sum(valid_N.astype(jnp.float32))
    total = jnp.maximum(jax.lax.psum(n, batch), 1.0)
    stats = jax.tree_util.tree_map(lambda x: jax.lax.psum(x * n, batch) / total, stats)
  return y_ND, stats


class ExpertKernel(nn.Module):
  """One [E, ...] weight of the experts, as a module "kernel" (so weight decay and the
  Hugging Face converters see it as any matmul kernel)."""
  cfg: ModelConfig
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  std: float

  @nn.compact
  def __call__(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=self.std), self.axes)
    return self.param("kernel", init, self.shape, self.cfg.params_dtype)


class MoE(nn.Module):
  """The sparse MLP: x_BTD -> y_BTD (module docstring); sows routing statistics into
  MOE_COLLECTION when that collection is mutable. With segment_ids_BT (packed rows,
  model/segments.py) padding (segment 0) goes to no routed expert, takes no capacity and is
  left out of the statistics: a packed row routes each document as it routes it alone."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT=None):
    cfg = self.cfg
    B, T, D = x_BTD.shape
    E, F = cfg.num_experts, cfg.expert_mlp
    std_out = 0.02 / math.sqrt(2 * cfg.num_layers)  # blocks.py's residual projections
    router = ExpertKernel(cfg, (D, E), ("embed", None), 0.02, name="router")()
    names = ("c_gate", "c_fc") if cfg.activation == "swiglu" else ("c_fc",)
    w = {name: ExpertKernel(cfg, (E, D, F), ("expert", "expert_embed", "mlp"), 0.02,
                            name=name)()
         for name in names}
    w["c_proj"] = ExpertKernel(cfg, (E, F, D), ("expert", "mlp", "expert_embed"), std_out,
                               name="c_proj")()
    x_ND = nn.with_logical_constraint(x_BTD.reshape(B * T, D).astype(cfg.compute_dtype), ACT_ND)
    valid_N = (jnp.ones((B * T,), bool) if segment_ids_BT is None
               else segment_ids_BT.reshape(B * T) != 0)
    valid_N = nn.with_logical_constraint(valid_N, ACT_ND[:1])
    y_ND, stats = routed_experts(x_ND, router, w, cfg, valid_N)
    for name, value in stats.items():
      self.sow(MOE_COLLECTION, name, value)
    y_BTD = y_ND.reshape(B, T, D)
    if cfg.num_shared_experts:
      shared = cfg.replace(d_mlp=cfg.num_shared_experts * F, resid_dropout=0.0)
      y_BTD = y_BTD + MLP(shared, name="shared")(x_BTD)
    return nn.Dropout(cfg.resid_dropout)(y_BTD, deterministic=self.deterministic)


def _leaves(tree: Any, name: str) -> list[jax.Array]:
  """The sown values `name` anywhere in a "moe" collection (loop or scan layout)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if any(getattr(k, "key", None) == name for k in path):
      out.append(leaf)
  return out


def moe_metrics(collection: Any, cfg: ModelConfig) -> dict[str, jax.Array]:
  """The losses and load of the sparse layers' sown statistics (module docstring):
  moe_aux_loss (E sum_e mean_l f_le mean_l P_le), moe_z_loss (mean over layers), moe_dropped
  (share of assignments dropped), moe_load [E] (each expert's share of the assignments,
  averaged over layers: 1 / E each when balanced)."""
  E = cfg.num_experts
  f_LE = jnp.concatenate([x.reshape(-1, E) for x in _leaves(collection, "tokens_per_expert")])
  p_LE = jnp.concatenate([x.reshape(-1, E) for x in _leaves(collection, "router_prob")])
  z_L = jnp.concatenate([jnp.reshape(x, (-1,)) for x in _leaves(collection, "z")])
  dropped_L = jnp.concatenate([jnp.reshape(x, (-1,)) for x in _leaves(collection, "dropped")])
  f_E = jnp.mean(f_LE, axis=0)
  return {"moe_aux_loss": E * jnp.sum(f_E * jnp.mean(p_LE, axis=0)),
          "moe_z_loss": jnp.mean(z_L), "moe_dropped": jnp.mean(dropped_L),
          "moe_load": f_E / cfg.num_experts_per_tok}


def moe_objective(metrics: dict[str, jax.Array], cfg: ModelConfig) -> jax.Array:
  """What the losses add to the training objective: the coefficients times them."""
  return (cfg.router_aux_loss_coef * metrics["moe_aux_loss"]
          + cfg.router_z_loss_coef * metrics["moe_z_loss"])
