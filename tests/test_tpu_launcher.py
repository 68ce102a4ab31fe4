"""python -m launch.tpu: the exact gcloud command text (--dry_run), slice arithmetic, validation.

No gcloud is needed: the builders return argv lists, and the shell that `train` runs on every
worker is also run here against a fake python3.
"""

import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from launch import tpu as cli
from training import tpu_commands as tc
from training.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
T = tc.Target("my-tpu", "us-central2-b")
SSH = "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b"


def lines(commands):
  return tc.format_commands(commands).splitlines()


def remote_script(command):
  """The --command value of an ssh command (argv list)."""
  return command[command.index("--command") + 1]


# ---------------------------------------------------------------------------------------------
# the module as a program, once


def test_module_dry_run_prints_the_create_command():
  env = dict(os.environ, PYTHONPATH=str(REPO))
  result = subprocess.run(
      [sys.executable, "-m", "launch.tpu", "create", "--name=my-tpu", "--zone=us-central2-b",
       "--accelerator_type=v4-32", "--spot", "--dry_run"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout == (
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot\n")


# ---------------------------------------------------------------------------------------------
# slice arithmetic


@pytest.mark.parametrize("accelerator_type,chips,hosts", [
    ("v4-8", 4, 1), ("v4-16", 8, 2), ("v4-32", 16, 4), ("v4-128", 64, 16),
    ("v5p-8", 4, 1), ("v5p-16", 8, 2), ("v5p-64", 32, 8), ("v5p-1024", 512, 128),
    ("v5litepod-1", 1, 1), ("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1),
    ("v5litepod-16", 16, 4), ("v5litepod-256", 256, 64),
    ("v6e-1", 1, 1), ("v6e-8", 8, 1), ("v6e-16", 16, 4), ("v6e-64", 64, 16), ("v6e-256", 256, 64),
])
def test_chips_and_hosts_per_slice(accelerator_type, chips, hosts):
  shape = tc.parse_accelerator_type(accelerator_type)
  assert (shape.chips, shape.hosts) == (chips, hosts)
  assert tc.hosts_per_slice(accelerator_type) == hosts


@pytest.mark.parametrize("accelerator_type,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5p-64", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_default_runtime_version_per_generation(accelerator_type, runtime):
  assert tc.default_runtime_version(accelerator_type) == runtime


@pytest.mark.parametrize("bad", ["v5e-16", "v3-8", "v5p-12", "v4-0", "v6e-12", "v5litepod-2",
                                 "tpu-v5p-8", "V5P-8", "v5p", ""])
def test_unknown_accelerator_types_are_refused(bad):
  with pytest.raises(UserError, match="accelerator_type"):
    tc.parse_accelerator_type(bad)


def test_v5e_hint_names_the_gcloud_spelling():
  with pytest.raises(UserError, match="v5litepod-16"):
    tc.parse_accelerator_type("v5e-16")


# ---------------------------------------------------------------------------------------------
# create / status / delete / ssh


def test_create_plain():
  assert lines(tc.create_commands(T, "v5p-64")) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v5p-64 "
      "--version=v2-alpha-tpuv5"]


def test_create_spot_preemptible_project_and_runtime():
  target = tc.Target("my-tpu", "europe-west4-a", project="my-proj")
  assert lines(tc.create_commands(target, "v6e-64", spot=True)) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=europe-west4-a --project=my-proj "
      "--accelerator-type=v6e-64 --version=v2-alpha-tpuv6e --spot"]
  assert lines(tc.create_commands(T, "v4-8", runtime_version="tpu-vm-base",
                                  preemptible=True)) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v4-8 "
      "--version=tpu-vm-base --preemptible"]


def test_create_queued():
  assert lines(tc.create_commands(T, "v5litepod-256", queued=True)) == [
      "gcloud compute tpus queued-resources create my-tpu --node-id=my-tpu --zone=us-central2-b "
      "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite"]
  assert lines(tc.create_commands(T, "v5p-128", queued=True, spot=True)) == [
      "gcloud compute tpus queued-resources create my-tpu --node-id=my-tpu --zone=us-central2-b "
      "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot"]


def test_create_refuses_conflicting_provisioning_flags():
  with pytest.raises(UserError, match="exclusive"):
    tc.create_commands(T, "v5p-8", spot=True, preemptible=True)
  with pytest.raises(UserError, match="--spot, not --preemptible"):
    tc.create_commands(T, "v5p-8", queued=True, preemptible=True)


def test_status_and_delete():
  assert lines(tc.status_commands(T)) == [
      "gcloud compute tpus tpu-vm describe my-tpu --zone=us-central2-b"]
  assert lines(tc.status_commands(T, queued=True)) == [
      "gcloud compute tpus queued-resources describe my-tpu --zone=us-central2-b"]
  assert lines(tc.delete_commands(T)) == [
      "gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b"]
  assert lines(tc.delete_commands(T, queued=True, yes=True)) == [
      "gcloud compute tpus queued-resources delete my-tpu --zone=us-central2-b --force --quiet"]


def test_ssh():
  assert lines(tc.ssh_commands(T, "python3 -c 'import jax; print(jax.device_count())'")) == [
      SSH + " --worker=all --command 'python3 -c '\"'\"'import jax; print(jax.device_count())"
      "'\"'\"''"]
  assert lines(tc.ssh_commands(T, None, "0")) == [SSH + " --worker=0"]
  assert tc.ssh_command(T, "ls", "1-3")[-3:] == ["--worker=1-3", "--command", "ls"]
  with pytest.raises(UserError, match="interactive"):
    tc.ssh_commands(T, None, "all")
  with pytest.raises(UserError, match="--worker"):
    tc.ssh_commands(T, "ls", "first")


# ---------------------------------------------------------------------------------------------
# setup


def test_setup_from_a_local_checkout():
  assert lines(tc.setup_commands(T, source_dir="/src/flaxgpt", tarball="/tmp/f.tar.gz")) == [
      "tar -czf /tmp/f.tar.gz --exclude=.git --exclude=__pycache__ '--exclude=*.egg-info' "
      "--exclude=.venv --exclude=.pytest_cache -C /src/flaxgpt .",
      "gcloud compute tpus tpu-vm scp /tmp/f.tar.gz my-tpu:flaxgpt.tar.gz --zone=us-central2-b "
      "--worker=all",
      SSH + " --worker=all --command 'rm -rf ~/flaxgpt && mkdir -p ~/flaxgpt && "
      "tar -xzf ~/flaxgpt.tar.gz -C ~/flaxgpt && rm ~/flaxgpt.tar.gz && cd ~/flaxgpt && "
      "python3 -m pip install -e \".[tpu]\"'",
  ]


def test_setup_from_git():
  assert lines(tc.setup_commands(T, git_url="https://github.com/me/flaxgpt.git",
                                 git_ref="v0.1")) == [
      SSH + " --worker=all --command 'rm -rf ~/flaxgpt && "
      "git clone https://github.com/me/flaxgpt.git ~/flaxgpt && git -C ~/flaxgpt checkout v0.1 "
      "&& cd ~/flaxgpt && python3 -m pip install -e \".[tpu]\"'"]


def test_setup_cli_defaults_to_this_checkout(capsys):
  assert cli.main(["setup", "--name=my-tpu", "--zone=us-central2-b", "--dry_run"]) == 0
  tar = shlex.split(capsys.readouterr().out.splitlines()[0])
  assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO), "."]


# ---------------------------------------------------------------------------------------------
# train


OVERRIDES = ["--config.train.batch_size=32", "--config.run_name=it's a test; rm -rf /",
             '--config.data.path=$HOME/data "x"']


def test_train_commands():
  commands = tc.train_commands(T, "configs/gpt2.py", "gs://bucket/runs/a", OVERRIDES[:1])
  assert lines(commands) == [
      SSH + " --worker=all --command 'cd ~/flaxgpt || exit 1; "
      "if [ -f ~/flaxgpt-train.pid ] && kill -0 \"$(cat ~/flaxgpt-train.pid)\" 2>/dev/null; "
      "then echo \"flaxgpt: a run is already going on $(hostname) "
      "(pid $(cat ~/flaxgpt-train.pid)); stop it first\" >&2; exit 1; fi; "
      "nohup python3 -u -m launch.train --config configs/gpt2.py --workdir gs://bucket/runs/a "
      "--config.train.batch_size=32 > ~/flaxgpt-train.log 2>&1 < /dev/null & "
      "echo $! > ~/flaxgpt-train.pid'",
      SSH + " --worker=0 --command "
      "'tail -n +1 --pid=\"$(cat ~/flaxgpt-train.pid)\" -F ~/flaxgpt-train.log'",
  ]
  assert len(tc.train_commands(T, "configs/gpt2.py", "gs://b/r", follow=False)) == 1


def test_train_overrides_survive_both_shells():
  """Printed line -> local shell -> gcloud's --command -> remote shell: the argv is unchanged."""
  printed = lines(tc.train_commands(T, "configs/gpt2.py", "gs://b/r", OVERRIDES))[0]
  argv = shlex.split(printed)
  assert "--worker=all" in argv
  remote = shlex.split(remote_script(argv))
  start = remote.index("python3")
  assert remote[start:start + 8 + len(OVERRIDES)] == [
      "python3", "-u", "-m", "launch.train", "--config", "configs/gpt2.py",
      "--workdir", "gs://b/r", *OVERRIDES]


def test_train_cli_passes_config_overrides(capsys):
  argv = ["train", "--name=my-tpu", "--zone=us-central2-b", "--config=configs/gpt2.py",
          "--workdir=gs://b/r", "--dry_run", *OVERRIDES]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out.splitlines()
  remote = shlex.split(remote_script(shlex.split(out[0])))
  assert remote[remote.index("gs://b/r") + 1:][:len(OVERRIDES)] == OVERRIDES


def test_local_workdir_is_refused_on_a_multi_host_slice():
  with pytest.raises(UserError, match="v5p-16 has 2 hosts"):
    tc.train_commands(T, "configs/gpt2.py", "/home/me/run", accelerator_type="v5p-16")
  with pytest.raises(UserError, match="gs://"):
    tc.train_commands(T, "configs/gpt2.py", "/home/me/run")  # host count unknown
  with pytest.raises(UserError, match="absolute"):
    tc.train_commands(T, "configs/gpt2.py", "runs/a", accelerator_type="v6e-8")
  # One host: an absolute local workdir is fine; a gs:// one never needs the accelerator type.
  assert tc.train_commands(T, "configs/gpt2.py", "/home/me/run", accelerator_type="v6e-8")
  assert tc.train_commands(T, "configs/gpt2.py", "gs://b/r")


def test_train_needs_config_and_flag_overrides():
  with pytest.raises(UserError, match="--config is required"):
    tc.train_commands(T, "", "gs://b/r")
  with pytest.raises(UserError, match="--workdir is required"):
    tc.train_commands(T, "configs/gpt2.py", None)
  with pytest.raises(UserError, match="should be a flag"):
    tc.train_commands(T, "configs/gpt2.py", "gs://b/r", ["batch_size=3"])


def test_logs_and_stop():
  assert lines(tc.logs_commands(T, "2", lines=50)) == [
      SSH + " --worker=2 --command "
      "'tail -n 50 --pid=\"$(cat ~/flaxgpt-train.pid)\" -F ~/flaxgpt-train.log'"]
  assert remote_script(tc.stop_commands(T)[0]).startswith("if [ -f ~/flaxgpt-train.pid ]")
  assert "--worker=all" in tc.stop_commands(T)[0]


# ---------------------------------------------------------------------------------------------
# the worker-side shell, run here with a fake python3


def _fake_worker(tmp_path, then):
  """HOME with ~/flaxgpt, and a python3 that prints its argv and cwd, then runs `then`."""
  home = tmp_path / "home"
  (home / "flaxgpt").mkdir(parents=True)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  fake = bin_dir / "python3"
  fake.write_text("#!/bin/bash\nprintf '<%s>' \"$@\"; echo\n"
                  f"echo \"cwd=$PWD\"\n{then}\n")
  fake.chmod(0o755)
  env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
  return home, env


def _bash(script, env, timeout=30):
  return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                        timeout=timeout)


def _wait_for(path, text, seconds=10):
  deadline = time.time() + seconds
  while time.time() < deadline:
    if path.exists() and text in path.read_text():
      return
    time.sleep(0.05)
  raise AssertionError(f"{text!r} not in {path}")


def test_worker_script_starts_in_background_logs_and_follows(tmp_path):
  home, env = _fake_worker(tmp_path, "sleep 0.5; echo done")
  start = _bash(tc.train_script("configs/gpt2.py", "gs://b/r", OVERRIDES), env)
  assert start.returncode == 0, start.stderr
  assert (home / "flaxgpt-train.pid").read_text().strip().isdigit()
  # Follow until the (fake) run ends: tail --pid returns by itself.
  follow = _bash(tc.follow_script(), env)
  assert follow.returncode == 0
  args = "".join(f"<{a}>" for a in ["-u", "-m", "launch.train", "--config", "configs/gpt2.py",
                                    "--workdir", "gs://b/r", *OVERRIDES])
  assert args in follow.stdout
  assert f"cwd={home / 'flaxgpt'}" in follow.stdout and "done" in follow.stdout


def test_worker_script_refuses_a_second_run_and_stop_ends_it(tmp_path):
  # A long "run" that ends on SIGTERM (its sleeps are short, so nothing outlives it for long).
  home, env = _fake_worker(tmp_path, "trap 'exit 0' TERM; echo ready; "
                                     "for i in $(seq 600); do sleep 0.1; done")
  assert _bash(tc.train_script("c.py", "gs://b/r"), env).returncode == 0
  pid = int((home / "flaxgpt-train.pid").read_text())
  stopped = False
  try:
    _wait_for(home / "flaxgpt-train.log", "ready")
    again = _bash(tc.train_script("c.py", "gs://b/r"), env)
    assert again.returncode == 1 and "already going" in again.stderr
    stop = _bash(remote_script(tc.stop_commands(T)[0]), env)
    stopped = "stopped" in stop.stdout
    assert stopped, stop
  finally:
    if not stopped:
      os.kill(pid, signal.SIGKILL)  # only the fake run this test started


# ---------------------------------------------------------------------------------------------
# CLI validation: one sentence, exit status 2


@pytest.mark.parametrize("argv,message", [
    (["create", "--zone=z", "--accelerator_type=v5p-8"], "--name is required"),
    (["create", "--name=n", "--accelerator_type=v5p-8"], "--zone is required"),
    (["create", "--name=n", "--zone=z"], "--accelerator_type is required"),
    (["create", "--name=n", "--zone=z", "--accelerator_type=v9-8"], "unknown --accelerator_type"),
    (["status", "--name=n", "--zone=z", "--config.x=1"], "unknown argument"),
    (["train", "--name=n", "--zone=z", "--config=c.py", "--workdir=gs://b", "--wat"],
     "unknown argument '--wat'"),
    (["train", "--name=n", "--zone=z", "--config=c.py", "--workdir=/tmp/w",
      "--accelerator_type=v4-32"], "v4-32 has 4 hosts"),
])
def test_cli_errors_are_one_sentence_with_status_2(capsys, argv, message):
  assert cli.main(argv + ["--dry_run"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.startswith("error: ") and message in captured.err
  assert captured.err.count("\n") == 1


def test_cli_usage_errors_exit_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["create", "--name=n", "--zone=z", "--accelerator_type=v5p-8", "--spot=yes"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_missing_gcloud_is_one_sentence(capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  assert cli.main(["status", "--name=n", "--zone=z"]) == 2
  assert "gcloud is not on PATH" in capsys.readouterr().err
