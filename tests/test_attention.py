"""model/attention.py: the splash-attention kernel (Pallas interpret mode on the CPU) against
the reference attention, forward and gradients, alone and inside the model on a mesh; which
kernel each setting picks; errors for settings splash cannot run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention
from model.config import ModelConfig, get_config
from model.errors import UserError
from model.blocks import causal_mask, reference_attention
from model.families import init_params
from model.gpt import GPT
from sharding import DEFAULT_RULES, activate, make_mesh

from conftest import assert_close, rel_err


def _reference(q, k, v):
  T = q.shape[1]
  return reference_attention(q, k, v, causal_mask(jnp.arange(T)[None, :], T))


def _loss(fn, q, k, v):
  # A fixed, non-uniform cotangent so every output element's gradient path is checked.
  out = fn(q, k, v).astype(jnp.float32)
  w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32) * 0.37).reshape(out.shape)
  return jnp.sum(out * w)


@functools.partial(jax.jit, static_argnames="fn")
def value_and_grads(fn, q, k, v):
  return jax.value_and_grad(functools.partial(_loss, fn), argnums=(0, 1, 2))(q, k, v), fn(q, k, v)


# float32: the same sums in another order (online softmax); bf16: inputs, probabilities and
# outputs rounded to 8 bits of mantissa (~4e-3 relative each) in different places.
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_splash_matches_reference_attention(dtype, tol):
  B, T, H, K = 2, 256, 2, 64
  q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, K), jnp.float32).astype(dtype)
             for i in range(3))
  (loss, grads), out = value_and_grads(attention.splash_attention, q, k, v)
  (ref_loss, ref_grads), ref_out = value_and_grads(_reference, q, k, v)
  assert out.shape == (B, T, H, K) and out.dtype == dtype
  assert rel_err(out, ref_out) <= tol
  assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss)) + tol
  for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
    assert g.dtype == dtype
    assert rel_err(g, ref) <= tol, name
  # Causal: the first query attends to the first key only, so it outputs v[:, 0].
  np.testing.assert_allclose(np.asarray(out[:, 0], np.float32),
                             np.asarray(v[:, 0], np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_splash_with_grouped_key_value_heads_matches_the_reference(kv_heads):
  """Grouped-query (4 query heads, 2 key/value heads) and multi-query attention: splash's MQA
  kernel per key/value head against the grouped reference attention, forward and gradients
  (float32), and jax.nn.dot_product_attention (the XLA / cuDNN path) agrees."""
  B, T, H, K = 2, 128, 4, 32
  q = jax.random.normal(jax.random.key(0), (B, T, H, K), jnp.float32)
  k, v = (jax.random.normal(jax.random.key(i), (B, T, kv_heads, K), jnp.float32)
          for i in (1, 2))
  (loss, grads), out = value_and_grads(attention.splash_attention, q, k, v)
  (ref_loss, ref_grads), ref_out = value_and_grads(_reference, q, k, v)
  assert out.shape == (B, T, H, K)
  assert rel_err(out, ref_out) <= 1e-5
  assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)) + 1e-5
  for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
    assert g.shape == ref.shape and rel_err(g, ref) <= 1e-5, name
  xla = jax.nn.dot_product_attention(q, k, v, is_causal=True)
  assert rel_err(xla, ref_out) <= 1e-5
  # query head h reads key/value head h // (H / G): head 3 of MQA and GQA reads the last one
  one = reference_attention(q[:, :, 3:], k[:, :, -1:], v[:, :, -1:],
                            causal_mask(jnp.arange(T)[None, :], T))
  assert rel_err(out[:, :, 3:], one) <= 1e-5


LLAMA_GQA = dict(num_kv_heads=2, position_embedding="rotary", norm="rmsnorm",
                 activation="swiglu", use_bias=False)


@pytest.mark.parametrize("changes", [{}, LLAMA_GQA], ids=["gpt2", "llama-gqa"])
def test_splash_inside_the_model_on_a_mesh(changes):
  """GPT with attention=splash on data=2 x tensor=4 (shard_map over batch and heads) gives
  the reference attention's logits and gradients; also a Llama-style one whose 2 key/value
  heads cannot be split 4 ways (splash then keeps the heads whole on every device)."""
  cfg = ModelConfig(vocab_size=64, block_size=128, num_layers=1, num_heads=4, d_model=64,
                    **changes)
  params = init_params(cfg, jax.random.key(0, impl="rbg"))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 128)), jnp.int32)
  mesh = make_mesh(2, 1, 4)

  def logits_and_grads(c):
    def loss(p):
      logits = GPT(c).apply({"params": p}, tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
    with activate(mesh, DEFAULT_RULES):
      (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
      hlo = jax.jit(loss).lower(params).as_text()
    return logits, grads, hlo

  logits, grads, hlo = logits_and_grads(cfg.replace(attention="splash"))
  ref_logits, ref_grads, ref_hlo = logits_and_grads(cfg.replace(attention="xla"))
  assert "shard_map" in hlo or "sdy.manual_computation" in hlo, "splash ran without shard_map"
  assert "manual_computation" not in ref_hlo
  assert rel_err(logits, ref_logits) <= 1e-5
  assert_close(grads, ref_grads, 1e-5, "grads")  # float32 (measured 3e-7)


def test_which_kernel_each_setting_picks():
  pick = attention.implementation
  auto, bf16 = ModelConfig(), ModelConfig(dtype="bfloat16")
  assert pick(auto, 1024, False, "tpu") == "splash"
  assert pick(auto, 1000, False, "tpu") == "dot_product"  # splash needs multiples of 128
  assert pick(auto, 1024, True, "tpu") == "xla"  # attention dropout: the reference path
  assert pick(bf16, 1024, False, "gpu") == "cudnn"
  assert pick(auto, 1024, False, "gpu") == "dot_product"  # cuDNN flash needs bf16/fp16
  assert pick(auto, 1024, False, "cpu") == "dot_product"
  assert pick(ModelConfig(attention="xla"), 1024, False, "tpu") == "xla"
  assert pick(ModelConfig(attention="cudnn"), 1024, False, "gpu") == "cudnn"
  splash = ModelConfig(attention="splash")
  assert pick(splash, 1024, False, "tpu") == pick(splash, 256, False, "cpu") == "splash"
  assert pick(splash, 1024, True, "tpu") == "xla"
  assert [attention.splash_block_size(t) for t in (128, 384, 768, 1024, 2048)] == [
      128, 128, 256, 512, 512]


def test_splash_errors():
  splash = ModelConfig(attention="splash")
  with pytest.raises(UserError, match="multiple of 128, got 200"):
    attention.implementation(splash, 200, False, "tpu")
  with pytest.raises(UserError, match="needs a TPU .* not gpu"):
    attention.implementation(splash, 1024, False, "gpu")
  with pytest.raises(UserError, match="block_size to be a multiple of 128, got 64"):
    get_config("tiny", attention="splash")
  with pytest.raises(UserError, match="attention must be one of xla, cudnn, splash, auto"):
    ModelConfig(attention="flash")


def test_cudnn_forced_without_a_gpu_is_one_sentence_before_anything_runs(tmp_path, capsys):
  """model.attention=cudnn on a CPU: the kernel check, and launch.train stops in build_run
  (exit 2, one line, no workdir) instead of failing inside the compile."""
  from conftest import exit_status  # pylint: disable=import-outside-toplevel
  from launch import train as train_cli  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match=r"model.attention='cudnn' needs a GPU .* not cpu"):
    attention.implementation(ModelConfig(attention="cudnn"), 1024, False, "cpu")
  workdir = tmp_path / "run"
  assert exit_status(train_cli.main, ["--config", "configs/tiny.py", "--workdir", str(workdir),
                                      "--config.model.attention=cudnn"]) == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
  assert errors == ["error: model.attention='cudnn' needs a GPU (cuDNN's flash attention), not "
                    "cpu; use model.attention=auto."]
  assert not workdir.exists()
