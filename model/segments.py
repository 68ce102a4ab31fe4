"""Segments: several documents or examples in one row, kept apart.

A row of T tokens may carry, beside its tokens, three per-token arrays (all optional; all None
is a plain causal row):

  segment_ids_BT  int32: which segment (document, example) token t belongs to; 0 is padding.
                  Segments are contiguous runs. A token attends only to tokens of its own
                  segment, so a padding token sees padding only and no real token ever sees it.
  positions_BT    int32: the token's index within its segment (`positions_from_segments`), the
                  position learned and rotary embeddings read.
  prefix_BT       bool: the prefix-LM's prefix. Key j is visible to query i iff they share a
                  segment and (j <= i or (prefix[i] and prefix[j])): the prefix attends to
                  itself both ways, every later token causally.

`visible` is that rule as a [B, 1, T, T] mask (the reference kernel's). The training step
derives the arrays on the device: from the end-of-text token (`document_segments`, for
data.document_mask), or from a packed batch's segment ids and loss mask (`prefix_from_weights`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T] bool: token t starts a segment (t = 0, or its id differs from token t - 1's)."""
  first_B1 = jnp.ones_like(segment_ids_BT[:, :1], dtype=bool)
  return jnp.concatenate([first_B1, segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T] int32: each token's index within its segment (0 at each segment's first token)."""
  t_BT = jnp.broadcast_to(jnp.arange(segment_ids_BT.shape[1], dtype=jnp.int32),
                          segment_ids_BT.shape)
  start_BT = jax.lax.cummax(jnp.where(segment_starts(segment_ids_BT), t_BT, 0), axis=1)
  return t_BT - start_BT


def document_segments(tokens_BT: jax.Array, eot_id: int) -> jax.Array:
  """[B, T] int32 segment ids of a window of documents joined by `eot_id`: each end-of-text
  token starts a new segment (it is the first token, at position 0, of the document after it;
  the tokens before the window's first end-of-text are a segment of their own). So a
  document's first token is predicted from <|endoftext|> alone, as GPT-2 is prompted for an
  unconditional sample, and a document's last token predicts <|endoftext|> from that document."""
  return (1 + jnp.cumsum(tokens_BT == eot_id, axis=1)).astype(jnp.int32)


def prefix_from_weights(segment_ids_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
  """[B, T] bool prefix of a packed prefix-LM row: weights_BT[b, t] says the output at t is
  scored (its target is token t + 1). A token is in the prefix iff no output before it in its
  segment is scored: the prefix ends with the token whose output predicts the segment's first
  scored target. Padding (segment 0) is never prefix."""
  w_BT = (weights_BT != 0).astype(jnp.int32)
  before_BT = jnp.cumsum(w_BT, axis=1) - w_BT  # scored outputs before t in the row
  t_BT = jnp.arange(segment_ids_BT.shape[1], dtype=jnp.int32)[None]
  start_BT = t_BT - positions_from_segments(segment_ids_BT)
  in_segment_BT = before_BT - jnp.take_along_axis(before_BT, start_BT, axis=1)
  return (in_segment_BT == 0) & (segment_ids_BT != 0)


def visible(segment_ids_BT: jax.Array, prefix_BT: jax.Array | None = None) -> jax.Array:
  """[B, 1, T, T] bool: query t may attend to key s (module docstring's rule)."""
  T = segment_ids_BT.shape[1]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  causal_TS = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]
  mask_BTS = same_BTS & causal_TS[None]
  if prefix_BT is not None:
    mask_BTS = mask_BTS | (same_BTS & prefix_BT[:, :, None] & prefix_BT[:, None, :])
  return mask_BTS[:, None]
