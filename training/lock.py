"""One run per workdir: a lock held by process 0 for the life of a training run.

A local workdir gets <workdir>/run.lock, JSON naming the holder ({"host", "pid", "started"}),
with an exclusive flock(2) on it while the run lives; the kernel drops the flock when the
process dies, however it dies. A second run finds the flock taken and is refused (UserError
naming the holder). A lock file whose flock is free was left by a dead run: when it names this
host and its pid is not running (or is another process now), it is taken over with a warning;
when it names another host (a workdir on a shared file system, where flock may not reach across
hosts), the run is refused unless `force`.

A remote workdir (gs://...) has no flock: process 0 creates the lock object run.lock with a
generation-0 precondition (GCS creates it only if it does not exist, so of two racing runs
exactly one wins) and deletes that generation at the end; a run finding one refuses to start
unless `force` (a run killed with SIGKILL leaves it behind; rerun with --force once sure that
no run uses the workdir).

    with workdir_lock(run.workdir, force=False):   # every process calls it; process 0 locks
      ...
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Iterator

import jax
import numpy as np
from etils import epath

from model.errors import UserError
from training import storage
from training.checkpoint import warn
from training.workdir import LOCK_NAME


def _pid_start(pid: int) -> str | None:
  """The start time of process `pid` (field 22 of /proc/<pid>/stat), None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder: dict) -> bool:
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  start = holder.get("pid_start")
  return start is None or _pid_start(pid) in (None, start)  # else: the pid was reused


def _me() -> dict:
  pid = os.getpid()
  return {"host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started "
          f"{holder.get('started', '?')})")


def _parse(text: str) -> dict:
  try:
    holder = json.loads(text)
    return holder if isinstance(holder, dict) else {}
  except ValueError:
    return {}


class _LocalLock:
  def __init__(self, workdir: epath.Path, force: bool):
    self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
    self.fd = None
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
          raise UserError(f"Could not lock {self.path} ({e.strerror}).") from None
        if not force:
          raise UserError(
              f"--workdir {os.fspath(workdir)!r} is in use by the run of {_describe(holder)}; "
              f"wait for it to end, stop it, or use another --workdir.")
        warn(f"--force: running on {os.fspath(workdir)} although the run of "
             f"{_describe(holder)} holds its lock.")
        return
      # The file may have been removed (and a new one made) by the holder that just ended.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    self.fd = fd
    holder = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    me = _me()
    if holder:
      if holder.get("host") == me["host"] and not _alive(holder):
        warn(f"taking over the lock {self.path} left by the run of {_describe(holder)}, which "
             f"is no longer running.")
      elif not force:
        os.close(fd)
        self.fd = None
        where = ("is still running but does not hold its flock"
                 if holder.get("host") == me["host"] else "may still be running there")
        raise UserError(
            f"--workdir {os.fspath(workdir)!r} is locked by the run of {_describe(holder)}, "
            f"which {where}; rerun with --force if no run uses it.")
      else:
        warn(f"--force: taking over the lock {self.path} of the run of {_describe(holder)}.")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)

  def release(self) -> None:
    if self.fd is None:
      return
    with contextlib.suppress(OSError):
      os.unlink(self.path)  # still holding the flock: nobody else wrote it meanwhile
    os.close(self.fd)
    self.fd = None


class _RemoteLock:
  """gs://: the lock object is created with a generation-0 precondition, so of two runs racing
  for it exactly one creates it; released by deleting that generation only."""

  def __init__(self, workdir: epath.Path, force: bool):
    self.path = os.fspath(workdir / LOCK_NAME)
    self.me = json.dumps(_me()).encode()
    self.generation = storage.create_exclusive(self.path, self.me)
    if self.generation is None:
      holder = _parse((storage.read(self.path) or b"").decode("utf-8", "replace"))
      if not force:
        raise UserError(
            f"--workdir {os.fspath(workdir)!r} is locked by the run of {_describe(holder)} "
            f"({self.path}); if no run uses it (a killed run leaves it), rerun with --force.")
      warn(f"--force: replacing the lock {self.path} of the run of {_describe(holder)}.")
      self.generation = storage.write(self.path, self.me)

  def release(self) -> None:
    if self.generation is not None:
      with contextlib.suppress(Exception):
        storage.delete_if(self.path, self.generation)
      self.generation = None


@contextlib.contextmanager
def workdir_lock(workdir: epath.Path, force: bool = False) -> Iterator[None]:
  """Hold the workdir's lock (process 0) for the body; UserError when another run holds it.
  Every process must call it: on several, the others learn process 0's answer."""
  lock, error = None, None
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    try:
      lock = (_RemoteLock if "://" in os.fspath(workdir) else _LocalLock)(workdir, force)
    except UserError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = UserError(f"--workdir {os.fspath(workdir)!r} is in use by another run "
                        f"(process 0 could not take its lock).")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
