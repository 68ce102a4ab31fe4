"""Train a GPT: python -m launch.train --config configs/<name>.py --workdir DIR [--quiet]
[--config.<section>.<key>=value ...]

Rerunning the same command on the same --workdir resumes from its latest checkpoint (a damaged
one is moved aside with a warning, and the newest that restores is used); one run at a time
holds a workdir (DIR/run.lock; see --force). Ctrl-C or SIGTERM saves and exits. Writes
DIR/metrics.jsonl, TensorBoard events, DIR/config.json and orbax checkpoints in
DIR/checkpoints/. Mistakes in the inputs print one `error:` line and exit with status 2.

Several processes (GPU hosts, or CPU processes in tests) run the same command, each with
--coordinator_address HOST:PORT --num_processes N --process_id I; on a multi-host TPU slice
the distributed runtime starts by itself. Process 0 writes the metrics, events and config;
all processes save and restore the checkpoints together.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from launch import cli

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/shakespeare_char.py or "
    "configs/shakespeare_char.py:cpu; override any field with --config.<section>.<key>=value.",
    flag_values=FLAGS, lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config "
                    "(a run there is resumed).", flag_values=FLAGS)
flags.DEFINE_bool("quiet", False, "No console output except errors.", flag_values=FLAGS)
flags.DEFINE_bool("force", False, "Run even if the workdir's lock (run.lock) names another run "
                  "that may still be running: a lock left on another host or in a gs:// "
                  "workdir by a killed run. Two live runs on one workdir destroy each other.",
                  flag_values=FLAGS)
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of process 0's "
                    "coordinator (the same on every process). Not needed on TPU VMs.",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.",
                     flag_values=FLAGS)
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, "
                     "0 .. num_processes - 1.", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def _start_distributed() -> None:
  from training import distributed  # pylint: disable=import-outside-toplevel
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except RuntimeError as e:  # e.g. the coordinator cannot be reached
    where = (f" at --coordinator_address {FLAGS.coordinator_address}"
             if FLAGS.coordinator_address else "")
    cli.fail(f"Could not start the distributed runtime{where}: {str(e).splitlines()[0]}",
             status=1)


def _main(args: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cli.no_arguments(args)
  config = cli.load_config(FLAGS)
  _start_distributed()
  # pylint: disable=import-outside-toplevel  (they import jax)
  from training.loop import CheckpointWriteFailed, TrainingDiverged, train
  try:
    train(config, FLAGS.workdir, quiet=FLAGS.quiet, force=FLAGS.force,
          explicit=cli.overridden_keys(FLAGS))
  except (TrainingDiverged, CheckpointWriteFailed) as e:
    cli.fail(str(e), status=1)
  return 0


def main(argv: list[str] | None = None) -> int:
  # A first Ctrl-C while training saves and returns (training/loop.py); a second one, or one
  # before training starts, ends the program at once:
  return cli.run(_main, FLAGS, __doc__, argv,
                 interrupted="exited at once without saving (checkpoints saved before are kept)")


if __name__ == "__main__":
  sys.exit(main())
