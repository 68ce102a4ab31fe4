"""From a config to a validated Run: the one place a config becomes a model, a mesh and steps.

    run = build_run(config, workdir="runs/x")   # launch.train: reads the data, checks the workdir
    run = build_run(config)                     # launch.benchmark (config.data: synthetic)
    run = build_run(config, devices=tpu_devices, read_data=False)   # launch.aot
    state = run.create_state()                  # born sharded over run.mesh
    train_step = run.compile_train_step()       # (state, batch) -> (state, metrics)

Every check happens in `build_run`, before anything is compiled, and fails with one UserError
sentence naming the bad value: numeric ranges of the train / optimizer / eval / checkpoint / log
sections, mesh.cpu_devices, the mesh against the device count, the sharding rules, the batch
against grad_accum, the data-parallel size and the process count, the block size, the data
(path, vocabulary), the model fields, a --workdir that already holds a run of another model, and
a workdir (and its checkpoints/) that cannot be created or written.
The same config is therefore checked and built the same way by training, the benchmark and the
ahead-of-time TPU compile. `config.init_from` (fine-tuning: gpt2 | gpt2-medium | ... | a
Hugging Face directory | a training workdir) is checked against the model here (nothing big
read) and gives a new run its first parameters (`Run.create_state`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
from typing import Any, Callable, Collection, Sequence

import jax
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from model import attention, moe
from model.config import FAMILIES, RENAMED_FIELDS, ModelConfig, upgrade_fields
from model.errors import UserError
from model.tokenizer import char_table_difference
from sharding import BATCH_AXES, MESH_AXES, make_mesh, resolve_mesh_shape, rules_from_config
from training import storage
from training.checkpoint import CHECKPOINT_DIR, resolve_workdir
from training.data import DataSource
from training.data.tasks import (NUM_SPECIALS, batch_width, data_tokenizer, data_vocabulary,
                                 make_task_source, resolve_task, special_ids)
from training.optimizer import make_optimizer, schedule_from_config
from training.state import (TrainState, abstract_train_state, create_train_state,
                            train_state_from_params)
from training.step import check_loss_chunk, compile_eval_step, compile_train_step
from training.weights import (check_init_vocabulary, describe_init_from, init_params,
                              model_from_weights)

CONFIG_NAME = "config.json"
# ModelConfig fields that may change between runs on one workdir: they change how the
# computation runs, not what the parameters are.
RUNTIME_MODEL_FIELDS = ("embd_dropout", "attn_dropout", "resid_dropout", "dropout_rng", "dtype",
                        "attention", "remat", "moe_kernel")

_SECTIONS = ("model", "train", "optimizer", "mesh", "data", "eval", "checkpoint", "log")
# (key, lowest allowed value, whether the value itself may equal it)
_POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum", "checkpoint.keep",
             "log.every", "optimizer.eps")
_NON_NEGATIVE = ("train.seed", "optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps",
                 "optimizer.weight_decay", "optimizer.clip", "eval.every", "eval.batches",
                 "checkpoint.every")


@dataclasses.dataclass
class Run:
  """Everything a run derives from its config, validated; steps compile on request."""
  config: ml_collections.ConfigDict  # resolved: no placeholders or -1 left
  model: ModelConfig
  mesh: Mesh
  rules: Any  # sharding rules (sharding/rules.py)
  tx: optax.GradientTransformation
  schedule: Callable[[Any], jax.Array]  # step -> learning rate
  source: DataSource | None  # None when built with read_data=False
  workdir: epath.Path | None
  # config.init_from: the weights a new training run starts from (checked); "" without a workdir
  init_from: str = ""
  task: str = "lm"  # what the batches teach (training/data/tasks.py)
  vocab_from: str = ""  # where model.vocab_size came from, in words

  @property
  def mesh_shape(self) -> tuple[int, ...]:
    return tuple(self.mesh.shape[name] for name in MESH_AXES)

  @property
  def seq_len(self) -> int:
    return self.model.block_size

  @property
  def batch_shape(self) -> tuple[int, int]:
    """The token batch of one step: [B, T + 1] (inputs [:, :-1], targets [:, 1:]); masked LM
    [B, 2T], seq2seq [B, S + T + 1] (training/data/tasks.py: batch_width)."""
    return (self.config.train.batch_size, batch_width(self.task, self.seq_len))

  @property
  def tokens_per_step(self) -> int:
    return self.config.train.batch_size * self.seq_len

  @functools.cached_property
  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the TrainState with their shardings on the mesh, nothing allocated."""
    return abstract_train_state(self.model, self.tx, self.mesh, self.rules)[0]

  def create_state(self) -> TrainState:
    """A fresh TrainState from config.train.seed, created directly with its shardings; with
    config.init_from, its parameters are those weights (training/weights.py: init_params),
    the optimizer state new and the step 0."""
    if self.init_from:
      return train_state_from_params(init_params(self.init_from, self.model), self.tx,
                                     self.abstract_state, self.config.train.seed)
    return create_train_state(self.model, self.tx, self.mesh, self.config.train.seed,
                              self.rules)[0]

  @property
  def loss_chunk(self) -> int:
    """Positions per loss chunk (training/step.py; 0: the full logits)."""
    return self.config.train.get("loss_chunk", 0)

  def compile_train_step(self):
    """(state, batch [B, T + 1]) -> (state, metrics), state donated (training/step.py)."""
    return compile_train_step(self.model, self.tx, self.schedule, self.mesh,
                              self.abstract_state, self.batch_shape,
                              self.config.train.grad_accum, self.rules, self.loss_chunk,
                              self.config.train.get("label_smoothing", 0.0))

  def compile_eval_step(self):
    """(params, batch [B, T + 1]) -> mean loss."""
    return compile_eval_step(self.model, self.mesh, self.abstract_state.params,
                             self.batch_shape, self.config.train.grad_accum, self.rules,
                             self.loss_chunk)


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


def model_config(config, data_vocab_size: int,
                 specials: dict[str, int] | None = None) -> ModelConfig:
  """The ModelConfig of config.model, vocab_size defaulting to the data's vocabulary and the
  special token ids left at -1 to the data's (`specials`, training/data/tasks.py)."""
  fields = {RENAMED_FIELDS.get(k, k): v for k, v in config.model.to_dict().items()}
  for name, value in (specials or {}).items():
    if fields.get(name, -1) == -1:
      fields[name] = value
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


def vocab_size_without_data(config, task: str = "lm") -> tuple[int, str]:
  """(vocabulary size, where it comes from): config.model.vocab_size, or what the data gives,
  found without tokenizing it (training/data/tasks.py: data_vocabulary) plus the family's
  special tokens."""
  vocab = config.model.get("vocab_size")
  if vocab is not None:
    return vocab, "config.model.vocab_size"
  vocab, where = data_vocabulary(config.data, task)
  if config.model.get("family", "gpt") != "gpt":
    return vocab + NUM_SPECIALS, f"{where} + {NUM_SPECIALS} special tokens"
  return vocab, where


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
    return upgrade_fields(json.loads(path.read_text())["model"])
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


def check_same_tokenizer(saved: dict | None, current: dict | None, where: str) -> None:
  """A resumed run's data must use the tokenizer its checkpoint was trained with: the same
  kind, and for characters the same table (a table of the same size with other characters
  would silently give the ids other meanings)."""
  if saved is None or current is None or saved == current:
    return
  name, other = saved.get("name"), current.get("name")
  if name != other:
    raise UserError(f"{where} was trained on {name} tokens, but the data here is {other} "
                    f"tokens; use the same data.tokenizer or another --workdir.")
  if name == "char":
    raise UserError(f"{where} was trained on another character table than the data here has "
                    f"({char_table_difference(saved.get('chars', ''), current.get('chars', ''))}"
                    f"); resume on the same text or use another --workdir.")
  raise UserError(f"{where} was trained with the tokenizer {saved!r}, the data here has "
                  f"{current!r}; use the same data or another --workdir.")


def check_workdir(workdir: str | os.PathLike) -> epath.Path:
  """The workdir's path; UserError if it, or a folder above it, is not a directory."""
  if not os.fspath(workdir):
    raise UserError("--workdir must name a directory.")
  path = resolve_workdir(workdir)
  if path.exists() and not path.is_dir():
    raise UserError(f"--workdir {str(path)!r} exists and is not a directory.")
  if "://" not in str(path):
    for parent in pathlib.Path(str(path)).parents:
      if parent.exists():
        if not parent.is_dir():
          raise UserError(f"--workdir {str(path)!r} cannot be created: {str(parent)!r} is a "
                          f"file, not a directory.")
        break
  return path


def check_writable(path: epath.Path) -> None:
  """Create the workdir and its checkpoints/ and write a file in each (a remote workdir: write
  and delete a probe object); UserError naming what fails: a file in the way, a read-only
  file system, a missing bucket, no credentials, an unreachable endpoint."""
  if "://" in str(path):
    storage.check_remote(str(path), "--workdir")
    return
  ckpt = pathlib.Path(str(path)) / CHECKPOINT_DIR
  if ckpt.exists() and not ckpt.is_dir():
    raise UserError(f"--workdir {str(path)!r} cannot hold checkpoints: {str(ckpt)!r} is a file, "
                    f"not a directory.")
  for folder in (ckpt.parent, ckpt):
    probe = folder / f".write-test-{os.getpid()}"
    try:
      folder.mkdir(parents=True, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"x")
        f.flush()
        os.fsync(f.fileno())
      probe.unlink()
    except OSError as e:
      raise UserError(f"--workdir {str(path)!r} is not writable: cannot write in "
                      f"{str(folder)!r} ({e.strerror or type(e).__name__}).") from None


def build_run(config: ml_collections.ConfigDict, *, workdir: str | os.PathLike | None = None,
              devices: Sequence[Any] | None = None, read_data: bool = True,
              explicit: Collection[str] = ()) -> Run:
  """Validate `config` and build its Run; raises UserError on a bad input, before compiling.

  workdir: the run's directory, checked (it must not hold a run of another model).
  devices: the mesh's devices (default: all of them; e.g. a TPU slice's compile-only devices);
    with the default, config.mesh.cpu_devices is applied first.
  read_data: build the data source (tokenizing text into the cache on first use); without it
    the vocabulary is config.model.vocab_size or what the data's tokenizer or metadata says
    (`vocab_size_without_data`: no tokens are read).
  explicit: the config keys the command line set ("model.num_layers", ...). With
    config.init_from (a new run in `workdir`) the model's shape comes from those weights
    (training/weights.py: model_from_weights): the config file's shape fields are replaced,
    and one the command line set that the weights fix otherwise is a UserError.
  """
  path = check_workdir(workdir) if workdir is not None else None
  check_values(config)
  if devices is None:
    configure_cpu_devices(config)
  mesh_shape = check_mesh(config, None if devices is None else len(devices))
  rules = check_rules(config)
  check_batch(config, mesh_shape)
  block_size = config.model.get("block_size")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
    raise UserError(f"config.model.block_size must be a positive integer, got {block_size!r}.")
  family = config.model.get("family", "gpt")
  if family not in FAMILIES:
    raise UserError(f"config.model.family must be one of {', '.join(FAMILIES)}; got "
                    f"{family!r}.")
  task = resolve_task(family, config.data)
  if family != "gpt" and config.train.get("loss_chunk", 0):
    raise UserError(f"config.train.loss_chunk applies to model.family='gpt' only; set it to 0 "
                    f"for {family!r}.")
  init_from = config.get("init_from") or ""
  if not isinstance(init_from, str):
    raise UserError(f"config.init_from must be a name or a path, got {init_from!r}.")
  if path is None:  # the benchmark and the TPU compile: random weights do as well
    init_from = ""
  if init_from and family != "gpt":
    raise UserError(f"config.init_from fine-tunes model.family='gpt' runs only, not "
                    f"{family!r}; leave it empty.")
  saved = saved_model_fields(path) if path is not None else None
  weights = None
  if init_from:  # the model's shape is the weights' (a resumed run's: the one it trained)
    if saved is None:
      weights = describe_init_from(init_from)
      base, label = weights.cfg, f"config.init_from={init_from!r}"
    else:
      base, label = ModelConfig(**saved), f"the run in --workdir {str(path)!r}"
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = model_from_weights(config.model.to_dict(), base, label, explicit)
    block_size = config.model.block_size
    if weights is not None and read_data:  # before the data is tokenized
      data_vocab, _, data_tok = data_tokenizer(config.data, task)
      check_init_vocabulary(weights, data_vocab, data_tok, init_from)
  source = None
  if read_data:
    source = make_task_source(config.data, task, seq_len=block_size,
                              global_batch_size=config.train.batch_size,
                              seed=config.train.seed)
  specials = getattr(source, "specials", None)
  if source is None:
    data_vocab, vocab_from = vocab_size_without_data(config, task)
    if family != "gpt":
      specials = special_ids(data_vocab - NUM_SPECIALS)
  else:
    data_vocab, vocab_from = source.vocab_size, "the data"
    if config.model.get("vocab_size") is not None:
      vocab_from = "config.model.vocab_size"
  if weights is not None:
    vocab_from = f"config.init_from={init_from!r}"
  cfg = model_config(config, data_vocab, specials)
  check_experts(cfg, mesh_shape, rules)
  mesh = make_mesh(*mesh_shape[:3], devices=devices, expert=mesh_shape[3])
  if family == "gpt":  # a kernel this platform cannot run is one sentence now, not in compiling
    attention.implementation(cfg, cfg.block_size, cfg.attn_dropout > 0,
                             platform=mesh.devices.flat[0].platform)
    if cfg.num_experts:
      moe.kernel(cfg, platform=mesh.devices.flat[0].platform)
  if saved is not None:
    check_same_model(saved, cfg, f"--workdir {str(path)!r}")
  if path is not None and jax.process_index() == 0:
    check_writable(path)
  steps = config.train.steps
  return Run(config=resolved_config(config, cfg, mesh_shape), model=cfg, mesh=mesh, rules=rules,
             tx=make_optimizer(config.optimizer, steps),
             schedule=schedule_from_config(config.optimizer, steps), source=source,
             workdir=path, init_from=init_from, task=task, vocab_from=vocab_from)
