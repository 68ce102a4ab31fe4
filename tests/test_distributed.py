"""training/distributed.py: 2 CPU processes x 4 devices train exactly like 1 process x 8, and a
checkpoint they wrote resumes on one process; the multi-process flags are checked."""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import FAST_COMPILE, built_once, exit_status, subprocess_env
from launch import train as train_cli
from model.errors import UserError
from training import distributed
from training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 150  # seconds for one run; a hung collective fails the test instead of hanging it
ARGS = ("--config", "configs/tiny.py", "--config.mesh.data=2", "--config.mesh.fsdp=-1",
        "--config.train.steps=6", "--config.log.every=1", "--config.checkpoint.every=3",
        "--config.checkpoint.keep=3", "--config.model.num_layers=1", "--quiet")


@pytest.fixture(scope="module")
def env():
  return subprocess_env()


def _free_address() -> str:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return f"localhost:{sock.getsockname()[1]}"


def _start(env, workdir, num_processes: int, devices_each: int, *overrides):
  """launch.train in `num_processes` processes, each in its own process group."""
  env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each} "
                            f"{FAST_COMPILE}")
  cmd = [sys.executable, "-m", "launch.train", "--workdir", str(workdir), *ARGS, *overrides]
  if num_processes > 1:
    address = _free_address()
    cmds = [cmd + [f"--coordinator_address={address}", f"--num_processes={num_processes}",
                   f"--process_id={i}"] for i in range(num_processes)]
  else:
    cmds = [cmd]
  return [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True) for c in cmds]


def _finish(procs) -> list[str]:
  """Each process's stderr once all exited with status 0; kills all and fails past TIMEOUT."""
  try:
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    pytest.fail(f"{len(procs)}-process run did not finish in {TIMEOUT}s (hung collective?)")
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}: {err[-3000:]}"
  return [err for _, err in outs]


def _train(env, workdir, num_processes: int, devices_each: int):
  _finish(_start(env, workdir, num_processes, devices_each))
  return read_metrics(workdir)


def _rows_written(workdir) -> int:
  """Complete metrics.jsonl lines so far (the writer may be in the middle of one)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def _checkpoints(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _losses(rows, key="loss"):
  return {r["step"]: r[key] for r in rows if r.get(key) is not None}


def _assert_close(got: dict, want: dict, steps) -> None:
  for s in steps:
    assert abs(got[s] - want[s]) <= 1e-6 * abs(want[s]), (s, got[s], want[s])


@pytest.fixture(scope="module")
def one_process_rows(env):
  """The metrics of the reference: 1 process x 8 devices, mesh data=2 fsdp=4 (made once)."""
  return read_metrics(built_once("distributed_one", lambda path: _train(env, path, 1, 8)))


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_on_one(env, tmp_path, one_process_rows):
  one = one_process_rows
  two = _train(env, tmp_path / "two", 2, 4)  # 2 processes x 4 devices, the same mesh
  assert [r["step"] for r in one] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]  # process 0 alone wrote the rows
  _assert_close(_losses(two), _losses(one), range(1, 7))
  _assert_close(_losses(two, "val_loss"), _losses(one, "val_loss"), [6])
  assert (tmp_path / "two" / "config.json").exists()
  assert not list((tmp_path / "two").glob("*.tmp"))
  assert _checkpoints(tmp_path / "two") == [3, 6]

  # The 2-process checkpoint of step 3 resumes on 1 process x 8 devices: steps 4..6 as before.
  resumed = tmp_path / "resumed"
  shutil.copytree(tmp_path / "two", resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  rows = _train(env, resumed, 1, 8)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  _assert_close(_losses(rows), _losses(one), range(4, 7))
  _assert_close(_losses(rows, "val_loss"), _losses(one, "val_loss"), [6])


@pytest.mark.slow
def test_sigterm_to_one_process_saves_all_at_the_same_step(env, tmp_path):
  """A preemption notice reaching one host: every process saves the same step and exits 0."""
  workdir = tmp_path / "w"
  procs = _start(env, workdir, 2, 4, "--config.train.steps=5000", "--config.eval.every=0",
                 "--config.checkpoint.every=5000")
  deadline = time.monotonic() + TIMEOUT
  while _rows_written(workdir) < 2 and time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  _finish(procs)
  (step,) = _checkpoints(workdir)
  assert 2 <= step < 5000 and read_metrics(workdir)[-1]["step"] == step


def test_tensor_axis_across_processes_is_refused(env, tmp_path):
  """The data source gives each process its own rows; a mesh that replicates the batch over
  both processes (tensor=8) would need all rows on each, so the run stops with one sentence."""
  procs = _start(env, tmp_path / "w", 2, 4, "--config.mesh.data=1", "--config.mesh.fsdp=1",
                 "--config.mesh.tensor=-1", "--config.model.num_heads=8")
  try:
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2, err[-2000:]
    assert "puts 8 rows of each batch on process" in err and "not mesh.tensor" in err, err


# ------------------------------------------------------------------------- flags and detection


def test_no_arguments_on_a_plain_machine_starts_nothing():
  assert not distributed.check_args(None, None, None)
  assert distributed.tpu_hosts({}) == 1
  assert distributed.tpu_hosts({"TPU_WORKER_HOSTNAMES": "localhost"}) == 1
  assert not distributed.initialize(environ={"TPU_WORKER_HOSTNAMES": "localhost"})


def test_tpu_hosts_from_the_environment():
  assert distributed.tpu_hosts({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}) == 4
  assert distributed.tpu_hosts({"TPU_WORKER_HOSTNAMES": "t1,t2",
                                "MEGASCALE_NUM_SLICES": "2"}) == 4
  assert distributed.tpu_hosts({"MEGASCALE_NUM_SLICES": "2"}) == 2


@pytest.mark.parametrize("args, message", [
    (("localhost:1234", 2, None), "go together"),
    (("localhost", 2, 0), "must be host:port"),
    (("localhost:1234", 0, 0), "--num_processes must be positive"),
    (("localhost:1234", 2, 2), r"--process_id must be in \[0, 2\), got 2"),
])
def test_bad_distributed_arguments_are_named(args, message):
  with pytest.raises(UserError, match=message):
    distributed.check_args(*args)


def test_bad_distributed_flag_is_one_error_line(tmp_path, capsys):
  assert exit_status(train_cli.main, ["--workdir", str(tmp_path), *ARGS,
                                      "--coordinator_address=localhost:1", "--num_processes=2",
                                      "--process_id=5"]) == 2
  assert capsys.readouterr().err.strip() == "error: --process_id must be in [0, 2), got 5."


@pytest.mark.slow
def test_two_processes_on_a_gs_workdir_train_like_one_on_disk(env, gcs, one_process_rows):
  """2 processes x 4 devices sharing a gs:// workdir (what a multi-host pod does) log the losses
  of 1 process x 8 devices on a local disk; every process writes its checkpoint shards there."""
  from etils import epath
  from training import storage
  env = dict(env, **gcs.env)
  one = one_process_rows
  remote = gcs.path("runs", "two-processes")
  two = _train(env, remote, 2, 4)
  assert [r["step"] for r in two] == [1, 2, 3, 4, 5, 6]
  _assert_close(_losses(two), _losses(one), range(1, 7))
  _assert_close(_losses(two, "val_loss"), _losses(one, "val_loss"), [6])
  storage.forget_listings()
  steps = sorted(int(p.name) for p in epath.Path(remote, "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [3, 6]
  assert storage.read(f"{remote}/run.lock") is None  # process 0 released it
