"""Fill-mask with an encoder (cfg.family == "bert"): the top-k candidates for each mask token.

    results = fill_mask(params, cfg, [ids, ...], mask_id=cfg.mask_id, top_k=5)
    results[row] == [(position, [(token_id, probability), ...]), ...]   # one entry per mask

All rows run as one padded batch (the padding masked out), in one jitted forward pass;
probabilities are the softmax over the model's vocabulary at each mask position, the
candidates exclude the special tokens given in `exclude` (pad / bos / eos / mask).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.encoder import Encoder
from model.errors import UserError


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def _top_k(params, tokens_BT, mask_BT, exclude_V, *, cfg: ModelConfig, top_k: int):
  logits_BTV = Encoder(cfg).apply({"params": params}, tokens_BT, mask_BT)
  logits_BTV = jnp.where(exclude_V, -jnp.inf, logits_BTV[..., :cfg.vocab_size])
  probs_BTV = jax.nn.softmax(logits_BTV, axis=-1)
  return jax.lax.top_k(probs_BTV, top_k)


def fill_mask(params, cfg: ModelConfig, rows: Sequence[Sequence[int]], *, mask_id: int,
              top_k: int = 5, exclude: Sequence[int] = ()) -> list[list[tuple[int, list]]]:
  """For each row, (position, [(token, probability)] * top_k) of every mask token, in order."""
  if cfg.family != "bert":
    raise UserError(f"Fill-mask needs an encoder model (family 'bert'), not {cfg.family!r}.")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= cfg.vocab_size:
    raise UserError(f"top_k must be in [1, {cfg.vocab_size}] for fill-mask, got {top_k!r}.")
  longest = max(len(r) for r in rows)
  if longest > cfg.block_size:
    raise UserError(f"A prompt has {longest} tokens, more than the model's {cfg.block_size} "
                    f"positions (block_size).")
  T = min(-(-longest // 8) * 8, cfg.block_size)
  tokens = np.full((len(rows), T), max(cfg.pad_id, 0), np.int32)
  mask = np.zeros((len(rows), T), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  exclude_V = np.zeros(cfg.vocab_size, bool)
  exclude_V[[e for e in exclude if 0 <= e < cfg.vocab_size]] = True
  probs, ids = jax.device_get(_top_k(params, tokens, mask, exclude_V, cfg=cfg, top_k=top_k))
  out = []
  for i, r in enumerate(rows):
    out.append([(t, [(int(ids[i, t, k]), float(probs[i, t, k])) for k in range(top_k)])
                for t, token in enumerate(r) if token == mask_id])
  return out
