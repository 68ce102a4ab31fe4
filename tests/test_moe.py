"""The mixture-of-experts layer (model/moe.py): routers, dropless and capacity dispatch against a
dense per-token reference (values and gradients), the load-balancing loss against
transformers', expert parallelism on meshes of the 8 CPU devices, layouts, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import adamw_start, random_batch
from model.config import get_config
from model.errors import UserError
from model.families import build, count_params, init_params
from model.layout import convert_layout
from model.grouped_matmul import kernel
from model.moe import (MOE_COLLECTION, capacity, dropless, moe_metrics, route, routing_stats,
                       slot_positions, with_capacity)
from sharding import DEFAULT_RULES, activate, make_mesh, shard_batch

F32 = dict(rtol=1e-5, atol=1e-6)


def moe_cfg(**changes):
  base = dict(vocab_size=64, block_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
              d_model=32, d_mlp=48, num_experts=4, num_experts_per_tok=2, attention="xla")
  return get_config("llama-tiny", **{**base, **changes})


def expert_weights(cfg, seed=0):
  rng = np.random.default_rng(seed)
  E, D, F = cfg.num_experts, cfg.d_model, cfg.expert_mlp
  w = {name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
       for name, shape in (("c_gate", (E, D, F)), ("c_fc", (E, D, F)), ("c_proj", (E, F, D)))}
  return {k: jnp.asarray(v) for k, v in w.items()}


def dense_reference(x_ND, weights_NJ, experts_NJ, w, kept_NJ=None):
  """Every expert applied to every token ([N, E, D]), then each token's J chosen outputs
  picked and weighted (dropped ones weighted 0): no sorting, no grouping."""
  h = jax.nn.silu(jnp.einsum("ND,EDF->NEF", x_ND, w["c_gate"])) * jnp.einsum(
      "ND,EDF->NEF", x_ND, w["c_fc"])
  y_NED = jnp.einsum("NEF,EFD->NED", h, w["c_proj"])
  picked_NJD = jnp.take_along_axis(y_NED, experts_NJ[:, :, None], axis=1)
  if kept_NJ is not None:
    weights_NJ = jnp.where(kept_NJ, weights_NJ, 0.0)
  return jnp.einsum("NJ,NJD->ND", weights_NJ, picked_NJD)


def routed(cfg, seed=0, n=48):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, cfg.d_model)).astype(np.float32))
  logits = jnp.asarray(rng.standard_normal((n, cfg.num_experts)).astype(np.float32))
  return x, logits


# --- routers ------------------------------------------------------------------------------------

def test_routers_as_published():
  logits = jnp.asarray([[2.0, 0.5, 1.0, -1.0]])
  mixtral = moe_cfg(router="topk_softmax")
  route = jax.jit(globals()["route"], static_argnums=1)
  w, e, probs = route(logits, mixtral)
  np.testing.assert_array_equal(e, [[0, 2]])
  np.testing.assert_allclose(w, jax.nn.softmax(jnp.asarray([[2.0, 1.0]])), **F32)
  p = np.asarray(jax.nn.softmax(logits))[0]
  w, e, _ = route(logits, moe_cfg(router="softmax_topk", norm_topk_prob=False))  # OLMoE
  np.testing.assert_allclose(w, [[p[0], p[2]]], **F32)
  w_norm, _, _ = route(logits, moe_cfg(router="softmax_topk", norm_topk_prob=True))  # Qwen3
  np.testing.assert_allclose(w_norm, [[p[0] / (p[0] + p[2]), p[2] / (p[0] + p[2])]], **F32)
  np.testing.assert_allclose(w_norm, route(logits, mixtral)[0], **F32)
  np.testing.assert_allclose(probs, jax.nn.softmax(logits), **F32)


# --- dispatch against the dense per-token reference -------------------------------------------

@pytest.mark.parametrize("J, E, kernel", [(2, 4, "ragged_dot"), (4, 8, "ragged_dot"),
                                          (2, 4, "megablox"), (2, 4, "tiled"), (4, 8, "tiled")])
def test_dropless_equals_the_dense_reference_values_and_gradients(J, E, kernel):
  """Values and gradients (inputs, expert weights, routing weights) of the sorted, grouped
  dispatch against every expert applied to every token; megablox in Pallas interpret mode."""
  cfg = moe_cfg(num_experts=E, num_experts_per_tok=J, moe_kernel=kernel)
  x, logits = routed(cfg, seed=J)
  w = expert_weights(cfg, seed=E)

  @jax.jit
  def both(x, w, logits):
    weights, experts, _ = route(logits, cfg)

    def loss(fn, x, w, weights):
      y = fn(x, weights, experts, w)
      return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y  # a fixed projection

    grad = jax.grad(loss, argnums=(1, 2, 3), has_aux=True)
    return (grad(lambda *a: dropless(*a, cfg), x, w, weights),
            grad(dense_reference, x, w, weights))

  (grads, y), (want_grads, want) = both(x, w, logits)
  # float32 sums in another order (megablox accumulates tiles): 1e-6 of the outputs' scale
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))
  for g, h in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(h))))


def test_slot_positions_take_first_choices_first_then_token_order():
  experts = jnp.asarray([[1, 0], [1, 2], [0, 1], [1, 0]])
  # order (j, n): first choices 1, 1, 0, 1, then second choices 0, 2, 1, 0
  np.testing.assert_array_equal(jax.jit(slot_positions, static_argnums=1)(experts, 3),
                                [[0, 1], [1, 0], [0, 3], [2, 2]])


@pytest.mark.parametrize("padded", [False, True])
def test_the_capacity_path_drops_exactly_the_assignments_over_capacity(padded):
  """Each expert's queue in the order (j, n), written out in Python; padding (valid False: a
  packed row's segment 0) queues nowhere, takes no slot and is not counted as dropped."""
  cfg = moe_cfg(num_experts=4, num_experts_per_tok=2, capacity_factor=0.5)
  x, logits = routed(cfg, seed=3, n=16)
  w = expert_weights(cfg, seed=1)
  valid = np.ones(16, bool)
  if padded:
    valid[[1, 2, 6, 11]] = False
  weights, experts, _ = jax.jit(lambda l: route(l, cfg))(logits)
  C = capacity(16, cfg)
  assert C == 4  # ceil(0.5 * 16 * 2 / 4)
  seen, kept = {}, np.zeros((16, 2), bool)
  for j in range(2):
    for n in np.flatnonzero(valid):
      e = int(experts[n, j])
      kept[n, j] = seen.get(e, 0) < C
      seen[e] = seen.get(e, 0) + 1
  dropped_want = (~kept[valid]).sum()
  assert 0 < dropped_want < 2 * valid.sum()
  y, dropped = jax.jit(lambda *a: with_capacity(*a, cfg, valid_N=jnp.asarray(valid)))(
      x, weights, experts, w)
  want = jax.jit(dense_reference)(x, weights, experts, w, jnp.asarray(kept))
  np.testing.assert_allclose(y, want, **F32)
  assert float(dropped) == pytest.approx(dropped_want / (2 * valid.sum()))


def test_a_capacity_that_drops_nothing_equals_dropless():
  cfg = moe_cfg(num_experts=4, num_experts_per_tok=2, capacity_factor=2.0)  # C = N
  x, logits = routed(cfg, seed=5, n=24)

  @jax.jit
  def both(x, w, logits):
    weights, experts, _ = route(logits, cfg)
    return (with_capacity(x, weights, experts, w, cfg),
            dropless(x, weights, experts, w, cfg))

  (y, dropped), want = both(x, expert_weights(cfg), logits)
  assert float(dropped) == 0.0
  np.testing.assert_allclose(y, want, **F32)


# --- the whole model -------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames="cfg")
def forward(cfg, params, tokens):
  logits, sown = build(cfg).apply({"params": params}, tokens, mutable=[MOE_COLLECTION])
  return logits, moe_metrics(sown[MOE_COLLECTION], cfg)


@pytest.mark.parametrize("moe_layers, period", [("every:2", 2), ("0,3", 4)])
def test_loop_and_scan_layouts_agree(moe_layers, period):
  cfg = moe_cfg(num_layers=4, moe_layers=moe_layers, num_shared_experts=1)
  assert cfg.layer_period == period
  params = init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(random_batch(2, 15, 64)[:, :16])
  want, want_m = forward(cfg, params, tokens)
  scan = cfg.replace(scan_layers=True)
  scanned = convert_layout(params, scan)
  got, got_m = forward(scan, scanned, tokens)
  np.testing.assert_allclose(got, want, **F32)
  for k in want_m:
    np.testing.assert_allclose(got_m[k], want_m[k], **F32)
  again = convert_layout(scanned, cfg)
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  sparse = [i for i in range(4) if "moe" in params[f"h_{i}"]]
  assert tuple(i in sparse for i in range(4)) == cfg.sparse_layers


def test_a_packed_row_routes_each_document_as_it_routes_it_alone():
  """The router is per token: a row of two documents and padding gives each document the
  logits it has alone, and (one document and padding) the routing statistics of the document
  alone: padding is left out of the load and the losses, also split over a (data, expert)
  mesh."""
  cfg = moe_cfg(num_layers=2, num_experts=8, num_experts_per_tok=2)
  params = init_params(cfg, jax.random.key(1))
  a, b = random_batch(1, 6, 64, seed=1)[:, :7], random_batch(1, 4, 64, seed=2)[:, :5]
  row = np.concatenate([a, b, np.zeros((1, 4), np.int32)], axis=1)  # T = 16
  seg = np.asarray([[1] * 7 + [2] * 5 + [0] * 4], np.int32)
  got, _ = packed_forward(cfg, params, jnp.asarray(row), jnp.asarray(seg))
  want_a, metrics_a = forward(cfg, params, jnp.asarray(a))
  want_b, _ = forward(cfg, params, jnp.asarray(b))
  np.testing.assert_allclose(got[:, :7], want_a, **F32)
  np.testing.assert_allclose(got[:, 7:12], want_b, **F32)
  a_padded = np.concatenate([a, row[:, :9] + 1], axis=1)  # padding of other tokens
  a_seg = np.asarray([[1] * 7 + [0] * 9], np.int32)
  _, metrics = packed_forward(cfg, params, jnp.asarray(a_padded), jnp.asarray(a_seg))
  for key in ("moe_aux_loss", "moe_z_loss", "moe_load"):
    np.testing.assert_allclose(metrics[key], metrics_a[key], **F32, err_msg=key)
  # two rows of 7 and 5 valid tokens, a row per data-parallel group of 4 expert devices
  b_padded = np.concatenate([b, np.full((1, 11), 3, np.int32)], axis=1)
  b_seg = np.asarray([[1] * 5 + [0] * 11], np.int32)
  rows = jnp.asarray(np.concatenate([a_padded, b_padded]))
  segs = jnp.asarray(np.concatenate([a_seg, b_seg]))
  _, want = packed_forward(cfg, params, rows, segs)
  with activate(make_mesh(data=2, fsdp=1, tensor=1, expert=4), DEFAULT_RULES):
    _, got_mesh = packed_forward(cfg, params, rows, segs)
  for key in ("moe_aux_loss", "moe_z_loss", "moe_load"):
    np.testing.assert_allclose(got_mesh[key], want[key], **F32, err_msg=key)


@functools.partial(jax.jit, static_argnames="cfg")
def packed_forward(cfg, params, tokens, segment_ids):
  logits, sown = build(cfg).apply({"params": params}, tokens, segment_ids_BT=segment_ids,
                                  mutable=[MOE_COLLECTION])
  return logits, moe_metrics(sown[MOE_COLLECTION], cfg)


def test_the_load_balancing_loss_equals_transformers(transformers_lib):
  torch, _ = transformers_lib
  # pylint: disable-next=import-outside-toplevel
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  cfg = moe_cfg(num_experts=8, num_experts_per_tok=2)
  rng = np.random.default_rng(0)
  layers = [rng.standard_normal((40, 8)).astype(np.float32) for _ in range(3)]
  sown = {f"h_{i}": {"moe": {"tokens_per_expert": (s["tokens_per_expert"],),
                              "router_prob": (s["router_prob"],), "z": (s["z"],),
                              "dropped": (jnp.zeros(()),)}}
          for i, s in enumerate(_stats(cfg, jnp.asarray(logits)) for logits in layers)}
  ours = float(jax.jit(lambda s: moe_metrics(s, cfg)["moe_aux_loss"])(sown))
  theirs = float(load_balancing_loss_func(tuple(torch.from_numpy(x) for x in layers), 8, 2))
  assert ours == pytest.approx(theirs, rel=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _stats(cfg, logits):
  _, experts, probs = route(logits, cfg)
  return routing_stats(logits, probs, experts, cfg.num_experts)


# --- meshes: expert parallelism ---------------------------------------------------------------

def _two_steps(cfg, mesh, host_state=None):
  state, step, initial = adamw_start(cfg, mesh, (8, 17), host_state)
  out, batch = [], shard_batch(random_batch(8, 16, 64), mesh)
  for _ in range(2):
    state, metrics = step(state, batch)
    out.append(jax.device_get(metrics))
  return out, jax.device_get(state.params), initial


MESHES = {"data x expert": dict(data=2, fsdp=1, tensor=1, expert=4),
          "fsdp x expert": dict(data=1, fsdp=2, tensor=1, expert=4),
          "expert x tensor": dict(data=1, fsdp=1, tensor=2, expert=4),
          "data x fsdp x tensor": dict(data=2, fsdp=2, tensor=2, expert=1)}


@pytest.fixture(scope="module")
def single_device_moe():
  cfg = moe_cfg(num_experts=8, num_experts_per_tok=2, router_z_loss_coef=1e-3)
  return cfg, _two_steps(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def test_expert_parallelism_with_the_megablox_kernel():
  """megablox (Pallas interpret mode here) leaves the rows past its groups unwritten: with 4
  experts of 8 per device most rows are another device's, and nothing of them may leak into
  the values or the gradients."""
  cfg = moe_cfg(num_experts=8, num_experts_per_tok=2, num_layers=1, moe_kernel="megablox")
  want, want_params, initial = _two_steps(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  got, got_params, _ = _two_steps(cfg, make_mesh(data=2, fsdp=1, tensor=1, expert=4), initial)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got_params), jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MESHES)
def test_two_adamw_steps_equal_the_single_device_run(single_device_moe, name):
  cfg, (want, want_params, initial) = single_device_moe
  got, got_params, _ = _two_steps(cfg, make_mesh(**MESHES[name]), initial)
  assert want[1]["loss"] < want[0]["loss"]
  for g, w in zip(got, want):
    for key in ("loss", "moe_aux_loss", "moe_z_loss", "grad_norm"):
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"{name} {key}")
    np.testing.assert_allclose(g["moe_load"], w["moe_load"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got_params), jax.tree_util.tree_leaves(want_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --- counts and bad input ---------------------------------------------------------------------

def test_experts_are_counted_and_split():
  cfg = moe_cfg(num_experts=8, num_experts_per_tok=2, num_layers=2)
  p = init_params(cfg, jax.random.key(0))["h_0"]["moe"]
  assert p["c_fc"]["kernel"].shape == (8, 32, 48) and p["router"]["kernel"].shape == (32, 8)
  dense = moe_cfg(num_experts=0)
  assert count_params(cfg) - count_params(dense) == 2 * (7 * 3 * 32 * 48 + 32 * 8)


def test_the_grouped_matmul_kernel_by_platform():
  auto, megablox = moe_cfg(), moe_cfg(moe_kernel="megablox")
  assert [kernel(auto, p) for p in ("tpu", "gpu", "cpu")] == ["megablox", "ragged_dot",
                                                               "tiled"]
  assert kernel(megablox, "cpu") == "megablox"  # interpret mode
  with pytest.raises(UserError, match=r"model.moe_kernel='megablox' needs a TPU \(or the CPU, "
                                      r"in Pallas interpret mode\), not gpu"):
    kernel(megablox, "gpu")


@pytest.mark.parametrize("changes, message", [
    (dict(num_experts=4, num_experts_per_tok=5),
     r"ModelConfig.num_experts_per_tok \(5\) must be between 1 and num_experts \(4\)"),
    (dict(moe_layers="every:0"), r"ModelConfig.moe_layers must be 'all', 'every:K'"),
    (dict(moe_layers="1,7"), r"layer indices below num_layers \(2\), got '1,7'"),
    (dict(router="grouped"), r"ModelConfig.router must be one of topk_softmax, softmax_topk"),
    (dict(capacity_factor=-1.0), r"ModelConfig.capacity_factor must be a number >= 0"),
])
def test_bad_moe_configs_are_one_sentence(changes, message):
  with pytest.raises(UserError, match=message):
    moe_cfg(**changes)
