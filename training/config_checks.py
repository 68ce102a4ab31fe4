"""The experiment config's own checks, before anything is built (training/run.py: build_run
calls them in this order): the numbers of the train / optimizer / eval / checkpoint / log
sections, mesh.cpu_devices, the mesh against the device count, the sharding rules, the batch
against grad_accum, the data-parallel size and the process count, and the expert axis against
the experts. Each fails with one UserError sentence naming the bad value.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from model.config import ModelConfig
from model.errors import UserError
from sharding import BATCH_AXES, MESH_AXES, resolve_mesh_shape, rules_from_config
from training.step import check_loss_chunk

_SECTIONS = ("model", "train", "optimizer", "mesh", "data", "eval", "checkpoint", "log")
# (key, lowest allowed value, whether the value itself may equal it)
_POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum", "checkpoint.keep",
             "log.every", "optimizer.eps")
_NON_NEGATIVE = ("train.seed", "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps",
                 "optimizer.weight_decay", "optimizer.clip", "eval.every", "eval.batches",
                 "checkpoint.every")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _numbers(node, prefix: str = ""):
  """(dotted key, value) of every float in a config (ints are always finite)."""
  for name, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _numbers(value, f"{prefix}{name}.")
    elif isinstance(value, float):
      yield f"{prefix}{name}", value


def check_values(config: ml_collections.ConfigDict) -> None:
  """The numeric fields: every float finite (no nan / inf anywhere), the counts positive or
  non-negative, Adam's betas in [0, 1), min_lr <= lr, decay_steps >= warmup_steps."""
  missing = [s for s in _SECTIONS if s not in config]
  if missing:
    raise UserError(f"The config has no {missing[0]!r} section; start from "
                    f"configs/common.py:base_config().")
  for key, value in _numbers(config):
    if not math.isfinite(value):
      raise UserError(f"config.{key} must be a finite number, got {value!r}.")
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
  check_loss_chunk(config.train.get("loss_chunk", 0))
  smoothing = config.train.get("label_smoothing", 0.0)
  if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not (
      0 <= smoothing < 1):
    raise UserError(f"config.train.label_smoothing must be in [0, 1), got {smoothing!r}.")
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


def check_mesh(config, num_devices: int | None = None) -> tuple[int, int, int, int]:
  """(data, fsdp, tensor, expert) sizes over `num_devices` (default: all devices), -1
  resolved."""
  m = config.mesh
  try:
    return resolve_mesh_shape(m.data, m.fsdp, m.tensor, num_devices=num_devices,
                              expert=m.get("expert", 1))
  except UserError as e:
    raise UserError(f"config.mesh: {e}") from None


def check_rules(config):
  try:
    return rules_from_config(config.mesh)
  except UserError as e:
    raise UserError(f"config.mesh.rules: {e}") from None


def check_experts(cfg: ModelConfig, mesh_shape: tuple[int, ...], rules) -> None:
  """The mesh axes the rules put the experts on must divide model.num_experts."""
  if not cfg.num_experts:
    return
  axes = dict(rules).get("expert")
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  size = math.prod(dict(zip(MESH_AXES, mesh_shape))[a] for a in axes)
  if cfg.num_experts % size:
    where = " x ".join(f"mesh.{a}" for a in axes)
    raise UserError(f"config.{where} ({size}) must divide model.num_experts "
                    f"({cfg.num_experts}): each device holds the same number of experts.")


def check_batch(config, mesh_shape: tuple[int, ...]) -> None:
  B, k = config.train.batch_size, config.train.grad_accum
  dp = math.prod(s for name, s in zip(MESH_AXES, mesh_shape) if name in BATCH_AXES)
  if B % k:
    raise UserError(f"config.train.batch_size ({B}) must be divisible by "
                    f"config.train.grad_accum ({k}).")
  if (B // k) % dp:
    sizes = dict(zip(MESH_AXES, mesh_shape))
    axes = " x ".join(f"mesh.{a}" for a in BATCH_AXES if a != "expert" or sizes[a] > 1)
    raise UserError(f"The micro-batch config.train.batch_size / grad_accum = {B // k} must be "
                    f"divisible by the data-parallel size {axes} = {dp}.")
  if B % jax.process_count():
    raise UserError(f"config.train.batch_size ({B}) must be divisible by the number of "
                    f"processes ({jax.process_count()}).")
