"""The gcloud commands behind `python -m launch.tpu`: create a TPU slice, set it up, train on it.

Every builder returns a list of commands, each an argv list: printed with `format_commands`
(`--dry_run`) or run one after another with `run_commands`. Nothing here talks to Google Cloud
by itself, so the exact command text is what the tests check.

Command syntax follows these gcloud reference pages:
  gcloud compute tpus tpu-vm create TPU --zone --accelerator-type --version [--spot|--preemptible]
    https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/create
  gcloud compute tpus queued-resources create QR --node-id --zone --accelerator-type
    --runtime-version [--spot]   (no --preemptible there)
    https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
  gcloud compute tpus queued-resources delete QR --zone [--force]  (--force deletes its nodes first)
    https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
  gcloud compute tpus tpu-vm ssh TPU --zone --worker=all|0|1-3 --command CMD
    https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/ssh
  gcloud compute tpus tpu-vm scp SRC TPU:DEST --zone --worker=all [--recurse]
    https://cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/scp
Slice names, chips, hosts and the default runtime version come from training/tpu/slices.py (the
same table `launch.aot` compiles for); the accelerator type passed to gcloud is its spelling
(`TpuSlice.accelerator_type`: v5e-16 becomes v5litepod-16).

A slice made with --queued has a node of the same name (`--node-id=NAME`), so setup, train and
ssh address it exactly like a slice made with `tpu-vm create`.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from typing import Sequence

from model.errors import UserError
from training.tpu.slices import TpuSlice, parse_slice

Command = list[str]

TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]

# Where the code and the training run live on every worker (paths relative to the home directory,
# expanded by the remote shell).
REMOTE_DIR = "~/flaxgpt"
REMOTE_TARBALL = "flaxgpt.tar.gz"  # scp destination, relative to the remote home directory
TRAIN_LOG = "~/flaxgpt-train.log"
TRAIN_PID = "~/flaxgpt-train.pid"
TAR_EXCLUDES = (".git", "__pycache__", "*.egg-info", ".venv", ".pytest_cache")
_WORKER_RE = re.compile(r"^(all|\d+(-\d+)?(,\d+(-\d+)?)*)$")  # gcloud's --worker forms


def parse_accelerator_type(accelerator_type: str) -> TpuSlice:
  """'v5p-64' -> TpuSlice(chips=32, hosts=8); raises UserError for an unknown type."""
  if not accelerator_type:
    raise UserError("--accelerator_type is required, e.g. --accelerator_type=v5p-64.")
  return parse_slice(accelerator_type, flag="--accelerator_type")


def hosts_per_slice(accelerator_type: str) -> int:
  """Number of TPU VMs (gcloud workers, JAX processes) in a slice."""
  return parse_accelerator_type(accelerator_type).hosts


def default_runtime_version(accelerator_type: str) -> str:
  return parse_accelerator_type(accelerator_type).generation.runtime


@dataclasses.dataclass(frozen=True)
class Target:
  """Which slice: its name (TPU VM node, and queued resource if any), zone and project."""
  name: str
  zone: str
  project: str | None = None

  def __post_init__(self):
    if not self.name:
      raise UserError("--name is required: the name of the TPU slice, e.g. --name=my-tpu.")
    if not self.zone:
      raise UserError("--zone is required: the zone of the TPU slice, e.g. --zone=us-central2-b.")

  def flags(self) -> list[str]:
    flags = [f"--zone={self.zone}"]
    if self.project:
      flags.append(f"--project={self.project}")
    return flags


# ---------------------------------------------------------------------------------------------
# create / status / delete


def create_commands(target: Target, accelerator_type: str, runtime_version: str | None = None,
                    spot: bool = False, preemptible: bool = False,
                    queued: bool = False) -> list[Command]:
  """The command that asks for the slice (queued: a queued resource with a same-named node)."""
  tpu = parse_accelerator_type(accelerator_type)
  runtime = runtime_version or tpu.generation.runtime
  if spot and preemptible:
    raise UserError("--spot and --preemptible are exclusive: pick one (spot is the newer kind).")
  if queued and preemptible:
    raise UserError("queued resources take --spot, not --preemptible.")
  if queued:
    cmd = QUEUED + ["create", target.name, f"--node-id={target.name}", *target.flags(),
                    f"--accelerator-type={tpu.accelerator_type}", f"--runtime-version={runtime}"]
  else:
    cmd = TPU + ["create", target.name, *target.flags(),
                 f"--accelerator-type={tpu.accelerator_type}", f"--version={runtime}"]
  if spot:
    cmd.append("--spot")
  if preemptible:
    cmd.append("--preemptible")
  return [cmd]


def status_commands(target: Target, queued: bool = False) -> list[Command]:
  """Describe the slice, or for --queued the queued resource (WAITING_FOR_RESOURCES, ACTIVE...)."""
  return [(QUEUED if queued else TPU) + ["describe", target.name] + target.flags()]


def delete_commands(target: Target, queued: bool = False, yes: bool = False) -> list[Command]:
  """Delete the slice; for --queued the queued resource with --force, which deletes its node too."""
  if queued:
    cmd = QUEUED + ["delete", target.name] + target.flags() + ["--force"]
  else:
    cmd = TPU + ["delete", target.name] + target.flags()
  if yes:
    cmd.append("--quiet")  # gcloud-wide flag: no confirmation prompt
  return [cmd]


# ---------------------------------------------------------------------------------------------
# ssh / setup


def ssh_command(target: Target, command: str | None, worker: str = "all") -> Command:
  """`tpu-vm ssh` on `worker` (all, 0, 0,3 or 1-3); without a command, an interactive shell."""
  worker = str(worker)
  if not _WORKER_RE.match(worker):
    raise UserError(f"--worker must be 'all', an index like 0, a list like 0,3 or a range like "
                    f"1-3, not {worker!r}.")
  if command is None and worker == "all":
    raise UserError("an interactive ssh needs one worker: pass --worker=0, or --command to run "
                    "a command on all workers.")
  cmd = TPU + ["ssh", target.name] + target.flags() + [f"--worker={worker}"]
  if command is not None:
    cmd += ["--command", command]
  return cmd


def ssh_commands(target: Target, command: str | None, worker: str = "all") -> list[Command]:
  return [ssh_command(target, command, worker)]


def _install(remote_dir: str) -> str:
  # jax[tpu] comes in through the project's `tpu` extra (pyproject.toml).
  return f'cd {remote_dir} && python3 -m pip install -e ".[tpu]"'


def setup_commands(target: Target, source_dir: str | None = None, tarball: str | None = None,
                   git_url: str | None = None, git_ref: str | None = None,
                   excludes: Sequence[str] = ()) -> list[Command]:
  """Put the code on every worker as ~/flaxgpt (replacing what was there) and pip-install it.

  From a local checkout: tar it (without .git, caches, virtual environments), scp the tarball to
  all workers, unpack. From git: clone `git_url` on every worker (and check out `git_ref`).
  Keep data and outputs outside ~/flaxgpt: setup replaces the directory.
  """
  if git_url:
    clone = f"rm -rf {REMOTE_DIR} && git clone {shlex.quote(git_url)} {REMOTE_DIR}"
    if git_ref:
      clone += f" && git -C {REMOTE_DIR} checkout {shlex.quote(git_ref)}"
    return [ssh_command(target, f"{clone} && {_install(REMOTE_DIR)}", "all")]
  if not source_dir or not tarball:
    raise UserError("setup needs a local source directory and tarball path, or --git_url.")
  tar = ["tar", "-czf", tarball]
  tar += [f"--exclude={pattern}" for pattern in (*TAR_EXCLUDES, *excludes)]
  tar += ["-C", source_dir, "."]
  scp = TPU + ["scp", tarball, f"{target.name}:{REMOTE_TARBALL}"] + target.flags() + [
      "--worker=all"]
  unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
            f"tar -xzf ~/{REMOTE_TARBALL} -C {REMOTE_DIR} && rm ~/{REMOTE_TARBALL}")
  return [tar, scp, ssh_command(target, f"{unpack} && {_install(REMOTE_DIR)}", "all")]


# ---------------------------------------------------------------------------------------------
# train / logs / stop


def validate_workdir(workdir: str, accelerator_type: str | None) -> None:
  """A multi-host run needs a workdir every host sees: a gs:// path.

  A local workdir (single host only) must be absolute: a relative one would land inside
  ~/flaxgpt, which `setup` replaces.
  """
  if not workdir:
    raise UserError("--workdir is required, e.g. --workdir=gs://my-bucket/runs/gpt2.")
  if workdir.startswith("gs://"):
    return
  if not workdir.startswith("/"):
    raise UserError(f"--workdir {workdir!r} must be a gs:// path or an absolute path on the "
                    "workers (a relative one would sit inside ~/flaxgpt, which setup replaces).")
  if accelerator_type is None:
    raise UserError(f"--workdir {workdir!r} is local to each worker, which is only right on a "
                    "single-host slice: use a gs:// workdir, or pass --accelerator_type to show "
                    "the slice has one host.")
  hosts = hosts_per_slice(accelerator_type)
  if hosts > 1:
    raise UserError(f"--workdir {workdir!r} is local, but {accelerator_type} has {hosts} hosts "
                    "that must share checkpoints: use a gs:// workdir, e.g. "
                    "gs://my-bucket/runs/NAME.")


def remote_train_argv(config: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
  """The command each worker runs: the same `launch.train` as on a laptop (-u: unbuffered log)."""
  for override in overrides:
    if not override.startswith("--"):
      raise UserError(f"extra train argument {override!r} should be a flag like "
                      "--config.train.batch_size=32.")
  return ["python3", "-u", "-m", "launch.train", "--config", config, "--workdir", workdir,
          *overrides]


def train_script(config: str, workdir: str, overrides: Sequence[str] = ()) -> str:
  """Shell run on every worker: refuse if a run is alive, else start one with nohup.

  Output goes to ~/flaxgpt-train.log (replaced each run), the process id to ~/flaxgpt-train.pid.
  nohup, no terminal on stdin and `&` let the run outlive the ssh session.
  """
  train = shlex.join(remote_train_argv(config, workdir, overrides))
  alive = f'[ -f {TRAIN_PID} ] && kill -0 "$(cat {TRAIN_PID})" 2>/dev/null'
  refuse = (f'echo "flaxgpt: a run is already going on $(hostname) (pid $(cat {TRAIN_PID})); '
            f'stop it first" >&2; exit 1')
  # `cmd & echo $!` records nohup's pid, which is python's (nohup execs it).
  start = f"nohup {train} > {TRAIN_LOG} 2>&1 < /dev/null & echo $! > {TRAIN_PID}"
  return f"cd {REMOTE_DIR} || exit 1; if {alive}; then {refuse}; fi; {start}"


def follow_script(lines: str = "+1") -> str:
  """Print worker 0's log as it grows; ends when the training process ends (GNU tail --pid)."""
  return f'tail -n {lines} --pid="$(cat {TRAIN_PID})" -F {TRAIN_LOG}'


def train_commands(target: Target, config: str, workdir: str, overrides: Sequence[str] = (),
                   accelerator_type: str | None = None, follow: bool = True) -> list[Command]:
  """Start `launch.train` on all workers in the background, then stream worker 0's log.

  Every worker runs the same command (JAX finds the other hosts itself); each writes its own
  log, and worker 0's is streamed. Interrupting the stream leaves training running. Rerunning
  the same command after a preemption resumes from the last checkpoint in the workdir.
  """
  if not config:
    raise UserError("--config is required, e.g. --config=configs/gpt2.py.")
  validate_workdir(workdir, accelerator_type)
  commands = [ssh_command(target, train_script(config, workdir, overrides), "all")]
  if follow:
    commands.append(ssh_command(target, follow_script(), "0"))
  return commands


def logs_commands(target: Target, worker: str = "0", lines: int = 100) -> list[Command]:
  return [ssh_command(target, follow_script(str(lines)), worker)]


def stop_commands(target: Target) -> list[Command]:
  """Stop the run on every worker (SIGTERM to the recorded process id)."""
  script = (f'if [ -f {TRAIN_PID} ] && kill -0 "$(cat {TRAIN_PID})" 2>/dev/null; '
            f'then kill "$(cat {TRAIN_PID})" && echo "flaxgpt: stopped on $(hostname)"; '
            f'else echo "flaxgpt: no run on $(hostname)"; fi')
  return [ssh_command(target, script, "all")]


# ---------------------------------------------------------------------------------------------
# printing and running


def format_commands(commands: Sequence[Command]) -> str:
  """One shell-quoted line per command: what `--dry_run` prints, paste-able into a shell."""
  return "\n".join(shlex.join(cmd) for cmd in commands)


def check_gcloud() -> None:
  if shutil.which("gcloud") is None:
    raise UserError("gcloud is not on PATH: install the Google Cloud CLI "
                    "(https://cloud.google.com/sdk/docs/install) or use --dry_run to print "
                    "the commands.")


def run_commands(commands: Sequence[Command], echo: bool = True) -> int:
  """Run the commands in order (each echoed to stderr first), stopping at the first failure.

  Returns the exit status of the last command run.
  """
  if any(cmd[0] == "gcloud" for cmd in commands):
    check_gcloud()
  for cmd in commands:
    if echo:
      print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    status = subprocess.run(cmd, check=False).returncode
    if status != 0:
      return status
  return 0
