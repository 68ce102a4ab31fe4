"""The one table that maps the model's logical axis names to the mesh axes data/fsdp/tensor/expert.

Parameters (created with nn.with_logical_partitioning in model/blocks.py and model/moe.py):
  vocab, embed, mlp, heads, kv_heads, kv, qkv, norm, position, token_types, layers, lora,
  expert, expert_embed (the experts' D axis: c_fc [expert, expert_embed, mlp])
(a LoRA adapter A [in..., r] / B [r, out...] carries its kernel's names on the in / out axes,
so fsdp and tensor split it as they split the kernel, and "lora" on the rank)
(the same names for every family: BERT's token-type table is token_types x embed; the
encoder-decoder's cross-attention c_q is embed x heads x kv and c_kv embed x qkv x heads x kv)
Activations (constrained with nn.with_logical_constraint):
  act_batch, act_length, act_embed, act_heads, act_kv_heads, act_kv, act_mlp, act_vocab,
  cache_layers, cache_length (the KV cache [L, B, S, H*K]; its last axis is "act_heads")

Strategies, all at once on a (data, fsdp, tensor, expert) mesh:
  data parallel   the batch is split over `data` (and `fsdp`); parameters are replicated on it.
  FSDP / ZeRO-3   the batch is split over `fsdp` too, and every weight is stored split over
                  `fsdp` (optimizer state follows its parameter), so XLA all-gathers each
                  layer's weights just in time and reduce-scatters the gradients.
  tensor (Megatron) attention heads, the MLP hidden axis and the vocabulary are split over
                  `tensor`; activations of those axes stay split between the two matmuls.
  expert          a mixture of experts' experts are split over `expert` (each device holds
                  E / expert of them, their weights split over fsdp and tensor as any MLP's),
                  and the batch is split over it too: tokens reach their experts' devices and
                  come back (model/moe.py). For everything else it is one more FSDP axis (the
                  batch split, the other weights stored split along embed over fsdp x expert,
                  as MaxText does), so a dense model treats it as FSDP.

Which axis FSDP splits. ZeRO-3 only asks that each device store 1/fsdp of every weight; any axis
gives the same bytes and the same all-gather volume. As in MaxText ("embed" -> fsdp) and
Levanter ("embed" -> data), weights are split along `embed` (D): every matrix of GPT-2 has a D
axis (wte [V, D], c_attn [D, 3, H, K], c_proj [H, K, D], c_fc [D, F], mlp c_proj [F, D]), and
its other axis is the one `tensor` takes, so fsdp x tensor shards each matrix in 2-D. The
"largest axis" only matters when D is not divisible by the fsdp size (GPT-2 small's 768 on 512
devices): then fsdp moves to the largest free axis it divides (F of an MLP kernel, V of the
embedding) instead of leaving the weight whole; see FSDP_AXES and partition.fit_spec. Other
rule axes that do not divide a dimension (GPT-2's 50257-row vocabulary on tensor=2) are
dropped and the dimension is replicated; `format_param_report` lists them. Pad the vocabulary
(padded_vocab_size=50304) to shard it.

Rules are in priority order (flax semantics): a mesh axis is used at most once per array.
Override entries with `make_rules({"embed": None})` or a config section (`rules_from_config`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from model.errors import UserError

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")
# Mesh axes that only decide where a weight is stored (it is all-gathered before use): when a
# rule puts one on a dimension it does not divide, it moves to the largest free dimension it does.
FSDP_AXES = ("fsdp", "expert")

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention's key/value heads (c_kv [D, 2, G, K])
    ("mlp", "tensor"),
    ("embed", ("fsdp", "expert")),
    ("kv", None),
    ("qkv", None),
    ("norm", None),
    ("position", None),
    ("token_types", None),
    ("layers", None),
    ("lora", None),  # a LoRA adapter's rank (model/lora.py): small, kept whole
    ("expert", "expert"),  # the experts of a sparse MLP (c_fc [E, D, F], ...)
    ("expert_embed", "fsdp"),  # the experts' D axis (their E axis is on `expert` already)
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_layers", None),
    ("cache_length", None),
)


def parse_mesh_axes(name: str, axes: Any) -> MeshAxes:
  """A rule's value: None / "" / "none" (replicated), "fsdp", "data,fsdp" or a list of names
  (strings are accepted so that command-line config overrides can express every value)."""
  if isinstance(axes, str):
    axes = [a.strip() for a in axes.split(",") if a.strip()]
    axes = None if not axes or axes == ["none"] or axes == ["None"] else axes
  if axes is None:
    return None
  if not isinstance(axes, (list, tuple)) or not all(isinstance(a, str) for a in axes):
    raise UserError(f"Sharding rule for {name!r} must be a mesh axis name, a list of them or "
                    f"None, got {axes!r}.")
  bad = [a for a in axes if a not in MESH_AXES]
  if bad:
    raise UserError(f"Sharding rule for {name!r} names unknown mesh axis {bad[0]!r}; mesh axes "
                    f"are {', '.join(MESH_AXES)}.")
  if len(set(axes)) != len(axes):
    raise UserError(f"Sharding rule for {name!r} repeats a mesh axis: {tuple(axes)!r}.")
  return axes[0] if len(axes) == 1 else tuple(axes)


def make_rules(overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None) -> Rules:
  """DEFAULT_RULES with some logical names remapped, e.g. {"embed": None} turns FSDP off for
  weights, {"vocab": None} keeps the embedding whole. Unknown logical names are an error."""
  if not overrides:
    return DEFAULT_RULES
  if hasattr(overrides, "to_dict"):  # ml_collections.ConfigDict
    overrides = overrides.to_dict()
  overrides = dict(overrides)
  known = [name for name, _ in DEFAULT_RULES]
  unknown = sorted(set(overrides) - set(known))
  if unknown:
    raise UserError(f"Unknown logical axis {unknown[0]!r} in sharding rules; known: "
                    f"{', '.join(sorted(known))}.")
  return tuple((name, parse_mesh_axes(name, overrides[name]) if name in overrides else axes)
               for name, axes in DEFAULT_RULES)


def _format_axes(axes: MeshAxes) -> str:
  if axes is None:
    return "none"
  return axes if isinstance(axes, str) else ",".join(axes)


def rules_config(rules: Rules = DEFAULT_RULES) -> dict[str, str]:
  """The table as {logical name: "tensor" | "data,fsdp" | "none"}: put it in a config
  (c.mesh.rules = ml_collections.ConfigDict(rules_config())) and every entry can be overridden
  from the command line, e.g. --config.mesh.rules.embed=none."""
  return {name: _format_axes(axes) for name, axes in rules}


def _parse_overrides(text: str) -> dict[str, str]:
  """"embed=none; vocab=none" -> {"embed": "none", "vocab": "none"}."""
  overrides = {}
  for item in text.replace(";", " ").split():
    name, sep, axes = item.partition("=")
    if not sep:
      raise UserError(f"Sharding rule override {item!r} must look like name=axes, e.g. "
                      f"embed=none or act_batch=data,fsdp.")
    overrides[name.strip()] = axes
  return overrides


def rules_from_config(mesh_cfg: Any) -> Rules:
  """make_rules from the `rules` entry of a mesh config section: a mapping of logical name ->
  mesh axes (as from rules_config), or a string "embed=none; vocab=none". DEFAULT_RULES when it
  is absent or empty."""
  get = getattr(mesh_cfg, "get", None)
  overrides = get("rules", None) if get is not None else getattr(mesh_cfg, "rules", None)
  if isinstance(overrides, str):
    overrides = _parse_overrides(overrides)
  return make_rules(overrides)


def format_rules(rules: Rules = DEFAULT_RULES) -> str:
  """The table as text, one `logical -> mesh axes` line per rule."""
  width = max(len(name) for name, _ in rules)
  return "\n".join(f"{name:<{width}} -> {_format_axes(axes)}" for name, axes in rules)
