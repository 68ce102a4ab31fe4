"""Trained weights from wherever they are: a training workdir or a Hugging Face checkpoint
(GPT-2, BERT or BART).

The one way `launch.sample`, `launch.eval`, `launch.export` and fine-tuning (`init_from`) find
weights by a name or a path:

  a training workdir (a directory with checkpoints/)   its latest (or `step`) checkpoint
  a Hugging Face checkpoint directory (config.json)    read with model/hf/
  gpt2 | gpt2-medium | gpt2-large | gpt2-xl            downloaded from the Hub once

    w = describe_weights("runs/x")          # Weights with params=None: nothing big read
    w = load_weights("gpt2", mesh=mesh)     # params placed on the mesh with their shardings
    w.cfg, w.params, w.tokenizer, w.step, w.label

`tokenizer` is the tokenizer the weights' ids mean, recorded as `model.tokenizer`'s to_dict()
(`tokenizer_from_dict` makes it again): the one a run recorded; for a Hugging Face decoder
`checkpoint_tokenizer` (an export's TOKENIZER_RECORD_FILE, a Llama's own tokenizer files, GPT-2
BPE for GPT-2's vocabulary); None where that is unknown (a GPT-2 of another vocabulary, read
with GPT-2 BPE; a BERT / BART checkpoint's own tokenizer files, model/hf/tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Collection

import jax
from jax.sharding import Mesh

from model import hf, lora
from model.hf import peft
from model.hf.tensors import map_tree
from model.layout import convert_layout
from model.config import ModelConfig
from model.config import from_dict as model_config_from_dict
from model.errors import NotFoundError, UserError
from model.hf.tokenizer import content_sha256
from model.tokenizer import (GPT2_VOCAB_SIZE, HF_PREFIX, describe_tokenizer, same_tokenizer,
                             tokenizer_difference)
from sharding import DEFAULT_RULES, make_mesh, param_shardings, place_params
from training import adapters as lora_runs
from training.checkpoint import CHECKPOINT_DIR, load_for_inference, read_run_meta

WORKDIR, HF, PEFT = "workdir", "hf", "peft"
# What an export (training/export.py) writes beside config.json: the tokenizer its ids mean, as
# model.tokenizer's to_dict() ({"name": "hf"} without a path: the folder's own tokenizer files).
TOKENIZER_RECORD_FILE = "flaxgpt_tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Weights:
  cfg: ModelConfig
  params: Any            # None from describe_weights
  tokenizer: dict | None  # a run's recorded tokenizer; None: GPT-2 BPE
  step: int | None       # the checkpoint's step (workdirs only)
  label: str             # what to call them in messages: "runs/x step 2000", "gpt2"
  kind: str              # WORKDIR or HF


def source_kind(name_or_dir: str | os.PathLike) -> str:
  """WORKDIR for a training run (it has checkpoints/, or lives on a remote file system), HF
  for a Hugging Face checkpoint directory or Hub name; NotFoundError for a missing path."""
  path = os.fspath(name_or_dir)
  if not path:
    raise UserError("The weights' name or directory is empty.")
  if "://" in path:
    return WORKDIR
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return WORKDIR
  if os.path.isdir(path) and peft.is_adapter_dir(path):
    return PEFT
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, hf.CONFIG_FILE)):
    raise NotFoundError(
        f"{path!r} is neither a training workdir (it has no {CHECKPOINT_DIR}/), a Hugging "
        f"Face checkpoint directory (it has no {hf.CONFIG_FILE}) nor a PEFT adapter "
        f"directory (it has no {peft.ADAPTER_CONFIG}).")
  return HF


def describe_weights(name_or_dir: str | os.PathLike, *, step: int | None = None,
                     dtype: str | None = None, kind: str | None = None) -> Weights:
  """The model config, tokenizer and step of the weights, without reading any arrays (a Hub
  name is downloaded). `dtype` replaces the compute dtype; `kind` (WORKDIR or HF) skips the
  guess of `source_kind` (e.g. for a --workdir flag, whose errors then speak of a workdir)."""
  path = os.fspath(name_or_dir)
  kind = kind or source_kind(path)
  if kind == WORKDIR:
    step, meta = read_run_meta(path, step)
    cfg = model_config_from_dict(meta["model"])
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    return Weights(cfg, None, meta.get("tokenizer"), step, f"{path} step {step}", WORKDIR)
  _no_step(path, step)
  if kind == PEFT:
    base = describe_weights(_adapter_base(path), dtype=dtype)
    cfg = peft.adapter_config(path, lora.without_lora(base.cfg), hf.export_type(base.cfg))
    return Weights(cfg, None, base.tokenizer, None, path, PEFT)
  directory = hf.resolve_checkpoint_dir(path)
  cfg = hf.checkpoint_config(directory, dtype=dtype or "float32")
  return Weights(cfg, None, checkpoint_tokenizer(directory, cfg), None, path, HF)


def load_weights(name_or_dir: str | os.PathLike, *, step: int | None = None,
                 dtype: str | None = None, mesh: Mesh | None = None, rules=DEFAULT_RULES,
                 kind: str | None = None, **hf_overrides) -> Weights:
  """The weights, placed on `mesh` (default: the first device) with the model's logical
  shardings; float32 parameters. A damaged newest checkpoint of a workdir is skipped with a
  warning (a damaged `step` is a UserError). `hf_overrides` go to `load_hf` (fields the
  weights do not fix, e.g. block_size lower than n_positions, padded_vocab_size); `kind` as
  in `describe_weights`."""
  path = os.fspath(name_or_dir)
  if mesh is None:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  kind = kind or source_kind(path)
  if kind == WORKDIR:
    cfg, params, tokenizer, step = load_for_inference(path, step=step, mesh=mesh, rules=rules)
    if cfg.lora_rank:  # the checkpoint holds the adapters; the base is the run's init_from
      params = _with_base(params, cfg, path, step, mesh, rules)
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    return Weights(cfg, params, tokenizer, step, f"{path} step {step}", WORKDIR)
  _no_step(path, step)
  if kind == PEFT:  # the base's weights, and the adapters beside them
    base = load_weights(_adapter_base(path), dtype=dtype, mesh=mesh, rules=rules,
                        **hf_overrides)
    model_type = hf.export_type(base.cfg)
    cfg = peft.adapter_config(path, lora.without_lora(base.cfg), model_type)
    base_params = jax.jit(lora.merge_weights, static_argnums=1)(base.params, base.cfg)
    adapters = convert_layout(peft.load_adapter(path, cfg, model_type), cfg)
    shardings = lora.split_adapters(param_shardings(cfg, mesh, rules))[0]
    adapters = jax.device_put(map_tree(lambda x: x.astype(cfg.params_dtype), adapters),
                              shardings)
    return Weights(cfg, lora.join(adapters, base_params), base.tokenizer, None, path, PEFT)
  cfg, params = hf.load_hf(path, dtype=dtype or "float32", **hf_overrides)
  tokenizer = checkpoint_tokenizer(hf.resolve_checkpoint_dir(path), cfg)
  return Weights(cfg, place_params(params, cfg, mesh, rules), tokenizer, None, path, HF)


def checkpoint_tokenizer(directory: str, cfg: ModelConfig) -> dict | None:
  """The tokenizer a Hugging Face decoder checkpoint's ids mean (a to_dict() record): an
  export's TOKENIZER_RECORD_FILE (a character table, GPT-2 BPE, or the folder's own tokenizer
  files), a Llama-shaped decoder's own tokenizer files, GPT-2 BPE for a GPT-2 of GPT-2's 50,257 tokens; None
  where that is unknown (another GPT-2, read with GPT-2 BPE; BERT / BART, their own files)."""
  if cfg.family != "gpt":
    return None
  path = os.path.join(directory, TOKENIZER_RECORD_FILE)
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
    except (OSError, ValueError) as e:
      raise UserError(f"{path} is not a readable tokenizer record ({e}).") from None
    if not isinstance(record, dict) or record.get("name") not in ("gpt2", "char", "hf"):
      raise UserError(f"{path} is not a tokenizer record (its 'name' must be gpt2, char or "
                      f"hf).")
    if record["name"] == "hf":  # the export's own tokenizer files
      record = dict(record, path=os.path.abspath(directory))
    return record
  kind = hf.read_hf_config(directory).get("model_type")
  if kind in hf.HF_CLASSES and kind != "gpt2":  # Llama, Qwen3, a mixture of experts
    directory = os.path.abspath(directory)
    return {"name": "hf", "path": directory, "sha256": content_sha256(directory)}
  if cfg.vocab_size == GPT2_VOCAB_SIZE:
    return {"name": "gpt2"}
  return None


def _with_base(adapters: Any, cfg: ModelConfig, path: str, step: int, mesh: Mesh,
               rules) -> Any:
  """A LoRA run's adapters joined to their base (the run's init_from, checked against the
  fingerprint its checkpoint saved), placed like the model's parameters."""
  meta = read_run_meta(path, step)[1]
  saved = meta.get(lora_runs.META_KEY) or {}
  base_from = saved.get("init_from", "")
  where = f"The LoRA run {path} (step {step})"
  if not base_from:
    raise UserError(f"{where} does not name the base its adapters belong to.")
  try:
    base = init_params(base_from, cfg)
  except UserError as e:
    raise UserError(f"{where} needs its base {base_from!r}: {e}") from None
  shardings = lora.split_adapters(param_shardings(cfg, mesh, rules))[1]
  base = jax.device_put(base, shardings)
  lora_runs.check_base(saved, base, base_from, where)
  return lora.join(adapters, base)


def _adapter_base(directory: str) -> str:
  """The base a PEFT adapter directory names (base_model_name_or_path): a local directory (as
  given, or relative to the adapter's folder) or a Hub name."""
  base = peft.read_adapter_config(directory)["base_model_name_or_path"]
  beside = os.path.join(directory, base)
  return beside if not os.path.exists(base) and os.path.exists(beside) else base


def _no_step(path: str, step: int | None) -> None:
  if step is not None:
    raise UserError(f"A step ({step}) only applies to a training workdir; {path!r} is a "
                    f"Hugging Face checkpoint.")


# ---------------------------------------------------------------------------------------------
# Fine-tuning: a run's first parameters from other weights (config.init_from)

# Fields a run sets for itself whatever weights it starts from: how the computation runs, not
# what the parameters are. block_size may be lowered (positions cropped) and padded_vocab_size
# raised (rows re-padded); every other field is the weights'.
RUN_FIELDS = ("embd_dropout", "attn_dropout", "resid_dropout", "dtype", "param_dtype",
              "attention", "dropout_rng", "scan_layers", "remat", "capacity_factor",
              "moe_kernel", "router_aux_loss_coef", "router_z_loss_coef")


def describe_init_from(name_or_dir: str) -> Weights:
  """The init_from weights' description (nothing big read; a Hub name is downloaded)."""
  try:
    w = describe_weights(name_or_dir)
  except UserError as e:
    raise UserError(f"config.init_from={name_or_dir!r}: {e}") from None
  if w.cfg.family != "gpt":
    raise UserError(f"config.init_from={name_or_dir!r} holds a model.family={w.cfg.family!r} "
                    f"model; fine-tuning starts model.family='gpt' runs only.")
  # adapters (a LoRA run, a PEFT directory) start a new run merged into their base
  return dataclasses.replace(w, cfg=lora.without_lora(w.cfg))


def model_from_weights(model: dict[str, Any], weights: ModelConfig, label: str,
                       explicit: Collection[str] = ()) -> dict[str, Any]:
  """The model fields of a run whose first parameters are `weights` (fine-tuning; `label`
  names them): the weights' shapes, with the RUN_FIELDS, block_size (up to the weights'
  positions) and padded_vocab_size (at least their vocabulary) of the config's `model`
  section. The config file may describe another model (its shapes are replaced); a field the
  command line set (`explicit`: "model.<name>" keys) that the weights fix otherwise is a
  UserError naming both values and `label` ("config.init_from='gpt2'").""" 
  fields = weights.to_dict()
  for name, value in model.items():
    if name not in fields or value is None:
      continue
    if name in RUN_FIELDS:
      fields[name] = value
      continue
    if name == "block_size":
      fits, limit = value <= weights.block_size, f"at most its {weights.block_size} positions"
    elif name == "padded_vocab_size":
      fits, limit = value >= weights.vocab_size, f"at least its vocabulary of {weights.vocab_size}"
    else:
      fits, limit = value == fields[name], repr(fields[name])
    if fits and name in ("block_size", "padded_vocab_size"):
      fields[name] = value
    elif not fits and f"model.{name}" in explicit:
      raise UserError(f"--config.model.{name}={value!r} does not fit {label}: its weights "
                      f"make model.{name} {limit}; leave the flag out (the weights give the "
                      f"model's shape) or start from other weights.")
  if fields["padded_vocab_size"] < fields["vocab_size"]:
    fields["padded_vocab_size"] = fields["vocab_size"]
  return fields


def check_init_vocabulary(weights: Weights, data_vocab: int, data_tokenizer: dict | None,
                          name_or_dir: str) -> None:
  """The weights must have been trained on the data's tokenizer (the same ids meaning the same
  tokens: a character table of the same size with other characters, GPT-2 BPE ids read as
  characters or another tokenizer.json of the same size would not), and the data must fit
  their vocabulary."""
  saved, label = weights.tokenizer, f"config.init_from={name_or_dir!r}"
  if not same_tokenizer(saved, data_tokenizer):
    if saved["name"] == data_tokenizer["name"] == "char":
      raise UserError(f"{label} was trained on another character table than the data here "
                      f"has ({tokenizer_difference(saved, data_tokenizer)}); fine-tune on text "
                      f"with its characters.")
    fix = (f"--config.data.tokenizer={HF_PREFIX}{saved.get('path')}" if saved["name"] == "hf"
           else f"--config.data.tokenizer={saved['name']}")
    what = (f"is a Hugging Face checkpoint whose ids are its own tokenizer's "
            f"({describe_tokenizer(saved)})" if weights.kind == HF and saved["name"] == "hf"
            else f"was trained with {describe_tokenizer(saved)}")
    raise UserError(f"{label} {what}, but the data here is read with "
                    f"{describe_tokenizer(data_tokenizer)}; read the data with its tokenizer: "
                    f"{fix}.")
  if data_vocab > weights.cfg.vocab_size:
    kind = (data_tokenizer or {}).get("name", "the data's")
    raise UserError(f"{label} has a vocabulary of "
                    f"{weights.cfg.vocab_size:,} tokens, fewer than the data's {data_vocab:,} "
                    f"({kind} tokens); use data its vocabulary covers (GPT-2 weights: "
                    f"data.tokenizer=gpt2).")


def init_params(name_or_dir: str, cfg: ModelConfig) -> dict:
  """The weights as host (numpy) arrays shaped for the run's model `cfg`: positions cropped to
  cfg.block_size, vocabulary rows re-padded to cfg.padded_vocab_size (zeros), cfg's layer
  layout, cfg.param_dtype (cfg from `model_from_weights`); adapters (of a LoRA run or a PEFT
  directory) merged into their kernels, none in the result."""
  import numpy as np
  from model.layout import unstack_layers
  w = load_weights(name_or_dir)
  merged = jax.jit(lora.merge_weights, static_argnums=1)(w.params, w.cfg)
  params = unstack_layers(jax.device_get(merged), w.cfg.num_layers)
  params = jax.tree_util.tree_map(np.asarray, params)

  def rows(x, n):  # the first vocab_size rows of a [V', ...] array, zero-padded to n
    x = x[:cfg.vocab_size]
    return np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)])

  params["wte"] = {"embedding": rows(params["wte"]["embedding"], cfg.padded_vocab_size)}
  if "wpe" in params:
    params["wpe"] = {"embedding": params["wpe"]["embedding"][:cfg.block_size]}
  if "lm_head" in params:
    params["lm_head"] = {"kernel": rows(params["lm_head"]["kernel"].T, cfg.padded_vocab_size).T}
  params = convert_layout(params, cfg)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, cfg.params_dtype), params)
