"""LoRA (Hu et al. 2021): low-rank adapters on the projections of the decoder's blocks.

With cfg.lora_rank = r > 0, each targeted projection y = x W (+ b) of a block becomes

    y = x W (+ b) + (alpha / r) * (dropout(x) A) B        A [in..., r], B [r, out...]

as Hugging Face PEFT computes it (A uniform in +-1/sqrt(fan_in), B zero at the start, so a new
adapter changes nothing). A and B are parameters like any other, beside the kernel they adapt
(`lora_a`, `lora_b`), with logical axes (the rank's is "lora"), so the rules table shards them
and orbax saves them; training/state.py trains them alone (`trainable_params`), the base frozen.

Targets (`cfg.lora_targets`, comma-separated), resolved per block by `plan`:
  q, k, v, o, gate, up, down  Llama's projection names. q, k, v are parts of a fused kernel where
                             the model has one (GPT-2's c_attn [D, 3, H, K], grouped-query
                             attention's c_kv [D, 2, G, K]): each gets its own A and B on its
                             part (`lora_a_q`, `lora_b_q`, ...); o is attn/c_proj, gate / up /
                             down are mlp/c_gate, c_fc, c_proj.
  c_attn, c_q, c_kv, c_proj, c_fc, c_gate   a module name, as PEFT's target_modules: every
                             module of that name, whole (c_proj is attention's and the MLP's:
                             GPT-2's c_attn, c_proj, c_fc are its fused attention and its MLP)
  a regular expression       (anything with / or * ...) matched in full against each module's
                             path inside a block ("attn/c_attn", "mlp/c_fc", "mlp/.*"), whole.

    merged = merge_weights(params, cfg)      # W + (alpha / r) A B, adapters gone
    adapters, base = split_adapters(params)  # and join(adapters, base)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import LORA_FIELDS
from model.errors import UserError

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
MODULE_NAMES = ("c_attn", "c_q", "c_kv", "c_proj", "c_fc", "c_gate")
LORA_AXIS = "lora"  # logical axis name of the rank (sharding/rules.py)
PREFIX = "lora_"  # the adapters' parameter names start with it
WHOLE = ""  # a part that is the whole kernel


def block_modules(cfg) -> dict[str, tuple[str, ...]]:
  """The projections of a decoder block: {path inside the block: the names of its fused parts
  along its first output axis, () for an unfused kernel}. A mixture of experts' blocks have
  attention's only (the experts, and any dense or shared MLP beside them, take no adapters)."""
  if cfg.kv_heads == cfg.num_heads:
    modules = {"attn/c_attn": ("q", "k", "v")}
  else:
    modules = {"attn/c_q": (), "attn/c_kv": ("k", "v")}
  modules["attn/c_proj"] = ()
  if cfg.num_experts:
    return modules
  modules["mlp/c_fc"] = ()
  if cfg.activation == "swiglu":
    modules["mlp/c_gate"] = ()
  modules["mlp/c_proj"] = ()
  return modules


def projections(cfg) -> dict[str, tuple[str, str]]:
  """{projection name: (module path, its part: WHOLE or the name of a fused part)}."""
  modules = block_modules(cfg)
  out = {}
  for name in ("q", "k", "v"):
    for path, parts in modules.items():
      if name in parts:
        out[name] = (path, name)
  if "q" not in out:
    out["q"] = ("attn/c_q", WHOLE)
  out["o"] = ("attn/c_proj", WHOLE)
  for name, path in (("gate", "mlp/c_gate"), ("up", "mlp/c_fc"), ("down", "mlp/c_proj")):
    if path in modules:
      out[name] = (path, WHOLE)
  return {name: out[name] for name in PROJECTIONS if name in out}


def parse_targets(text: str) -> tuple[str, ...]:
  return tuple(t.strip() for t in str(text).split(",") if t.strip())


def _is_pattern(target: str) -> bool:
  return any(c in target for c in "/.*+?[](){}|^$\\")


def _existing(cfg) -> str:
  return (f"its projections are {', '.join(projections(cfg))} and its modules "
          f"{', '.join(block_modules(cfg))} (a pattern is matched against these paths)")


@functools.lru_cache(maxsize=64)
def plan(cfg, where: str = "config.train.lora.targets") -> dict[str, tuple[str, ...]]:
  """{module path inside a block: its adapted parts (WHOLE, or fused part names)} of
  cfg.lora_targets; {} without LoRA. UserError (naming `where`) for a target that matches
  nothing or one that adapts a kernel both whole and in parts."""
  if not cfg.lora_rank:
    return {}
  modules, projs = block_modules(cfg), projections(cfg)
  targets = parse_targets(cfg.lora_targets)
  if not targets:
    raise UserError(f"{where} is empty; name the projections to adapt ({_existing(cfg)}).")
  chosen: dict[str, set[str]] = {}
  for target in targets:
    if target in projs:
      path, part = projs[target]
      hits = [(path, part)]
    elif target in PROJECTIONS:
      hits = []
    elif target in MODULE_NAMES:
      hits = [(path, WHOLE) for path in modules if path.split("/")[-1] == target]
    elif _is_pattern(target):
      try:
        pattern = re.compile(target)
      except re.error as e:
        raise UserError(f"{where}: {target!r} is not a valid regular expression ({e}).") from None
      hits = [(path, WHOLE) for path in modules if pattern.fullmatch(path)]
    else:
      raise UserError(f"{where}: unknown target {target!r}; use a projection name "
                      f"({', '.join(PROJECTIONS)}), a module name ({', '.join(MODULE_NAMES)}) "
                      f"or a pattern over module paths such as 'attn/.*'.")
    if not hits:
      raise UserError(f"{where}: {target!r} matches no projection of this model; "
                      f"{_existing(cfg)}.")
    for path, part in hits:
      chosen.setdefault(path, set()).add(part)
  out = {}
  for path in modules:  # in the block's order
    parts = chosen.get(path)
    if parts is None:
      continue
    if WHOLE in parts and len(parts) > 1:
      raise UserError(f"{where} adapts {path} both whole and in parts "
                      f"({', '.join(sorted(parts - {WHOLE}))}); name one or the other.")
    out[path] = (WHOLE,) if WHOLE in parts else tuple(p for p in modules[path] if p in parts)
  return out


def check_rank(cfg, kernel_shapes: dict[str, tuple[int, ...]],
               where: str = "config.train.lora.rank") -> None:
  """UserError when the rank exceeds the smaller side of an adapted matrix (`kernel_shapes`:
  {module path: the kernel's shape, input axes first, as `n_inputs` tells})."""
  for path, parts in plan(cfg).items():
    shape = kernel_shapes[path]
    n_in = n_inputs(path)
    rows, cols = math.prod(shape[:n_in]), math.prod(shape[n_in + (parts != (WHOLE,)):])
    if cfg.lora_rank > min(rows, cols):
      raise UserError(f"{where} ({cfg.lora_rank}) is larger than the {path} matrix "
                      f"({rows} x {cols}{' per part' if parts != (WHOLE,) else ''}) allows: "
                      f"at most {min(rows, cols)}.")


def n_inputs(path: str) -> int:
  """How many leading kernel axes are inputs: attention's output projection reads [H, K]."""
  return 2 if path == "attn/c_proj" else 1


def kernel_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """The kernel shape of each projection of a decoder block (model/blocks.py's layout)."""
  D, H, K, G, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.kv_heads, cfg.d_mlp
  shapes = {"attn/c_attn": (D, 3, H, K), "attn/c_q": (D, H, K), "attn/c_kv": (D, 2, G, K),
            "attn/c_proj": (H, K, D), "mlp/c_fc": (D, F), "mlp/c_gate": (D, F),
            "mlp/c_proj": (F, D)}
  return {path: shapes[path] for path in block_modules(cfg)}


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def lora_delta(module: nn.Module, x, spec: str, kernel_shape: tuple[int, ...],
               kernel_axes: tuple[str | None, ...], parts: tuple[str, ...],
               fused: tuple[str, ...], deterministic: bool):
  """(alpha / r) (dropout(x) A) B for the adapted `parts` of an EinsumDense's kernel, called
  inside its compact method (the adapters are its parameters): the kernel [in..., out...] of
  `spec` ("BTD,DCHK->BTCHK"); `fused` names the parts along the first output axis."""
  cfg = module.cfg
  r, dt = cfg.lora_rank, cfg.compute_dtype
  (x_letters, k_letters), out_letters = spec.split("->")[0].split(","), spec.split("->")[1]
  n_in = sum(1 for c in k_letters if c in x_letters)
  ins, outs = k_letters[:n_in], k_letters[n_in:]
  batch = "".join(c for c in x_letters if c not in k_letters)
  if cfg.lora_dropout > 0:
    x = nn.Dropout(cfg.lora_dropout)(x, deterministic=deterministic)
  x = x.astype(dt)
  a_init = nn.with_logical_partitioning(
      _uniform(1.0 / math.sqrt(math.prod(kernel_shape[:n_in]))),
      tuple(kernel_axes[:n_in]) + (LORA_AXIS,))
  deltas = {}
  for part in parts:
    skip = 0 if part == WHOLE else 1  # a part drops the fused axis
    suffix = "" if part == WHOLE else f"_{part}"
    out_part = outs[skip:]
    a = module.param(f"{PREFIX}a{suffix}", a_init, tuple(kernel_shape[:n_in]) + (r,),
                     cfg.params_dtype)
    b = module.param(f"{PREFIX}b{suffix}", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (LORA_AXIS,) + tuple(kernel_axes[n_in + skip:])),
        (r,) + tuple(kernel_shape[n_in + skip:]), cfg.params_dtype)
    h = jnp.einsum(f"{x_letters},{ins}r->{batch}r", x, a.astype(dt))
    deltas[part] = jnp.einsum(f"{batch}r,r{out_part}->{batch}{out_part}", h, b.astype(dt))
  if WHOLE in deltas:
    delta = deltas[WHOLE]
  else:
    shape = deltas[parts[0]].shape
    delta = jnp.stack([deltas.get(name, jnp.zeros(shape, dt)) for name in fused],
                      axis=len(batch))
  assert out_letters == batch + outs, spec
  return delta * jnp.asarray(cfg.lora_alpha / r, dt)


# ---------------------------------------------------------------------------------------------
# Parameter trees: adapters apart from the base, and merged into it


def is_adapter(name: str) -> bool:
  return str(name).startswith(PREFIX)


def split_adapters(params: Any) -> tuple[dict, dict]:
  """(the adapters' subtree, the rest) of a nested dict of parameters (boxed or not)."""
  adapters, base = {}, {}
  for key, value in params.items():
    if isinstance(value, dict):
      a, b = split_adapters(value)
      if a:
        adapters[key] = a
      if b:
        base[key] = b
    elif is_adapter(key):
      adapters[key] = value
    else:
      base[key] = value
  return adapters, base


def join(a: Any, b: Any) -> dict:
  """The union of two nested dicts with disjoint leaves (split_adapters' inverse)."""
  out = dict(b)
  for key, value in a.items():
    out[key] = join(value, out[key]) if isinstance(value, dict) and key in out else value
  return out


def has_adapters(params: Any) -> bool:
  return bool(split_adapters(params)[0])


def _merged_module(node: dict, path: str, cfg, stacked: bool) -> dict:
  """A module's {kernel, bias, lora_*} -> {kernel + (alpha / r) A B, bias}."""
  parts = {k: v for k, v in node.items() if is_adapter(k)}
  out = {k: v for k, v in node.items() if not is_adapter(k)}
  if not parts:
    return out
  kernel = out["kernel"]
  scale = cfg.lora_alpha / cfg.lora_rank
  fused = block_modules(cfg)[path]
  n_in = n_inputs(path) + stacked

  def delta_of(a, b):
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if stacked:
      return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a32, b32)
    return jnp.tensordot(a32, b32, axes=1)

  delta = jnp.zeros(kernel.shape, jnp.float32)
  if f"{PREFIX}a" in parts:
    delta = delta_of(parts[f"{PREFIX}a"], parts[f"{PREFIX}b"])
  else:
    pieces = []
    for name in fused:
      if f"{PREFIX}a_{name}" in parts:
        pieces.append(delta_of(parts[f"{PREFIX}a_{name}"], parts[f"{PREFIX}b_{name}"]))
      else:
        pieces.append(jnp.zeros(kernel.shape[:n_in] + kernel.shape[n_in + 1:], jnp.float32))
    delta = jnp.stack(pieces, axis=n_in)
  out["kernel"] = (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
  return out


def merge_weights(params: dict, cfg) -> dict:
  """The parameters with every adapter folded into its kernel (W + (alpha / r) A B, computed in
  float32, stored in the kernel's dtype) and the adapters removed: the model without LoRA
  computes what the model with it did (cfg.replace(lora_rank=0) describes it)."""
  if not cfg.lora_rank:
    return params
  out = {}
  for key, block in params.items():
    is_block = key == "h" or (key.startswith("h_") and key[2:].isdigit())
    if not is_block or not isinstance(block, dict):
      out[key] = block
      continue
    stacked = key == "h"
    new_block = {}
    for sub, modules in block.items():
      if sub in ("attn", "mlp") and isinstance(modules, dict):
        new_block[sub] = {name: (_merged_module(node, f"{sub}/{name}", cfg, stacked)
                                 if isinstance(node, dict) else node)
                          for name, node in modules.items()}
      else:
        new_block[sub] = modules
    out[key] = new_block
  return out


def without_lora(cfg):
  """The config of the base model (no adapters: the LoRA fields at their defaults)."""
  defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in LORA_FIELDS}
  return cfg.replace(**defaults)


def dense_args(cfg, path: str) -> dict[str, Any]:
  """The LoRA arguments of the EinsumDense at `path` inside a decoder block: its adapted parts
  and the names of its fused parts ({} when it is not adapted)."""
  parts = plan(cfg).get(path)
  return {} if not parts else {"lora": parts, "fused": block_modules(cfg)[path]}
