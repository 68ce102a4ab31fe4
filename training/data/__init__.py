"""The data pipeline: batches for training, deterministic by step, one file per task.

    source = make_task_source(config.data, "lm", seq_len=1024, global_batch_size=512, seed=0)
    tokens = source.get_batch("train", step)      # int32 [local_batch, width]
    for tokens in prefetch(source, "train", start_step): ...
    prepare_text(["input.txt"], "gpt2", "data/mine")       # launch.prepare --input
    prepare_tfds("lm1b", "data/lm1b", val_split="test")     # launch.prepare --tfds

Files, in the order a config travels through them:
  tasks.py    the table: a task's name -> its families, batch layout, source, vocabulary
  lm.py, mlm.py, pairs.py   one file per task (pairs: reverse, denoise, tsv)
  sources.py  what every source shares: DataSource, splits, process layout, prefetch
  text.py     text files (tiny shakespeare by default) -> a prepared directory
  tfds.py     tfds.data_source documents -> a prepared directory (tensorflow-datasets only here)
  remote.py   prepared directories on gs://
  bin.py      the prepared directory itself: train.bin, val.bin, meta.json; the cache
"""

from training.data.bin import read_meta
from training.data.lm import STREAM_SOURCES as SOURCES
from training.data.lm import SyntheticSource, TokenFileSource, make_source
from training.data.sources import DataSource, prefetch
from training.data.tasks import (TASKS, batch_layout, batch_width, default_data_config,
                                 make_task_source, resolve_task)
from training.data.text import prepare_text, resolve_text_paths
from training.data.tfds import prepare_tfds

__all__ = ["SOURCES", "TASKS", "DataSource", "SyntheticSource", "TokenFileSource",
           "batch_layout", "batch_width", "default_data_config", "make_source",
           "make_task_source", "prefetch", "prepare_text", "prepare_tfds", "read_meta",
           "resolve_task", "resolve_text_paths"]
