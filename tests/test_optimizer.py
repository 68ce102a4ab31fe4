"""training/optimizer.py: nanoGPT's schedule and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import optimizer_config
from training.optimizer import decay_mask, lr_schedule, make_optimizer, schedule_from_config


def test_schedule_warmup_peak_cosine_floor():
  lr = lr_schedule(1e-3, 1e-4, warmup_steps=100, decay_steps=2000)
  np.testing.assert_allclose(lr(0), 1e-3 / 101, rtol=1e-6)  # nanoGPT: lr * (it + 1) / (w + 1)
  np.testing.assert_allclose(lr(99), 1e-3 * 100 / 101, rtol=1e-6)
  np.testing.assert_allclose(lr(100), 1e-3, rtol=1e-6)  # peak
  np.testing.assert_allclose(lr(1050), 5.5e-4, rtol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose(lr(2000), 1e-4, rtol=1e-6)  # end
  np.testing.assert_allclose(lr(5000), 1e-4, rtol=1e-6)  # floor after decay_steps
  opt = optimizer_config(warmup_steps=100)
  np.testing.assert_allclose(schedule_from_config(opt, 2000)(2000), 1e-4, rtol=1e-6)


def test_weight_decay_only_on_matrices(single_device_run):
  params = jax.device_get(single_device_run[1].params)  # tiny, one layer
  flat = {"/".join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
  assert flat["h_0/attn/c_attn/kernel"] and flat["h_0/mlp/c_fc/kernel"]
  assert not flat["h_0/attn/c_attn/bias"] and not flat["h_0/ln_1/scale"]
  assert not flat["ln_f/bias"] and not flat["wte/embedding"] and not flat["wpe/embedding"]
  with_emb = jax.tree_util.tree_leaves(decay_mask(params, decay_embeddings=True)["wte"])
  assert with_emb == [True]
  # Decay acts on a kernel (zero gradient, the parameter shrinks) but not on a bias.
  opt = optimizer_config(weight_decay=0.5, clip=0.0)
  tx = make_optimizer(opt, 10)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  params["h_0"]["attn"]["c_attn"]["bias"] = np.ones_like(params["h_0"]["attn"]["c_attn"]["bias"])
  updates, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p))(params)
  assert float(jnp.abs(updates["h_0"]["mlp"]["c_fc"]["kernel"]).max()) > 0
  assert float(jnp.abs(updates["h_0"]["attn"]["c_attn"]["bias"]).max()) == 0
  assert float(jnp.abs(updates["wte"]["embedding"]).max()) == 0
