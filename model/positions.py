"""How positions enter the model: sinusoidal position vectors (Vaswani et al. 2017) and rotary
position embeddings (Su et al. 2021, in Hugging Face Llama's rotate-half pairing), at the given
per-token positions (which restart at each segment of a packed row: model/segments.py). Learned
positions are rows of the "wpe" table (model/blocks.py: embed)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def sinusoidal_positions(positions_BT: jax.Array, d_model: int) -> jax.Array:
  """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(same)."""
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d_model, 2, dtype=jnp.float32) / d_model))
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq
  return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
      *positions_BT.shape, d_model)


def rope_inv_freq(cfg: ModelConfig):
  """The K/2 rotary frequencies theta^(-2i/K) (float32, as Hugging Face computes them); with
  rope_scaling "llama3", Llama 3.1's: wavelengths above original_positions / low_freq_factor
  divided by rope_factor, below original_positions / high_freq_factor kept, a smooth blend
  between (transformers' _compute_llama3_parameters)."""
  K = cfg.head_dim
  inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, K, 2, dtype=np.float32) / K))
  inv_freq = inv_freq.astype(np.float32)
  if cfg.rope_scaling == "llama3":
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_positions
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv_freq = np.where(medium, blended, scaled).astype(np.float32)
  return inv_freq


def rotary(x_BTNK, positions_BT, cfg: ModelConfig):
  """Rotary position embedding of queries or keys [B, T, N, K] at positions_BT, in Hugging
  Face Llama's rotate-half pairing: x * cos + rotate_half(x) * sin, rotate_half(x) =
  (-x[K/2:], x[:K/2]), angles p * inv_freq repeated for both halves; cos and sin in float32,
  applied in x's dtype (as transformers does)."""
  angles_BTk = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
  angles_BTK = jnp.concatenate([angles_BTk, angles_BTk], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles_BTK).astype(x_BTNK.dtype), jnp.sin(angles_BTK).astype(x_BTNK.dtype)
  half = x_BTNK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BTNK[..., half:], x_BTNK[..., :half]], axis=-1)
  return x_BTNK * cos + rotated * sin
