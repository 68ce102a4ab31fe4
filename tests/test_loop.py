"""training/loop.py in-process: a NaN loss stops the run and keeps the last good checkpoint; a
full disk stops it at once with one sentence. (The loop end to end, with resume after SIGKILL /
SIGTERM / SIGINT, is in test_train_cli.py; damaged checkpoints in test_checkpoint.py.)"""

import math
import re

import pytest

from conftest import mounted_tmpfs, tiny_run_config
from training.checkpoint import Checkpointer
from training.loop import CheckpointWriteFailed, TrainingDiverged, train
from training.metrics import read_metrics


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shakespeare_path):
  c = tiny_run_config(shakespeare_path, train__steps=20, optimizer__lr=1e30,
                      optimizer__min_lr=1e29, optimizer__warmup_steps=0, optimizer__clip=0.0,
                      checkpoint__every=1, eval__every=0, eval__batches=0)
  with pytest.raises(TrainingDiverged, match=r"became (nan|inf).* at step \d+"):
    train(c, str(tmp_path), quiet=True)
  ckpt = Checkpointer(tmp_path, read_only=True)
  last = ckpt.latest_step()
  assert last is not None and last < 20
  state_meta = ckpt.read_meta(last)
  assert state_meta["step"] == last
  rows = read_metrics(tmp_path)
  assert all(math.isfinite(r["loss"]) for r in rows)


@pytest.fixture
def small_disk(tmp_path):
  """A 1.5 MB tmpfs: room for one checkpoint of the one-layer tiny model (0.7 MB), not two.
  Skipped where mounting is not allowed."""
  yield from mounted_tmpfs(tmp_path / "disk", "size=1500k", "a small tmpfs")


def test_full_disk_stops_the_run_with_one_sentence(small_disk, shakespeare_path):
  c = tiny_run_config(shakespeare_path, train__steps=60, checkpoint__every=20,
                      checkpoint__keep=3, log__every=1, eval__every=0, eval__batches=0)
  workdir = small_disk / "run"
  with pytest.raises(CheckpointWriteFailed) as info:
    train(c, str(workdir), quiet=True)
  message = str(info.value)
  assert "\n" not in message and message.startswith(
      f"Saving the checkpoint of step 40 in {workdir}/checkpoints failed (no space left on the "
      f"device; it needs up to "), message
  # Stopped soon after the failed save, not at the next save or the end, and cleaned up.
  stopped = int(re.search(r"the run stopped at step (\d+)", message).group(1))
  assert 40 < stopped < 60, message
  assert message.endswith("and 40.orbax-checkpoint-tmp was removed, and the last good "
                          "checkpoint (step 20) is kept."), message
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20"]
  assert max(r["step"] for r in read_metrics(workdir)) < 60
  assert Checkpointer(workdir, read_only=True).restore_newest(lambda s: s) == (20, 20)
