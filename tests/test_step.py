"""training/step.py: the train step on every mesh, gradient accumulation, the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.core import jaxprs_in_params

from conftest import MESH_CFG, assert_close, random_batch, rel_err, two_step_losses
from model.config import get_config
from model.errors import UserError
from model.families import init_params
from sharding import DEFAULT_RULES, activate, make_mesh
from training.step import (check_loss_chunk, chunked_cross_entropy, cross_entropy, loss_fn,
                           train_step)


def test_grad_accumulation_matches_one_big_batch(single_device_run):
  # Plain SGD, so the update is -lr * gradient and compares element by element (Adam's first
  # step, lr * g / (|g| + eps), would amplify rounding where a gradient is near zero).
  cfg = get_config("tiny", **MESH_CFG)
  tx = optax.sgd(0.1)
  sched = lambda step: jnp.float32(0.1)
  state = single_device_run[1]
  state = state.replace(opt_state=tx.init(state.params))
  params0 = jax.device_get(state.params)
  tokens = jnp.asarray(random_batch(8, 16, 64))
  results = {}
  for k in (1, 4):
    step = jax.jit(lambda s, b, k=k: train_step(s, b, cfg=cfg, tx=tx, schedule=sched,
                                                grad_accum=k))
    results[k] = jax.device_get(step(state, tokens))
  (s1, m1), (s4, m4) = results[1], results[4]
  assert rel_err(m4["loss"], m1["loss"]) <= 1e-5
  assert rel_err(m4["grad_norm"], m1["grad_norm"]) <= 1e-5
  update = lambda s: jax.tree_util.tree_map(lambda a, p0: a - p0, s.params, params0)
  assert_close(update(s4), update(s1), 1e-5, "updates")  # the updates themselves


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_one_step_same_loss_on_every_mesh(shape, single_device_run):
  reference, initial = single_device_run
  losses, _ = two_step_losses(make_mesh(*shape), initial)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_cross_entropy_equals_optax_values_and_gradient():
  """The scatter-free cross-entropy is optax's, including with a masked padded vocabulary."""
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 4.0
  logits = logits.at[..., 9:].set(-1e30)  # padded entries, as the model writes them
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 9)
  ref = lambda l: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(l, targets))
  ours = lambda l: cross_entropy(l, targets)
  assert rel_err(ours(logits), ref(logits)) < 1e-6
  assert rel_err(jax.grad(ours)(logits), jax.grad(ref)(logits)) < 1e-6


# ---------------------------------------------------------------------------------------------
# the chunked loss


def _loss_and_grads(cfg, params, tokens, loss_chunk):
  fn = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(p, cfg, t, None, False, loss_chunk)))
  return fn(params, tokens)


@pytest.mark.parametrize("tied,chunk", [(True, 8), (False, 4)])
def test_chunked_loss_equals_the_full_loss_and_gradients(tied, chunk):
  """Chunks of 8 or 4 over T = 24, a padded vocabulary (100 of 128) and a tied or untied head:
  the loss and every gradient are the full logits' within float32 rounding (the same sums in
  another order)."""
  cfg = get_config("tiny", vocab_size=100, padded_vocab_size=128, tie_embeddings=tied)
  params = init_params(cfg, jax.random.key(0, impl="rbg"))
  tokens = jnp.asarray(random_batch(4, 24, 100, seed=3))
  full_loss, full_grads = _loss_and_grads(cfg, params, tokens, 0)
  loss, grads = _loss_and_grads(cfg, params, tokens, chunk)
  assert rel_err(loss, full_loss) <= 1e-6
  assert_close(grads, full_grads, 1e-5, "grads")


def test_chunked_loss_never_holds_the_full_logits():
  """No [B, T, V] array anywhere in the forward or backward program, only [B, chunk, V]. (A
  vocabulary above ONE_HOT_LOOKUP_ROWS, so the embedding lookup is a gather, not [B, T, V].)"""
  cfg = get_config("tiny", vocab_size=1100, padded_vocab_size=1152)
  params = init_params(cfg, jax.random.key(0, impl="rbg"))
  tokens = jnp.asarray(random_batch(4, 24, 1100))
  grad = lambda chunk: jax.value_and_grad(lambda p: loss_fn(p, cfg, tokens, None, False, chunk))

  def shapes(chunk):
    found = set()
    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        found.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for sub in jaxprs_in_params(eqn.params):
          walk(sub)
    walk(jax.make_jaxpr(grad(chunk))(params).jaxpr)
    return found

  assert (4, 24, 1152) in shapes(0)  # the check sees the full logits where they exist
  chunked = shapes(8)
  assert (4, 8, 1152) in chunked
  assert not [s for s in chunked if len(s) == 3 and s[-1] == 1152 and s[1] > 8], sorted(chunked)


def test_chunked_loss_in_the_sharded_train_step(single_device_run):
  """The train step on data=2 x fsdp=2 x tensor=2 (vocabulary split over tensor) with chunks of
  4 positions gives the full-logits step's loss and update."""
  cfg = get_config("tiny", **MESH_CFG)
  tx, sched = optax.sgd(0.1), lambda step: jnp.float32(0.1)
  state = single_device_run[1]
  state = state.replace(opt_state=tx.init(state.params))
  params = state.params
  tokens = jnp.asarray(random_batch(8, 16, 64))
  out = {}
  with activate(make_mesh(2, 2, 2), DEFAULT_RULES):
    for chunk in (0, 4):
      step = jax.jit(lambda s, b, c=chunk: train_step(s, b, cfg=cfg, tx=tx, schedule=sched,
                                                      loss_chunk=c))
      out[chunk] = jax.device_get(step(state, tokens))
  (s0, m0), (s4, m4) = out[0], out[4]
  assert rel_err(m4["loss"], m0["loss"]) <= 1e-6
  update = lambda s: jax.tree_util.tree_map(lambda a, p: a - p, s.params, params)
  assert_close(update(s4), update(s0), 1e-5, "updates")


@pytest.mark.parametrize("bad", [-1, 2.5, True, "64"])
def test_bad_loss_chunk_is_a_user_error(bad):
  with pytest.raises(UserError, match="config.train.loss_chunk must be"):
    check_loss_chunk(bad)


def test_loss_chunk_must_divide_the_sequence():
  with pytest.raises(UserError, match=r"loss_chunk \(10\) must divide the sequence length 24"):
    chunked_cross_entropy({}, get_config("tiny"), jnp.zeros((2, 24, 64)),
                          jnp.zeros((2, 24), jnp.int32), 10)


def test_dropout_masks_from_rbg_keep_their_rate_and_follow_the_key():
  """model.dropout_rng='rbg': masks from XLA's RngBitGenerator keep 1 - p of the entries, the
  same key draws the same mask and another key another; threefry's masks are today's."""
  from training.step import dropout_key  # pylint: disable=import-outside-toplevel
  rbg = get_config("tiny", dropout_rng="rbg")
  key = jax.random.fold_in(jax.random.key(3), 7)
  mask = lambda k: np.asarray(jax.random.bernoulli(k, 0.8, (1 << 20,)))
  assert jax.random.key_impl(dropout_key(key, rbg)) == jax.random.key_impl(
      jax.random.key(0, impl="rbg"))
  assert abs(mask(dropout_key(key, rbg)).mean() - 0.8) < 0.002  # 5 sigma at 2^20 draws
  np.testing.assert_array_equal(mask(dropout_key(key, rbg)), mask(dropout_key(key, rbg)))
  other = jax.random.fold_in(jax.random.key(3), 8)
  assert (mask(dropout_key(key, rbg)) != mask(dropout_key(other, rbg))).mean() > 0.2
  assert dropout_key(key, get_config("tiny")) is key


def test_the_dropout_generator_changes_only_dropout_losses():
  """Losses of one step: with dropout, rbg draws other masks than threefry (and the same ones
  twice); without dropout the generator changes nothing."""
  params = init_params(get_config("tiny"), jax.random.key(0))
  tokens = jnp.asarray(random_batch(4, 16, 64))
  key = jax.random.key(5)

  def loss(**changes):
    cfg = get_config("tiny", **changes)
    return float(jax.jit(lambda p: loss_fn(p, cfg, tokens, key, True))(params))

  drop = dict(embd_dropout=0.2, attn_dropout=0.2, resid_dropout=0.2)
  assert loss(dropout_rng="rbg", **drop) == loss(dropout_rng="rbg", **drop)
  assert loss(dropout_rng="rbg", **drop) != loss(**drop)
  assert loss(dropout_rng="rbg") == loss()
  with pytest.raises(UserError, match="dropout_rng must be one of threefry, rbg; got 'philox'"):
    get_config("tiny", dropout_rng="philox")
