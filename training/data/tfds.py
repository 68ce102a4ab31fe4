"""TFDS text datasets through `tfds.data_source` (array_record, random access, no TensorFlow),
tokenized once into a prepared directory (see training/data/bin.py).

With GPT-2 BPE every document is followed by <|endoftext|>; with the char tokenizer (vocabulary
from all documents) documents are simply concatenated. tensorflow-datasets is imported only
when one of these functions runs, so the rest of the project works without it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator

import numpy as np

from model.errors import UserError
from model.tokenizer import get_tokenizer
from training.data.bin import (BinWriter, Progress, build_cached, cache_key, cache_root,
                               check_out_dir, check_tokenizer, write_prepared)
from training.data.text import tokenizer_key

TFDS_GROUP = 256  # documents read and encoded together


def cached_tfds_dir(name: str, *, train_split: str, val_split: str, tokenizer_name: str,
                    text_key: str = "text", data_dir: str = "", cache_dir: str = "",
                    quiet: bool = False) -> pathlib.Path:
  """Prepared directory for a TFDS text dataset, keyed by its name, version, splits and sizes."""
  check_tokenizer(tokenizer_name)
  sources = _tfds_sources(name, {"train": train_split, "val": val_split}, data_dir)
  info = getattr(sources["train"], "dataset_info", None)
  key = cache_key({"kind": "tfds", "name": getattr(info, "full_name", name),
                   "splits": [train_split, val_split], "sizes": [len(s) for s in sources.values()],
                   "data_dir": data_dir, "text_key": text_key,
                   "tokenizer": tokenizer_key(tokenizer_name)})
  safe_name = name.replace("/", "_").replace(":", "_")
  out_dir = cache_root(cache_dir) / "tfds" / f"{safe_name}-{key}"
  return build_cached(out_dir, lambda d: _prepare_tfds_sources(
      sources, d, name=name, text_key=text_key, tokenizer_name=tokenizer_name, quiet=quiet))


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("The tfds data source needs tensorflow-datasets: "
                    "pip install 'flaxgpt[tfds]'.") from None
  return tfds


def _tfds_sources(name: str, splits: dict[str, str], data_dir: str = "") -> dict[str, Any]:
  tfds = _import_tfds()
  sources = {}
  for split, tfds_split in splits.items():
    try:
      sources[split] = tfds.data_source(name, split=tfds_split, data_dir=data_dir or None)
    except Exception as e:  # tfds raises many types; the message is what matters
      first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"tfds.data_source({name!r}, split={tfds_split!r}) failed: {first_line} "
                      f"(without TensorFlow the dataset must already be prepared as array_record "
                      f"under data_dir, e.g. by `tfds build {name} --file_format=array_record` "
                      f"where TensorFlow is installed).") from e
  return sources


def _documents(source, text_key: str, group: int = TFDS_GROUP) -> Iterator[list[str]]:
  """Groups of document texts, in index order. Uses the batched `__getitems__` where it works
  (array_record) and falls back to one read per document (e.g. under tfds.testing.mock_data)."""
  batched = hasattr(source, "__getitems__")
  for start in range(0, len(source), group):
    keys = list(range(start, min(start + group, len(source))))
    records = None
    if batched:
      try:
        records = source.__getitems__(keys)
      except TypeError:
        batched = False
    if records is None:
      records = [source[k] for k in keys]
    yield [_document_text(r, text_key) for r in records]


def _document_text(record: dict[str, Any], text_key: str) -> str:
  try:
    text = record[text_key]
  except KeyError:
    raise UserError(f"TFDS examples have no feature {text_key!r} (they have "
                    f"{', '.join(map(repr, record))}); set data.tfds_text_key.") from None
  if isinstance(text, np.ndarray):
    text = text.item()
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def prepare_tfds(name: str, out_dir: str | os.PathLike, *, train_split: str = "train",
                 val_split: str = "validation", tokenizer_name: str = "gpt2",
                 text_key: str = "text", data_dir: str = "", quiet: bool = False,
                 force: bool = False) -> dict:
  """Tokenize a TFDS text dataset (via tfds.data_source, no TensorFlow) into out_dir (new or
  empty, unless `force`: then its prepared files are replaced)."""
  check_tokenizer(tokenizer_name)
  check_out_dir(out_dir, force)
  sources = _tfds_sources(name, {"train": train_split, "val": val_split}, data_dir)
  return _prepare_tfds_sources(sources, out_dir, name=name, text_key=text_key,
                               tokenizer_name=tokenizer_name, quiet=quiet)


def _prepare_tfds_sources(sources: dict[str, Any], out_dir, *, name: str, text_key: str,
                          tokenizer_name: str, quiet: bool) -> dict[str, Any]:
  """Every document encoded and followed by <|endoftext|> (char: documents just concatenated,
  over a vocabulary collected from all documents first)."""
  if tokenizer_name == "char":
    chars = set()
    for source in sources.values():
      for docs in _documents(source, text_key):
        chars.update(*map(set, docs))
    if not chars:
      raise UserError(f"TFDS dataset {name!r} has no text to build a character vocabulary from.")
    tokenizer = get_tokenizer("char", text="".join(sorted(chars)))
  else:
    tokenizer = get_tokenizer(tokenizer_name)
  eot = [] if tokenizer.eot_id is None else [tokenizer.eot_id]

  def pieces(writer: BinWriter) -> None:
    for split, source in sources.items():
      progress = Progress(f"tokenizing {name} {split}", len(source), "documents", quiet)
      for docs in _documents(source, text_key):
        encoded = tokenizer.encode_batch(docs)
        writer.write(split, np.concatenate([np.asarray(ids + eot, np.int64)
                                            for ids in encoded]))
        progress.update(len(docs), sum(len(ids) + len(eot) for ids in encoded))
      progress.close()

  return write_prepared(out_dir, tokenizer, {"source": f"tfds:{name}"}, pieces)
