"""training/lock.py: one run per workdir. (Two live runs on one workdir: test_train_cli.py.)"""

import json
import os
import socket
import subprocess
import sys

import pytest

from model.errors import UserError
from training.checkpoint import resolve_workdir
from training.lock import LOCK_NAME, workdir_lock


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_names_the_holder_and_is_removed_at_the_end(tmp_path):
  workdir = resolve_workdir(tmp_path / "run")
  with workdir_lock(workdir):
    holder = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(UserError, match=rf"is in use by the run of pid {os.getpid()} on host "):
      with workdir_lock(workdir):  # a second holder (another open file) is refused
        pass
  assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
  pid = _dead_pid()
  (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
  with workdir_lock(resolve_workdir(tmp_path)):
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "taking over the lock" in err[0] and f"pid {pid} " in err[0], err


def test_lock_of_another_host_needs_force(tmp_path, capsys):
  (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 123}))
  with pytest.raises(UserError, match=r"locked by the run of pid 123 on host elsewhere .*"
                                      r"rerun with --force"):
    with workdir_lock(resolve_workdir(tmp_path)):
      pass
  with workdir_lock(resolve_workdir(tmp_path), force=True):
    pass
  assert "--force: taking over the lock" in capsys.readouterr().err
