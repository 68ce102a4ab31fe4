"""Compile a config's train step for a TPU slice on this machine (no TPU needed) and report
per-chip memory, FLOPs and the implied step time:

  python -m launch.aot --config configs/<name>.py --topology v5p-64 [--mfu 0.5]
      [--num_slices 1] [--json FILE] [--config.<section>.<key>=value ...]

--topology: v4-N, v5p-N (N TensorCores, 2 per chip), v5e-N / v5litepod-N, v6e-N (N chips), or
a chip grid such as v5p:4x4x12. Needs libtpu: pip install "jax[tpu]" (any machine).
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

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from training.cli_errors import config_arg, fail, load_config, parse_flags  # noqa: E402
from training.errors import UserError  # noqa: E402

config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/gpt2_xl.py; override any field with "
    "--config.<section>.<key>=value.", lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice: v4-N, v5p-N, v5e-N (v5litepod-N), v6e-N, "
                    "or a chip grid such as v5p:4x4x8.")
flags.DEFINE_float("mfu", 0.5, "Model FLOPs utilisation for the implied step time, in (0, 1].")
flags.DEFINE_integer("num_slices", 1, "Number of such slices (multi-slice, data-centre network "
                     "between them).")
flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config", "topology"])
FLAGS = flags.FLAGS

EXIT_DOES_NOT_FIT = 3


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"Unexpected arguments: {' '.join(argv[1:])}.")
  # pylint: disable=import-outside-toplevel  (they import jax)
  from training import aot
  from training.tpu_topology import parse_topology
  try:
    topo = parse_topology(FLAGS.topology)
    config = load_config(FLAGS)
    name = os.path.splitext(os.path.basename(config_arg(sys.argv).partition(":")[0]))[0]
    report = aot.compile_for_topology(
        config, topo, mfu=FLAGS.mfu, num_slices=FLAGS.num_slices, config_name=name,
        log=lambda line: print(line, file=sys.stderr, flush=True))
  except UserError as e:
    fail(str(e))
  print(aot.format_report(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(report.to_dict(), f, indent=2)
  sys.exit(0 if report.fits else EXIT_DOES_NOT_FIT)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: parse_flags(FLAGS, argv))
