"""A GPT whose greedy continuation of any prompt of a given length is a chosen token sequence:
for tests that need a real server to stream chosen text (emoji, CJK) through a real tokenizer.

Every block's output projections are zero, so the residual stream at position p is
wte[token] + wpe[p]. wte's rows are random unit vectors (nearly orthogonal in D dimensions:
their largest cosine with another row is ~0.6 for D = 64 and 50k rows) and wpe[p] is
SCALE * wte[target] for the position p that predicts `target`, so after ln_f the tied LM head's
largest logit there is the target token, whatever the prompt's tokens are."""

import jax
import numpy as np

from model.config import get_config
from model.families import init_params

SCALE = 30.0


def scripted_gpt(vocab_size: int, prompt_len: int, target_ids, *, d_model: int = 64,
                 block_size: int = 64, seed: int = 0):
  """(cfg, params) of a 1-layer GPT-2 whose greedy continuation of a prompt of prompt_len
  tokens is target_ids."""
  if prompt_len + len(target_ids) > block_size:
    raise ValueError("prompt and target longer than block_size")
  cfg = get_config("gpt2", num_layers=1, d_model=d_model, num_heads=2, d_mlp=2 * d_model,
                   vocab_size=vocab_size, padded_vocab_size=vocab_size, block_size=block_size)
  params = jax.tree_util.tree_map(np.array, init_params(cfg, jax.random.key(seed)))
  rng = np.random.default_rng(seed)
  wte = rng.standard_normal((vocab_size, d_model)).astype(np.float32)
  wte /= np.linalg.norm(wte, axis=1, keepdims=True)
  wpe = np.zeros((block_size, d_model), np.float32)
  for i, token in enumerate(target_ids):
    wpe[prompt_len - 1 + i] = SCALE * wte[token]
  params["wte"]["embedding"], params["wpe"]["embedding"] = wte, wpe
  for name, block in params.items():
    if name.startswith("h_"):
      for proj in (block["attn"]["c_proj"], block["mlp"]["c_proj"]):
        proj["kernel"] = np.zeros_like(proj["kernel"])
        proj["bias"] = np.zeros_like(proj["bias"])
  return cfg, params
