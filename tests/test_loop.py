"""training/loop.py in-process: a NaN loss stops the run and keeps the last good checkpoint.
(The loop end to end, with resume after SIGKILL / SIGTERM, is in test_train_cli.py.)"""

import math

import pytest

from conftest import tiny_run_config
from training.checkpoint import Checkpointer
from training.loop import TrainingDiverged, train
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
