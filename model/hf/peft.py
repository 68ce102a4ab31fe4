"""Hugging Face PEFT LoRA adapter directories <-> our adapters (model/lora.py).

A PEFT adapter directory holds adapter_config.json (peft_type "LORA", base_model_name_or_path,
r, lora_alpha, target_modules, fan_in_fan_out, ...) and adapter_model.safetensors with one
lora_A [r, in] and lora_B [out, r] per adapted torch module, named after it:

  base_model.model.transformer.h.<i>.attn.c_attn.lora_A.weight     GPT-2 (Conv1D: fan_in_fan_out)
  base_model.model.model.layers.<i>.self_attn.q_proj.lora_B.weight   Llama

PEFT computes x W + (lora_alpha / r) (x A^T) B^T, so our A [in..., r] is lora_A transposed and
our B [r, out...] is lora_B transposed, reshaped to the kernel's axes. GPT-2's modules are
whole kernels (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj); Llama's q_proj / k_proj /
v_proj are parts of our fused c_attn or c_kv where the model has one.

Writing: an adapter on a whole fused kernel of a Llama (c_attn, c_kv) becomes one PEFT adapter
per projection, each with the same A; adapters on parts of GPT-2's fused c_attn (targets q, k,
v) become one adapter of rank n r on attn.c_attn whose A is the parts' side by side and whose B
is block-diagonal (rank_pattern / alpha_pattern keep the scale alpha / r): the same function.
Reading accepts what PEFT's plain LoRA is; anything else (DoRA, rsLoRA, modules_to_save,
another adapter type, per-module ranks, adapters on some layers only) is one UserError naming it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from model import lora
from model.config import ModelConfig
from model.errors import NotFoundError, UserError
from model.layout import unstack_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# our module path inside a block <-> the PEFT module of each model type
GPT2_MODULES = {"attn/c_attn": "attn.c_attn", "attn/c_proj": "attn.c_proj",
                "mlp/c_fc": "mlp.c_fc", "mlp/c_proj": "mlp.c_proj"}
LLAMA_PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                     "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                     "down": "mlp.down_proj"}
# the layers of each model type in PEFT's names (every Llama-shaped type has Llama's)
PREFIXES = {"gpt2": "base_model.model.transformer.h",
            **{kind: "base_model.model.model.layers"
               for kind in ("llama", "qwen3", "mixtral", "qwen3_moe", "olmoe")}}
# adapter_config.json fields that change what the adapter computes, and the value we support
UNSUPPORTED = (("use_dora", False, "DoRA (use_dora)"), ("use_rslora", False, "rsLoRA (use_rslora)"),
               ("bias", "none", "trained biases (bias)"), ("lora_bias", False, "lora_bias"),
               ("modules_to_save", None, "modules_to_save"),
               ("layers_to_transform", None, "layers_to_transform"),
               ("layer_replication", None, "layer_replication"),
               ("target_parameters", None, "target_parameters"),
               ("trainable_token_indices", None, "trainable_token_indices"),
               ("rank_pattern", None, "per-module ranks (rank_pattern)"),
               ("alpha_pattern", None, "per-module alphas (alpha_pattern)"),
               ("use_qalora", False, "QA-LoRA (use_qalora)"))
_KEY = re.compile(r"^(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def is_adapter_dir(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG))


def read_adapter_config(directory: str) -> dict[str, Any]:
  """adapter_config.json, checked to be a plain LoRA adapter this project computes exactly."""
  path = os.path.join(directory, ADAPTER_CONFIG)
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except FileNotFoundError:
    raise NotFoundError(f"{path} not found: a PEFT adapter directory needs it.") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not readable JSON ({e}).") from None
  if not isinstance(config, dict):
    raise UserError(f"{path} must hold a JSON object.")
  kind = config.get("peft_type", "LORA")
  if str(kind).upper() != "LORA":
    raise UserError(f"{path}: adapter type {kind!r} is not supported; only LoRA adapters "
                    f"(peft_type 'LORA') are.")
  for key, plain, what in UNSUPPORTED:
    value = config.get(key, plain)
    if value not in (plain, None, {}, []) and value != plain:
      raise UserError(f"{path}: {what} = {value!r} is not supported; only plain LoRA adapters "
                      f"(every module the same rank and alpha, no extra trained modules) are.")
  for key in ("r", "lora_alpha"):
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      raise UserError(f"{path}: {key} must be a positive number, got {value!r}.")
  if not config.get("base_model_name_or_path"):
    raise UserError(f"{path} does not name its base model (base_model_name_or_path).")
  return config


def _tensor_names(directory: str) -> list[str]:
  path = os.path.join(directory, ADAPTER_WEIGHTS)
  if not os.path.isfile(path):
    raise NotFoundError(f"{path} not found: a PEFT adapter directory needs it.")
  from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(path, "np") as f:
      return list(f.keys())
  except (SafetensorError, OSError, ValueError) as e:
    raise UserError(f"{path} is not a readable safetensors file ({e}).") from None


def _modules(directory: str, names: list[str], model_type: str, cfg: ModelConfig,
             num_layers: int) -> dict[str, dict[str, str]]:
  """{PEFT module: {"path": our module path, "part": WHOLE or a fused part}} of the adapted
  modules, the same in every layer (UserError otherwise)."""
  source = os.path.join(directory, ADAPTER_WEIGHTS)
  prefix = PREFIXES[model_type] + "."
  per_layer: dict[int, set[str]] = {}
  for name in names:
    match = _KEY.match(name[len(prefix):]) if name.startswith(prefix) else None
    if match is None:
      raise UserError(f"{source}: tensor {name!r} is not a LoRA matrix of a "
                      f"{model_type} block's projection; only those are supported.")
    per_layer.setdefault(int(match.group(1)), set()).add(match.group(2))
  if not per_layer:
    raise UserError(f"{source} holds no LoRA matrices.")
  layers = sorted(per_layer)
  if layers != list(range(num_layers)) or any(per_layer[i] != per_layer[0] for i in layers):
    raise UserError(f"{source}: adapters on some layers or modules only are not supported; "
                    f"every one of the {num_layers} layers needs the same adapted modules.")
  if model_type == "gpt2":
    ours = {peft: path for path, peft in GPT2_MODULES.items()}
    table = {m: (ours[m], lora.WHOLE) for m in per_layer[0] if m in ours}
  else:
    projs = lora.projections(cfg)
    table = {peft: projs[name] for name, peft in LLAMA_PROJECTIONS.items()
             if peft in per_layer[0] and name in projs}
  unknown = sorted(per_layer[0] - set(table))
  if unknown:
    raise UserError(f"{source}: LoRA on {unknown[0]!r} is not supported for {model_type}; "
                    f"supported modules: "
                    f"{', '.join(GPT2_MODULES.values() if model_type == 'gpt2' else LLAMA_PROJECTIONS.values())}.")
  return {m: {"path": path, "part": part} for m, (path, part) in table.items()}


def _targets(model_type: str, modules: dict[str, dict[str, str]]) -> str:
  if model_type == "gpt2":
    return ",".join(v["path"] for v in modules.values())
  return ",".join(name for name, peft in LLAMA_PROJECTIONS.items() if peft in modules)


def adapter_config(directory: str, base_cfg: ModelConfig, model_type: str) -> ModelConfig:
  """The ModelConfig of base + the adapters of `directory` (reads tensor names only)."""
  config = read_adapter_config(directory)
  modules = _modules(directory, _tensor_names(directory), model_type, base_cfg,
                     base_cfg.num_layers)
  cfg = base_cfg.replace(lora_rank=int(config["r"]), lora_alpha=float(config["lora_alpha"]),
                         lora_dropout=float(config.get("lora_dropout") or 0.0),
                         lora_targets=_targets(model_type, modules))
  lora.plan(cfg, f"{os.path.join(directory, ADAPTER_CONFIG)}: target_modules")
  return cfg


def load_adapter(directory: str, cfg: ModelConfig, model_type: str) -> dict:
  """The adapters of `directory` as our parameters (loop layout, float32 numpy), for `cfg`
  (from adapter_config)."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  source = os.path.join(directory, ADAPTER_WEIGHTS)
  tensors = load_file(source)
  modules = _modules(directory, list(tensors), model_type, cfg, cfg.num_layers)
  shapes, r = lora.kernel_shapes(cfg), cfg.lora_rank
  out: dict = {}
  for i in range(cfg.num_layers):
    for module, where in modules.items():
      path, part = where["path"], where["part"]
      shape, n_in = shapes[path], lora.n_inputs(path)
      in_shape = shape[:n_in]
      out_shape = shape[n_in:] if part == lora.WHOLE else shape[n_in + 1:]
      key = f"{PREFIXES[model_type]}.{i}.{module}"
      a, b = (np.asarray(tensors[f"{key}.lora_{x}.weight"], np.float32) for x in "AB")
      want_a, want_b = (r, int(np.prod(in_shape))), (int(np.prod(out_shape)), r)
      for x, want, name in ((a, want_a, "A"), (b, want_b, "B")):
        if tuple(x.shape) != want:
          raise UserError(f"{source}: {key}.lora_{name}.weight has shape {tuple(x.shape)}, "
                          f"but r = {r} and the base model imply {want}.")
      suffix = "" if part == lora.WHOLE else f"_{part}"
      sub, name = path.split("/")
      node = out.setdefault(f"h_{i}", {}).setdefault(sub, {}).setdefault(name, {})
      node[f"{lora.PREFIX}a{suffix}"] = a.T.reshape(*in_shape, r)
      node[f"{lora.PREFIX}b{suffix}"] = b.T.reshape(r, *out_shape)
  return out


def save_adapter(params: dict, cfg: ModelConfig, model_type: str, path: str,
                 base_model_name_or_path: str) -> list[str]:
  """Writes `path`/adapter_config.json and adapter_model.safetensors of the adapters in
  `params` (either layout), readable by PEFT's PeftModel.from_pretrained. Returns the files."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  p = unstack_layers(params, cfg.num_layers)
  r, alpha = cfg.lora_rank, cfg.lora_alpha
  shapes, plan = lora.kernel_shapes(cfg), lora.plan(cfg)
  tensors, targets, ranks = {}, [], {}

  def put(key, a_Ir, b_rO):  # our A [in..., r'], B [r', out...] -> PEFT's
    rank = a_Ir.shape[-1]
    tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a_Ir.reshape(-1, rank).T)
    tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_rO.reshape(rank, -1).T)

  for i in range(cfg.num_layers):
    block = p[f"h_{i}"]
    for mpath, parts in plan.items():
      sub, name = mpath.split("/")
      node = {k: np.asarray(v, np.float32) for k, v in block[sub][name].items()}
      shape, n_in = shapes[mpath], lora.n_inputs(mpath)
      fused = lora.block_modules(cfg)[mpath]
      if model_type == "gpt2":
        module = GPT2_MODULES[mpath]
        key = f"{PREFIXES['gpt2']}.{i}.{module}"
        if parts == (lora.WHOLE,):
          put(key, node["lora_a"], node["lora_b"])
        else:  # parts of the fused c_attn: block-diagonal, rank len(parts) * r
          a = np.concatenate([node[f"lora_a_{x}"] for x in parts], axis=-1)
          b = np.zeros((len(parts) * r,) + shape[n_in:], np.float32)
          for j, x in enumerate(parts):
            b[j * r:(j + 1) * r, fused.index(x)] = node[f"lora_b_{x}"]
          put(key, a, b)
          ranks[module] = len(parts) * r
        targets.append(module)
        continue
      for proj, (ppath, part) in lora.projections(cfg).items():
        if ppath != mpath or (parts != (lora.WHOLE,) and part not in parts):
          continue
        key = f"{PREFIXES[model_type]}.{i}.{LLAMA_PROJECTIONS[proj]}"
        if parts == (lora.WHOLE,):
          b = node["lora_b"] if part == lora.WHOLE else node["lora_b"][:, fused.index(part)]
          put(key, node["lora_a"], b)
        else:
          put(key, node[f"lora_a_{part}"], node[f"lora_b_{part}"])
        targets.append(LLAMA_PROJECTIONS[proj].split(".")[-1])
  targets = sorted(set(targets))
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path, "r": r, "lora_alpha": alpha,
      "lora_dropout": cfg.lora_dropout, "target_modules": targets,
      "fan_in_fan_out": model_type == "gpt2", "bias": "none", "use_rslora": False,
      "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
      "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {m: n for m, n in ranks.items()},
      "alpha_pattern": {m: alpha * n / r for m, n in ranks.items()}, "revision": None}
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(path, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
