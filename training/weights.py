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

`tokenizer` is the tokenizer a run recorded (`model.tokenizer.tokenizer_from_dict`), or None
for a Hugging Face checkpoint (GPT-2 BPE; a BERT / BART checkpoint's own tokenizer files,
model/hf/tokenizer.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Collection

import jax
from jax.sharding import Mesh

from model import hf
from model.config import ModelConfig
from model.config import from_dict as model_config_from_dict
from model.errors import NotFoundError, UserError
from model.tokenizer import char_table_difference
from sharding import DEFAULT_RULES, make_mesh, place_params
from training.checkpoint import CHECKPOINT_DIR, load_for_inference, read_run_meta

WORKDIR, HF = "workdir", "hf"


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
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, hf.CONFIG_FILE)):
    raise NotFoundError(
        f"{path!r} is neither a training workdir (it has no {CHECKPOINT_DIR}/) nor a Hugging "
        f"Face checkpoint directory (it has no {hf.CONFIG_FILE}).")
  return HF


def describe_weights(name_or_dir: str | os.PathLike, *, step: int | None = None,
                     dtype: str | None = None, kind: str | None = None) -> Weights:
  """The model config, tokenizer and step of the weights, without reading any arrays (a Hub
  name is downloaded). `dtype` replaces the compute dtype; `kind` (WORKDIR or HF) skips the
  guess of `source_kind` (e.g. for a --workdir flag, whose errors then speak of a workdir)."""
  path = os.fspath(name_or_dir)
  if (kind or source_kind(path)) == WORKDIR:
    step, meta = read_run_meta(path, step)
    cfg = model_config_from_dict(meta["model"])
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    return Weights(cfg, None, meta.get("tokenizer"), step, f"{path} step {step}", WORKDIR)
  _no_step(path, step)
  directory = hf.resolve_checkpoint_dir(path)
  cfg = hf.checkpoint_config(directory, dtype=dtype or "float32")
  return Weights(cfg, None, None, None, path, HF)


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
  if (kind or source_kind(path)) == WORKDIR:
    cfg, params, tokenizer, step = load_for_inference(path, step=step, mesh=mesh, rules=rules)
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    return Weights(cfg, params, tokenizer, step, f"{path} step {step}", WORKDIR)
  _no_step(path, step)
  cfg, params = hf.load_hf(path, dtype=dtype or "float32", **hf_overrides)
  return Weights(cfg, place_params(params, cfg, mesh, rules), None, None, path, HF)


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
  return w


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
  """The data must fit the weights' vocabulary, and a run's weights must have been trained on
  the data's tokenizer (a character table of the same size with other characters would give
  the ids other meanings)."""
  own = own_tokenizer_dir(weights.label) if weights.kind == HF else None
  if own is not None:  # a Llama checkpoint: its ids are its own tokenizer's
    if not _same_hf_tokenizer(own, data_tokenizer):
      raise UserError(f"config.init_from={name_or_dir!r} is a Hugging Face checkpoint whose "
                      f"ids are its own tokenizer's ({own}/tokenizer.json); read the data with "
                      f"it: --config.data.tokenizer=hf:{name_or_dir}.")
  if data_vocab > weights.cfg.vocab_size:
    kind = (data_tokenizer or {}).get("name", "the data's")
    raise UserError(f"config.init_from={name_or_dir!r} has a vocabulary of "
                    f"{weights.cfg.vocab_size:,} tokens, fewer than the data's {data_vocab:,} "
                    f"({kind} tokens); use data its vocabulary covers (GPT-2 weights: "
                    f"data.tokenizer=gpt2).")
  saved = weights.tokenizer
  if saved is None or data_tokenizer is None or saved == data_tokenizer:
    return
  if saved.get("name") != data_tokenizer.get("name"):
    raise UserError(f"config.init_from={name_or_dir!r} was trained on {saved.get('name')} "
                    f"tokens, the data here is {data_tokenizer.get('name')} tokens; use "
                    f"data.tokenizer={saved.get('name')}.")
  difference = char_table_difference(saved.get("chars", ""), data_tokenizer.get("chars", ""))
  raise UserError(f"config.init_from={name_or_dir!r} was trained on another character table "
                  f"than the data here has ({difference}); fine-tune on text with its "
                  f"characters.")


def own_tokenizer_dir(name_or_dir: str) -> str | None:
  """The directory of a Hugging Face checkpoint that brings the tokenizer its ids mean (a
  Llama's, Qwen3's or a mixture of experts' tokenizer.json; GPT-2 checkpoints mean GPT-2 BPE),
  else None (a workdir too)."""
  if source_kind(name_or_dir) != HF:
    return None
  directory = hf.resolve_checkpoint_dir(name_or_dir)
  kind = hf.read_hf_config(directory).get("model_type", "gpt2")
  return directory if kind in hf.HF_CLASSES and kind != "gpt2" else None


def _same_hf_tokenizer(directory: str, data_tokenizer: dict | None) -> bool:
  """Whether the data's tokenizer is the checkpoint's: "hf" with the same tokenizer.json."""
  if not data_tokenizer or data_tokenizer.get("name") != "hf":
    return False
  mine, theirs = (os.path.join(d, "tokenizer.json") for d in (directory, data_tokenizer["path"]))
  try:
    with open(mine, "rb") as a, open(theirs, "rb") as b:
      return a.read() == b.read()
  except OSError:
    return False


def init_params(name_or_dir: str, cfg: ModelConfig) -> dict:
  """The weights as host (numpy) arrays shaped for the run's model `cfg`: positions cropped to
  cfg.block_size, vocabulary rows re-padded to cfg.padded_vocab_size (zeros), cfg's layer
  layout, cfg.param_dtype (cfg from `model_from_weights`)."""
  import numpy as np
  from model.layout import convert_layout, unstack_layers
  w = load_weights(name_or_dir)
  params = unstack_layers(jax.device_get(w.params), w.cfg.num_layers)
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
