"""From a config and a workdir to a validated Run, before anything is compiled.

Checks, each failing with one UserError sentence naming the bad value: numeric ranges of the
train / optimizer / eval / checkpoint / log sections, the mesh against the device count, the
batch against grad_accum and the data-parallel size, the data (path, vocabulary), the model
fields, and a --workdir that already holds a run of a different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from model.config import ModelConfig
from sharding import BATCH_AXES, MESH_AXES, resolve_mesh_shape, rules_from_config
from training.errors import UserError

CONFIG_NAME = "config.json"
# ModelConfig fields that may change between runs on one workdir: they change how the
# computation runs, not what the parameters are.
RUNTIME_MODEL_FIELDS = ("embd_dropout", "attn_dropout", "resid_dropout", "dtype", "attention",
                        "remat")

_SECTIONS = ("model", "train", "optimizer", "mesh", "data", "eval", "checkpoint", "log")
# (key, lowest allowed value, whether the value itself may equal it)
_POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum", "checkpoint.keep",
             "log.every", "optimizer.eps")
_NON_NEGATIVE = ("train.seed", "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps",
                 "optimizer.weight_decay", "optimizer.clip", "eval.every", "eval.batches",
                 "checkpoint.every")


@dataclasses.dataclass
class Run:
  """Everything a training run derives from its config, validated, nothing compiled yet."""
  config: ml_collections.ConfigDict  # resolved: no placeholders left
  model: ModelConfig
  mesh_shape: tuple[int, int, int]
  source: Any  # training.data.DataSource
  workdir: epath.Path

  @property
  def seq_len(self) -> int:
    return self.model.block_size

  @property
  def tokens_per_step(self) -> int:
    return self.config.train.batch_size * self.seq_len


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_values(config: ml_collections.ConfigDict) -> None:
  missing = [s for s in _SECTIONS if s not in config]
  if missing:
    raise UserError(f"The config has no {missing[0]!r} section; start from "
                    f"configs/common.py:base_config().")
  for key in _POSITIVE + _NON_NEGATIVE:
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      raise UserError(f"The config has no key {key!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise UserError(f"config.{key} must be a number, got {value!r}.")
    if key in _POSITIVE and value <= 0:
      raise UserError(f"config.{key} must be positive, got {value!r}.")
    if value < 0:
      raise UserError(f"config.{key} must be >= 0, got {value!r}.")
  for key in ("optimizer.b1", "optimizer.b2"):
    value = _get(config, key)
    if not 0 <= value < 1:
      raise UserError(f"config.{key} must be in [0, 1), got {value!r}.")
  opt = config.optimizer
  if opt.min_lr > opt.lr:
    raise UserError(f"config.optimizer.min_lr ({opt.min_lr}) must not exceed "
                    f"config.optimizer.lr ({opt.lr}).")
  decay = opt.get("decay_steps")
  if decay is not None and decay < opt.warmup_steps:
    raise UserError(f"config.optimizer.decay_steps ({decay}) must be at least "
                    f"config.optimizer.warmup_steps ({opt.warmup_steps}).")


def cpu_device_count(requested: int, batch_size: int, cores: int) -> int:
  """The CPU devices mesh.cpu_devices asks for: requested > 0 as it is; -1 ("auto") the
  largest divisor of the batch size that is at most `cores` (one device per core)."""
  if requested > 0:
    return requested
  return max(d for d in range(1, min(cores, batch_size) + 1) if batch_size % d == 0)


def configure_cpu_devices(config) -> None:
  """Apply config.mesh.cpu_devices: on a host without accelerators, JAX's CPU backend becomes
  that many devices, so the mesh splits each batch over the cores (data parallel; each device
  runs on its own thread). 0 keeps JAX's default (one device). Has no effect when
  --xla_force_host_platform_device_count is in XLA_FLAGS (the user's choice) or when JAX's
  backends are already running (e.g. a caller in the same process chose already)."""
  requested = config.mesh.get("cpu_devices", 0)
  if isinstance(requested, bool) or not isinstance(requested, int) or requested < -1:
    raise UserError(f"config.mesh.cpu_devices must be -1 (one per core), 0 (JAX's default) "
                    f"or a positive device count, got {requested!r}.")
  if requested == 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  try:
    jax.config.update("jax_num_cpu_devices",
                      cpu_device_count(requested, config.train.batch_size, cores or 1))
  except RuntimeError:  # the backends are already running: keep their devices
    pass


def check_mesh(config) -> tuple[int, int, int]:
  m = config.mesh
  try:
    return resolve_mesh_shape(m.data, m.fsdp, m.tensor)
  except ValueError as e:
    raise UserError(f"config.mesh: {e}") from None


def check_batch(config, mesh_shape: tuple[int, int, int]) -> None:
  B, k = config.train.batch_size, config.train.grad_accum
  dp = math.prod(s for name, s in zip(MESH_AXES, mesh_shape) if name in BATCH_AXES)
  if B % k:
    raise UserError(f"config.train.batch_size ({B}) must be divisible by "
                    f"config.train.grad_accum ({k}).")
  if (B // k) % dp:
    raise UserError(f"The micro-batch config.train.batch_size / grad_accum = {B // k} must be "
                    f"divisible by the data-parallel size mesh.data x mesh.fsdp = {dp}.")
  if B % jax.process_count():
    raise UserError(f"config.train.batch_size ({B}) must be divisible by the number of "
                    f"processes ({jax.process_count()}).")


def model_config(config, data_vocab_size: int) -> ModelConfig:
  """The ModelConfig of config.model, vocab_size defaulting to the data's vocabulary."""
  fields = dict(config.model.to_dict())
  vocab = fields.get("vocab_size")
  if vocab is None:
    fields["vocab_size"] = data_vocab_size
  elif vocab < data_vocab_size:
    raise UserError(f"config.model.vocab_size ({vocab}) is smaller than the data's vocabulary "
                    f"({data_vocab_size}); leave it unset (None) to use the data's.")
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise UserError(f"config.model.{unknown[0]} is not a ModelConfig field.")
  try:
    return ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise UserError(str(e).replace("ModelConfig.", "config.model.")) from None


def resolved_config(config, cfg: ModelConfig, mesh_shape) -> ml_collections.ConfigDict:
  """A copy of `config` with every placeholder and -1 filled in."""
  out = ml_collections.ConfigDict(config.to_dict())
  for name, value in cfg.to_dict().items():
    out.model[name] = value
  if out.optimizer.get("decay_steps") is None:
    out.optimizer.decay_steps = out.train.steps
  for name, size in zip(MESH_AXES, mesh_shape):
    out.mesh[name] = size
  return out


def config_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def saved_model_fields(workdir: epath.Path) -> dict | None:
  """The model section of the config saved in a workdir, or None for a new workdir."""
  path = workdir / CONFIG_NAME
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())["model"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} exists but is not a flaxgpt config ({e}); use another "
                    f"--workdir.") from None


def check_same_model(saved: dict, cfg: ModelConfig, where: str) -> None:
  for name, value in cfg.to_dict().items():
    if name in RUNTIME_MODEL_FIELDS:
      continue
    if saved.get(name) != value:
      raise UserError(f"{where} holds a run of a different model (model.{name} is "
                      f"{saved.get(name)!r} there, {value!r} here); use another --workdir.")


def check_workdir(workdir: str | os.PathLike) -> epath.Path:
  from training.checkpoint import resolve_workdir  # pylint: disable=import-outside-toplevel
  if not os.fspath(workdir):
    raise UserError("--workdir must name a directory.")
  path = resolve_workdir(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir {str(path)!r} exists and is not a directory.")
  return path


def prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Run:
  """Validate everything and build the data source; raises UserError on a bad input."""
  from training.data import make_source  # pylint: disable=import-outside-toplevel
  path = check_workdir(workdir)
  check_values(config)
  configure_cpu_devices(config)
  mesh_shape = check_mesh(config)
  try:
    rules_from_config(config.mesh)
  except ValueError as e:
    raise UserError(f"config.mesh.rules: {e}") from None
  check_batch(config, mesh_shape)
  block_size = config.model.get("block_size")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
    raise UserError(f"config.model.block_size must be a positive integer, got {block_size!r}.")
  source = make_source(config.data, seq_len=block_size,
                       global_batch_size=config.train.batch_size, seed=config.train.seed)
  cfg = model_config(config, source.vocab_size)
  saved = saved_model_fields(path)
  if saved is not None:
    check_same_model(saved, cfg, f"--workdir {str(path)!r}")
  return Run(config=resolved_config(config, cfg, mesh_shape), model=cfg, mesh_shape=mesh_shape,
             source=source, workdir=path)
