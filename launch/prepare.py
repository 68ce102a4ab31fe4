"""Tokenize a corpus once into nanoGPT-format train.bin / val.bin + meta.json.

  python -m launch.prepare --input=input.txt --tokenizer=char --out_dir=data/shakespeare_char
  python -m launch.prepare --tfds=tiny_shakespeare --out_dir=data/shakespeare_tfds
  python -m launch.prepare --tfds=lm1b --split=train --val_split=test --out_dir=data/lm1b

then train with --config.data.source=bin --config.data.path=<out_dir>.
"""

from __future__ import annotations

import argparse
import sys

from training.data_prepare import prepare_text, resolve_text_paths
from training.data_tfds import prepare_tfds
from training.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m launch.prepare", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--input", help="text file(s): a path, comma-separated paths or a glob")
  source.add_argument("--tfds", metavar="NAME", help="a TFDS text dataset, read with "
                      "tfds.data_source (needs tensorflow-datasets, not TensorFlow)")
  parser.add_argument("--out_dir", required=True, help="directory for train.bin, val.bin, "
                      "meta.json (created; existing files there are replaced when done)")
  parser.add_argument("--tokenizer", default="gpt2", help="gpt2 (BPE; offline: set "
                      "FLAXGPT_GPT2_BPE) or char (vocabulary from the text) (default: gpt2)")
  parser.add_argument("--val_fraction", type=float, default=0.1,
                      help="--input: the last fraction of the characters is val (default: 0.1)")
  parser.add_argument("--split", default="train", help="--tfds: the train split; slicing "
                      "works, e.g. 'train[:99%%]' (default: train)")
  parser.add_argument("--val_split", default="validation",
                      help="--tfds: the val split, e.g. 'train[99%%:]' (default: validation)")
  parser.add_argument("--text_key", default="text", help="--tfds: the text feature")
  parser.add_argument("--tfds_data_dir", default="", help="--tfds: TFDS data_dir")
  parser.add_argument("--quiet", action="store_true", help="no progress line")
  return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
  if args.input is not None:
    return prepare_text(resolve_text_paths(args.input), args.tokenizer, args.out_dir,
                        val_fraction=args.val_fraction, quiet=args.quiet)
  return prepare_tfds(args.tfds, args.out_dir, train_split=args.split,
                      val_split=args.val_split, tokenizer_name=args.tokenizer,
                      text_key=args.text_key, data_dir=args.tfds_data_dir, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    meta = run(args)
  except (UserError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  total = meta["train_tokens"] + meta["val_tokens"]
  print(f"wrote {args.out_dir}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val "
        f"tokens ({meta['dtype']}), vocab {meta['vocab_size']:,} ({meta['tokenizer']['name']}), "
        f"{meta['seconds']:.1f}s, {total / max(meta['seconds'], 1e-9):,.0f} tokens/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
