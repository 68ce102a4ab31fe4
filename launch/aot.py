"""Compile a config's train step (or one sampling step) for a TPU slice on this machine (no TPU
needed) and report per-chip memory, FLOPs and the implied step time:

  python -m launch.aot --config configs/<name>.py --topology v5p-64 [--mfu 0.5]
      [--num_slices 1] [--json FILE] [--config.<section>.<key>=value ...]
  python -m launch.aot --step decode --config configs/gpt2.py --topology v5litepod-1
      --batch 64 --cache_len 512 [--position 64] [--sampling greedy|temperature|top_k_top_p]

--step decode compiles model/decode/sampling.py's decode step (training/perf/aot_decode.py) for --batch
rows and a --cache_len-slot KV cache, measured at --position filled slots (default: the full
cache), and reports per-chip memory (does it fit: the serving question) and XLA's FLOPs and
bytes accessed per decode step (every cache chunk and layer counted: they are unrolled).

--topology: v4-N, v5p-N (N TensorCores, 2 per chip), v5e-N / v5litepod-N, v6e-N (N chips), or
a chip grid such as v5p:4x4x12: the slice table of training/tpu/slices.py, which `launch.tpu`
uses too. Needs libtpu: pip install "jax[tpu]" (any machine).
Exit status: 0 it fits in the chips' HBM; 3 it compiled, or the compiler ran out of HBM, and it
does not fit (the numbers and what to change are printed); 2 a mistake in the inputs (one
`error:` line); 1 anything else.
"""

from __future__ import annotations

import json
import os
import sys

# The compile runs for the topology's devices; nothing runs on a local TPU, so keep jax's
# default backend on the CPU (also where this runs on a TPU VM).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from launch import cli  # noqa: E402

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/gpt2_xl.py; override any field with "
    "--config.<section>.<key>=value.", flag_values=FLAGS, lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice: v4-N, v5p-N, v5e-N (v5litepod-N), v6e-N, "
                    "or a chip grid such as v5p:4x4x8.", flag_values=FLAGS)
flags.DEFINE_float("mfu", 0.5, "Model FLOPs utilisation for the implied step time, in (0, 1].",
                   flag_values=FLAGS)
flags.DEFINE_integer("num_slices", 1, "Number of such slices (multi-slice, data-centre network "
                     "between them).", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the report as JSON to this file.",
                    flag_values=FLAGS)
flags.DEFINE_enum("step", "train", ["train", "decode"], "Which step to compile.",
                  flag_values=FLAGS)
flags.DEFINE_integer("batch", None, "--step decode: rows decoded together.", flag_values=FLAGS)
flags.DEFINE_integer("cache_len", None, "--step decode: KV-cache slots.", flag_values=FLAGS)
flags.DEFINE_integer("position", None, "--step decode: filled cache slots at the measured step "
                     "(default --cache_len).", flag_values=FLAGS)
flags.DEFINE_enum("sampling", "greedy", ["greedy", "temperature", "top_k_top_p"],
                  "--step decode: the sampling compiled into the step.", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "topology"], flag_values=FLAGS)

EXIT_DOES_NOT_FIT = 3


DECODE_FLAGS = ("batch", "cache_len", "position")


def _check_step_flags() -> None:
  """Decode-only flags only with --step decode, and --batch / --cache_len required there."""
  # pylint: disable=import-outside-toplevel
  from model.errors import UserError
  if FLAGS.step == "train":
    given = [f"--{name}" for name in DECODE_FLAGS if getattr(FLAGS, name) is not None]
    if FLAGS["sampling"].present:
      given.append("--sampling")
    if given:
      raise UserError(f"--step train does not take {', '.join(given)}, which are for --step "
                      f"decode (the train step's batch is --config.train.batch_size).")
    return
  missing = [f"--{name}" for name in ("batch", "cache_len") if getattr(FLAGS, name) is None]
  if missing:
    raise UserError(f"--step decode needs {' and '.join(missing)} (rows and KV-cache slots).")
  if FLAGS["mfu"].present or FLAGS["num_slices"].present:
    raise UserError("--mfu and --num_slices only apply to --step train.")


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  _check_step_flags()
  # pylint: disable=import-outside-toplevel  (they import jax)
  from training.perf import aot, aot_decode
  from training.tpu.slices import parse_slice
  tpu = parse_slice(FLAGS.topology)
  config = cli.load_config(FLAGS)
  log = lambda line: print(line, file=sys.stderr, flush=True)
  if FLAGS.step == "decode":
    report = aot_decode.compile_decode(
        config, tpu, batch=FLAGS.batch, cache_len=FLAGS.cache_len, position=FLAGS.position,
        sampling=FLAGS.sampling, config_name=cli.config_name(FLAGS), log=log)
    text = aot_decode.format_decode_report(report)
  else:
    report = aot.compile_for_topology(
        config, tpu, mfu=FLAGS.mfu, num_slices=FLAGS.num_slices,
        config_name=cli.config_name(FLAGS), log=log)
    text = aot.format_report(report)
  print(text, flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(report.to_dict(), f, indent=2)
  return 0 if report.fits else EXIT_DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
