"""Loss per token, perplexity and bits per byte of a model on a held-out token stream (behind
`launch.eval`).

The window rule. The data is tokenized as one stream s_0 .. s_{N-1}; every token but the first
(which has no context) is a target, scored exactly once. With the model's block size T and a
stride S (default T), window k starts at b = k * S, feeds the n = min(T, N - 1 - b) tokens
s_b .. s_{b+n-1} at positions 0 .. n-1 and predicts s_{b+1} .. s_{b+n}; it scores only the
targets the windows before it have not (positions t >= scored_end - b). The last window is the
first that reaches s_{N-1}.
  S = T: windows do not overlap; the target at position t of its window sees t + 1 tokens.
  S < T: Hugging Face's perplexity-guide method ("sliding window"): after the first window,
         each window scores its last S targets only, each seeing at least T - S + 1 tokens.
  (Unlike the guide's code, a window here is T inputs and the token after them, so no target
  at a window's start goes unscored.)
Reported: mean loss = total nats / targets scored, perplexity = exp(mean loss), and bits per
byte = total nats / ln 2 / the UTF-8 bytes of s_1 .. s_{N-1}.

    plan = plan_windows(num_tokens, block_size=T, stride=S)      # [(b, n, t0), ...]
    result = evaluate(params, cfg, tokens, mesh=mesh, stride=S)  # sharded over the mesh
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from model.config import ModelConfig
from model.errors import NotFoundError, UserError
from sharding import (DEFAULT_RULES, batch_size_multiple, is_cpu, param_shardings,
                      process_batch_indices, shard_batch)
from training.data.bin import Progress
from training.step import compile_score_step

DATA_KINDS = ("text", "bin", "tfds", "chat")  # chat: training/evaluate_chat.py


@dataclasses.dataclass(frozen=True)
class Window:
  start: int        # b: the stream index of the window's first input
  length: int       # n: inputs fed (targets s_{b+1} .. s_{b+n})
  first_scored: int  # t0: positions t0 .. n-1 are scored


@dataclasses.dataclass(frozen=True)
class EvalResult:
  loss: float            # mean nats per scored token
  perplexity: float
  bits_per_byte: float | None  # None when the byte count is unknown (0 bytes)
  tokens: int            # targets scored
  bytes: int
  windows: int
  seconds: float

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_stride(stride: Any, block_size: int) -> int:
  if stride is None:
    return block_size
  if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not (
      1 <= stride <= block_size):
    raise UserError(f"--stride must be an integer in [1, block_size = {block_size}], got "
                    f"{stride!r}.")
  return int(stride)


def plan_windows(num_tokens: int, *, block_size: int, stride: int | None = None) -> list[Window]:
  """The windows of the rule in the module docstring; UserError if the stream is shorter than
  one window (block_size + 1 tokens)."""
  stride = check_stride(stride, block_size)
  if num_tokens < block_size + 1:
    raise UserError(f"The data has {num_tokens:,} tokens, fewer than one window of the model's "
                    f"block_size + 1 = {block_size + 1:,} tokens; give a longer text.")
  windows, scored_end, b = [], 0, 0
  while scored_end < num_tokens - 1:
    n = min(block_size, num_tokens - 1 - b)
    windows.append(Window(b, n, max(0, scored_end - b)))
    scored_end = b + n
    b += stride
  return windows


def check_ids(tokens: np.ndarray, vocab_size: int, what: str = "The data") -> None:
  """UserError if a token id is outside the model's vocabulary (it would be scored as garbage)."""
  if len(tokens) and (int(tokens.max()) >= vocab_size or int(tokens.min()) < 0):
    bad = int(tokens.max()) if int(tokens.max()) >= vocab_size else int(tokens.min())
    raise UserError(f"{what} has token id {bad:,}, outside [0, {vocab_size:,}), the model's "
                    f"vocabulary; evaluate on data tokenized for this model.")


def window_batch(tokens: np.ndarray, windows: Sequence[Window], rows: int,
                 block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """int32 [rows, T + 1] tokens and float32 [rows, T] weights (1 where scored) of the windows;
  rows beyond len(windows) are padding with weight 0."""
  out = np.zeros((rows, block_size + 1), np.int32)
  weights = np.zeros((rows, block_size), np.float32)
  for r, w in enumerate(windows):
    out[r, :w.length + 1] = tokens[w.start:w.start + w.length + 1]
    weights[r, w.first_scored:w.length] = 1.0
  return out, weights


def score(params: Any, cfg: ModelConfig, tokens: np.ndarray, windows: Sequence[Window], *,
          mesh: Mesh, rules=DEFAULT_RULES, batch_size: int = 8,
          quiet: bool = False) -> tuple[float, int]:
  """(total nats, targets scored) of `windows` of `tokens` (every process passes them all),
  batch_size windows per step (rounded up to a multiple of the data-parallel size), split over
  the mesh like a training batch; one compiled step. `params` are placed on `mesh` with the
  model's logical shardings."""
  T = cfg.block_size
  multiple = batch_size_multiple(mesh, rules)
  B = -(-max(1, batch_size) // multiple) * multiple
  abstract = jax.tree_util.tree_map(
      lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params,
      param_shardings(cfg, mesh, rules))
  step = compile_score_step(cfg, mesh, abstract, (B, T + 1), rules)
  mine = process_batch_indices(B, mesh, rules)
  # Several CPU devices in one process: one step at a time (XLA:CPU can deadlock when queued
  # steps' collectives meet out of order; training/loop.py does the same).
  one_at_a_time = is_cpu(mesh) and mesh.devices.size > 1
  progress = Progress("scoring", len(windows), "windows", quiet=quiet)
  nats, scored, pending = 0.0, 0.0, None

  def read(done):  # the previous batch's sums, read back while the next one runs
    nonlocal nats, scored
    (total, count), n = jax.device_get(done[0]), done[1]
    # float64 on the host: a sum over millions of tokens in float32 would lose digits.
    nats, scored = nats + float(total), scored + float(count)
    progress.update(n, int(count))

  for lo in range(0, len(windows), B):
    batch = windows[lo:lo + B]
    tok, wts = window_batch(tokens, batch, B, T)
    out = step(params, shard_batch(tok[mine], mesh, rules), shard_batch(wts[mine], mesh, rules))
    if one_at_a_time:
      jax.block_until_ready(out)
    if pending is not None:
      read(pending)
    pending = (out, len(batch))
  read(pending)
  progress.close()
  return nats, int(round(scored))


def evaluate(params: Any, cfg: ModelConfig, tokens: np.ndarray, *, mesh: Mesh,
             rules=DEFAULT_RULES, stride: int | None = None, batch_size: int = 8,
             num_bytes: int = 0, quiet: bool = False) -> EvalResult:
  """The stream `tokens` scored by the window rule (module docstring) with `stride`.
  `num_bytes`: the UTF-8 bytes of tokens[1:], for bits per byte."""
  t_start = time.perf_counter()
  tokens = np.asarray(tokens)
  check_ids(tokens, cfg.vocab_size)
  windows = plan_windows(len(tokens), block_size=cfg.block_size, stride=stride)
  nats, scored = score(params, cfg, tokens, windows, mesh=mesh, rules=rules,
                       batch_size=batch_size, quiet=quiet)
  if scored != len(tokens) - 1:
    raise AssertionError(f"scored {scored} targets of {len(tokens) - 1}")
  loss = nats / scored
  return EvalResult(loss=loss, perplexity=math.exp(loss),
                    bits_per_byte=nats / math.log(2) / num_bytes if num_bytes else None,
                    tokens=scored, bytes=num_bytes, windows=len(windows),
                    seconds=time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------
# Data: --data text:PATH | bin:DIR[:train|val] | tfds:NAME:SPLIT


def parse_data_spec(spec: str) -> tuple[str, str, str]:
  """(kind, path or name, split) of a --data value."""
  kind, sep, rest = (spec or "").partition(":")
  if not sep or kind not in DATA_KINDS or not rest:
    raise UserError(f"--data must be text:PATH, bin:DIR[:train|val], tfds:NAME:SPLIT or "
                    f"chat:FILE, got {spec!r}.")
  if kind in ("text", "chat"):
    return kind, rest, ""
  if kind == "bin":
    path, _, split = rest.rpartition(":") if rest.rsplit(":", 1)[-1] in ("train", "val") else (
        rest, "", "")
    return kind, path, split or "val"
  bracket = rest.find("[")  # a split slice such as test[:1%] holds ':' itself
  head, tail = (rest[:bracket], rest[bracket:]) if bracket >= 0 else (rest, "")
  name, _, split = head.rpartition(":")
  split += tail
  if not name or not split:
    raise UserError(f"--data tfds:NAME:SPLIT needs a dataset name and a split, got {spec!r}.")
  return kind, name, split


def read_tokens(spec: str, tokenizer, *, block_size: int, max_tokens: int | None = None,
                quiet: bool = False) -> tuple[np.ndarray, str]:
  """The token stream of --data (tokenized with the model's `tokenizer`; a bin directory must
  have been prepared with it), cut to max_tokens, and a description."""
  from training.run import check_same_tokenizer  # pylint: disable=import-outside-toplevel
  kind, where, split = parse_data_spec(spec)
  if kind == "text":
    path = os.path.expanduser(where)
    if not os.path.isfile(path):
      raise NotFoundError(f"--data text file {where!r} does not exist.")
    try:
      with open(path, encoding="utf-8") as f:
        text = f.read(None if max_tokens is None else max(16 * max_tokens, 1 << 16))
    except UnicodeDecodeError as e:
      raise UserError(f"--data text file {where!r} is not UTF-8 text ({e.reason} at byte "
                      f"{e.start}).") from None
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    desc = f"text {where}"
  elif kind == "bin":
    from training.data.lm import TokenFileSource  # pylint: disable=import-outside-toplevel
    source = TokenFileSource(os.path.expanduser(where), name="bin", seq_len=block_size,
                             global_batch_size=1, seed=0, process_index=0, process_count=1)
    check_same_tokenizer(source.tokenizer, tokenizer.to_dict(), f"--data {spec!r}")
    tokens = np.asarray(source.tokens[split][:max_tokens], np.int32)
    desc = f"bin {where} ({split}.bin)"
  else:
    from training.data import tfds as tfds_data  # pylint: disable=import-outside-toplevel
    source = tfds_data._tfds_sources(where, {"eval": split})["eval"]  # pylint: disable=protected-access
    eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]
    pieces, count = [], 0
    for docs in tfds_data._documents(source, "text"):  # pylint: disable=protected-access
      for ids in tokenizer.encode_batch(docs):
        pieces.append(np.asarray(ids + eot, np.int32))
        count += len(ids) + len(eot)
      if max_tokens is not None and count >= max_tokens:
        break
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    desc = f"tfds {where} split {split} (documents joined by <|endoftext|>)"
  if max_tokens is not None:
    tokens = tokens[:max_tokens]
  return tokens, desc
