"""training/step.py: the train step on every mesh, gradient accumulation, the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import MESH_CFG, random_batch, rel_err, two_step_losses
from model.config import get_config
from sharding import make_mesh
from training.step import cross_entropy, train_step


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
  for p0, a, b in zip(jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(s4.params),
                      jax.tree_util.tree_leaves(s1.params)):
    assert rel_err(a - p0, b - p0) <= 1e-5  # the updates themselves


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
