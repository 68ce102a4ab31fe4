"""Draw the loss curves of one or several training runs into an image.

  python -m launch.plot RUN_DIR [RUN_DIR ...] --out FILE.png [--x step|tokens] [--title T]
      [--metric loss|KEY|moe_load]

Train loss (lines) and validation loss (dots joined by dashes) from each run's metrics, against
the optimizer step or, with --x tokens, the tokens trained on (train.batch_size x
model.block_size per step, from the run's config.json); a second axis along the top shows the
other one when there is a single run. One colour per run, labelled with the run's folder name.
--metric KEY draws another logged metric and its val_ twin (e.g. rewards/accuracies of a DPO
run); --metric moe_load draws a mixture of experts' load: each expert's share of the routed
tokens (averaged over the sparse layers) against the step, one panel per run, the even share
1 / E dashed.
--out ends in .png, .svg or .pdf; it is written only once the figure is complete. A run
without metrics, a missing folder or a bad --out prints one `error:` line and exits with
status 2, with nothing written.
"""

from __future__ import annotations

import sys

from absl import flags

from launch import cli
from model.errors import UserError

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "The image to write (.png, .svg or .pdf).", flag_values=FLAGS)
flags.DEFINE_enum("x", "step", ["step", "tokens"], "The horizontal axis.", flag_values=FLAGS)
flags.DEFINE_string("title", None, "A title (default: none).", flag_values=FLAGS)
flags.DEFINE_string("metric", "loss", "The metrics.jsonl key to draw, with its val_ twin "
                    "(e.g. rewards/accuracies of a DPO run); moe_load: a mixture of experts' "
                    "load, one line per expert.", flag_values=FLAGS)
flags.mark_flags_as_required(["out"], flag_values=FLAGS)


def _main(args: list[str]) -> int:
  if not args:
    raise UserError("Give at least one run folder: python -m launch.plot RUN_DIR [RUN_DIR ...] "
                    "--out FILE.png.")
  # pylint: disable=import-outside-toplevel  (matplotlib is slow to import)
  from training.plot import LOAD_METRIC, check_out, plot_expert_load, plot_runs, read_runs
  out = check_out(FLAGS.out)
  runs = read_runs(args, FLAGS.metric)
  if FLAGS.metric == LOAD_METRIC:
    plot_expert_load(runs, out, x=FLAGS.x, title=FLAGS.title)
  else:
    plot_runs(runs, out, x=FLAGS.x, title=FLAGS.title, metric=FLAGS.metric)
  rows = sum(len(r.load_steps if FLAGS.metric == LOAD_METRIC else r.steps) for r in runs)
  print(f"wrote {out}: {len(runs)} run{'s' * (len(runs) > 1)}, {rows} logged steps")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
