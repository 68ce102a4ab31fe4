"""Create a Cloud TPU slice, put the code on it, train on all its hosts: a thin gcloud wrapper.

  python -m launch.tpu create --name=NAME --zone=ZONE --accelerator_type=v5p-64
      [--runtime_version=V] [--spot | --preemptible] [--queued] [--project=P]
  python -m launch.tpu setup  --name=NAME --zone=ZONE
      [--source_dir=DIR | --git_url=URL [--git_ref=REF]] [--exclude=PATTERN ...]
  python -m launch.tpu train  --name=NAME --zone=ZONE --config=configs/gpt2.py
      --workdir=gs://BUCKET/runs/RUN [--accelerator_type=T] [--no_follow] [--config.x=y ...]
      (the config and its overrides are read here first, as launch.train reads them)
  python -m launch.tpu logs   --name=NAME --zone=ZONE [--worker=0] [--lines=100]
  python -m launch.tpu stop   --name=NAME --zone=ZONE
  python -m launch.tpu ssh    --name=NAME --zone=ZONE [--command=CMD] [--worker=all]
  python -m launch.tpu status --name=NAME --zone=ZONE [--queued]
  python -m launch.tpu delete --name=NAME --zone=ZONE [--queued] [--yes]

Every subcommand takes --dry_run (print the gcloud commands, one shell-quoted line each, and run
nothing; `create` also prints the slice's chips and hosts on stderr) and --project. Slice names
are those of training/tpu/slices.py, the table `launch.aot` compiles for: v4-N and v5p-N count
TensorCores, v5e-N (gcloud's v5litepod-N) and v6e-N chips. The commands are built in
training/tpu/gcloud.py; see there for the gcloud reference pages they follow. `train` starts the
run with nohup on every worker (output to ~/flaxgpt-train.log on each) and then streams worker
0's log; Ctrl-C stops the stream, not the run. After a preemption, recreate the slice, run
setup, and rerun the same `train`: it resumes from the last checkpoint in the gs:// workdir.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

from absl import flags

from launch import cli
from model.errors import UserError
from training.tpu import gcloud

FLAGS = flags.FlagValues()
# Every subcommand's flags
flags.DEFINE_string("name", None, "TPU slice name (also the queued resource's name).",
                    flag_values=FLAGS)
flags.DEFINE_string("zone", None, "Zone, e.g. us-central2-b.", flag_values=FLAGS)
flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's configured one).",
                    flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the commands, one per line, instead of running them.",
                  flag_values=FLAGS)
# create (and train)
flags.DEFINE_string("accelerator_type", None, "create: v4-N, v5p-N (TensorCores), v5e-N "
                    "(v5litepod-N), v6e-N; train: lets a single-host slice use a local workdir.",
                    flag_values=FLAGS)
flags.DEFINE_string("runtime_version", None, "create: TPU software version (default: per "
                    "generation).", flag_values=FLAGS)
flags.DEFINE_bool("spot", False, "create: Spot VMs, cheap and preemptible.", flag_values=FLAGS)
flags.DEFINE_bool("preemptible", False, "create: preemptible VMs (the older kind).",
                  flag_values=FLAGS)
flags.DEFINE_bool("queued", False, "create, status, delete: through a queued resource (waits "
                  "for capacity).", flag_values=FLAGS)
# setup
flags.DEFINE_string("source_dir", None, "setup: local checkout to copy (default: this one).",
                    flag_values=FLAGS)
flags.DEFINE_string("git_url", None, "setup: clone this repository on every worker instead.",
                    flag_values=FLAGS)
flags.DEFINE_string("git_ref", None, "setup: branch, tag or commit to check out after cloning.",
                    flag_values=FLAGS)
flags.DEFINE_multi_string("exclude", [], "setup: extra tar --exclude pattern for the local copy "
                          "(repeatable).", flag_values=FLAGS)
# train
flags.DEFINE_string("config", None, "train: config file on the workers, e.g. configs/gpt2.py.",
                    flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "train: gs:// path shared by all hosts.", flag_values=FLAGS)
flags.DEFINE_bool("no_follow", False, "train: start the run, do not stream its log.",
                  flag_values=FLAGS)
# logs, ssh
flags.DEFINE_string("worker", None, "logs: the worker (default 0); ssh: all, an index, a list "
                    "0,2 or a range 1-3 (default all).", flag_values=FLAGS)
flags.DEFINE_integer("lines", 100, "logs: lines of history to show first.", flag_values=FLAGS)
flags.DEFINE_string("command", None, "ssh: command to run (none: an interactive shell on one "
                    "worker).", flag_values=FLAGS)
flags.DEFINE_bool("yes", False, "delete: do not ask for confirmation.", flag_values=FLAGS)

SUBCOMMANDS = {
    "create": ("accelerator_type", "runtime_version", "spot", "preemptible", "queued"),
    "setup": ("source_dir", "git_url", "git_ref", "exclude"),
    "train": ("config", "workdir", "accelerator_type", "no_follow"),
    "logs": ("worker", "lines"),
    "stop": (),
    "ssh": ("command", "worker"),
    "status": ("queued",),
    "delete": ("queued", "yes"),
}


def _default_source_dir() -> str:
  root = pathlib.Path(gcloud.__file__).resolve().parents[2]
  if not (root / "pyproject.toml").exists():
    raise UserError(f"{root} is not a flaxgpt checkout: pass --source_dir or --git_url.")
  return str(root)


def _setup(target):
  if FLAGS.git_url:
    return gcloud.setup_commands(target, git_url=FLAGS.git_url, git_ref=FLAGS.git_ref)
  source_dir = FLAGS.source_dir or _default_source_dir()
  if not os.path.isfile(os.path.join(source_dir, "pyproject.toml")):
    raise UserError(f"--source_dir {source_dir!r} has no pyproject.toml: is it a flaxgpt "
                    "checkout?")
  tarball = os.path.join(tempfile.gettempdir(), f"flaxgpt-{target.name}.tar.gz")
  return gcloud.setup_commands(target, source_dir=source_dir, tarball=tarball,
                               excludes=FLAGS.exclude)


def _check_subcommand(args: list[str], overrides: list[str]) -> str:
  """The subcommand; UserError for a missing or unknown one, or for a flag it does not take."""
  if not args:
    raise UserError(f"Give a subcommand: {', '.join(SUBCOMMANDS)} (see --help).")
  sub = args[0]
  if sub not in SUBCOMMANDS:
    raise UserError(f"Unknown subcommand {sub!r}: choose one of {', '.join(SUBCOMMANDS)}.")
  if len(args) > 1:
    raise UserError(f"Unexpected arguments: {' '.join(args[1:])}.")
  others = {name for names in SUBCOMMANDS.values() for name in names} - set(SUBCOMMANDS[sub])
  for name in sorted(others):
    if FLAGS[name].present:
      raise UserError(f"{sub} does not take --{name} (see --help).")
  if overrides and sub != "train":
    raise UserError(f"Unknown argument {overrides[0]!r} for {sub}: only train passes "
                    f"--config.* overrides on.")
  return sub


def build_commands(sub: str, overrides: list[str]) -> list[gcloud.Command]:
  """The parsed flags -> the gcloud (and tar) commands; raises UserError for bad inputs."""
  target = gcloud.Target(FLAGS.name, FLAGS.zone, FLAGS.project)
  if sub == "create":
    return gcloud.create_commands(target, FLAGS.accelerator_type, FLAGS.runtime_version,
                                  spot=FLAGS.spot, preemptible=FLAGS.preemptible,
                                  queued=FLAGS.queued)
  if sub == "setup":
    return _setup(target)
  if sub == "train":
    return gcloud.train_commands(target, FLAGS.config, FLAGS.workdir, overrides,
                                 accelerator_type=FLAGS.accelerator_type,
                                 follow=not FLAGS.no_follow)
  if sub == "logs":
    return gcloud.logs_commands(target, FLAGS.worker or "0", FLAGS.lines)
  if sub == "stop":
    return gcloud.stop_commands(target)
  if sub == "ssh":
    return gcloud.ssh_commands(target, FLAGS.command, FLAGS.worker or "all")
  if sub == "status":
    return gcloud.status_commands(target, queued=FLAGS.queued)
  return gcloud.delete_commands(target, queued=FLAGS.queued, yes=FLAGS.yes)


def _check_train_config(overrides: list[str]) -> None:
  """The workers run `launch.train --config FLAGS.config <overrides>` in their copy of this
  checkout: read the config and the overrides here the same way first, so that a missing file,
  an unknown key or a bad value is one `error:` line now, not in a log on every worker."""
  spec = FLAGS.config
  path = spec.partition(":")[0]
  if not os.path.isfile(path):  # relative to the checkout's root, as on the workers
    in_checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    if os.path.isfile(in_checkout):
      spec = in_checkout + spec[len(path):]
  cli.check_config(spec, overrides)


def _run(args: list[str], overrides: list[str]) -> int:
  sub = _check_subcommand(args, overrides)
  commands = build_commands(sub, overrides)
  if sub == "train":
    _check_train_config(overrides)
  if FLAGS.dry_run:
    if sub == "create":
      print(gcloud.parse_accelerator_type(FLAGS.accelerator_type).describe(), file=sys.stderr)
    print(gcloud.format_commands(commands))
    return 0
  try:
    return gcloud.run_commands(commands)
  except KeyboardInterrupt:
    if sub in ("train", "logs"):
      print("\nstopped streaming the log; training goes on (`python -m launch.tpu logs` to "
            "re-attach, `stop` to end it).", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # `train` hands --config.<key>=value overrides to launch.train on the workers unchanged.
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  return cli.run(lambda args: _run(args, overrides), FLAGS, __doc__, rest,
                 xla=False)  # it starts no XLA here (the TPU VMs have their own XLA_FLAGS)


if __name__ == "__main__":
  sys.exit(main())
