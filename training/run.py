"""From a config to a validated Run: the one place a config becomes a model, a mesh and steps.

    run = build_run(config, workdir="runs/x")   # launch.train: reads the data, checks the workdir
    run = build_run(config)                     # launch.benchmark (config.data: synthetic)
    run = build_run(config, devices=tpu_devices, read_data=False)   # launch.aot
    state = run.create_state()                  # born sharded over run.mesh
    train_step = run.compile_train_step()       # (state, batch) -> (state, metrics)

Every check happens in `build_run`, before anything is compiled, and fails with one UserError
sentence naming the bad value: the config's own (training/config_checks.py: numeric ranges,
mesh.cpu_devices, the mesh against the device count, the sharding rules, the batch against
grad_accum, the data-parallel size and the process count, the expert axis against the
experts), the block size, the data (path, vocabulary), the model fields, a --workdir that
already holds a run of another model, and a workdir (and its checkpoints/) that cannot be
created or written.
The same config is therefore checked and built the same way by training, the benchmark and the
ahead-of-time TPU compile. `config.init_from` (fine-tuning: gpt2 | gpt2-medium | ... | a
Hugging Face directory | a training workdir) is checked against the model here (nothing big
read) and gives a new run its first parameters (`Run.create_state`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Callable, Collection, Sequence

import jax
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from model import attention, grouped_matmul
from model.config import FAMILIES, RENAMED_FIELDS, ModelConfig, upgrade_fields
from model.errors import UserError
from model.tokenizer import describe_tokenizer, same_tokenizer, tokenizer_difference
from sharding import MESH_AXES, make_mesh
from training import storage
from training.adapters import (REFERENCE, join, lora_fields, meta_key, split_trainable,
                               trainable_params, with_lora, with_reference)
from training.checkpoint import CHECKPOINT_DIR, resolve_workdir
from training.config_checks import (check_batch, check_experts, check_mesh, check_rules,
                                    check_values, configure_cpu_devices)
from training.dpo import DPOSettings, settings_from_config
from training.data import DataSource
from training.data.sources import NUM_SPECIALS, special_ids
from training.data.tasks import (batch_layout, batch_width, data_tokenizer, data_vocabulary,
                                 make_task_source, resolve_task)
from training.lm_inputs import check_prefix_lm, document_eot
from training.optimizer import make_optimizer, schedule_from_config
from training.state import (TrainState, abstract_train_state, create_train_state, new_adapters,
                            place, train_state_from_params)
from training.step import compile_eval_step, compile_train_step
from training.weights import (check_init_vocabulary, describe_init_from, init_params,
                              model_from_weights)
from training.workdir import CONFIG_NAME

# ModelConfig fields that may change between runs on one workdir: they change how the
# computation runs, not what the parameters are.
RUNTIME_MODEL_FIELDS = ("embd_dropout", "attn_dropout", "resid_dropout", "dropout_rng", "dtype",
                        "attention", "remat", "moe_kernel")


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
  # data.document_mask: the end-of-text id the step splits windows into documents at
  eot_id: int | None = None

  @property
  def layout(self) -> str:
    """How the GPT step reads a batch (training/lm_inputs.py): tokens, packed or preference
    (DPO's pairs: training/dpo.py)."""
    layout = batch_layout(self.task)
    return layout if layout in ("packed", "preference") else "tokens"

  @property
  def dpo(self) -> DPOSettings | None:
    """config.train.dpo of a preference run (training/dpo.py), else None."""
    return settings_from_config(self.config) if self.layout == "preference" else None

  @property
  def segments(self) -> bool:
    """Whether the step's rows hold several segments (packed examples or documents)."""
    return self.layout in ("packed", "preference") or self.eot_id is not None

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

  @property
  def reference(self) -> bool:
    """Whether the state holds a frozen reference copy of the starting weights: DPO without
    LoRA (training/adapters.py: REFERENCE; with LoRA the reference is the adapters off)."""
    return self.layout == "preference" and not self.model.lora_rank

  @property
  def frozen_meta_key(self) -> str | None:
    """The checkpoint meta key naming where the run's frozen parameters came from (a LoRA
    base, a DPO reference); None when nothing is frozen."""
    if self.reference:
      return meta_key({REFERENCE: None})
    return meta_key({}) if self.model.lora_rank else None

  @functools.cached_property
  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the TrainState with their shardings on the mesh, nothing allocated
    (a DPO run's reference copy sharded like the parameters it copies)."""
    abstract = abstract_train_state(self.model, self.tx, self.mesh, self.rules)[0]
    return abstract.replace(params=with_reference(abstract.params)) if self.reference else abstract

  @property
  def saved_abstract_state(self) -> TrainState:
    """What a checkpoint of the run holds: the TrainState without its frozen parameters (a
    LoRA run's base, a DPO run's reference: training/adapters.py)."""
    abstract = self.abstract_state
    return abstract.replace(params=trainable_params(self.model, abstract.params))

  def create_state(self) -> TrainState:
    """A fresh TrainState from config.train.seed, created directly with its shardings; with
    config.init_from, its parameters are those weights (training/weights.py: init_params;
    a LoRA run's base, with new adapters; a DPO run's, twice: the reference a copy), the
    optimizer state new and the step 0."""
    seed = self.config.train.seed
    if self.init_from:
      host = init_params(self.init_from, self.model)
      if self.model.lora_rank:
        host = join(new_adapters(self.model, seed), host)
      if self.reference:
        host = with_reference(host)
      return train_state_from_params(host, self.tx, self.abstract_state, seed, self.model)
    state = create_train_state(self.model, self.tx, self.mesh, seed, self.rules)[0]
    if self.reference:  # random weights (the benchmark): the reference a copy of them
      copy = jax.tree_util.tree_map(lambda x: x.copy(), state.params)
      state = state.replace(params={**state.params, REFERENCE: copy})
    return state

  def base_params(self):
    """The frozen parameters (config.init_from's weights) placed on the mesh: a LoRA run's
    base, or a DPO run's reference ({REFERENCE: ...})."""
    frozen_abstract = split_trainable(self.model, self.abstract_state.params)[1]
    host = init_params(self.init_from, self.model)
    return place({REFERENCE: host} if self.reference else host, frozen_abstract)

  @property
  def loss_chunk(self) -> int:
    """Positions per loss chunk (training/step.py; 0: the full logits)."""
    return self.config.train.get("loss_chunk", 0)

  def compile_train_step(self):
    """(state, batch [B, T + 1]) -> (state, metrics), state donated (training/step.py)."""
    return compile_train_step(self.model, self.tx, self.schedule, self.mesh,
                              self.abstract_state, self.batch_shape,
                              self.config.train.grad_accum, self.rules, self.loss_chunk,
                              self.config.train.get("label_smoothing", 0.0), self.layout,
                              self.eot_id, self.dpo)

  def compile_eval_step(self):
    """(params, batch [B, T + 1]) -> mean loss."""
    return compile_eval_step(self.model, self.mesh, self.abstract_state.params,
                             self.batch_shape, self.config.train.grad_accum, self.rules,
                             self.loss_chunk, self.layout, self.eot_id, self.dpo)


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
  kind, for characters the same table, for a Hugging Face tokenizer the same content (a table
  or a tokenizer.json of the same size with other tokens would silently give the ids other
  meanings); compared by content, not by path."""
  if same_tokenizer(saved, current):
    return
  if saved.get("name") == current.get("name") == "char":
    raise UserError(f"{where} was trained on another character table than the data here has "
                    f"({tokenizer_difference(saved, current)}); resume on the same text or use "
                    f"another --workdir.")
  raise UserError(f"{where} was trained with {describe_tokenizer(saved)}, but the data here is "
                  f"read with {describe_tokenizer(current)}; use the same data.tokenizer (the "
                  f"same files) or another --workdir.")


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
  config = ml_collections.ConfigDict(config.to_dict())  # the task may set model.prefix_lm
  check_prefix_lm(config, task)
  if family != "gpt" and config.train.get("loss_chunk", 0):
    raise UserError(f"config.train.loss_chunk applies to model.family='gpt' only; set it to 0 "
                    f"for {family!r}.")
  init_from = config.get("init_from") or ""
  if not isinstance(init_from, str):
    raise UserError(f"config.init_from must be a name or a path, got {init_from!r}.")
  lora = lora_fields(config)
  if batch_layout(task) == "preference":  # DPO (training/dpo.py)
    settings_from_config(config)
    if path is not None and not init_from:
      raise UserError("data.task=preference (DPO) moves a model away from its reference, the "
                      "weights it starts from: set config.init_from (a training workdir, a "
                      "Hugging Face checkpoint or a PEFT adapter directory).")
  if lora and path is not None and not init_from:
    raise UserError(f"config.train.lora.rank={lora['lora_rank']} trains adapters on existing "
                    f"weights: set config.init_from (a training workdir, a Hugging Face "
                    f"checkpoint or a PEFT adapter directory).")
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
  if getattr(source, "template", None) is not None:  # chat: the run records the template text
    config.data.chat_template = source.template.text
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
  cfg = with_lora(model_config(config, data_vocab, specials), lora)
  check_experts(cfg, mesh_shape, rules)
  tokenizer = source.tokenizer if source is not None else None
  if source is None and config.data.get("document_mask") is True:  # not read: what it records
    tokenizer = data_tokenizer(config.data, task)[2]
  eot_id = document_eot(config.data, task, family, tokenizer)
  mesh = make_mesh(*mesh_shape[:3], devices=devices, expert=mesh_shape[3])
  if family == "gpt":  # a kernel this platform cannot run is one sentence now, not in compiling
    attention.implementation(cfg, cfg.block_size, cfg.attn_dropout > 0,
                             platform=mesh.devices.flat[0].platform,
                             segments=batch_layout(task) == "packed" or eot_id is not None,
                             prefix=cfg.prefix_lm)
    if cfg.num_experts:
      grouped_matmul.kernel(cfg, platform=mesh.devices.flat[0].platform)
  if saved is not None:
    check_same_model(saved, cfg, f"--workdir {str(path)!r}")
  if path is not None and jax.process_index() == 0:
    check_writable(path)
  steps = config.train.steps
  return Run(config=resolved_config(config, cfg, mesh_shape), model=cfg, mesh=mesh, rules=rules,
             tx=make_optimizer(config.optimizer, steps),
             schedule=schedule_from_config(config.optimizer, steps), source=source,
             workdir=path, init_from=init_from, task=task, vocab_from=vocab_from,
             eot_id=eot_id)
