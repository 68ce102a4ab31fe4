"""Sharding on 8 fake CPU devices: meshes, rules, sharded creation, batch placement, parity.

Every mesh gives the single-device numbers: forward logits, loss and gradients of one batch
agree within 1e-5 relative (float32, "highest" matmul precision from conftest.py). Each mesh
is compiled once (module-scoped fixtures) to keep the file fast on two CPU cores.
"""

import functools
import os
import pathlib
import re
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sharding as S
from model import GPT, get_config, init_params
from model.errors import UserError

from conftest import assert_close, rel_err

REPO = pathlib.Path(__file__).resolve().parents[1]
# Heads (8), width (64), MLP width (256) and vocabulary (128) divide by 8: tensor=8 splits all.
CFG = get_config("tiny", num_heads=8)
TOKENS_BT = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 17)).astype(np.int32)
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)]
RTOL = 1e-5
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def loss_and_logits(params, tokens_BT):
  logits_BTV = GPT(CFG).apply({"params": params}, tokens_BT[:, :-1])
  logp_BTV = jax.nn.log_softmax(logits_BTV)
  loss = -jnp.mean(jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1))
  return loss, logits_BTV


grad_fn = jax.value_and_grad(loss_and_logits, has_aux=True)


def forward(params, tokens_BT):
  return GPT(CFG).apply({"params": params}, tokens_BT)



def shard_shapes(x: jax.Array) -> set[tuple[int, ...]]:
  return {s.data.shape for s in x.addressable_shards}


@pytest.fixture(scope="module")
def reference():
  """Unsharded parameters and the single-device loss, logits and gradients."""
  params = jax.jit(functools.partial(init_params, CFG))(jax.random.key(0))
  (loss, logits), grads = jax.jit(grad_fn)(params, TOKENS_BT)
  return types.SimpleNamespace(params=params, loss=loss, logits=logits, grads=grads)


@pytest.fixture(scope="module", params=MESHES, ids=lambda s: "x".join(map(str, s)))
def mesh_run(request, reference):
  """Loss, logits and gradients of the same batch on one mesh (compiled once)."""
  mesh = S.make_mesh(*request.param)
  params = S.place_params(reference.params, CFG, mesh)
  batch = S.shard_batch(TOKENS_BT, mesh)
  with S.activate(mesh):
    compiled = jax.jit(grad_fn).lower(params, batch).compile()
  (loss, logits), grads = compiled(params, batch)
  return types.SimpleNamespace(mesh=mesh, params=params, loss=loss, logits=logits, grads=grads)


# ---------------------------------------------------------------------------- mesh


def test_mesh_shapes_and_minus_one():
  assert S.make_mesh(2, 2, 2).devices.shape == (2, 2, 2, 1)  # (data, fsdp, tensor, expert)
  assert dict(S.make_mesh(data=2, fsdp=-1, tensor=1).shape) == {"data": 2, "fsdp": 4, "tensor": 1,
                                                                 "expert": 1}
  assert S.resolve_mesh_shape(1, 1, -1, num_devices=8) == (1, 1, 8, 1)
  assert S.resolve_mesh_shape(-1, 1, 1, num_devices=1) == (1, 1, 1, 1)
  assert S.resolve_mesh_shape(1, -1, 1, num_devices=8, expert=4) == (1, 2, 1, 4)
  one = S.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert one.devices.size == 1 and "1 cpu device" in S.describe(one)
  assert "expert" not in S.describe(S.make_mesh(2, 2, 2))  # an axis of 1 is not named
  assert "data=2 x fsdp=1 x tensor=1 x expert=4 over 8" in S.describe(S.make_mesh(2, 1, 1,
                                                                                  expert=4))


def test_mesh_wrong_device_count_names_both_numbers():
  with pytest.raises(UserError, match=r"needs 16 devices, but 8 are available"):
    S.make_mesh(2, 4, 2)
  with pytest.raises(UserError, match=r"\b3\b.*\b8\b"):
    S.make_mesh(data=3, fsdp=-1)


@pytest.mark.parametrize("sizes, match", [
    ((0, 8, 1), "data must be a positive integer or -1, got 0"),
    ((1, "8", 1), "fsdp must be a positive integer or -1, got '8'"),
    ((1, 8, True), "tensor must be a positive integer or -1, got True"),
    ((-1, -1, 1), "At most one mesh axis may be -1"),
])
def test_mesh_bad_axis_values(sizes, match):
  with pytest.raises(UserError, match=re.escape(match)):
    S.make_mesh(*sizes)


def test_mesh_and_rules_from_config():
  cfg = ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2, "rules": {}})
  assert dict(S.mesh_from_config(cfg).shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert S.rules_from_config(cfg) == S.DEFAULT_RULES
  cfg.rules = {"embed": "none", "mlp": "fsdp,tensor"}  # as --config.mesh.rules.embed=none sets it
  assert dict(S.rules_from_config(cfg))["embed"] is None
  assert dict(S.rules_from_config(cfg))["mlp"] == ("fsdp", "tensor")
  assert dict(S.mesh_from_config({"tensor": 4}).shape) == {"data": 1, "fsdp": 2, "tensor": 4,
                                                          "expert": 1}
  # the whole table in a config, every entry overridable; or a one-line string of overrides
  assert S.make_rules(S.rules_config()) == S.DEFAULT_RULES
  assert dict(S.rules_from_config({"rules": "embed=none; act_batch=data"}))["act_batch"] == "data"
  with pytest.raises(UserError, match="must look like name=axes"):
    S.rules_from_config({"rules": "embed"})


def _fake_devices(num_hosts, per_host, **extra):
  return [types.SimpleNamespace(id=h * per_host + i, process_index=h, platform="gpu",
                                device_kind="fake", **{k: f(h) for k, f in extra.items()})
          for h in range(num_hosts) for i in range(per_host)]


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (4, 2, 1)])
def test_multi_host_device_order_keeps_tensor_and_fsdp_in_a_host(shape):
  """2 hosts x 4 GPUs: hosts go along data first (then fsdp); tensor never leaves a host."""
  grid = S.mesh_devices(shape, _fake_devices(2, 4))
  hosts = np.vectorize(lambda d: d.process_index)(grid)
  assert (hosts == hosts[..., :1]).all()  # each tensor group is on one host
  if shape[0] % 2 == 0:
    assert (hosts == hosts[:, :1, :1]).all()  # each data replica (fsdp x tensor) is one host
  assert sorted(d.id for d in grid.flat) == list(range(8))


def test_multi_slice_device_order_puts_slices_on_data():
  devices = _fake_devices(4, 2, slice_index=lambda h: h // 2)  # 2 slices of 2 hosts
  grid = S.mesh_devices((2, 2, 2), devices)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()


# ---------------------------------------------------------------------------- rules


def test_rules_override():
  rules = S.make_rules({"embed": None, "act_batch": "data,fsdp", "vocab": "none"})
  table = dict(rules)
  assert table["embed"] is None and table["vocab"] is None
  assert table["act_batch"] == ("data", "fsdp") and table["mlp"] == "tensor"
  assert S.make_rules(ml_collections.ConfigDict({"heads": ["tensor"]})) == S.DEFAULT_RULES
  with pytest.raises(UserError, match="Unknown logical axis 'embd'"):
    S.make_rules({"embd": None})
  with pytest.raises(UserError, match="unknown mesh axis 'model'"):
    S.make_rules({"mlp": "model"})


def test_rules_override_disables_fsdp_of_weights():
  mesh = S.make_mesh(1, 8, 1)
  default = S.param_shardings(CFG, mesh)
  no_fsdp = S.param_shardings(CFG, mesh, S.make_rules({"embed": None}))
  assert default["h_0"]["mlp"]["c_fc"]["kernel"].spec == P("fsdp")
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(no_fsdp))


def test_fit_spec_drops_or_moves_axes_that_do_not_divide():
  mesh = S.make_mesh(1, 4, 2)
  # tensor (compute layout) is dropped when it does not divide: GPT-2's 50257-row vocabulary
  assert S.fit_spec(P("tensor", "fsdp"), (50257, 768), mesh) == P(None, "fsdp")
  # fsdp (storage only) moves to the largest dimension it divides: D=6 -> F=24, joining tensor
  assert S.fit_spec(P("fsdp", "tensor"), (6, 24), mesh) == P(None, ("tensor", "fsdp"))
  assert S.fit_spec(P("fsdp", None), (6, 5, 12), mesh) == P(None, None, "fsdp")
  assert S.fit_spec(P("fsdp", "tensor"), (8, 6), S.make_mesh(8, 1, 1)) == P()


# ---------------------------------------------------------------------------- parity


def test_forward_loss_and_grads_match_single_device(mesh_run, reference):
  assert rel_err(mesh_run.loss, reference.loss) < RTOL
  assert rel_err(mesh_run.logits, reference.logits) < RTOL
  assert_close(mesh_run.grads, reference.grads, RTOL, "grads")


def test_tensor_parallel_splits_heads_eightfold(reference):
  params = S.place_params(reference.params, CFG, S.make_mesh(1, 1, 8))
  attn = params["h_0"]["attn"]
  H, K, D = CFG.num_heads, CFG.head_dim, CFG.d_model
  assert shard_shapes(attn["c_attn"]["kernel"]) == {(D, 3, H // 8, K)}
  assert shard_shapes(attn["c_proj"]["kernel"]) == {(H // 8, K, D)}
  assert shard_shapes(params["h_0"]["mlp"]["c_fc"]["kernel"]) == {(D, CFG.d_mlp // 8)}


# ---------------------------------------------------------------------------- HLO


def boxed_init(rng):
  return init_params(CFG, rng, unbox=False)


def _forward_hlo(mesh):
  params = S.abstract_sharded(boxed_init, mesh, S.DEFAULT_RULES, jax.random.key(0))
  batch = jax.ShapeDtypeStruct(TOKENS_BT.shape, jnp.int32, sharding=S.batch_sharding(mesh))
  with S.activate(mesh):
    return jax.jit(forward).lower(params, batch).compile().as_text()


def test_fsdp_forward_all_gathers_parameters():
  hlo = _forward_hlo(S.make_mesh(1, 8, 1))
  gathered = set(re.findall(r"= f32\[([\d,]+)\][^ ]* all-gather\(", hlo))
  D, F, V = CFG.d_model, CFG.d_mlp, CFG.padded_vocab_size
  assert {f"{V},{D}", f"{D},{F}", f"{F},{D}"} <= gathered, gathered


def test_data_parallel_forward_has_no_collectives():
  hlo = _forward_hlo(S.make_mesh(8, 1, 1))
  assert not [op for op in COLLECTIVES if op in hlo]


def test_embedding_lookup_needs_no_full_rematerialization(capfd):
  """On data x fsdp x tensor the token and position lookups gather from tables whose embed
  axis is split over fsdp, like the batch; without the table constraint in
  model.blocks._lookup XLA warns "Involuntary full rematerialization" (it replicates the
  gathered activations, then splits them again)."""
  hlo = _forward_hlo(S.make_mesh(2, 2, 2))
  assert "all-gather" in hlo
  assert "Involuntary full rematerialization" not in capfd.readouterr().err


# ---------------------------------------------------------------------------- sharded creation


ADAMW = optax.adamw(1e-3, weight_decay=0.1, mask=lambda p: jax.tree_util.tree_map(
    lambda x: x.ndim >= 2, p))


@pytest.fixture(scope="module")
def fsdp_state():
  """{"params", "opt_state"} of AdamW created sharded on (1, 8, 1) from the reference's rng."""
  mesh = S.make_mesh(1, 8, 1)
  state, shardings = S.init_params_and_opt_state_sharded(CFG, ADAMW, jax.random.key(0), mesh)
  return types.SimpleNamespace(mesh=mesh, state=state, shardings=shardings)


def test_sharded_init_equals_unsharded_init_bit_for_bit(fsdp_state, reference):
  params = fsdp_state.state["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(reference.params)
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                params, reference.params)
  assert all(jax.tree_util.tree_leaves(same))


def test_fsdp_splits_embedding_and_mlp_kernels_eightfold(fsdp_state):
  params = fsdp_state.state["params"]
  for x in (params["wte"]["embedding"], *(params[f"h_{i}"]["mlp"][name]["kernel"]
                                          for i in range(CFG.num_layers)
                                          for name in ("c_fc", "c_proj"))):
    (shape,) = shard_shapes(x)
    assert np.prod(shape) * 8 == x.size
    assert len({s.device for s in x.addressable_shards}) == 8


def test_optimizer_state_is_sharded_like_params(fsdp_state):
  state, shardings = fsdp_state.state, fsdp_state.shardings
  adam = state["opt_state"][0]
  placement = lambda tree: jax.tree_util.tree_map(lambda x: (x.sharding, x.shape), tree)
  for moments in (adam.mu, adam.nu):
    assert placement(moments) == placement(state["params"])
  assert adam.count.sharding.spec == P()
  # the returned shardings describe the arrays (what a train step's out_shardings needs)
  assert jax.tree_util.tree_map(lambda x: x.sharding, state) == shardings
  abstract = S.abstract_sharded(S.params_and_opt_state_init(CFG, ADAMW), fsdp_state.mesh,
                                S.DEFAULT_RULES, jax.random.key(0))
  assert jax.tree_util.tree_map(lambda a: a.sharding, abstract) == shardings


# ---------------------------------------------------------------------------- batches


def test_shard_batch_places_rows_on_the_right_devices():
  mesh = S.make_mesh(2, 2, 2)
  batch = {"inputs": TOKENS_BT, "weights": np.arange(8, dtype=np.float32)}
  placed = S.shard_batch(batch, mesh)
  assert placed["inputs"].shape == TOKENS_BT.shape
  rows_per_shard = 8 // S.batch_size_multiple(mesh)
  for (d, f, t, _), device in np.ndenumerate(mesh.devices):
    start = (d * mesh.shape["fsdp"] + f) * rows_per_shard  # same rows on both tensor devices
    for name, x in batch.items():
      (shard,) = [s for s in placed[name].addressable_shards if s.device == device]
      np.testing.assert_array_equal(shard.data, x[start:start + rows_per_shard])
  np.testing.assert_array_equal(S.process_batch_indices(8, mesh), np.arange(8))


def test_shard_batch_rejects_rows_that_do_not_split():
  mesh = S.make_mesh(2, 2, 2)
  with pytest.raises(UserError, match="batch of 6 rows does not split evenly over its 4"):
    S.shard_batch(TOKENS_BT[:6], mesh)
  with pytest.raises(UserError, match="Global batch size 6 must be a positive multiple of 4"):
    S.process_batch_size(6, mesh)


def test_batch_axes_follow_the_rules():
  mesh, rules = S.make_mesh(2, 2, 2), S.make_rules({"act_batch": "data"})
  assert S.batch_size_multiple(mesh, rules) == 2
  assert S.shard_batch(TOKENS_BT, mesh, rules).sharding.spec == P("data", None)


_TWO_PROCESS_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
import sharding as S
global_BT = np.arange(16 * 3).reshape(16, 3)
for shape in [(2, 2, 2), (1, 8, 1), (1, 2, 4), (1, 1, 8)]:
  mesh = S.make_mesh(*shape)
  rows = S.process_batch_indices(16, mesh)
  x = S.shard_batch(global_BT[rows], mesh)  # this host's rows only
  ok = x.shape == global_BT.shape and all(
      np.array_equal(s.data, global_BT[s.index]) for s in x.addressable_shards)
  print(shape, len(rows), ok, flush=True)
jax.distributed.shutdown()
"""


def test_shard_batch_on_two_processes():
  """Two CPU processes x 4 devices: each passes only its rows; the global array is the batch."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    address = f"localhost:{sock.getsockname()[1]}"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(i), address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    # tensor inside a host: half the rows each; tensor=8 spans both hosts: all rows on each
    assert out.split("\n")[:4] == ["(2, 2, 2) 8 True", "(1, 8, 1) 8 True", "(1, 2, 4) 8 True",
                                   "(1, 1, 8) 16 True"], out


# ---------------------------------------------------------------------------- reports


def test_gpt2_xl_fsdp_bytes_per_device_is_an_eighth():
  cfg = get_config("gpt2-xl")
  report = S.bytes_per_device(S.abstract_model_params(cfg), S.make_mesh(1, 8, 1))
  assert report["total_bytes"] == 4 * 1_557_611_200
  assert abs(report["fraction"] - 1 / 8) < 1e-3  # only LayerNorm and a few biases replicated
  text = S.format_param_report(cfg, S.make_mesh(1, 8, 1))
  assert "Parameters: 1,557,611,200" in text and "(12.5% of the total)" in text
  assert re.search(r"wte/embedding +\[50257, 1600\] -> \[50257, 200\]", text), text


def test_param_report_names_axes_that_do_not_divide():
  text = S.format_param_report(get_config("gpt2"), S.make_mesh(2, 2, 2))
  assert "Not split over tensor (it does not divide the size): wte/embedding [50257, 768]" in text
  assert "Not split" not in S.format_param_report(get_config("gpt2", padded_vocab_size=50304),
                                                  S.make_mesh(2, 2, 2))
