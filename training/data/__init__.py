"""The data pipeline: fixed-length token windows for training, deterministic by step.

    source = make_source(config.data, seq_len=1024, global_batch_size=512, seed=0)
    tokens = source.get_batch("train", step)      # int32 [local_batch, seq_len + 1]
    for tokens in prefetch(source, "train", start_step): ...
    prepare_text(["input.txt"], "gpt2", "data/mine")       # launch.prepare --input
    prepare_tfds("lm1b", "data/lm1b", val_split="test")     # launch.prepare --tfds

Files, in the order a config travels through them:
  sources.py  the config's source (text | bin | tfds | synthetic) and its windows; prefetch
  text.py     text files (tiny shakespeare by default) -> a prepared directory
  tfds.py     tfds.data_source documents -> a prepared directory (tensorflow-datasets only here)
  bin.py      the prepared directory itself: train.bin, val.bin, meta.json; the cache
"""

from training.data.bin import read_meta
from training.data.sources import (SOURCES, DataSource, SyntheticSource, TokenFileSource,
                                   default_data_config, make_source, prefetch)
from training.data.text import prepare_text, resolve_text_paths
from training.data.tfds import prepare_tfds

__all__ = ["SOURCES", "DataSource", "SyntheticSource", "TokenFileSource", "default_data_config",
           "make_source", "prefetch", "prepare_text", "prepare_tfds", "read_meta",
           "resolve_text_paths"]
