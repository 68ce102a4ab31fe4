"""model/kv_cache.py: chunked attention over the cache equals the reference attention, and a
decode loop updates the cache in place (no copy of the whole cache in the compiled program)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from conftest import rel_err
from model import kv_cache
from model.decode.sampling import Buckets, _decode, _start
from model.blocks import causal_mask, reference_attention
from model.layout import stack_layers

# float32 scores and softmax; the online softmax only reorders the sums.
TOL = 1e-5


@pytest.mark.parametrize("num_chunks", [None, 3])
def test_chunked_attention_matches_reference(num_chunks):
  L, B, S, H, K, T = 2, 3, 3 * kv_cache.CACHE_CHUNK, 4, 8, 2
  rng = np.random.default_rng(0)
  k_LBSD = jnp.asarray(rng.standard_normal((L, B, S, H * K)), jnp.float32)
  v_LBSD = jnp.asarray(rng.standard_normal((L, B, S, H * K)), jnp.float32)
  q_BTHK = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)
  # Ragged rows: one in the first chunk, one in the second, one at the very end.
  positions_BT = jnp.asarray([[3, 4], [200, 201], [S - 2, S - 1]], jnp.int32)
  layer = 1
  got = jax.jit(kv_cache.cached_attention, static_argnames="num_chunks")(
      q_BTHK, k_LBSD, v_LBSD, layer, positions_BT, num_chunks=num_chunks)
  expected = reference_attention(q_BTHK, k_LBSD[layer].reshape(B, S, H, K),
                                 v_LBSD[layer].reshape(B, S, H, K), causal_mask(positions_BT, S))
  assert rel_err(got, expected) <= TOL


def test_write_cache_sets_only_the_given_slots():
  cache = jnp.zeros((2, 2, 8, 6))
  new_BTHK = jnp.arange(2 * 2 * 6, dtype=jnp.float32).reshape(2, 2, 2, 3) + 1
  out = np.asarray(kv_cache.write_cache(cache, 1, jnp.asarray([[0, 1], [5, 6]]), new_BTHK))
  expected = np.zeros((2, 2, 8, 6))
  expected[1, 0, [0, 1]] = np.asarray(new_BTHK[0]).reshape(2, 6)
  expected[1, 1, [5, 6]] = np.asarray(new_BTHK[1]).reshape(2, 6)
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_loop_never_copies_the_cache(scan_layers):
  """The compiled decode loop (CPU) holds no copy of a whole-cache-shaped array: each layer's
  write is a scatter into the carried cache (a restacked cache would be a concatenate, a
  relayout a copy)."""
  cfg = model.get_config("tiny").replace(scan_layers=scan_layers)
  params = model.init_params(cfg, jax.random.key(0))
  if scan_layers:
    params = stack_layers(params, cfg.num_layers)
  run = _start(params, cfg, [[1, 2, 3], [4]], 4, 0.0, 0, 1.0, 0, None,
               Buckets(batch=2, prompt_len=8, cache_len=32, out_len=8))
  hlo = _decode.lower(params, run.state, jnp.asarray(4, jnp.int32), run.settings, cfg=cfg,
                      mode=run.mode).compile().as_text()
  shape = f"f32[{cfg.num_layers},2,32,{cfg.d_model}]"
  lines = [line for line in hlo.splitlines() if f"= {shape}" in line]
  assert any(" scatter(" in line or "fusion(" in line for line in lines)
  assert not [line for line in lines
              if any(op in line for op in (" copy(", " copy-start(", " concatenate("))], lines
