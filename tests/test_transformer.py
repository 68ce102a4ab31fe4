"""model/gpt.py and model/blocks.py: the GPT module's presets, causality, KV cache, layouts,
variants, init statistics, LayerNorm and embedding lookups.

Relative error throughout: rel(a, b) = max|a - b| / max|b| (b the reference).
Most of this file's time is XLA compiling, so tests share jitted functions (one compile per
config and shape) and build variant parameters from the base ones instead of re-initialising.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig, get_config
from model.blocks import LayerNorm, MASK_VALUE, ONE_HOT_LOOKUP_ROWS, _lookup, sinusoidal_positions
from model.families import abstract_params, count_params, init_params
from model.gpt import GPT, logits_from_hidden
from model.kv_cache import init_cache
from model.layout import stack_layers, unstack_layers

from conftest import assert_close, rel_err

TOL = 1e-5  # float32, same weights, different computation order
# LLVM optimisation level 0 halves CPU compile time; XLA's graph passes (and numerics) are
# unchanged, only the generated machine code is slower, which these tiny shapes don't notice.
FAST_COMPILE = {"xla_backend_optimization_level": 0}



def base_config(**overrides) -> ModelConfig:
  """vocab 128, 64 positions, width 64, 2 layers, 4 heads."""
  return get_config("tiny", **overrides)


def key(seed):
  """An "rbg" PRNG key: on CPU it compiles ~5x faster than the default (partitionable
  threefry; 10 s -> 2 s to initialise the tiny model), with the same distributions."""
  return jax.random.key(seed, impl="rbg")


def random_tokens(seed, shape, vocab_size):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab_size, shape), jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "deterministic", "return_hidden"),
                   compiler_options=FAST_COMPILE)
def forward(cfg, params, tokens_BT, rng=None, deterministic=True, return_hidden=False):
  rngs = None if rng is None else {"dropout": rng}
  return GPT(cfg).apply({"params": params}, tokens_BT, deterministic=deterministic, rngs=rngs,
                        return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnames=("cfg",), compiler_options=FAST_COMPILE)
def forward_cached(cfg, params, tokens_BT, positions_BT, cache):
  return GPT(cfg).apply({"params": params}, tokens_BT, positions_BT=positions_BT, cache=cache)


def params_like(cfg, base_params, seed=0):
  """Parameters for `cfg`: the base weights (in cfg's layout) wherever a parameter of the same
  name and shape exists, fresh N(0, 0.02) draws elsewhere. No compilation."""
  if cfg.scan_layers:
    base_params = stack_layers(base_params, cfg.num_layers)
  base_flat = {jax.tree_util.keystr(p): x
               for p, x in jax.tree_util.tree_leaves_with_path(base_params)}
  rng = np.random.default_rng(seed)

  def pick(path, spec):
    x = base_flat.get(jax.tree_util.keystr(path))
    if x is not None and x.shape == spec.shape:
      return x
    return jnp.asarray(0.02 * rng.standard_normal(spec.shape), spec.dtype)

  return jax.tree_util.tree_map_with_path(pick, abstract_params(cfg))


@pytest.fixture(scope="module")
def base():
  cfg = base_config()
  init = jax.jit(init_params, static_argnums=0, compiler_options=FAST_COMPILE)
  return cfg, init(cfg, key(0))


@pytest.fixture(scope="module")
def tokens():
  return random_tokens(1, (2, 24), 128)


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name, expected", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200)])
def test_preset_param_counts(name, expected):
  # The scan layout traces one block instead of L (same count, faster).
  assert count_params(get_config(name, scan_layers=name != "gpt2")) == expected


def test_param_count_same_in_both_layouts():
  cfg = get_config("gpt2")
  assert count_params(cfg.replace(scan_layers=True)) == count_params(cfg) == 124_439_808
  assert count_params(cfg, non_embedding=True) == 124_439_808 - 1024 * 768


# ---------------------------------------------------------------------------------------------
# Causality, layouts, attention implementations


@pytest.mark.parametrize("t", [0, 7, 23])
def test_causality(base, tokens, t):
  cfg, params = base
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
  before, after = forward(cfg, params, tokens), forward(cfg, params, changed)
  np.testing.assert_array_equal(after[:, :t], before[:, :t])  # bit-identical on CPU
  assert np.abs(np.asarray(after[:, t] - before[:, t])).max() > 1e-4


def test_layouts_and_attention_implementations_agree(base, tokens):
  cfg, params = base
  reference = forward(cfg.replace(attention="xla"), params, tokens)
  stacked = stack_layers(params, cfg.num_layers)
  assert stacked["h"]["attn"]["c_attn"]["kernel"].shape == (2, 64, 3, 4, 16)
  for scan in (False, True):
    for attention in ("xla", "auto"):
      c = cfg.replace(scan_layers=scan, attention=attention)
      logits = forward(c, stacked if scan else params, tokens)
      assert logits.shape == (2, 24, cfg.vocab_size) and logits.dtype == jnp.float32
      assert rel_err(logits, reference) <= TOL, (scan, attention)
  restored = unstack_layers(stacked, cfg.num_layers)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, restored, params))


def test_return_hidden_then_head_equals_logits(base, tokens):
  cfg, params = base
  hidden = forward(cfg, params, tokens, return_hidden=True)
  assert hidden.shape == (2, 24, cfg.d_model)
  head = jax.jit(logits_from_hidden, static_argnums=1, compiler_options=FAST_COMPILE)
  assert rel_err(head(params, cfg, hidden), forward(cfg, params, tokens)) <= TOL


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decode_matches_full_forward(base, tokens, scan_layers):
  """Row 0 is prefilled with 5 real tokens, row 1 with 9 (a padded [2, 9] prefill); then 6
  single-token steps at per-row positions. Each real position must match the full forward."""
  cfg, params = base
  cfg = cfg.replace(scan_layers=scan_layers)
  params = stack_layers(params, cfg.num_layers) if scan_layers else params
  full = np.asarray(forward(cfg, params, tokens))
  prompt_lens, steps = (5, 9), 6

  prefill = jnp.stack([tokens[0, :9].at[5:].set(0), tokens[1, :9]])  # row 0 padded with 0s
  positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
  cache = init_cache(cfg, batch_size=2, max_len=24)
  logits, cache = forward_cached(cfg, params, prefill, positions, cache)
  assert cache["k"].shape == (cfg.num_layers, 2, 24, cfg.num_heads * cfg.head_dim)
  for b, n in enumerate(prompt_lens):
    assert rel_err(logits[b, :n], full[b, :n]) <= TOL

  pos = np.array(prompt_lens)
  for _ in range(steps):
    step_tokens = jnp.asarray(np.asarray(tokens)[np.arange(2), pos][:, None])
    logits, cache = forward_cached(cfg, params, step_tokens, jnp.asarray(pos[:, None], jnp.int32),
                                   cache)
    for b in range(2):
      assert rel_err(logits[b, 0], full[b, pos[b]]) <= TOL, (b, pos[b])
    pos = pos + 1


def test_init_cache_rejects_too_long():
  with pytest.raises(ValueError, match="block_size"):
    init_cache(base_config(), batch_size=1, max_len=65)


# ---------------------------------------------------------------------------------------------
# Variants: each trains (a few SGD steps on one batch) with finite grads and falling loss.


def cross_entropy(cfg, params, tokens_BT, rng, deterministic):
  logits_BTV = GPT(cfg).apply({"params": params}, tokens_BT[:, :-1],
                              deterministic=deterministic, rngs={"dropout": rng})
  logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1).mean()


@functools.partial(jax.jit, static_argnames=("cfg",), compiler_options=FAST_COMPILE)
def sgd_step(cfg, params, tokens_BT, rng, lr):
  """(loss, grads, params after one SGD step), in training mode (dropout on where set)."""
  loss, grads = jax.value_and_grad(cross_entropy, argnums=1)(cfg, params, tokens_BT, rng, False)
  return loss, grads, jax.tree_util.tree_map(lambda w, g: w - lr * g, params, grads)


def sgd_run(cfg, params, tokens_BT, steps=4, lr=0.3):
  """Losses before each of `steps` SGD steps and after the last; grads of the first step."""
  losses, first_grads = [], None
  for i in range(steps + 1):
    loss, grads, params = sgd_step(cfg, params, tokens_BT, key(100 + i), lr)
    losses.append(float(loss))
    first_grads = grads if first_grads is None else first_grads
  return losses, first_grads


# Independent options are paired to halve the compiles; remat variants keep the base weights
# and must reproduce the base gradients.
VARIANTS = {
    "base": {},
    "sinusoidal_relu": dict(position_embedding="sinusoidal", activation="relu"),
    "post_ln_gelu": dict(norm_placement="post", activation="gelu"),
    "untied_padded_vocab": dict(tie_embeddings=False, padded_vocab_size=192),
    "no_bias_dropout": dict(use_bias=False, embd_dropout=0.1, attn_dropout=0.1,
                            resid_dropout=0.1),
    "remat_full": dict(remat="full"),
    "remat_dots_no_batch": dict(remat="dots_no_batch"),
    "scan_remat_dots": dict(scan_layers=True, remat="dots"),
}


@pytest.fixture(scope="module")
def train_tokens():
  return random_tokens(3, (4, 17), 128)


@pytest.fixture(scope="module")
def base_run(base, train_tokens):
  cfg, params = base
  return sgd_run(cfg, params, train_tokens)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains(name, base, base_run, train_tokens):
  cfg = base_config(**VARIANTS[name])
  params = params_like(cfg, base[1])
  losses, grads = base_run if name == "base" else sgd_run(cfg, params, train_tokens)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.isfinite(g).all()) for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
  if cfg.remat != "none":  # same weights, same gradients
    base_grads = base_run[1]
    expected = stack_layers(base_grads, cfg.num_layers) if cfg.scan_layers else base_grads
    assert_close(grads, expected, TOL, name)


def test_variant_parameter_sets():
  def names(**overrides):
    return set(abstract_params(base_config(**overrides)))
  assert "wpe" not in names(position_embedding="sinusoidal")
  assert "ln_f" not in names(norm_placement="post")
  assert "lm_head" in names(tie_embeddings=False) and "lm_head" not in names()
  no_bias = abstract_params(base_config(use_bias=False))
  assert not any("bias" in jax.tree_util.keystr(path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(no_bias))


def test_sinusoidal_positions_formula():
  pe = np.asarray(sinusoidal_positions(jnp.arange(5)[None], 8))[0]
  p, i = 3, 2
  np.testing.assert_allclose(pe[p, 2 * i], math.sin(p / 10000 ** (2 * i / 8)), rtol=1e-6)
  np.testing.assert_allclose(pe[p, 2 * i + 1], math.cos(p / 10000 ** (2 * i / 8)), rtol=1e-6)


def test_padded_vocab(base, tokens):
  cfg, params = base
  padded_cfg = cfg.replace(padded_vocab_size=192)
  padded = params_like(padded_cfg, params)
  padded["wte"]["embedding"] = padded["wte"]["embedding"].at[:128].set(
      params["wte"]["embedding"])
  logits = forward(padded_cfg, padded, tokens)
  assert logits.shape == (2, 24, 192)
  assert bool((logits[..., 128:] == MASK_VALUE).all())
  assert int(logits.argmax(-1).max()) < 128
  assert rel_err(logits[..., :128], forward(cfg, params, tokens)) <= TOL


def test_dropout_only_when_not_deterministic(base, tokens):
  cfg = base_config(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  params = base[1]
  no_dropout = forward(base[0], params, tokens)
  np.testing.assert_array_equal(forward(cfg, params, tokens, key(1)), no_dropout)
  a = forward(cfg, params, tokens, key(1), deterministic=False)
  b = forward(cfg, params, tokens, key(2), deterministic=False)
  again = forward(cfg, params, tokens, key(1), deterministic=False)
  assert rel_err(a, no_dropout) > 1e-3 and rel_err(a, b) > 1e-3
  np.testing.assert_array_equal(a, again)


# ---------------------------------------------------------------------------------------------
# Initialisation statistics


def test_init_statistics():
  """Sample std of n draws has relative standard error ~1/sqrt(2n); allow 6 of those."""
  cfg = get_config("tiny", vocab_size=256, d_model=128, num_heads=4, num_layers=4,
                   scan_layers=True)
  params = jax.jit(init_params, static_argnums=0, compiler_options=FAST_COMPILE)(cfg, key(7))
  h = params["h"]
  assert "h_0" not in params and h["mlp"]["c_fc"]["kernel"].shape == (4, 128, 512)
  residual = 0.02 / math.sqrt(2 * cfg.num_layers)
  for name, x, std in [
      ("wte", params["wte"]["embedding"], 0.02), ("wpe", params["wpe"]["embedding"], 0.02),
      ("c_attn", h["attn"]["c_attn"]["kernel"], 0.02), ("c_fc", h["mlp"]["c_fc"]["kernel"], 0.02),
      ("attn.c_proj", h["attn"]["c_proj"]["kernel"], residual),
      ("mlp.c_proj", h["mlp"]["c_proj"]["kernel"], residual)]:
    x = np.asarray(x, np.float64)
    n = x.size
    assert abs(x.std() / std - 1) < 6 / math.sqrt(2 * n), (name, x.std(), std)
    assert abs(x.mean()) < 6 * std / math.sqrt(n), (name, x.mean())
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path)
    if name.endswith("['bias']"):
      assert not np.asarray(x).any(), name
    if name.endswith("['scale']"):
      np.testing.assert_array_equal(x, 1.0, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Layers


def test_layer_norm_equals_flax_layer_norm():
  """model.blocks.LayerNorm is nn.LayerNorm(use_fast_variance=False), values and grads."""
  cfg = get_config("tiny")
  x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model)) * 3.0 + 1.0
  params = {"scale": jax.random.normal(jax.random.key(2), (cfg.d_model,)),
            "bias": jax.random.normal(jax.random.key(3), (cfg.d_model,))}
  ours = lambda p, x: LayerNorm(cfg).apply({"params": p}, x)
  ref = lambda p, x: nn.LayerNorm(epsilon=cfg.norm_eps,
                                  use_fast_variance=False).apply({"params": p}, x)
  assert rel_err(ours(params, x), ref(params, x)) < TOL
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))
  assert_close(jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(ref), (0, 1))(params, x),
               TOL, "grads")


@pytest.mark.parametrize("rows", [65, 2048])  # one-hot matmul / gather
def test_embedding_lookup_values_and_gradient(rows):
  """Both lookup paths return exactly the table's rows; the gradient is the per-row sum."""
  assert (rows <= ONE_HOT_LOOKUP_ROWS) == (rows == 65)
  table = jax.random.normal(jax.random.key(0), (rows, 16))
  ids = jax.random.randint(jax.random.key(1), (3, 7), 0, rows)
  embed = nn.Embed(rows, 16)
  lookup = lambda t: embed.apply({"params": {"embedding": t}}, ids,
                                 method=lambda m, i: _lookup(m, i, None))
  np.testing.assert_array_equal(lookup(table), table[ids])
  w = jax.random.normal(jax.random.key(2), (3, 7, 16))
  grad = jax.grad(lambda t: jnp.sum(lookup(t) * w))(table)
  expected = np.zeros((rows, 16))
  np.add.at(expected, np.asarray(ids), np.asarray(w, np.float64))
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)
