"""Tokenize a corpus once into nanoGPT-format train.bin / val.bin + meta.json.

  python -m launch.prepare --input=input.txt --tokenizer=char --out_dir=data/shakespeare_char
  python -m launch.prepare --tfds=tiny_shakespeare --out_dir=data/shakespeare_tfds
  python -m launch.prepare --tfds=lm1b --split=train --val_split=test --out_dir=data/lm1b

then train with --config.data.source=bin --config.data.path=<out_dir>. Give exactly one of
--input (text files) and --tfds (a TFDS text dataset). --out_dir must be new or empty
(--force replaces the prepared files of a non-empty one). Mistakes print one `error:` line
and exit with status 2.
"""

from __future__ import annotations

import sys

from absl import flags

from launch import cli
from model.errors import UserError
from training.data import prepare_text, prepare_tfds, resolve_text_paths

FLAGS = flags.FlagValues()
flags.DEFINE_string("input", None, "Text file(s): a path, comma-separated paths or a glob.",
                    flag_values=FLAGS)
flags.DEFINE_string("tfds", None, "A TFDS text dataset, read with tfds.data_source (needs "
                    "tensorflow-datasets, not TensorFlow).", flag_values=FLAGS)
flags.DEFINE_string("out_dir", None, "Directory for train.bin, val.bin, meta.json (created; "
                    "it must be empty unless --force).", flag_values=FLAGS)
flags.DEFINE_bool("force", False, "Write into a non-empty --out_dir: its train.bin, val.bin "
                  "and meta.json are replaced when the new ones are complete.", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "gpt2", "gpt2 (BPE), char (vocabulary from the text) or "
                    "hf:DIR (a Hugging Face checkpoint's tokenizer.json).", flag_values=FLAGS)
flags.DEFINE_float("val_fraction", 0.1, "--input: the last fraction of the characters is val.",
                   flag_values=FLAGS)
flags.DEFINE_string("split", "train", "--tfds: the train split; slicing works, e.g. "
                    "'train[:99%]'.", flag_values=FLAGS)
flags.DEFINE_string("val_split", "validation", "--tfds: the val split, e.g. 'train[99%:]'.",
                    flag_values=FLAGS)
flags.DEFINE_string("text_key", "text", "--tfds: the text feature.", flag_values=FLAGS)
flags.DEFINE_string("tfds_data_dir", "", "--tfds: TFDS data_dir.", flag_values=FLAGS)
flags.DEFINE_bool("quiet", False, "No progress line.", flag_values=FLAGS)
flags.mark_flags_as_required(["out_dir"], flag_values=FLAGS)


def _prepare() -> dict:
  if (FLAGS.input is None) == (FLAGS.tfds is None):
    raise UserError("Give one of --input (text files) and --tfds (a TFDS dataset)"
                    + (", not both." if FLAGS.input is not None else "."))

  def write(out_dir, force):
    if FLAGS.input is not None:
      return prepare_text(resolve_text_paths(FLAGS.input), FLAGS.tokenizer, out_dir,
                          val_fraction=FLAGS.val_fraction, quiet=FLAGS.quiet, force=force)
    return prepare_tfds(FLAGS.tfds, out_dir, train_split=FLAGS.split,
                        val_split=FLAGS.val_split, tokenizer_name=FLAGS.tokenizer,
                        text_key=FLAGS.text_key, data_dir=FLAGS.tfds_data_dir,
                        quiet=FLAGS.quiet, force=force)

  if "://" in FLAGS.out_dir:  # prepared locally, then uploaded (training/data/remote.py)
    from training.data.remote import prepare_remote  # pylint: disable=import-outside-toplevel
    return prepare_remote(lambda local: write(local, False), FLAGS.out_dir, FLAGS.force)
  return write(FLAGS.out_dir, FLAGS.force)


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  try:
    meta = _prepare()
  except OSError as e:  # e.g. a read-only or full disk
    raise UserError(str(e)) from None
  total = meta["train_tokens"] + meta["val_tokens"]
  print(f"wrote {FLAGS.out_dir}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val "
        f"tokens ({meta['dtype']}), vocab {meta['vocab_size']:,} ({meta['tokenizer']['name']}), "
        f"{meta['seconds']:.1f}s, {total / max(meta['seconds'], 1e-9):,.0f} tokens/s")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv, interrupted="nothing written; --out_dir is as it was")


if __name__ == "__main__":
  sys.exit(main())
