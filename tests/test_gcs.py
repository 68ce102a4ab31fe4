"""gs:// end to end against a local GCS server (tests/gcs_emulator.py, fixture `gcs`): a run on
a gs:// workdir killed with SIGKILL and rerun logs the local run's losses bit for bit; bin data
on gs:// trains like the same files on disk; the workdir lock holds on gs://; sampling,
evaluation, export and plots read gs:// runs; unusable gs:// paths are one sentence."""

import json
import signal
import subprocess
import sys
import time

import pytest
from etils import epath

from conftest import (ONE_DEVICE_XLA_FLAGS, REPO, exit_status, signal_after_first_checkpoint,
                      subprocess_env, tiny_run_config)
from launch import eval as eval_cli
from launch import export as export_cli
from launch import plot as plot_cli
from launch import prepare as prepare_cli
from launch import sample as sample_cli
from launch import train as train_cli
from training import storage
from training.loop import train
from training.metrics import read_metrics

# One pytest-xdist worker for the file: its tests read the bucket of that worker's emulator.
pytestmark = pytest.mark.xdist_group("gcs")
RUN_ARGS = ("--config", "configs/tiny.py", "--config.train.steps=200", "--config.log.every=1",
            "--config.eval.every=50", "--config.checkpoint.every=10",
            "--config.checkpoint.keep=2", "--config.model.num_layers=1", "--quiet")


def _env(gcs, **changes):
  """A launch.train process on one device (LLVM's optimisation on: runs of many steps), the
  packaged text, the emulator."""
  e = subprocess_env(XLA_FLAGS=ONE_DEVICE_XLA_FLAGS, **gcs.env)
  e.pop("FLAXGPT_DATA_DIR", None)
  e.update(changes)
  return e


def _train_cmd(workdir):
  return [sys.executable, "-m", "launch.train", "--workdir", str(workdir), *RUN_ARGS]


def _gs_checkpoints(path):
  storage.forget_listings()  # another process writes them
  folder = epath.Path(path) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if (
      folder.is_dir()) else []


def _losses(workdir):
  rows = read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), "each step must be logged once"
  return {r["step"]: (r["loss"], r.get("val_loss")) for r in rows}


@pytest.fixture(scope="module")
def gs_run(gcs, tmp_path_factory):
  """(gs:// workdir, local workdir) of the same run: the gs:// one killed with SIGKILL after its
  first checkpoint and rerun to the end."""
  env = _env(gcs)
  local = tmp_path_factory.mktemp("local") / "run"
  out = subprocess.run(_train_cmd(local), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  remote = gcs.path("runs", "resumed")
  rc, _, _ = signal_after_first_checkpoint(_train_cmd(remote), env,
                                           lambda: _gs_checkpoints(remote), signal.SIGKILL)
  assert rc == -signal.SIGKILL, "the run ended before it could be killed"
  saved = _gs_checkpoints(remote)
  assert saved and saved[-1] < 200
  rerun = subprocess.run([*_train_cmd(remote), "--force"], cwd=REPO, env=env,  # the lock a
                         capture_output=True, text=True, timeout=300)  # SIGKILL left behind
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  storage.forget_listings()  # this process listed the folders before the rerun wrote them
  return remote, local, saved[-1]


@pytest.mark.slow
def test_killed_and_rerun_on_gs_logs_the_local_losses_bit_for_bit(gs_run):
  remote, local, resumed_at = gs_run
  want, got = _losses(local), _losses(remote)
  assert sorted(got) == sorted(want) == list(range(1, 201))
  assert not [s for s in got if got[s] != want[s]], "losses differ from the local run"
  storage.forget_listings()
  names = sorted(p.name for p in epath.Path(remote).iterdir())
  assert {"checkpoints", "config.json", "metrics"} <= set(names)
  assert any(n.startswith("events.out.tfevents") for n in names)  # TensorBoard on gs://
  assert "run.lock" not in names  # released at the end
  assert _gs_checkpoints(remote) == [190, 200] and resumed_at >= 10


@pytest.mark.slow
def test_sample_eval_export_and_plot_read_gs_runs(gs_run, tmp_path, capsys):
  remote, local, _ = gs_run
  args = ["--prompt", "ROMEO:", "--max_new_tokens", "12", "--temperature", "0", "--json"]
  assert exit_status(sample_cli.main, ["--workdir", remote, *args]) == 0
  from_gs = json.loads(capsys.readouterr().out)["token_ids"]
  assert exit_status(sample_cli.main, ["--workdir", str(local), *args]) == 0
  assert json.loads(capsys.readouterr().out)["token_ids"] == from_gs
  text = tmp_path / "t.txt"
  text.write_text((REPO / "training/data/assets/tinyshakespeare.txt").read_text()[:3000])
  results = []
  for workdir in (remote, str(local)):
    assert exit_status(eval_cli.main, ["--workdir", workdir, "--data", f"text:{text}",
                                       "--json", "--quiet"]) == 0
    results.append(json.loads(capsys.readouterr().out)["loss"])
  assert results[0] == results[1]
  assert exit_status(export_cli.main, ["--workdir", remote, "--out", str(tmp_path / "hf")]) == 0
  assert (tmp_path / "hf" / "model.safetensors").exists()
  assert exit_status(plot_cli.main, [remote, "--out", str(tmp_path / "loss.png")]) == 0
  assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_bin_data_on_gs_trains_like_the_same_files_on_disk(gcs, tmp_path, capsys, small_text):
  local = tmp_path / "data"
  remote = gcs.path("data", "small")
  for out_dir in (str(local), remote):
    assert exit_status(prepare_cli.main, ["--input", str(small_text), "--tokenizer", "char",
                                          "--out_dir", out_dir, "--quiet"]) == 0
  names = sorted(p.name for p in epath.Path(remote).iterdir())
  assert names == ["meta.json", "train.bin", "val.bin"]
  assert epath.Path(remote, "train.bin").read_bytes() == (local / "train.bin").read_bytes()
  # A non-empty gs:// --out_dir is refused like a local one.
  assert exit_status(prepare_cli.main, ["--input", str(small_text), "--out_dir", remote]) == 2
  assert "is not empty" in capsys.readouterr().err
  losses = {}
  for name, path, copy in (("disk", str(local), ""), ("gs", remote, ""),
                           ("gs-copied", remote, str(tmp_path / "copy"))):
    c = tiny_run_config(small_text, train__steps=4, log__every=1, eval__every=4,
                        eval__batches=1, checkpoint__every=100, model__block_size=16)
    c.data.source, c.data.path, c.data.local_copy = "bin", path, copy
    train(c, str(tmp_path / name), quiet=False)
    losses[name] = [(r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / name)]
  out = capsys.readouterr().out
  assert "ranged reads:" in out and "ms per batch of 8 x 17 tokens" in out
  assert losses["gs"] == losses["disk"] == losses["gs-copied"]
  assert (tmp_path / "copy" / gcs.bucket / "data" / "small" / "train.bin").exists()


def test_the_workdir_lock_holds_on_gs(gcs, tmp_path, capsys, shakespeare_path):
  workdir = gcs.path("runs", "locked")
  holder = json.dumps({"host": "tpu-vm-7", "pid": 4242, "started": "2026-12-02T10:00:00"})
  assert storage.create_exclusive(f"{workdir}/run.lock", holder.encode()) is not None
  # Of two creators exactly one wins (GCS's generation-0 precondition).
  assert storage.create_exclusive(f"{workdir}/run.lock", b"another") is None
  args = ["--config", "configs/tiny.py", "--workdir", workdir, "--quiet",
          f"--config.data.path={shakespeare_path}", "--config.train.steps=2",
          "--config.model.num_layers=1"]
  assert exit_status(train_cli.main, args) == 2
  err = capsys.readouterr().err
  assert "is locked by the run of" in err and "tpu-vm-7" in err and "--force" in err
  assert storage.read(f"{workdir}/run.lock") == holder.encode()  # untouched
  assert exit_status(train_cli.main, [*args, "--force"]) == 0
  assert storage.read(f"{workdir}/run.lock") is None  # taken over, then released


@pytest.mark.parametrize("case", ["no-bucket", "unreachable"])
def test_unusable_gs_paths_are_one_sentence_before_compiling(case, gcs, tmp_path_factory):
  env = _env(gcs)
  workdir = gcs.path("runs", "x")
  if case == "no-bucket":
    workdir, expected = "gs://no-such-bucket/run", "the bucket 'no-such-bucket' does not exist"
  else:
    env["TENSORSTORE_GCS_HTTP_URL"] = "http://localhost:9"  # nothing listens there
    expected = "the storage endpoint http://localhost:9 cannot be reached"
  start = time.time()
  out = subprocess.run(_train_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0] and workdir in errors[0], out.stderr
  assert "Traceback" not in out.stderr and "compiled" not in out.stdout
  assert time.time() - start < 60
