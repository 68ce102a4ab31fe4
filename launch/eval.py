"""Evaluate a model on held-out text: mean loss per token, perplexity and bits per byte.

  python -m launch.eval (--workdir DIR [--step N] | --init_from NAME_OR_DIR)
      --data text:PATH|bin:DIR[:train|val]|tfds:NAME:SPLIT|chat:FILE [--stride N] [--max_tokens N]
      [--batch_size N] [--dtype float32|bfloat16] [--json] [--quiet]

--workdir scores a launch.train run's latest (or --step) checkpoint with the run's tokenizer;
--init_from a Hugging Face GPT-2 (gpt2, gpt2-medium, ... or a local directory; GPT-2 BPE) or a
training workdir. --data: a UTF-8 text file, a prepared token directory (val.bin unless :train;
it must use the model's tokenizer) or a TFDS split (documents joined by <|endoftext|>), read as
one stream of tokens, cut to its first --max_tokens.

--data chat:FILE scores JSONL conversations instead (training/evaluate_chat.py): rendered with
the run's chat template (or --chat_template), packed, the loss on the assistant's tokens only.

The stream is scored in windows of the model's block size T (training/evaluate.py): every
token but the first is predicted exactly once; with --stride S < T each window after the first
scores only its last S tokens, so each sees at least T - S + 1 tokens of context (Hugging
Face's perplexity-guide method); the default S = T gives non-overlapping windows. Windows run
--batch_size at a time, split over all devices (data parallel), one compiled step; a progress
line with the ETA goes to stderr. Output: loss (nats per token), perplexity = exp(loss), bits
per byte = total nats / ln 2 / UTF-8 bytes of the scored tokens; --json prints them as one
object. Mistakes print one `error:` line and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags

from launch import cli
from model.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A launch.train workdir: its latest checkpoint.",
                    flag_values=FLAGS)
flags.DEFINE_integer("step", None, "--workdir: this checkpoint instead of the latest.",
                     flag_values=FLAGS)
flags.DEFINE_string("init_from", None, "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face "
                    "GPT-2 directory, or a training workdir.", flag_values=FLAGS)
flags.DEFINE_string("data", None, "text:PATH, bin:DIR[:train|val], tfds:NAME:SPLIT or "
                    "chat:FILE (JSONL conversations: the assistant-token loss).",
                    flag_values=FLAGS)
flags.DEFINE_string("chat_template", None, "--data chat:FILE: 'default' or a .jinja file "
                    "instead of the model's own chat template.", flag_values=FLAGS)
flags.DEFINE_integer("stride", None, "Tokens between window starts (default: the block size, "
                     "no overlap).", flag_values=FLAGS)
flags.DEFINE_integer("max_tokens", None, "Score only the first N tokens of the data.",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "Windows per step (rounded up to a multiple of the "
                     "devices).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the "
                  "checkpoint's; float32 for Hugging Face checkpoints).", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "Print the result as one JSON object.", flag_values=FLAGS)
flags.DEFINE_bool("quiet", False, "No progress or status lines on stderr.", flag_values=FLAGS)
flags.mark_flags_as_required(["data"], flag_values=FLAGS)


def check_flags() -> None:
  if (FLAGS.workdir is None) == (FLAGS.init_from is None):
    raise UserError("Give one of --workdir (a training run) or --init_from (a Hugging Face "
                    "GPT-2 or a workdir).")
  if FLAGS.step is not None and FLAGS.workdir is None:
    raise UserError("--step needs --workdir.")
  if FLAGS.max_tokens is not None and FLAGS.max_tokens < 2:
    raise UserError(f"--max_tokens must be at least 2, got {FLAGS.max_tokens}.")
  if FLAGS.batch_size < 1:
    raise UserError(f"--batch_size must be at least 1, got {FLAGS.batch_size}.")
  if FLAGS.stride is not None and FLAGS.stride < 1:
    raise UserError(f"--stride must be at least 1, got {FLAGS.stride}.")


def _status(text: str) -> None:
  if not FLAGS.quiet:
    print(text, file=sys.stderr, flush=True)


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  check_flags()
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about read-only directories
  # pylint: disable=import-outside-toplevel  (they import jax)
  from launch.sample import choose_tokenizer
  from sharding import describe, make_mesh
  from training import evaluate as ev
  from training.weights import WORKDIR, describe_weights, load_weights
  kind, where, _ = ev.parse_data_spec(FLAGS.data)
  if FLAGS.chat_template is not None and kind != "chat":
    raise UserError("--chat_template goes with --data chat:FILE.")
  source = ({"name_or_dir": FLAGS.workdir, "kind": WORKDIR} if FLAGS.workdir is not None
            else {"name_or_dir": FLAGS.init_from})
  try:
    w = describe_weights(**source, step=FLAGS.step, dtype=FLAGS.dtype)
    if w.cfg.family != "gpt":
      raise UserError(f"launch.eval measures a causal language model's perplexity, and "
                      f"{w.label} is a model.family={w.cfg.family!r} model (launch.train's "
                      f"eval reports its masked-token or exact-match accuracy).")
    tokenizer = choose_tokenizer(w.tokenizer, w.cfg.vocab_size, FLAGS.init_from)
    if kind == "chat":
      return _chat(source, w, tokenizer, where)
    stride = ev.check_stride(FLAGS.stride, w.cfg.block_size)
    tokens, desc = ev.read_tokens(FLAGS.data, tokenizer, block_size=w.cfg.block_size,
                                  max_tokens=FLAGS.max_tokens, quiet=FLAGS.quiet)
    ev.check_ids(tokens, w.cfg.vocab_size, f"--data {FLAGS.data!r} ({tokenizer.name} tokens)")
    ev.plan_windows(len(tokens), block_size=w.cfg.block_size, stride=stride)  # checks length
    mesh = make_mesh(-1, 1, 1)
    w = load_weights(**source, step=FLAGS.step, dtype=FLAGS.dtype, mesh=mesh)
  except (ValueError, OSError) as e:  # ours, and the clear errors of checkpoint loading
    raise UserError(str(e)) from None
  _status(f"{w.label}: {w.cfg.num_layers} layers, width {w.cfg.d_model}, block "
          f"{w.cfg.block_size}, {tokenizer.name} tokenizer; data: {desc}, {len(tokens):,} "
          f"tokens; stride {stride}; mesh {describe(mesh)}")
  result = ev.evaluate(w.params, w.cfg, tokens, mesh=mesh, stride=stride,
                       batch_size=FLAGS.batch_size, num_bytes=tokenizer.num_bytes(tokens[1:]),
                       quiet=FLAGS.quiet)
  if FLAGS.json:
    print(json.dumps({"model": w.label, "data": FLAGS.data, "stride": stride,
                      "block_size": w.cfg.block_size, **result.to_dict()}))
  else:
    bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"
    print(f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.3f} | "
          f"bits per byte {bpb}")
    print(f"{result.tokens:,} tokens ({result.bytes:,} bytes) in {result.windows:,} windows "
          f"of {w.cfg.block_size}, stride {stride}, {result.seconds:.1f}s")
  return 0


def _chat(source, w, tokenizer, path: str) -> int:
  """--data chat:FILE: the assistant-token loss of the file's conversations."""
  # pylint: disable=import-outside-toplevel
  import os
  from launch.sample_chat import chat_template
  from model.hf import resolve_checkpoint_dir
  from sharding import describe, make_mesh
  from training.evaluate_chat import chat_rows, evaluate_chats
  from training.weights import load_weights
  if not os.path.isfile(os.path.expanduser(path)):
    raise UserError(f"--data chat file {path!r} does not exist.")
  hf_dir = None if FLAGS.init_from is None else resolve_checkpoint_dir(FLAGS.init_from)
  template = chat_template(tokenizer, workdir=FLAGS.workdir, hf_dir=hf_dir,
                           override=FLAGS.chat_template)
  chat_rows(path, template, tokenizer, w.cfg.block_size, w.cfg.vocab_size)  # checks, no weights
  mesh = make_mesh(-1, 1, 1)
  w = load_weights(**source, step=FLAGS.step, dtype=FLAGS.dtype, mesh=mesh)
  _status(f"{w.label}: {w.cfg.num_layers} layers, block {w.cfg.block_size}; data: chats "
          f"{path} ({template.source}); mesh {describe(mesh)}")
  r = evaluate_chats(w.params, w.cfg, path, template, tokenizer, mesh=mesh,
                     batch_size=FLAGS.batch_size)
  if FLAGS.json:
    print(json.dumps({"model": w.label, "data": FLAGS.data, **r.to_dict()}))
  else:
    print(f"assistant-token loss {r.loss:.4f} nats/token | perplexity {r.perplexity:.3f}")
    left = f", {r.left_out:,} longer than the block size left out" if r.left_out else ""
    print(f"{r.tokens:,} assistant tokens in {r.conversations:,} conversations{left}, "
          f"{r.seconds:.1f}s")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
