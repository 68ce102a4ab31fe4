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

from model.config import LORA_FIELDS
from model.config import get_config as model_preset
from sharding.rules import rules_config
from training.data import default_data_config

# Filled in from other fields when None (see the module docstring).
_DERIVED_MODEL_FIELDS = ("vocab_size", "padded_vocab_size", "d_mlp")


def model_section(preset: str, **overrides) -> ml_collections.ConfigDict:
  """Every ModelConfig field of a preset (model/config.py) but the LoRA ones (config.train.lora
  sets them); vocab_size, padded_vocab_size and d_mlp become placeholders unless given, so they
  follow the data and d_model."""
  fields = model_preset(preset, **overrides).to_dict()
  section = ml_collections.ConfigDict()
  derived = {"vocab_size": True, "padded_vocab_size": fields["padded_vocab_size"] == fields[
      "vocab_size"], "d_mlp": fields["d_mlp"] == 4 * fields["d_model"]}  # else the preset's own
  for name, value in fields.items():
    if name in LORA_FIELDS:  # set from config.train.lora
      continue
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
  # LoRA (model/lora.py): with a rank, train low-rank adapters on the frozen weights of
  # config.init_from instead of every weight (no gradients and no optimizer state for them);
  # checkpoints hold the adapters and name their base; launch.export writes a PEFT adapter.
  c.train.lora = ml_collections.ConfigDict()
  c.train.lora.rank = config_dict.placeholder(int)  # None: a full fine-tune
  c.train.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  c.train.lora.dropout = 0.0  # on the adapters' input (PEFT's lora_dropout)
  # q, k, v, o, gate, up, down (Llama's names; q, k, v are parts of a fused kernel where there
  # is one), module names (c_attn, c_q, c_kv, c_proj, c_fc, c_gate: GPT-2's c_attn is its fused
  # attention) or regular expressions over a block's module paths ("attn/.*": every attention
  # projection, whole)
  c.train.lora.targets = "attn/.*"
  # DPO (data.task=preference; training/dpo.py): the reference is the starting point, config.
  # init_from's weights (with LoRA: the adapters switched off; without: a frozen copy)
  c.train.dpo = ml_collections.ConfigDict()
  # sigmoid (DPO), robust (Chowdhury et al. 2024), cdpo (conservative DPO) or ipo (Azar et al.
  # 2023, per-token normalised as TRL's)
  c.train.dpo.loss = "sigmoid"
  c.train.dpo.beta = 0.1  # how far the policy may move from the reference (IPO's tau)
  # robust / cdpo: the share of pairs assumed flipped, in [0, 0.5)
  c.train.dpo.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  # cosine (nanoGPT's) | rsqrt (the 2017 Transformer's inverse square root; min_lr unused)
  c.optimizer.schedule = "cosine"
  c.optimizer.lr = 6e-4  # peak learning rate, after warmup_steps of linear warmup
  c.optimizer.min_lr = 6e-5  # cosine decay ends here at decay_steps
  c.optimizer.warmup_steps = 100  # steps of linear warmup to lr
  c.optimizer.decay_steps = config_dict.placeholder(int)  # None: train.steps
  c.optimizer.weight_decay = 0.1  # on weight matrices only
  c.optimizer.decay_embeddings = False  # also decay wte / wpe (nanoGPT does)
  c.optimizer.b1 = 0.9  # AdamW: decay of the gradient's running mean
  c.optimizer.b2 = 0.95  # AdamW: decay of the squared gradient's running mean
  c.optimizer.eps = 1e-8  # AdamW: added to the denominator
  c.optimizer.clip = 1.0  # global gradient-norm clipping; 0 disables

  c.mesh = ml_collections.ConfigDict()  # device counts; one axis may be -1 ("the rest")
  c.mesh.data = -1  # data parallel: each device holds all weights and a share of the batch
  c.mesh.fsdp = 1  # FSDP (ZeRO-3): weights, gradients, optimizer state split too
  c.mesh.tensor = 1  # tensor parallel: heads, MLP width and vocabulary split
  # expert parallel: a mixture of experts' experts split over this many devices; the batch and
  # the other weights (as FSDP) are split over them too
  c.mesh.expert = 1
  # CPU-only hosts: split the CPU into this many JAX devices, data parallel over the cores
  # (-1: one per core, as many as divide train.batch_size; 0: JAX's default, one device).
  c.mesh.cpu_devices = 0
  # Logical axis -> mesh axes ("tensor", "data,fsdp", "none"); override single entries, e.g.
  # --config.mesh.rules.embed=none turns FSDP off for weights (sharding/rules.py).
  c.mesh.rules = ml_collections.ConfigDict(rules_config())

  c.data = default_data_config()
  # lm: keep the documents of each window apart (training/lm_inputs.py): attention stops at the
  # end-of-text token, which starts the document after it at position 0, so a document's first
  # token is predicted from <|endoftext|> alone; every target is still scored.
  c.data.document_mask = False

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 250  # steps between evaluations (and after the last step); 0: never
  c.eval.batches = 20  # fixed val batches (of train.batch_size) averaged into val_loss
  c.eval.at_start = False  # also evaluate before the first step (a row of step 0)
  # encdec: val pairs (a fixed sample) whose greedy outputs give val_exact_match; -1: all
  c.eval.exact_match = 256

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 1000  # steps between checkpoints (one is always saved at the end)
  c.checkpoint.keep = 3  # most recent checkpoints kept

  c.log = ml_collections.ConfigDict()
  c.log.every = 10  # steps between rows of metrics.jsonl / TensorBoard
  return c
