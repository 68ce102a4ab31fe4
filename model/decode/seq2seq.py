"""Generation from an encoder-decoder model (cfg.family == "encdec"): the source is encoded once,
each decoder layer's cross-attention keys and values are computed once (model/encdec.py:
start_cache), and the target grows token by token with the self-attention KV cache, in one
jitted `lax.while_loop` per batch.

    outs = generate(params, cfg, sources, max_new_tokens=64)                   # greedy
    outs = generate(params, cfg, sources, max_new_tokens=64, temperature=0.8, top_k=40)
    outs = generate(params, cfg, sources, max_new_tokens=64, num_beams=4, length_penalty=1.0)

`sources` are lists of token ids (at most block_size each); each output is the list of
generated ids after the decoder's start token (cfg.bos_id), cut before the first cfg.eos_id,
plus whether it ended at eos. Sampling settings mean what they mean for GPT (decode/logits.py);
`seed` keys the draws.

Beam search follows Hugging Face transformers' (5.x, `GenerationMixin._beam_search`), so that
the same model gives the same output: every step the 2K best continuations of the K running
beams by summed log-probability; the K best that do not end at eos keep running; those among the
top K that end at eos (or reach max_new_tokens) enter the finished set with score
sum_logprob / length ** length_penalty (length = generated tokens, eos included), which keeps
its K best. The search stops when every running beam has no more room, when (early_stopping)
K hypotheses are finished, or when the best running beam's score / current length **
length_penalty cannot beat the worst finished one (transformers' early_stopping=False
heuristic). The answer is the best finished hypothesis.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.encdec import decode, start_cache
from model.errors import UserError
from model.decode.logits import check_settings, sample_filtered, static_mode

NEG = -1.0e9  # transformers' "impossible" score


def check_sources(sources: Sequence[Sequence[int]], cfg: ModelConfig) -> None:
  if not sources:
    raise UserError("Give at least one source.")
  for i, src in enumerate(sources):
    if len(src) == 0:
      raise UserError(f"Source {i} is empty.")
    if len(src) > cfg.block_size:
      raise UserError(f"Source {i} has {len(src)} tokens, more than the model's "
                      f"{cfg.block_size} positions (block_size).")
    bad = [t for t in src if not 0 <= int(t) < cfg.vocab_size]
    if bad:
      raise UserError(f"Source {i} holds token id {bad[0]}, outside the vocabulary "
                      f"[0, {cfg.vocab_size}).")


def pad_sources(sources: Sequence[Sequence[int]], cfg: ModelConfig,
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [B, S], bool mask [B, S]) with S the longest source rounded up to a multiple of 8
  (fewer distinct compilations), at most block_size."""
  longest = max(len(s) for s in sources)
  S = length or min(-(-longest // 8) * 8, cfg.block_size)
  pad = max(cfg.pad_id, 0)
  src = np.full((len(sources), S), pad, np.int32)
  mask = np.zeros((len(sources), S), bool)
  for i, s in enumerate(sources):
    src[i, :len(s)] = s
    mask[i, :len(s)] = True
  return src, mask


def check_max_new_tokens(max_new_tokens, cfg: ModelConfig) -> None:
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
  if cfg.position_embedding == "learned" and max_new_tokens > cfg.block_size:
    raise UserError(f"max_new_tokens ({max_new_tokens}) exceeds the decoder's "
                    f"{cfg.block_size} positions (block_size).")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "mode"))
def _sample_loop(params, src_BS, mask_BS, seed, temperature, top_k, top_p, *, cfg: ModelConfig,
                 max_new_tokens: int, mode: int | None):
  """[B, max_new_tokens] generated ids (eos, then eos-filled after a row's end)."""
  B = src_BS.shape[0]
  M = max_new_tokens
  cache = start_cache(params, cfg, src_BS, mask_BS, M)
  key = jax.random.key(seed)

  def cond(carry):
    t, _, _, done_B, _ = carry
    return (t < M) & ~jnp.all(done_B)

  def body(carry):
    t, token_B, cache, done_B, out_BM = carry
    logits_B1V, cache = decode(params, cfg, token_B[:, None], jnp.full((B, 1), t, jnp.int32),
                               cache)
    nxt_B = sample_filtered(jax.random.fold_in(key, t), logits_B1V[:, 0], temperature, top_k,
                            top_p, mode, cfg.vocab_size)
    nxt_B = jnp.where(done_B, cfg.eos_id, nxt_B)
    out_BM = out_BM.at[:, t].set(nxt_B)
    return t + 1, nxt_B, cache, done_B | (nxt_B == cfg.eos_id), out_BM

  init = (jnp.zeros((), jnp.int32), jnp.full((B,), cfg.bos_id, jnp.int32), cache,
          jnp.zeros((B,), bool), jnp.full((B, M), cfg.eos_id, jnp.int32))
  return jax.lax.while_loop(cond, body, init)[4]


def _gather(x_BK, idx_BJ):
  """x[b, idx[b, j]] along axis 1 (any trailing axes)."""
  idx = idx_BJ.reshape(idx_BJ.shape + (1,) * (x_BK.ndim - 2))
  return jnp.take_along_axis(x_BK, idx, axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "num_beams",
                                             "early_stopping"))
def _beam_loop(params, src_BS, mask_BS, length_penalty, *, cfg: ModelConfig,
               max_new_tokens: int, num_beams: int, early_stopping: bool):
  """(sequences [B, K, M + 1] of the finished hypotheses, best first; their scores [B, K])."""
  B, S = src_BS.shape
  K, K2, M = num_beams, 2 * num_beams, max_new_tokens + 1  # M: decoder tokens incl. the start
  N = B * K
  # the decoder reads positions 0 .. M - 2 (the start, then all but the last token)
  cache = start_cache(params, cfg, jnp.repeat(src_BS, K, axis=0), jnp.repeat(mask_BS, K, axis=0),
                      M - 1)
  fill = cfg.pad_id if cfg.pad_id >= 0 else cfg.eos_id
  running = jnp.full((B, K, M), fill, jnp.int32).at[:, :, 0].set(cfg.bos_id)
  running_scores = jnp.where(jnp.arange(K) == 0, 0.0, NEG)[None].repeat(B, 0)
  top_mask = jnp.arange(K2) < K
  rows_B1 = jnp.arange(B)[:, None] * K

  def cond(c):
    return c["go"]

  def body(c):
    cur = c["cur"]
    tokens_N1 = jax.lax.dynamic_index_in_dim(c["running"], cur - 1, axis=2,
                                             keepdims=False).reshape(N, 1)
    logits_N1V, cache = decode(params, cfg, tokens_N1, jnp.full((N, 1), cur - 1, jnp.int32),
                               c["cache"])
    logp_NV = jax.nn.log_softmax(logits_N1V[:, 0].astype(jnp.float32), axis=-1)
    V = logp_NV.shape[-1]
    acc_BKV = logp_NV.reshape(B, K, V) + c["running_scores"][:, :, None]
    top_lp, top_idx = jax.lax.top_k(acc_BKV.reshape(B, K * V), K2)
    beam_BJ, token_BJ = top_idx // V, (top_idx % V).astype(jnp.int32)
    top_seq = _gather(c["running"], beam_BJ)
    top_seq = jax.lax.dynamic_update_index_in_dim(top_seq, token_BJ, cur, axis=2)
    hits = (token_BJ == cfg.eos_id) | (cur + 1 >= M)
    # beams that keep running
    run_lp = top_lp + hits.astype(jnp.float32) * NEG
    keep = jax.lax.top_k(run_lp, K)[1]
    running, running_scores = _gather(top_seq, keep), _gather(run_lp, keep)
    parent_BK = _gather(beam_BJ, keep)
    # the finished set
    norm = top_lp / (cur.astype(jnp.float32) ** length_penalty)
    full = jnp.all(c["finished"], axis=-1, keepdims=True) & early_stopping
    norm = norm + full.astype(jnp.float32) * NEG
    norm = norm + (~c["unsat"]).astype(jnp.float32) * NEG
    just = hits & top_mask[None]
    norm = norm + (~just).astype(jnp.float32) * NEG
    merged_seq = jnp.concatenate([c["seqs"], top_seq], axis=1)
    merged_scores = jnp.concatenate([c["scores"], norm], axis=1)
    merged_fin = jnp.concatenate([c["finished"], just], axis=1)
    best = jax.lax.top_k(merged_scores, K)[1]
    seqs, scores, finished = (_gather(merged_seq, best), _gather(merged_scores, best),
                              _gather(merged_fin, best))
    # the cache rows follow their beams
    rows_N = (rows_B1 + parent_BK).reshape(N)
    cache = dict(cache, k=cache["k"][:, rows_N], v=cache["v"][:, rows_N])
    cur = cur + 1
    best_possible = running_scores[:, :1] / ((cur - 1).astype(jnp.float32) ** length_penalty)
    worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    unsat = c["unsat"] & jnp.any(best_possible > worst, axis=-1, keepdims=True)
    go = (jnp.any(unsat) & ~(jnp.all(finished) & early_stopping) & ~jnp.all(hits)
          & (cur < M))
    return dict(cur=cur, running=running, running_scores=running_scores, seqs=seqs,
                scores=scores, finished=finished, unsat=unsat, cache=cache, go=go)

  init = dict(cur=jnp.ones((), jnp.int32), running=running, running_scores=running_scores,
              seqs=running, scores=jnp.full((B, K), NEG), finished=jnp.zeros((B, K), bool),
              unsat=jnp.ones((B, 1), bool), cache=cache, go=jnp.asarray(M > 1))
  out = jax.lax.while_loop(cond, body, init)
  return out["seqs"], out["scores"]


def _cut(row: np.ndarray, eos_id: int) -> tuple[list[int], bool]:
  ids = [int(t) for t in row]
  if eos_id in ids:
    return ids[:ids.index(eos_id)], True
  return ids, False


def generate(params, cfg: ModelConfig, sources: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
             batch_size: int | None = None) -> list[tuple[list[int], bool]]:
  """(generated ids without the start token, cut before eos; whether eos ended it) per source.
  num_beams > 1 is beam search (deterministic: sampling settings must be greedy's defaults).
  batch_size (default: all) splits the sources into batches of that many (each compiled once
  per shape)."""
  if cfg.family != "encdec":
    raise UserError(f"Sequence-to-sequence generation needs an encoder-decoder model "
                    f"(family 'encdec'), not {cfg.family!r}.")
  if cfg.bos_id < 0 or cfg.eos_id < 0:
    raise UserError("Generation needs the model's bos_id (the decoder's first input) and "
                    "eos_id; this ModelConfig has none.")
  check_sources(sources, cfg)
  check_max_new_tokens(max_new_tokens, cfg)
  check_settings(temperature, top_k, top_p)
  if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
    raise UserError(f"num_beams must be a positive integer, got {num_beams!r}.")
  if num_beams > 1 and (temperature != 0.0 or top_k or top_p != 1.0):
    raise UserError("Beam search (num_beams > 1) is deterministic: leave temperature at 0 and "
                    "top_k / top_p unset.")
  if num_beams > 1 and cfg.eos_id < 0:
    raise UserError("Beam search needs the model's eos_id.")
  step = batch_size or len(sources)
  out = []
  for lo in range(0, len(sources), step):
    chunk = sources[lo:lo + step]
    src, mask = pad_sources(chunk, cfg)
    if num_beams == 1:
      rows = _sample_loop(params, src, mask, seed + lo, temperature, top_k, top_p, cfg=cfg,
                          max_new_tokens=max_new_tokens,
                          mode=static_mode(temperature, top_k, top_p))
    else:
      seqs, _ = _beam_loop(params, src, mask, float(length_penalty), cfg=cfg,
                           max_new_tokens=max_new_tokens, num_beams=num_beams,
                           early_stopping=bool(early_stopping))
      rows = seqs[:, 0, 1:]
    if not getattr(rows, "is_fully_addressable", True):  # several processes: every row
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      rows = multihost_utils.process_allgather(rows, tiled=True)
    out.extend(_cut(r, cfg.eos_id) for r in np.asarray(jax.device_get(rows)))
  return out
