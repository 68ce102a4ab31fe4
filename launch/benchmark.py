"""Benchmark training and sampling throughput:

  python -m launch.benchmark --config configs/<name>.py [--mode train|sample|all]
      [--json FILE] [--profile DIR] [--steps 20] [--config.key=value ...]

Train: compile time, step time (median, p90) over --steps synchronised steps after warm-up,
tokens/s, TFLOP/s, MFU against the device's dense bf16 peak, peak memory. Sample: tokens/s at
--batch_sizes (prompt --prompt_len, --new_tokens new tokens), greedy and with top-k/top-p, and
achieved memory bandwidth. Random data and random parameters: speed does not depend on them.
Prints a table; --json writes the same numbers.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/gpt2.py.",
                                lock_config=False)
flags.DEFINE_enum("mode", "all", ["train", "sample", "all"], "What to measure.")
flags.DEFINE_string("json", None, "Also write the results as JSON to this file.")
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 train steps here.")
flags.DEFINE_integer("steps", 20, "Timed training steps (after warm-up).", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed training steps after compilation.", lower_bound=1)
flags.DEFINE_list("batch_sizes", ["1", "8", "64"], "Sampling batch sizes.")
flags.DEFINE_integer("prompt_len", 16, "Sampling prompt length.", lower_bound=1)
flags.DEFINE_integer("new_tokens", 256, "Tokens generated per row (capped by block_size).",
                     lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed generate calls per case (best is reported).",
                     lower_bound=1)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    fail(f"Unexpected arguments: {' '.join(argv[1:])}.")
  try:
    batch_sizes = tuple(int(b) for b in FLAGS.batch_sizes)
  except ValueError:
    fail(f"--batch_sizes must be comma-separated integers, got {','.join(FLAGS.batch_sizes)!r}.")
  if any(b < 1 for b in batch_sizes):
    fail(f"--batch_sizes must be positive, got {','.join(FLAGS.batch_sizes)!r}.")
  config = FLAGS.config
  config.data.source = "synthetic"
  from training import benchmark  # pylint: disable=import-outside-toplevel  (imports jax)
  from training.errors import UserError  # pylint: disable=import-outside-toplevel
  from training.setup import configure_cpu_devices  # pylint: disable=import-outside-toplevel
  try:
    configure_cpu_devices(config)  # before anything starts JAX's backends
  except UserError as e:
    fail(str(e))
  report = {"device": benchmark.device_info(), "command": " ".join(sys.argv)}
  try:
    if FLAGS.mode in ("train", "all"):
      report["train"] = benchmark.benchmark_train(config, steps=FLAGS.steps,
                                                  warmup=FLAGS.warmup,
                                                  profile_dir=FLAGS.profile)
    if FLAGS.mode in ("sample", "all"):
      report["sample"] = benchmark.benchmark_sample(
          config, batch_sizes=batch_sizes, prompt_len=FLAGS.prompt_len,
          new_tokens=FLAGS.new_tokens, repeats=FLAGS.repeats)
  except ValueError as e:
    fail(str(e))
  print(benchmark.format_table(report))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
