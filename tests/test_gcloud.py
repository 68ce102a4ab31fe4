"""training/tpu/gcloud.py: the exact gcloud command text, validation, and the shell that `train`
runs on every worker, run here against a fake python3. No gcloud is needed: the builders return
argv lists."""

import os
import shlex
import signal
import subprocess
import time

import pytest

from conftest import TRAIN_OVERRIDES, remote_script
from model.errors import UserError
from training.tpu import gcloud

T = gcloud.Target("my-tpu", "us-central2-b")
SSH = "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b"


def lines(commands):
  return gcloud.format_commands(commands).splitlines()


def test_create_plain():
  assert lines(gcloud.create_commands(T, "v5p-64")) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v5p-64 "
      "--version=v2-alpha-tpuv5"]


def test_create_spot_preemptible_project_and_runtime():
  target = gcloud.Target("my-tpu", "europe-west4-a", project="my-proj")
  assert lines(gcloud.create_commands(target, "v6e-64", spot=True)) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=europe-west4-a --project=my-proj "
      "--accelerator-type=v6e-64 --version=v2-alpha-tpuv6e --spot"]
  assert lines(gcloud.create_commands(T, "v4-8", runtime_version="tpu-vm-base",
                                  preemptible=True)) == [
      "gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b --accelerator-type=v4-8 "
      "--version=tpu-vm-base --preemptible"]


def test_create_queued():
  assert lines(gcloud.create_commands(T, "v5litepod-256", queued=True)) == [
      "gcloud compute tpus queued-resources create my-tpu --node-id=my-tpu --zone=us-central2-b "
      "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite"]
  assert lines(gcloud.create_commands(T, "v5p-128", queued=True, spot=True)) == [
      "gcloud compute tpus queued-resources create my-tpu --node-id=my-tpu --zone=us-central2-b "
      "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --spot"]


def test_create_refuses_conflicting_provisioning_flags():
  with pytest.raises(UserError, match="exclusive"):
    gcloud.create_commands(T, "v5p-8", spot=True, preemptible=True)
  with pytest.raises(UserError, match="--spot, not --preemptible"):
    gcloud.create_commands(T, "v5p-8", queued=True, preemptible=True)


def test_status_and_delete():
  assert lines(gcloud.status_commands(T)) == [
      "gcloud compute tpus tpu-vm describe my-tpu --zone=us-central2-b"]
  assert lines(gcloud.status_commands(T, queued=True)) == [
      "gcloud compute tpus queued-resources describe my-tpu --zone=us-central2-b"]
  assert lines(gcloud.delete_commands(T)) == [
      "gcloud compute tpus tpu-vm delete my-tpu --zone=us-central2-b"]
  assert lines(gcloud.delete_commands(T, queued=True, yes=True)) == [
      "gcloud compute tpus queued-resources delete my-tpu --zone=us-central2-b --force --quiet"]


def test_ssh():
  assert lines(gcloud.ssh_commands(T, "python3 -c 'import jax; print(jax.device_count())'")) == [
      SSH + " --worker=all --command 'python3 -c '\"'\"'import jax; print(jax.device_count())"
      "'\"'\"''"]
  assert lines(gcloud.ssh_commands(T, None, "0")) == [SSH + " --worker=0"]
  assert gcloud.ssh_command(T, "ls", "1-3")[-3:] == ["--worker=1-3", "--command", "ls"]
  with pytest.raises(UserError, match="interactive"):
    gcloud.ssh_commands(T, None, "all")
  with pytest.raises(UserError, match="--worker"):
    gcloud.ssh_commands(T, "ls", "first")


def test_setup_from_a_local_checkout():
  assert lines(gcloud.setup_commands(T, source_dir="/src/flaxgpt", tarball="/tmp/f.tar.gz")) == [
      "tar -czf /tmp/f.tar.gz --exclude=.git --exclude=__pycache__ '--exclude=*.egg-info' "
      "--exclude=.venv --exclude=.pytest_cache -C /src/flaxgpt .",
      "gcloud compute tpus tpu-vm scp /tmp/f.tar.gz my-tpu:flaxgpt.tar.gz --zone=us-central2-b "
      "--worker=all",
      SSH + " --worker=all --command 'rm -rf ~/flaxgpt && mkdir -p ~/flaxgpt && "
      "tar -xzf ~/flaxgpt.tar.gz -C ~/flaxgpt && rm ~/flaxgpt.tar.gz && cd ~/flaxgpt && "
      "python3 -m pip install -e \".[tpu]\"'",
  ]


def test_setup_from_git():
  assert lines(gcloud.setup_commands(T, git_url="https://github.com/me/flaxgpt.git",
                                 git_ref="v0.1")) == [
      SSH + " --worker=all --command 'rm -rf ~/flaxgpt && "
      "git clone https://github.com/me/flaxgpt.git ~/flaxgpt && git -C ~/flaxgpt checkout v0.1 "
      "&& cd ~/flaxgpt && python3 -m pip install -e \".[tpu]\"'"]


def test_train_commands():
  commands = gcloud.train_commands(T, "configs/gpt2.py", "gs://bucket/runs/a", TRAIN_OVERRIDES[:1])
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
  assert len(gcloud.train_commands(T, "configs/gpt2.py", "gs://b/r", follow=False)) == 1


def test_train_overrides_survive_both_shells():
  """Printed line -> local shell -> gcloud's --command -> remote shell: the argv is unchanged."""
  printed = lines(gcloud.train_commands(T, "configs/gpt2.py", "gs://b/r", TRAIN_OVERRIDES))[0]
  argv = shlex.split(printed)
  assert "--worker=all" in argv
  remote = shlex.split(remote_script(argv))
  start = remote.index("python3")
  assert remote[start:start + 8 + len(TRAIN_OVERRIDES)] == [
      "python3", "-u", "-m", "launch.train", "--config", "configs/gpt2.py",
      "--workdir", "gs://b/r", *TRAIN_OVERRIDES]


def test_local_workdir_is_refused_on_a_multi_host_slice():
  with pytest.raises(UserError, match="v5p-16 has 2 hosts"):
    gcloud.train_commands(T, "configs/gpt2.py", "/home/me/run", accelerator_type="v5p-16")
  with pytest.raises(UserError, match="gs://"):
    gcloud.train_commands(T, "configs/gpt2.py", "/home/me/run")  # host count unknown
  with pytest.raises(UserError, match="absolute"):
    gcloud.train_commands(T, "configs/gpt2.py", "runs/a", accelerator_type="v6e-8")
  # One host: an absolute local workdir is fine; a gs:// one never needs the accelerator type.
  assert gcloud.train_commands(T, "configs/gpt2.py", "/home/me/run", accelerator_type="v6e-8")
  assert gcloud.train_commands(T, "configs/gpt2.py", "gs://b/r")


def test_train_needs_config_and_flag_overrides():
  with pytest.raises(UserError, match="--config is required"):
    gcloud.train_commands(T, "", "gs://b/r")
  with pytest.raises(UserError, match="--workdir is required"):
    gcloud.train_commands(T, "configs/gpt2.py", None)
  with pytest.raises(UserError, match="should be a flag"):
    gcloud.train_commands(T, "configs/gpt2.py", "gs://b/r", ["batch_size=3"])


def test_logs_and_stop():
  assert lines(gcloud.logs_commands(T, "2", lines=50)) == [
      SSH + " --worker=2 --command "
      "'tail -n 50 --pid=\"$(cat ~/flaxgpt-train.pid)\" -F ~/flaxgpt-train.log'"]
  assert remote_script(gcloud.stop_commands(T)[0]).startswith("if [ -f ~/flaxgpt-train.pid ]")
  assert "--worker=all" in gcloud.stop_commands(T)[0]


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
  start = _bash(gcloud.train_script("configs/gpt2.py", "gs://b/r", TRAIN_OVERRIDES), env)
  assert start.returncode == 0, start.stderr
  assert (home / "flaxgpt-train.pid").read_text().strip().isdigit()
  # Follow until the (fake) run ends: tail --pid returns by itself.
  follow = _bash(gcloud.follow_script(), env)
  assert follow.returncode == 0
  args = "".join(f"<{a}>" for a in ["-u", "-m", "launch.train", "--config", "configs/gpt2.py",
                                    "--workdir", "gs://b/r", *TRAIN_OVERRIDES])
  assert args in follow.stdout
  assert f"cwd={home / 'flaxgpt'}" in follow.stdout and "done" in follow.stdout


def test_worker_script_refuses_a_second_run_and_stop_ends_it(tmp_path):
  # A long "run" that ends on SIGTERM (its sleeps are short, so nothing outlives it for long).
  home, env = _fake_worker(tmp_path, "trap 'exit 0' TERM; echo ready; "
                                     "for i in $(seq 600); do sleep 0.1; done")
  assert _bash(gcloud.train_script("c.py", "gs://b/r"), env).returncode == 0
  pid = int((home / "flaxgpt-train.pid").read_text())
  stopped = False
  try:
    _wait_for(home / "flaxgpt-train.log", "ready")
    again = _bash(gcloud.train_script("c.py", "gs://b/r"), env)
    assert again.returncode == 1 and "already going" in again.stderr
    stop = _bash(remote_script(gcloud.stop_commands(T)[0]), env)
    stopped = "stopped" in stop.stdout
    assert stopped, stop
  finally:
    if not stopped:
      os.kill(pid, signal.SIGKILL)  # only the fake run this test started
