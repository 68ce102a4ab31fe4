"""What a run trains and what it keeps frozen: LoRA adapters on a frozen base, and DPO's frozen
reference copy.

`config.train.lora` (configs/common.py) turns a fine-tune into a LoRA run: the model gains
low-rank adapters on the targeted projections (model/lora.py); the optimizer sees only them
(`trainable_params`: no gradients and no optimizer state for the base); checkpoints hold the
adapters, their optimizer state, step and RNG, and name the base by a fingerprint of its arrays
(`base_fingerprint`), so that resuming, sampling or exporting on top of other weights is
refused (`check_base`). The base is config.init_from's weights, read again when the run
resumes.

A DPO run without LoRA (data.task=preference, training/dpo.py) keeps its reference, a frozen
copy of the starting weights, beside the model's parameters under the top-level key REFERENCE
(`with_reference`): the same partition as a LoRA base (no gradient, no optimizer state, not in
checkpoints, config.init_from's weights read again on resume and checked by fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections

from model import lora
from model.config import ModelConfig
from model.errors import UserError
from training import fingerprint

# The key of a checkpoint's meta that names the base of a LoRA run.
META_KEY = "lora_base"
# The top-level parameter key of a DPO run's frozen reference copy (no model has a parameter of
# that name), and the key of its checkpoints' meta that names the weights it is a copy of.
REFERENCE = "reference"
REFERENCE_META_KEY = "dpo_reference"


def lora_fields(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """The ModelConfig LoRA fields of config.train.lora, checked; None for a full fine-tune
  (train.lora.rank unset)."""
  section = config.train.get("lora")
  if section is None or section.get("rank") is None:
    return None
  rank, alpha = section.rank, section.get("alpha", 16.0)
  dropout, targets = section.get("dropout", 0.0), section.get("targets", "")
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise UserError(f"config.train.lora.rank must be a positive whole number (the adapters' "
                    f"rank), got {rank!r}; leave it unset for a full fine-tune.")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise UserError(f"config.train.lora.alpha must be a positive number (the adapters' scale "
                    f"is alpha / rank), got {alpha!r}.")
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise UserError(f"config.train.lora.dropout must be in [0, 1), got {dropout!r}.")
  if not isinstance(targets, str):
    raise UserError(f"config.train.lora.targets must be a comma-separated string, got "
                    f"{targets!r}.")
  return {"lora_rank": rank, "lora_alpha": float(alpha), "lora_dropout": float(dropout),
          "lora_targets": targets}


def with_lora(cfg: ModelConfig, fields: dict[str, Any] | None) -> ModelConfig:
  """cfg with the LoRA fields of `fields` (None: none), its targets and rank checked against
  the model (UserError naming config.train.lora's keys)."""
  if fields is None:
    return lora.without_lora(cfg) if cfg.lora_rank else cfg
  if cfg.family != "gpt":
    raise UserError(f"config.train.lora applies to model.family='gpt' (GPT-2 and Llama-style "
                    f"decoders), not {cfg.family!r}; leave train.lora.rank unset.")
  cfg = cfg.replace(**fields)
  lora.plan(cfg)
  lora.check_rank(cfg, lora.kernel_shapes(cfg))
  return cfg


def trainable_params(cfg: ModelConfig, params: Any) -> Any:
  """What the optimizer trains: the adapters of a LoRA model, else every parameter but a DPO
  reference copy."""
  return split_trainable(cfg, params)[0]


def split_trainable(cfg: ModelConfig, params: Any) -> tuple[Any, Any]:
  """(trainable, frozen) parameters; join(trainable, frozen) gives `params` back. Frozen: a
  LoRA model's base, or a DPO run's reference copy ({REFERENCE: ...})."""
  if REFERENCE in params:
    return {k: v for k, v in params.items() if k != REFERENCE}, {REFERENCE: params[REFERENCE]}
  if not cfg.lora_rank:
    return params, {}
  return lora.split_adapters(params)


def join(trainable: Any, frozen: Any) -> Any:
  return lora.join(trainable, frozen) if frozen else trainable


def with_reference(params: Any) -> dict:
  """A DPO run's parameters: the model's, and the same values again as its frozen reference."""
  return {**params, REFERENCE: params}


def meta_key(frozen: Any) -> str:
  """The checkpoint meta key that names where a run's frozen parameters came from."""
  return REFERENCE_META_KEY if REFERENCE in frozen else META_KEY


def base_fingerprint(base: Any) -> str:
  """One hexadecimal name for the content of a parameter tree: a hash of its arrays'
  fingerprints (training/fingerprint.py; computed where the arrays live, any mesh)."""
  fps = fingerprint.fingerprints({"params": base})
  return hashlib.sha256(json.dumps(sorted(fps.items())).encode()).hexdigest()[:16]


def base_meta(init_from: str, base: Any) -> dict[str, str]:
  """What a LoRA run's checkpoints say about their base: where it is (a local path made
  absolute) and its fingerprint."""
  where = os.path.abspath(init_from) if os.path.exists(init_from) else init_from
  return {"init_from": where, "fingerprint": base_fingerprint(base)}


def check_base(saved: dict | None, base: Any, init_from: str, where: str) -> None:
  """UserError unless `base` (a run's frozen parameters: a LoRA base or a DPO reference) is the
  one the checkpoint of `where` was trained with (`saved`: its meta_key entry)."""
  if not saved:
    return
  got = base_fingerprint(base)
  if got == saved.get("fingerprint"):
    return
  if REFERENCE in base:
    raise UserError(f"{where} holds a DPO run against another reference: it started from "
                    f"{saved.get('init_from')!r} (fingerprint {saved.get('fingerprint')}), but "
                    f"{init_from!r} has fingerprint {got}; use the weights it started from.")
  raise UserError(f"{where} holds LoRA adapters for another base: they were trained on "
                  f"{saved.get('init_from')!r} (fingerprint {saved.get('fingerprint')}), but "
                  f"{init_from!r} has fingerprint {got}; use the base they were trained on.")
