"""The assistant-token loss of a model on a file of conversations (behind `launch.eval --data
chat:FILE`).

Every conversation of the file is rendered with the model's chat template and tokenized
(training/data/chat.py; one longer than the model's block size + 1 is left out and counted),
the conversations are packed best fit into rows of T + 1 (every one exactly once,
training/data/packing.py: pack_all) and scored as training scores a chat batch: the loss on
the assistant's tokens only, attention kept inside each conversation. Reported: the mean loss
over the assistant's tokens, its perplexity, the tokens scored and the conversations.

    result = evaluate_chats(params, cfg, path, template, tokenizer, mesh=mesh)
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.errors import UserError
from sharding import (DEFAULT_RULES, activate, batch_sharding, batch_size_multiple,
                      param_shardings, shard_batch)
from training.data.chat import encode_chats, messages_of
from training.data.chat_template import ChatTemplate
from training.data.examples import fit_examples, read_jsonl
from training.data.packing import Examples, pack_all
from training.step import loss_and_metrics


@dataclasses.dataclass(frozen=True)
class ChatEvalResult:
  loss: float        # mean nats per assistant token
  perplexity: float
  tokens: int        # assistant tokens scored
  conversations: int  # scored
  left_out: int      # longer than a row
  seconds: float

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def chat_rows(path: str, template: ChatTemplate, tokenizer, block_size: int,
              vocab_size: int) -> tuple[np.ndarray, int, int]:
  """(packed rows [R, 3 (T + 1)], conversations kept, conversations left out)."""
  chats = [(messages_of(v, where), where) for v, where in read_jsonl(path)]
  encoded = encode_chats(template, tokenizer, chats)
  for ids, _, where in encoded:
    if len(ids) and int(ids.max()) >= vocab_size:
      raise UserError(f"{where}: token id {int(ids.max())} is outside the model's vocabulary "
                      f"of {vocab_size}.")
  kept, left_out = fit_examples(encoded, block_size + 1, "drop", "conversation")
  if not kept:
    raise UserError(f"No conversation of {path} fits the model's {block_size + 1} positions.")
  return pack_all(Examples.of(kept), block_size + 1), len(kept), left_out


def evaluate_chats(params: Any, cfg: ModelConfig, path: str, template: ChatTemplate,
                   tokenizer, *, mesh: Mesh, rules=DEFAULT_RULES,
                   batch_size: int = 8) -> ChatEvalResult:
  """The assistant-token loss of the conversations in `path` (module docstring)."""
  start = time.perf_counter()
  rows, kept, left_out = chat_rows(path, template, tokenizer, cfg.block_size, cfg.vocab_size)
  multiple = batch_size_multiple(mesh, rules)
  B = -(-max(1, batch_size) // multiple) * multiple

  def sums(p, batch):
    loss, metrics = loss_and_metrics(p, cfg, batch, None, False, layout="packed")
    count = metrics["scored_tokens"]
    return loss * jnp.maximum(count, 1.0), count

  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(sums, in_shardings=(param_shardings(cfg, mesh, rules), batch_sharding(mesh)),
                 out_shardings=(replicated, replicated))
  nats, scored = 0.0, 0.0
  with activate(mesh, rules):
    for lo in range(0, len(rows), B):
      batch = np.zeros((B, rows.shape[1]), np.int32)  # rows past the end: all padding
      part = rows[lo:lo + B]
      batch[:len(part)] = part
      total, count = jax.device_get(step(params, shard_batch(batch, mesh, rules)))
      nats, scored = nats + float(total), scored + float(count)
  loss = nats / max(scored, 1.0)
  return ChatEvalResult(loss=loss, perplexity=math.exp(loss), tokens=int(round(scored)),
                        conversations=kept, left_out=left_out,
                        seconds=time.perf_counter() - start)
