"""Create a Cloud TPU slice, put the code on it, train on all its hosts: a thin gcloud wrapper.

  python -m launch.tpu create --name=NAME --zone=ZONE --accelerator_type=v5p-64
      [--runtime_version=V] [--spot | --preemptible] [--queued] [--project=P]
  python -m launch.tpu setup  --name=NAME --zone=ZONE
      [--source_dir=DIR | --git_url=URL [--git_ref=REF]]
  python -m launch.tpu train  --name=NAME --zone=ZONE --config=configs/gpt2.py
      --workdir=gs://BUCKET/runs/RUN [--accelerator_type=T] [--no_follow] [--config.x=y ...]
  python -m launch.tpu logs   --name=NAME --zone=ZONE [--worker=0] [--lines=100]
  python -m launch.tpu stop   --name=NAME --zone=ZONE
  python -m launch.tpu ssh    --name=NAME --zone=ZONE [--command=CMD] [--worker=all]
  python -m launch.tpu status --name=NAME --zone=ZONE [--queued]
  python -m launch.tpu delete --name=NAME --zone=ZONE [--queued] [--yes]

Every subcommand takes --dry_run (print the gcloud commands, one shell-quoted line each, and run
nothing) and --project. The commands are built in training/tpu_commands.py; see there for the
gcloud reference pages they follow. `train` starts the run with nohup on every worker (output to
~/flaxgpt-train.log on each) and then streams worker 0's log; Ctrl-C stops the stream, not the
run. After a preemption, recreate the slice, run setup, and rerun the same `train`: it resumes
from the last checkpoint in the gs:// workdir.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

from training import tpu_commands as tc
from training.errors import UserError


class _Parser(argparse.ArgumentParser):
  """Usage mistakes as one sentence with exit status 2; no abbreviated flags."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(*args, **kwargs)

  def error(self, message):
    self.exit(2, f"error: {message} (see python -m launch.tpu {self._sub_name()}--help)\n")

  def _sub_name(self):
    parts = self.prog.split()
    return f"{parts[-1]} " if len(parts) > 1 and parts[-1] != "launch.tpu" else ""


def _common() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", help="TPU slice name (also the queued resource's name)")
  common.add_argument("--zone", help="zone, e.g. us-central2-b")
  common.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  common.add_argument("--dry_run", action="store_true",
                      help="print the commands, one per line, instead of running them")
  return common


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m launch.tpu", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=_Parser)
  common = _common()

  create = sub.add_parser("create", parents=[common], help="create a TPU slice")
  create.add_argument("--accelerator_type", help="v4-N, v5p-N (TensorCores), v5litepod-N, v6e-N")
  create.add_argument("--runtime_version", help="TPU software version (default: per generation)")
  create.add_argument("--spot", action="store_true", help="Spot VMs: cheap, preemptible")
  create.add_argument("--preemptible", action="store_true", help="preemptible (older kind)")
  create.add_argument("--queued", action="store_true",
                      help="request through a queued resource (waits for capacity)")

  setup = sub.add_parser("setup", parents=[common], help="copy or clone the code, pip install")
  setup.add_argument("--source_dir", help="local checkout to copy (default: this one)")
  setup.add_argument("--git_url", help="clone this repository on every worker instead")
  setup.add_argument("--git_ref", help="branch, tag or commit to check out after cloning")
  setup.add_argument("--exclude", action="append", default=[],
                     help="extra tar --exclude pattern for the local copy (repeatable)")

  train = sub.add_parser(
      "train", parents=[common], help="run launch.train on all workers",
      description="Start `python -m launch.train --config CONFIG --workdir WORKDIR [--config.x=y "
      "...]` on every worker (nohup, log in ~/flaxgpt-train.log), then stream worker 0's log. "
      "Extra --config.x=value flags are passed to launch.train unchanged.")
  train.add_argument("--config", help="config file on the workers, e.g. configs/gpt2.py")
  train.add_argument("--workdir", help="gs:// path shared by all hosts")
  train.add_argument("--accelerator_type", help="lets a single-host slice use a local workdir")
  train.add_argument("--no_follow", action="store_true", help="start the run, do not stream")

  logs = sub.add_parser("logs", parents=[common], help="stream a worker's training log")
  logs.add_argument("--worker", default="0")
  logs.add_argument("--lines", type=int, default=100, help="lines of history to show first")

  sub.add_parser("stop", parents=[common], help="stop the training run on every worker")

  ssh = sub.add_parser("ssh", parents=[common], help="run a command on workers")
  ssh.add_argument("--command", help="command to run (none: interactive shell on one worker)")
  ssh.add_argument("--worker", default="all", help="all, an index, a list 0,2 or a range 1-3")

  status = sub.add_parser("status", parents=[common], help="describe the slice")
  status.add_argument("--queued", action="store_true", help="describe the queued resource")

  delete = sub.add_parser("delete", parents=[common], help="delete the slice")
  delete.add_argument("--queued", action="store_true", help="delete the queued resource too")
  delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
  return parser


def _default_source_dir() -> str:
  root = pathlib.Path(tc.__file__).resolve().parents[1]
  if not (root / "pyproject.toml").exists():
    raise UserError(f"{root} is not a flaxgpt checkout: pass --source_dir or --git_url.")
  return str(root)


def _setup(args, target):
  if args.git_url:
    return tc.setup_commands(target, git_url=args.git_url, git_ref=args.git_ref)
  source_dir = args.source_dir or _default_source_dir()
  if not os.path.isfile(os.path.join(source_dir, "pyproject.toml")):
    raise UserError(f"--source_dir {source_dir!r} has no pyproject.toml: is it a flaxgpt checkout?")
  tarball = os.path.join(tempfile.gettempdir(), f"flaxgpt-{target.name}.tar.gz")
  return tc.setup_commands(target, source_dir=source_dir, tarball=tarball, excludes=args.exclude)


def build_commands(args, extra: list[str]) -> list[tc.Command]:
  """Parsed flags -> the gcloud (and tar) commands; raises UserError for bad inputs."""
  if extra and args.subcommand != "train":
    raise UserError(f"unknown argument {extra[0]!r} for {args.subcommand}.")
  for flag in extra:
    if not flag.startswith("--config."):
      raise UserError(f"unknown argument {flag!r}: train passes on only --config.* overrides, "
                      "written as --config.x=value.")
  target = tc.Target(args.name, args.zone, args.project)
  if args.subcommand == "create":
    return tc.create_commands(target, args.accelerator_type, args.runtime_version,
                              spot=args.spot, preemptible=args.preemptible, queued=args.queued)
  if args.subcommand == "setup":
    return _setup(args, target)
  if args.subcommand == "train":
    return tc.train_commands(target, args.config, args.workdir, extra,
                             accelerator_type=args.accelerator_type, follow=not args.no_follow)
  if args.subcommand == "logs":
    return tc.logs_commands(target, args.worker, args.lines)
  if args.subcommand == "stop":
    return tc.stop_commands(target)
  if args.subcommand == "ssh":
    return tc.ssh_commands(target, args.command, args.worker)
  if args.subcommand == "status":
    return tc.status_commands(target, queued=args.queued)
  return tc.delete_commands(target, queued=args.queued, yes=args.yes)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if args.subcommand is None:
    parser.print_help(sys.stderr)
    return 2
  try:
    commands = build_commands(args, extra)
    if args.dry_run:
      print(tc.format_commands(commands))
      return 0
    return tc.run_commands(commands)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if args.subcommand in ("train", "logs"):
      print("\nstopped streaming the log; training goes on (`python -m launch.tpu logs` to "
            "re-attach, `stop` to end it).", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
