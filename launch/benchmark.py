"""Benchmark training and sampling throughput:

  python -m launch.benchmark --config configs/<name>.py [--mode train|sample|all]
      [--json FILE] [--profile DIR] [--steps 20] [--config.key=value ...]
  python -m launch.benchmark --config configs/gpt2.py --mode sample --compare transformers
      --config.model.dtype=float32 --batch_sizes 1,8 --new_tokens 128

--compare transformers (with --mode sample, needs torch and transformers) times greedy
generation against transformers' `generate` on the same random weights in the same run
(exported with model/hf/gpt2.py; no download) instead of the sampling table.

The config is built and checked exactly as `launch.train` builds it (training/run.py), on random
data and random parameters (speed does not depend on them): synthetic tokens over the
vocabulary the model trains with, which is config.model.vocab_size or, when the model leaves
it to the data, what the configured data gives (the character table of a text source's files,
GPT-2 BPE's 50,257, a prepared directory's meta.json; read without tokenizing anything). The
report says which.
Train: compile time, step time (median, p90) over --steps synchronised steps after warm-up,
tokens/s, TFLOP/s, MFU against the device's dense bf16 peak, peak memory. Sample: tokens/s at
--batch_sizes (prompt --prompt_len, --new_tokens new tokens), greedy and with top-k/top-p, and
achieved memory bandwidth. Prints a table; --json writes the same numbers.

The encoder (configs/bert_base.py) and encoder-decoder (configs/transformer_base.py) configs
benchmark training (--mode all means train for them): random masked-LM rows, and random
denoising pairs for an encoder-decoder (source length = target length = block_size); FLOPs per
token are their family's formula (training/perf/flops.py).
"""

from __future__ import annotations

import json
import sys

from absl import flags, logging
from ml_collections import config_flags

from launch import cli
from model.errors import UserError

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/gpt2.py.",
                                flag_values=FLAGS, lock_config=True)
flags.DEFINE_enum("mode", "all", ["train", "sample", "all"], "What to measure.",
                  flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results as JSON to this file.",
                    flag_values=FLAGS)
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 train steps here.",
                    flag_values=FLAGS)
flags.DEFINE_integer("steps", 20, "Timed training steps (after warm-up).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "Untimed training steps after compilation.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Sampling batch sizes.", flag_values=FLAGS)
flags.DEFINE_integer("prompt_len", 16, "Sampling prompt length.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("new_tokens", 256, "Tokens generated per row (capped by block_size).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed generate calls per case (best is reported).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("cache_reads", "auto", ["auto", "filled", "all"],
                  "Sampling: how much of the KV cache each decode step reads (auto: every chunk "
                  "on a GPU, the filled chunks elsewhere; model/decode/sampling.py).",
                  flag_values=FLAGS)
flags.DEFINE_enum("compare", None, ["transformers"], "With --mode sample: time greedy "
                  "generation against this peer on the same weights instead.", flag_values=FLAGS)
flags.mark_flags_as_required(["config"], flag_values=FLAGS)


def _batch_sizes() -> tuple[int, ...]:
  text = ",".join(FLAGS.batch_sizes)
  try:
    batch_sizes = tuple(int(b) for b in FLAGS.batch_sizes)
  except ValueError:
    raise UserError(f"--batch_sizes must be comma-separated integers, got {text!r}.") from None
  if any(b < 1 for b in batch_sizes):
    raise UserError(f"--batch_sizes must be positive, got {text!r}.")
  return batch_sizes


def _main(args: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  cli.no_arguments(args)
  batch_sizes = _batch_sizes()
  if FLAGS.compare and FLAGS.mode != "sample":
    raise UserError(f"--compare {FLAGS.compare} needs --mode sample, got --mode {FLAGS.mode}.")
  config = cli.load_config(FLAGS)
  from training.perf import benchmark  # pylint: disable=import-outside-toplevel  (jax)
  run, where = benchmark.random_token_run(config)
  report = {"device": benchmark.device_info(), "command": " ".join(sys.argv),
            "vocabulary": {"size": run.model.vocab_size, "padded": run.model.padded_vocab_size,
                           "from": where}}
  if FLAGS.mode in ("train", "all"):
    report["train"] = benchmark.benchmark_train(run, steps=FLAGS.steps, warmup=FLAGS.warmup,
                                                profile_dir=FLAGS.profile)
  if FLAGS.compare:
    report["compare"] = benchmark.compare_transformers(
        run, batch_sizes=batch_sizes, prompt_len=FLAGS.prompt_len,
        new_tokens=FLAGS.new_tokens, repeats=FLAGS.repeats)
  elif FLAGS.mode == "sample" or (FLAGS.mode == "all" and run.model.family == "gpt"):
    report["sample"] = benchmark.benchmark_sample(
        run, batch_sizes=batch_sizes, prompt_len=FLAGS.prompt_len,
        new_tokens=FLAGS.new_tokens, repeats=FLAGS.repeats, cache_reads=FLAGS.cache_reads)
  print(benchmark.format_table(report))
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
