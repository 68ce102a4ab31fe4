"""The one table that maps the model's logical axis names to the mesh axes data/fsdp/tensor.

Parameters (created with nn.with_logical_partitioning in model/transformer.py):
  vocab, embed, mlp, heads, kv, qkv, norm, position, layers
Activations (constrained with nn.with_logical_constraint):
  act_batch, act_length, act_embed, act_heads, act_kv, act_mlp, act_vocab,
  cache_layers, cache_length (the KV cache [L, B, S, H, K])

Strategies, all at once on a (data, fsdp, tensor) mesh:
  data parallel   the batch is split over `data` (and `fsdp`); parameters are replicated on it.
  FSDP / ZeRO-3   the batch is split over `fsdp` too, and every weight matrix is split along its
                  `embed` axis over `fsdp` (optimizer state follows its parameter), so XLA
                  all-gathers each layer's weights just in time and reduce-scatters the grads.
  tensor (Megatron) attention heads, the MLP hidden axis and the vocabulary are split over
                  `tensor`; activations of those axes stay split between the two matmuls.

Rules are in priority order (flax semantics): a mesh axis is used at most once per array.
"""

from __future__ import annotations

from typing import Mapping, Sequence

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("qkv", None),
    ("norm", None),
    ("position", None),
    ("layers", None),
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_layers", None),
    ("cache_length", None),
)


def _check_mesh_axes(name: str, axes: MeshAxes) -> MeshAxes:
  if axes is None:
    return None
  if isinstance(axes, (list, tuple)):
    axes = tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
  else:
    bad = [axes] if axes not in MESH_AXES else []
  if bad:
    raise ValueError(f"Sharding rule for {name!r} names unknown mesh axis {bad[0]!r}; mesh axes "
                     f"are {', '.join(MESH_AXES)}.")
  return axes


def make_rules(overrides: Mapping[str, MeshAxes] | Sequence[tuple[str, MeshAxes]] | None = None
               ) -> Rules:
  """DEFAULT_RULES with some logical names remapped, e.g. {"embed": None} turns FSDP off for
  weights, {"vocab": None} keeps the embedding whole. Unknown logical names are an error."""
  if not overrides:
    return DEFAULT_RULES
  overrides = dict(overrides)
  known = {name for name, _ in DEFAULT_RULES}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"Unknown logical axis {unknown[0]!r} in sharding rules; known: "
                     f"{', '.join(sorted(known))}.")
  return tuple((name, _check_mesh_axes(name, overrides.get(name, axes)) if name in overrides
                else axes) for name, axes in DEFAULT_RULES)
