"""LoRA (model/lora.py, training/adapters.py): targets, the adapted model against its merged
weights, gradients, the frozen base, every mesh and both layer layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import optimizer_config, random_batch
from model import lora
from model.config import get_config
from model.errors import UserError
from model.families import init_params
from model.gpt import GPT
from model.layout import convert_layout, unstack_layers
from sharding import make_mesh, shard_batch
from training.adapters import split_trainable
from training.optimizer import make_optimizer, schedule_from_config
from training.state import abstract_train_state, create_train_state, train_state_from_params
from training.step import compile_train_step, cross_entropy

# GPT-2-shaped (fused c_attn) and Llama-shaped (c_q, c_kv with 2 of 4 key/value heads) tiny
# models; the targets cover whole kernels and parts of fused ones.
GPT2 = dict(vocab_size=64, block_size=16, num_layers=2, num_heads=4, d_model=32)
LLAMA = dict(vocab_size=64, block_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
             d_model=32, d_mlp=48)
CASES = {"gpt2-parts": ("tiny", GPT2, "q,v,o,c_fc"),
         "gpt2-whole": ("tiny", GPT2, "c_attn,c_proj"),
         "llama": ("llama-tiny", LLAMA, "q,k,v,o,gate,up,down"),
         "llama-fused": ("llama-tiny", LLAMA, "attn/c_kv,mlp/.*")}


def _cfg(case, **changes):
  preset, shape, targets = CASES[case]
  return get_config(preset, **{**shape, "lora_rank": 4, "lora_alpha": 8.0,
                               "lora_targets": targets, **changes})


def _random_adapters(cfg, seed=1):
  """Parameters whose adapters (B too) are random: an adapter that changes the model."""
  def make(key):
    adapters, base = lora.split_adapters(init_params(cfg, key))
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return lora.join(jax.tree_util.tree_unflatten(tree, noisy), base)
  return jax.jit(make)(jax.random.key(0))


def test_targets_resolve_to_projections_and_parts():
  assert lora.plan(_cfg("gpt2-parts")) == {"attn/c_attn": ("q", "v"), "attn/c_proj": ("",),
                                           "mlp/c_fc": ("",)}
  assert lora.plan(_cfg("gpt2-whole")) == {"attn/c_attn": ("",), "attn/c_proj": ("",),
                                           "mlp/c_proj": ("",)}  # c_proj: both modules
  assert lora.plan(_cfg("llama")) == {
      "attn/c_q": ("",), "attn/c_kv": ("k", "v"), "attn/c_proj": ("",), "mlp/c_fc": ("",),
      "mlp/c_gate": ("",), "mlp/c_proj": ("",)}
  assert lora.plan(_cfg("llama-fused")) == {"attn/c_kv": ("",), "mlp/c_fc": ("",),
                                            "mlp/c_gate": ("",), "mlp/c_proj": ("",)}


@pytest.mark.parametrize("case, targets, message", [
    ("gpt2-parts", "gate", "'gate' matches no projection of this model; its projections are "
                           "q, k, v, o, up, down and its modules attn/c_attn, attn/c_proj, "
                           "mlp/c_fc, mlp/c_proj"),
    ("gpt2-parts", "mlp/c_gate", "matches no projection"),
    ("gpt2-parts", "wte", "unknown target 'wte'"),
    ("llama", "q,c_kv,k", "adapts attn/c_kv both whole and in parts (k)"),
])
def test_bad_targets_name_what_exists(case, targets, message):
  with pytest.raises(UserError, match="config.train.lora.targets") as e:
    lora.plan(_cfg(case, lora_targets=targets))
  assert message in str(e.value)


@pytest.mark.parametrize("case, scan_layers", [("gpt2-parts", False), ("gpt2-whole", True),
                                               ("llama", True), ("llama-fused", False)])
def test_adapted_model_equals_its_merged_weights(case, scan_layers):
  """x W + (alpha / r) (x A) B over every adapted kernel (and part) equals the model without
  LoRA on W + (alpha / r) A B; an adapter that is not zero changes the logits."""
  cfg = _cfg(case, scan_layers=scan_layers)
  params = _random_adapters(cfg)
  tokens = jnp.asarray(random_batch(2, 15, 64)[:, :-1])
  plain = lora.without_lora(cfg)
  merged = jax.jit(lora.merge_weights, static_argnums=1)(params, cfg)
  assert not lora.has_adapters(merged)
  logits, expected, base_only = jax.jit(lambda p, m, b: [
      GPT(cfg).apply({"params": p}, tokens), GPT(plain).apply({"params": m}, tokens),
      GPT(plain).apply({"params": b}, tokens)])(params, merged, lora.split_adapters(params)[1])
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(np.asarray(logits) - np.asarray(base_only))) > 1e-2


@pytest.mark.parametrize("case", ["gpt2-parts", "llama"])
def test_adapter_gradients_are_the_merged_weights_gradient_projected(case):
  """dL/dA = (alpha / r) G B^T and dL/dB = (alpha / r) A^T G, G = dL/dW of the merged kernel
  (of its part, for a part of a fused kernel)."""
  cfg = _cfg(case)
  params = _random_adapters(cfg)
  batch = jnp.asarray(random_batch(2, 15, 64))
  plain = lora.without_lora(cfg)
  loss = lambda c: lambda p: cross_entropy(GPT(c).apply({"params": p}, batch[:, :-1]),
                                           batch[:, 1:])
  adapters, base = lora.split_adapters(params)
  g_adapters = jax.jit(jax.grad(lambda a: loss(cfg)(lora.join(a, base))))(adapters)
  g_merged = jax.jit(lambda p: jax.grad(loss(plain))(lora.merge_weights(p, cfg)))(params)
  scale = cfg.lora_alpha / cfg.lora_rank
  checked = 0
  for layer in ("h_0", "h_1"):
    for path, parts in lora.plan(cfg).items():
      sub, name = path.split("/")
      G = np.asarray(g_merged[layer][sub][name]["kernel"])
      n_in = lora.n_inputs(path)
      for part in parts:
        suffix = "" if part == lora.WHOLE else f"_{part}"
        g = G if part == lora.WHOLE else np.take(
            G, lora.block_modules(cfg)[path].index(part), axis=n_in)
        node = adapters[layer][sub][name]
        a, b = (np.asarray(node[f"lora_{x}{suffix}"]) for x in "ab")
        got = g_adapters[layer][sub][name]
        rows = int(np.prod(a.shape[:-1]))
        g2 = g.reshape(rows, -1)
        np.testing.assert_allclose(np.asarray(got[f"lora_a{suffix}"]).reshape(rows, -1),
                                   scale * g2 @ b.reshape(b.shape[0], -1).T,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[f"lora_b{suffix}"]).reshape(b.shape[0], -1),
                                   scale * a.reshape(rows, -1).T @ g2, rtol=1e-5, atol=1e-6)
        checked += 1
  assert checked == 2 * sum(len(p) for p in lora.plan(cfg).values())


def _lora_steps(cfg, mesh, initial=None):
  """(losses, final host state, the initial host parameters) of three LoRA steps from a new
  state, or from `initial` (loop-layout parameters) laid out as cfg and mesh ask."""
  opt = optimizer_config(lr=1e-2)
  tx, sched = make_optimizer(opt, 10), schedule_from_config(opt, 10)
  abstract, _ = abstract_train_state(cfg, tx, mesh)
  if initial is None:
    state, _ = create_train_state(cfg, tx, mesh, seed=0)
  else:
    state = train_state_from_params(convert_layout(initial, cfg), tx, abstract, 0, cfg)
  initial = jax.device_get(state.params)
  step = compile_train_step(cfg, tx, sched, mesh, abstract, (8, 17))
  losses = []
  for i in range(3):
    state, metrics = step(state, shard_batch(random_batch(8, 16, 64, seed=i), mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state), initial


@pytest.fixture(scope="module")
def one_device_lora_steps():
  return {case: _lora_steps(_cfg(case), make_mesh(1, 1, 1, devices=jax.devices()[:1]))
          for case in ("gpt2-parts", "llama")}


def test_only_the_adapters_train_and_hold_optimizer_state(one_device_lora_steps):
  """Three AdamW steps: the base is bit for bit what it was; every adapter moved (B from
  zero); AdamW's moments exist for the adapters only."""
  for case, (_, state, initial) in one_device_lora_steps.items():
    cfg = _cfg(case)
    adapters, base = split_trainable(cfg, state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, split_trainable(cfg, initial)[1])
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(adapters))
    n_adapters = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_adapters  # mu and nu


@pytest.mark.parametrize("case, shape, scan_layers", [
    pytest.param("gpt2-parts", (8, 1, 1), False, marks=pytest.mark.slow),
    pytest.param("llama", (1, 8, 1), True, marks=pytest.mark.slow),
    ("llama", (2, 1, 4), False),
    pytest.param("gpt2-parts", (1, 2, 4), True, marks=pytest.mark.slow)])
def test_lora_steps_on_every_mesh_equal_one_device(one_device_lora_steps, case, shape,
                                                   scan_layers):
  """The same three LoRA steps on data, FSDP and tensor meshes, in both layer layouts, from the
  same initial parameters: the same losses and adapters as on one device (AdamW's normalised
  updates carry float32 differences of reduction order in near-zero gradients: 1e-5 absolute
  after three steps of lr 1e-2)."""
  ref_losses, ref_state, initial = one_device_lora_steps[case]
  losses, state, _ = _lora_steps(_cfg(case, scan_layers=scan_layers), make_mesh(*shape),
                                 initial)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  adapters = lora.split_adapters(state.params)[0]
  if scan_layers:
    adapters = unstack_layers(adapters, 2)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         adapters, lora.split_adapters(ref_state.params)[0])
