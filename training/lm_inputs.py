"""What a GPT training or eval step reads from its batch, by the batch's layout (static, known
from the task: training.data's batch_layout):

  tokens  int32 [B, T + 1]: inputs [:, :T], targets [:, 1:], every target scored. With
          data.document_mask (`eot_id`) the windows' documents are kept apart: segment ids
          from the end-of-text token (model/segments.py: document_segments; each <|endoftext|>
          starts the document after it) and positions restarting at each document, derived
          here, on the device.
  packed  int32 [B, 3 (T + 1)] = tokens | segment_ids | loss_mask, each plane T + 1 wide
          (examples packed into rows; segment 0 is padding). Inputs tokens[:, :T] in segments
          segment_ids[:, :T], targets tokens[:, 1:], weights loss_mask[1:] where the target is
          in the same non-padding segment as its input. With cfg.prefix_lm, the prefix of each
          segment (model/segments.py: prefix_from_weights) attends to itself both ways.

`LMInputs` is what the step hands the model and the loss; `batch_weight` the count of scored
targets of a whole batch (the normaliser of its loss, also under gradient accumulation).
`document_eot` and `check_prefix_lm` are the config checks behind them (training/run.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.errors import UserError
from model.segments import document_segments, prefix_from_weights
from model.tokenizer import HF_PREFIX, get_tokenizer, tokenizer_from_dict

LAYOUTS = ("tokens", "packed", "preference")  # preference: packed pairs (training/dpo.py)


class LMInputs(NamedTuple):
  inputs_BT: jax.Array
  targets_BT: jax.Array
  weights_BT: jax.Array | None  # float32 1 / 0 per target; None: every target
  segment_ids_BT: jax.Array | None  # None: one sequence per row
  prefix_BT: jax.Array | None  # None: no prefix (plain causal attention)


def check_layout(layout: str, width: int | None = None, eot_id: int | None = None) -> None:
  """UserError unless `layout` is one of LAYOUTS, a packed batch's width is three planes, and
  document masks (an end-of-text id) go with the tokens layout."""
  if layout not in LAYOUTS:
    raise UserError(f"The batch layout must be one of {', '.join(LAYOUTS)}; got {layout!r}.")
  if layout in ("packed", "preference") and width is not None and width % 3:
    raise UserError(f"A packed batch is three planes (tokens | segment ids | loss mask) of "
                    f"T + 1 columns each; its width {width} is not a multiple of 3.")
  if layout == "packed" and eot_id is not None:
    raise UserError("data.document_mask applies to windows of documents (data.task=lm); a "
                    "packed batch carries its own segment ids.")


def packed_planes(batch_BW: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A packed batch's (tokens, segment_ids, loss_mask), each [B, T + 1]."""
  W = batch_BW.shape[1] // 3
  return batch_BW[:, :W], batch_BW[:, W:2 * W], batch_BW[:, 2 * W:]


def packed_weights(segments_BT1: jax.Array, loss_mask_BT1: jax.Array) -> jax.Array:
  """float32 [B, T]: target t + 1 is scored iff its loss mask is set and it lies in the same
  non-padding segment as input t."""
  same_BT = segments_BT1[:, 1:] == segments_BT1[:, :-1]
  return ((loss_mask_BT1[:, 1:] != 0) & same_BT & (segments_BT1[:, 1:] != 0)).astype(
      jnp.float32)


def lm_inputs(cfg: ModelConfig, batch: jax.Array, layout: str = "tokens",
              eot_id: int | None = None) -> LMInputs:
  """The model inputs, targets, loss weights, segments and prefix of a GPT batch."""
  if layout == "packed":
    tokens_BT1, segments_BT1, loss_mask_BT1 = packed_planes(batch)
    weights_BT = packed_weights(segments_BT1, loss_mask_BT1)
    segment_ids_BT = segments_BT1[:, :-1]
    prefix_BT = prefix_from_weights(segment_ids_BT, weights_BT) if cfg.prefix_lm else None
    return LMInputs(tokens_BT1[:, :-1], tokens_BT1[:, 1:], weights_BT, segment_ids_BT,
                    prefix_BT)
  inputs_BT = batch[:, :-1]
  segment_ids_BT = None if eot_id is None else document_segments(inputs_BT, eot_id)
  return LMInputs(inputs_BT, batch[:, 1:], None, segment_ids_BT, None)


def batch_weight(batch: jax.Array, layout: str) -> jax.Array | None:
  """The number of scored targets of a packed batch (float32, at least 1); None for the
  tokens layout (every target: the mean over B x T)."""
  if layout != "packed":
    return None
  _, segments_BT1, loss_mask_BT1 = packed_planes(batch)
  return jnp.maximum(jnp.sum(packed_weights(segments_BT1, loss_mask_BT1)), 1.0)


def packed_metrics(lm: LMInputs) -> dict[str, jax.Array]:
  """Counts a packed batch adds to the step's metrics (summed over micro-batches): its scored
  targets and its padding inputs."""
  return {"scored_tokens": jnp.sum(lm.weights_BT),
          "padding_tokens": jnp.sum(lm.segment_ids_BT == 0).astype(jnp.float32)}


def check_prefix_lm(config, task: str) -> None:
  """model.prefix_lm follows the task: data.task=prefix_lm sets it; another task must not."""
  value = config.model.get("prefix_lm", False)
  if not isinstance(value, bool):
    raise UserError(f"config.model.prefix_lm must be True or False, got {value!r}.")
  if value and task != "prefix_lm":
    raise UserError(f"config.model.prefix_lm=True is the prefix-LM objective's; it is set by "
                    f"data.task=prefix_lm, not with data.task={task!r}.")
  if task == "prefix_lm":
    config.model.prefix_lm = True


def document_eot(data_cfg, task: str, family: str, tokenizer: dict | None) -> int | None:
  """data.document_mask: the end-of-text id the step splits each window into documents at
  (training/lm_inputs.py), or None when off. `tokenizer` is the source's (None for synthetic
  tokens: data.tokenizer's). UserError for another task, or a tokenizer without one."""
  on = data_cfg.get("document_mask", False)
  if not isinstance(on, bool):
    raise UserError(f"config.data.document_mask must be true or false, got {on!r}.")
  if not on:
    return None
  if family != "gpt" or task != "lm":
    raise UserError(f"config.data.document_mask applies to windows of documents "
                    f"(model.family='gpt', data.task=lm), not data.task={task!r}; packed "
                    f"examples carry their own segments.")
  name = data_cfg.get("tokenizer", "char")
  if tokenizer is not None:
    eot = tokenizer_from_dict(tokenizer).eot_id
    name = tokenizer.get("name", name)
  else:
    eot = get_tokenizer(name).eot_id if name == "gpt2" or name.startswith(HF_PREFIX) else None
  if eot is None:
    raise UserError(f"config.data.document_mask=true splits windows at the end-of-text token, "
                    f"and the {name!r} tokenizer has none; use data.tokenizer=gpt2 or hf:DIR "
                    f"(its end-of-sequence token), or document_mask=false.")
  return eot
