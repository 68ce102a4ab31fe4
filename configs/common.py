"""The keys every experiment config has, with their types and defaults.

Sections: model (every ModelConfig field), train, optimizer, mesh, data, eval, checkpoint, log;
and init_from (fine-tuning: the weights a new run starts from).
Config files start from `base_config()` and change what differs. Fields are typed: overriding an
int field with a float on the command line fails. Placeholders (None) are resolved at start-up:

  model.vocab_size         None: the data's vocabulary (e.g. 65 characters of tiny shakespeare)
  model.padded_vocab_size  None: model.vocab_size
  model.d_mlp              None: 4 * model.d_model
  optimizer.decay_steps    None: train.steps (nanoGPT's lr_decay_iters)
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from model.config import get_config as model_preset
from sharding.rules import rules_config
from training.data import default_data_config

# Filled in from other fields when None (see the module docstring).
_DERIVED_MODEL_FIELDS = ("vocab_size", "padded_vocab_size", "d_mlp")


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """Every ModelConfig field of a preset (model/config.py); vocab_size, padded_vocab_size and
  d_mlp become placeholders unless given, so they follow the data and d_model."""
  fields = model_preset(preset, **overrides).to_dict()
  section = ml_collections.ConfigDict()
  derived = {"vocab_size": True, "padded_vocab_size": fields["padded_vocab_size"] == fields[
      "vocab_size"], "d_mlp": fields["d_mlp"] == 4 * fields["d_model"]}  # else the preset's own
  for name, value in fields.items():
    if name in _DERIVED_MODEL_FIELDS and name not in overrides and derived[name]:
      section[name] = config_dict.placeholder(int)
    else:
      section[name] = value
  return section


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_section("tiny")
  # Fine-tuning: a new run's first parameters come from these weights (gpt2, gpt2-medium,
  # gpt2-large, gpt2-xl, a Hugging Face GPT-2 directory, or a training workdir's latest
  # checkpoint), with a new optimizer state at step 0; the model section must describe the same
  # shapes (block_size may be lower). "": a randomly initialised model. A run that resumes from
  # its own checkpoint ignores it.
  c.init_from = ""

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer updates
  c.train.batch_size = 8  # global batch (sequences per update, all micro-batches together)
  c.train.grad_accum = 1  # micro-batches per update; batch_size / grad_accum run at once
  c.train.seed = 0  # parameters, dropout and data order
  # Cross-entropy over chunks of this many positions from the final hidden states, each chunk's
  # logits recomputed in the backward pass, so the [B, T, V] float32 logits never exist at once
  # (training/step.py); 0: the full logits. Worth it for large vocabularies (docs/performance.md).
  c.train.loss_chunk = 0
  # bert / encdec: the loss is (1 - e) cross-entropy + e x the mean -log p over the vocabulary
  # (Szegedy et al. 2016; the 2017 Transformer's 0.1); eval reports the plain cross-entropy.
  c.train.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  # cosine (nanoGPT's) | rsqrt (the 2017 Transformer's inverse square root; min_lr unused)
  c.optimizer.schedule = "cosine"
  c.optimizer.lr = 6e-4  # peak learning rate, after warmup_steps of linear warmup
  c.optimizer.min_lr = 6e-5  # cosine decay ends here at decay_steps
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_steps = config_dict.placeholder(int)  # None: train.steps
  c.optimizer.weight_decay = 0.1  # on weight matrices only
  c.optimizer.decay_embeddings = False  # also decay wte / wpe (nanoGPT does)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.clip = 1.0  # global gradient-norm clipping; 0 disables

  c.mesh = ml_collections.ConfigDict()  # device counts; one axis may be -1 ("the rest")
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1  # a mixture of experts' experts split over this many devices (and the batch)
  # CPU-only hosts: split the CPU into this many JAX devices, data parallel over the cores
  # (-1: one per core, as many as divide train.batch_size; 0: JAX's default, one device).
  c.mesh.cpu_devices = 0
  # Logical axis -> mesh axes ("tensor", "data,fsdp", "none"); override single entries, e.g.
  # --config.mesh.rules.embed=none turns FSDP off for weights (sharding/rules.py).
  c.mesh.rules = ml_collections.ConfigDict(rules_config())

  c.data = default_data_config()

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 250  # steps between evaluations (and after the last step); 0: never
  c.eval.batches = 20  # fixed val batches (of train.batch_size) averaged into val_loss
  # encdec: val pairs (a fixed sample) whose greedy outputs give val_exact_match; -1: all
  c.eval.exact_match = 256

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000  # steps between checkpoints (one is always saved at the end)
  c.checkpoint.keep = 3  # most recent checkpoints kept

  c.log = ml_collections.ConfigDict()
  c.log.every = 10  # steps between rows of metrics.jsonl / TensorBoard
  return c
