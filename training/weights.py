"""Trained weights from wherever they are: a training workdir or a Hugging Face GPT-2.

The one way `launch.sample`, `launch.eval`, `launch.export` and fine-tuning (`init_from`) find
weights by a name or a path:

  a training workdir (a directory with checkpoints/)   its latest (or `step`) checkpoint
  a Hugging Face checkpoint directory (config.json)    read with model/pretrained.py
  gpt2 | gpt2-medium | gpt2-large | gpt2-xl            downloaded from the Hub once

    w = describe_weights("runs/x")          # Weights with params=None: nothing big read
    w = load_weights("gpt2", mesh=mesh)     # params placed on the mesh with their shardings
    w.cfg, w.params, w.tokenizer, w.step, w.label

`tokenizer` is the tokenizer a run recorded (`model.tokenizer.tokenizer_from_dict`), or None
for a Hugging Face checkpoint (GPT-2 BPE).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from jax.sharding import Mesh

from model import pretrained
from model.config import ModelConfig
from model.errors import NotFoundError, UserError
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
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, pretrained.CONFIG_FILE)):
    raise NotFoundError(
        f"{path!r} is neither a training workdir (it has no {CHECKPOINT_DIR}/) nor a Hugging "
        f"Face checkpoint directory (it has no {pretrained.CONFIG_FILE}).")
  return HF


def describe_weights(name_or_dir: str | os.PathLike, *, step: int | None = None,
                     dtype: str | None = None, kind: str | None = None) -> Weights:
  """The model config, tokenizer and step of the weights, without reading any arrays (a Hub
  name is downloaded). `dtype` replaces the compute dtype; `kind` (WORKDIR or HF) skips the
  guess of `source_kind` (e.g. for a --workdir flag, whose errors then speak of a workdir)."""
  path = os.fspath(name_or_dir)
  if (kind or source_kind(path)) == WORKDIR:
    step, meta = read_run_meta(path, step)
    cfg = ModelConfig(**meta["model"])
    cfg = cfg.replace(dtype=dtype) if dtype else cfg
    return Weights(cfg, None, meta.get("tokenizer"), step, f"{path} step {step}", WORKDIR)
  _no_step(path, step)
  directory = pretrained.resolve_checkpoint_dir(path)
  cfg = pretrained.config_from_hf(pretrained.read_hf_config(directory),
                                  dtype=dtype or "float32", source=directory)
  return Weights(cfg, None, None, None, path, HF)


def load_weights(name_or_dir: str | os.PathLike, *, step: int | None = None,
                 dtype: str | None = None, mesh: Mesh | None = None, rules=DEFAULT_RULES,
                 kind: str | None = None, **hf_overrides) -> Weights:
  """The weights, placed on `mesh` (default: the first device) with the model's logical
  shardings; float32 parameters. A damaged newest checkpoint of a workdir is skipped with a
  warning (a damaged `step` is a UserError). `hf_overrides` go to `load_hf_gpt2` (fields the
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
  cfg, params = pretrained.load_hf_gpt2(path, dtype=dtype or "float32", **hf_overrides)
  return Weights(cfg, place_params(params, cfg, mesh, rules), None, None, path, HF)


def _no_step(path: str, step: int | None) -> None:
  if step is not None:
    raise UserError(f"A step ({step}) only applies to a training workdir; {path!r} is a "
                    f"Hugging Face checkpoint.")
