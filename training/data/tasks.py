"""The table of training tasks: a task's name -> the model families it trains, its batch
layout, its source and its vocabulary. A new task is a file under training/data/ and a row here.

    task = resolve_task("gpt", config.data)                    # "" -> the family's default
    source = make_task_source(config.data, task, seq_len=T, global_batch_size=B, seed=0)
    batch_layout(task)   # "tokens" [B, T + 1] | "mlm" [B, 2T] | "seq2seq" [B, S + T + 1]
                         # | "packed" [B, 3 (T + 1)]

    task     family  file       batches
    lm       gpt     lm.py      windows of T + 1 tokens of one token stream (data.source)
    mlm      bert    mlm.py     windows of T tokens, 15% chosen; inputs | targets
    reverse  encdec  pairs.py   each line of a text -> the line reversed
    denoise  encdec  pairs.py   BART text infilling of windows of the stream
    tsv      encdec  pairs.py   source<TAB>target lines
    prefix_lm gpt    prefix_lm.py  a prefix seen both ways, the loss on the continuation
    chat     gpt     chat.py    conversations, the loss on the assistant's tokens
    preference gpt   preference.py  prompt, chosen, rejected: DPO (training/dpo.py), pairs
                                packed as segments 2k - 1 (chosen) and 2k (rejected)
The last three are packed: examples of different lengths in rows of T + 1 (packing.py),
[B, 3 (T + 1)] = tokens | segment ids | loss mask.

A config travels one way: this table -> the task's file -> the stream's sources (lm.py) ->
the corpora (text.py, tfds.py, remote.py) -> the prepared token files (bin.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from model.errors import UserError
from training.data import chat, examples, lm, mlm, pairs, prefix_lm, preference
from training.data.sources import DataSource

LAYOUTS = ("tokens", "mlm", "seq2seq", "packed", "preference")


@dataclasses.dataclass(frozen=True)
class Task:
  families: tuple[str, ...]  # the model families it trains (the first task of a family is its
  #                            default)
  layout: str  # one of LAYOUTS: how a batch row is laid out (`batch_width`)
  # (data_cfg, *, seq_len, global_batch_size, seed, process_index, process_count) -> DataSource
  make_source: Callable[..., DataSource]
  # data_cfg -> (vocabulary size, where it comes from, the tokenizer's to_dict() or None),
  # without tokenizing anything (launch.benchmark and launch.aot read no data)
  tokenizer: Callable[[Any], tuple[int, str, dict[str, Any] | None]]
  add_config: Callable[[ml_collections.ConfigDict], None] | None = None  # its data.* keys
  prefix_lm: bool = False  # the model attends bidirectionally inside each example's prefix


TASKS: dict[str, Task] = {
    "lm": Task(("gpt",), "tokens", lm.make_source, lm.stream_tokenizer),
    "mlm": Task(("bert",), "mlm", mlm.make_source, lm.stream_tokenizer, mlm.add_config),
    "reverse": Task(("encdec",), "seq2seq", pairs.make_reverse_source, lm.stream_tokenizer,
                    pairs.add_config),
    "denoise": Task(("encdec",), "seq2seq", pairs.make_denoise_source, lm.stream_tokenizer),
    "tsv": Task(("encdec",), "seq2seq", pairs.make_tsv_source, pairs.tsv_tokenizer),
    "prefix_lm": Task(("gpt",), "packed", prefix_lm.make_source, prefix_lm.vocabulary,
                      prefix_lm.add_config, prefix_lm=True),
    "chat": Task(("gpt",), "packed", chat.make_source, chat.chat_vocabulary, chat.add_config),
    "preference": Task(("gpt",), "preference", preference.make_source, preference.vocabulary),
}
SEQ2SEQ_TASKS = tuple(name for name, t in TASKS.items() if t.layout == "seq2seq")


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` part of an experiment config: the stream's keys (lm.py), then each task's."""
  cfg = ml_collections.ConfigDict()
  cfg.source = "text"  # text | bin | tfds | synthetic (lm.py); jsonl: examples (chat, prefix_lm)
  # text: a file, comma-separated files or a glob; "" = tiny shakespeare (the package's copy, or
  # $FLAXGPT_DATA_DIR's). bin: a directory with train.bin, val.bin, meta.json.
  cfg.path = ""
  # char | gpt2 | hf:DIR (a Hugging Face checkpoint's tokenizer.json, e.g. the Llama a run
  # fine-tunes); text and tfds sources (bin reads it from meta.json)
  cfg.tokenizer = "char"
  cfg.tfds_name = "tiny_shakespeare"  # tfds: the TFDS data set
  cfg.tfds_train_split = "train"  # tfds: the split training reads
  cfg.tfds_val_split = "validation"  # tfds: the split evaluation reads
  cfg.tfds_text_key = "text"  # tfds: the feature holding each document's text
  cfg.tfds_data_dir = ""  # tfds: where TFDS keeps its data ("": its default)
  cfg.val_fraction = 0.1  # text: the last 10% of the characters is the val split
  cfg.cache_dir = ""  # "" = $FLAXGPT_CACHE_DIR or ~/.cache/flaxgpt
  cfg.prefetch = 2  # batches a background thread keeps ready (0 = none)
  # bin on gs://: "" reads windows by ranged requests; a folder: the files are copied there once
  # and memory-mapped.
  cfg.local_copy = ""
  cfg.vocab_size = 50257  # synthetic only
  # What the batches teach (training/data/tasks.py): lm | prefix_lm | chat | preference | mlm |
  # reverse | denoise | tsv; "": the model family's default (gpt: lm, bert: mlm).
  cfg.task = ""
  for task in TASKS.values():
    if task.add_config is not None:
      task.add_config(cfg)
  examples.add_config(cfg)
  return cfg


def family_tasks(family: str) -> tuple[str, ...]:
  return tuple(name for name, t in TASKS.items() if family in t.families)


def resolve_task(family: str, data_cfg) -> str:
  """data.task checked against the model family ("" -> the family's default)."""
  task = data_cfg.get("task", "") or ""
  if not task:
    if family == "encdec":
      raise UserError("config.data.task must be set for model.family='encdec': one of "
                      f"{', '.join(SEQ2SEQ_TASKS)}.")
    task = family_tasks(family)[0]
  if task not in TASKS:
    raise UserError(f"config.data.task must be one of {', '.join(TASKS)}; got {task!r}.")
  if family not in TASKS[task].families:
    raise UserError(f"config.data.task={task!r} does not train model.family={family!r}; "
                    f"use {' or '.join(family_tasks(family))}.")
  return task


def batch_layout(task: str) -> str:
  """How a batch row of `task` is laid out: one of LAYOUTS."""
  return TASKS[task].layout


def is_prefix_lm(task: str) -> bool:
  """Whether `task` trains the prefix-LM objective (the model's prefix_lm)."""
  return TASKS[task].prefix_lm


def batch_width(task: str, block_size: int) -> int:
  """Tokens per row of one batch: T + 1 (tokens), 2T (mlm), S + T + 1 (seq2seq; S = T),
  3 (T + 1) (packed: tokens | segment ids | loss mask, packing.py)."""
  layout = batch_layout(task)
  if layout in ("packed", "preference"):
    return 3 * (block_size + 1)
  if layout == "tokens":
    return block_size + 1
  if layout == "mlm":
    return 2 * block_size
  return 2 * block_size + 1


def data_tokenizer(data_cfg, task: str = "lm") -> tuple[int, str, dict[str, Any] | None]:
  """(vocabulary size, where it comes from, the tokenizer the source will record) of the data
  `make_task_source(data_cfg, task)` reads, found without tokenizing anything. The special
  tokens of the bert / encdec tasks are not counted."""
  return TASKS[task].tokenizer(data_cfg)


def data_vocabulary(data_cfg, task: str = "lm") -> tuple[int, str]:
  """`data_tokenizer` without the tokenizer."""
  size, where, _ = data_tokenizer(data_cfg, task)
  return size, where


def make_task_source(data_cfg, task: str, *, seq_len: int, global_batch_size: int, seed: int,
                     process_index: int | None = None,
                     process_count: int | None = None) -> DataSource:
  """The DataSource of a task for this process (jax.process_index/count unless given)."""
  return TASKS[task].make_source(data_cfg, seq_len=seq_len,
                                 global_batch_size=global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count)
