"""python -m launch.train end to end, in subprocesses: outputs, exact resume after SIGKILL,
SIGTERM and Ctrl-C (SIGINT), one run per workdir, and one-sentence errors for bad inputs and
workdirs that cannot be written."""

import fcntl
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from conftest import (ONE_DEVICE_XLA_FLAGS, built_once, exit_status, mounted_tmpfs,
                      signal_after_first_checkpoint, subprocess_env)
from launch import train as train_cli
from model.tokenizer import tokenizer_from_dict
from model.gpt import GPT
from training.checkpoint import load_for_inference
from training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"}
# A long enough tiny run that it is still going when its first checkpoint appears.
RESUME_ARGS = ("--config.train.steps=300", "--config.log.every=1", "--config.eval.every=50",
               "--config.checkpoint.every=20", "--config.checkpoint.keep=3",
               "--config.model.num_layers=1")


@pytest.fixture(scope="module")
def env():
  """One JAX device; no FLAXGPT_DATA_DIR: the text source's default is the packaged tiny
  shakespeare."""
  e = subprocess_env(XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  e.pop("FLAXGPT_DATA_DIR", None)
  return e


def _args(workdir, *overrides, config="configs/tiny.py"):
  return ["--config", config, "--workdir", str(workdir), *overrides]


def _cmd(workdir, *overrides, config="configs/tiny.py"):
  return [sys.executable, "-m", "launch.train", *_args(workdir, *overrides, config=config)]


def _run(cmd, env, timeout=240):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _start(cmd, env):
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _checkpoints(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def e2e_workdir(tiny_run):
  """conftest's tiny run: launch.train for 20 steps, in process."""
  return tiny_run


def test_end_to_end_outputs(e2e_workdir):
  workdir, stdout = e2e_workdir
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  for row in rows:
    assert METRIC_KEYS <= set(row) and row["mfu"] is None  # a CPU has no peak in the table
    assert row["tokens_per_sec"] > 0 and row["loss"] > 0
  assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["vocab_size"] == 65 and config["model"]["d_mlp"] == 256
  assert config["optimizer"]["decay_steps"] == 20
  assert _checkpoints(workdir) == [10, 20]
  assert "ETA" in stdout and "done: step 20" in stdout


def test_load_for_inference(e2e_workdir):
  workdir, _ = e2e_workdir
  cfg, params, tokenizer, step = load_for_inference(workdir)
  assert step == 20 and cfg.vocab_size == 65 and cfg.num_layers == 2
  tok = tokenizer_from_dict(tokenizer)
  ids = jnp.asarray([tok.encode("ROMEO:")])
  logits = GPT(cfg).apply({"params": params}, ids)
  assert logits.shape == (1, 6, 65) and bool(jnp.isfinite(logits).all())
  assert load_for_inference(workdir, step=10)[3] == 10
  assert {d for x in jax.tree_util.tree_leaves(params) for d in x.devices()} == {
      jax.devices()[0]}


@pytest.fixture(scope="module")
def reference_losses(env):
  """The losses of the uninterrupted run (a real process, made once per test run)."""
  def build(workdir):
    out = _run(_cmd(workdir, *RESUME_ARGS, "--quiet"), env)
    assert out.returncode == 0, out.stderr
  return _losses(built_once("train_cli_reference", build))


def _losses(workdir):
  rows = read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), "each step must be logged once"
  return {r["step"]: (r["loss"], r.get("val_loss")) for r in rows}


def _interrupt_after_first_checkpoint(workdir, env, sig):
  return signal_after_first_checkpoint(_cmd(workdir, *RESUME_ARGS), env,
                                       lambda: _checkpoints(workdir), sig)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_exact_resume_after_interruption(sig, env, tmp_path, reference_losses):
  rc, stdout, stderr = _interrupt_after_first_checkpoint(tmp_path, env, sig)
  if sig == signal.SIGKILL:
    assert rc == -signal.SIGKILL, f"the run ended (rc {rc}) before it could be killed"
  else:
    assert rc == 0, stderr  # preemption or Ctrl-C: save and exit cleanly
    assert f"stopped by {signal.Signals(sig).name}" in stdout
    assert _checkpoints(tmp_path)[-1] == max(_losses(tmp_path))  # saved where it stopped
  saved = _checkpoints(tmp_path)
  assert saved and saved[-1] < 300
  out = _run(_cmd(tmp_path, *RESUME_ARGS), env)
  assert out.returncode == 0, out.stderr
  assert f"resumed from the checkpoint of step {saved[-1]}" in out.stdout
  losses = _losses(tmp_path)
  assert sorted(losses) == sorted(reference_losses) == list(range(1, 301))
  mismatched = [s for s in losses if losses[s] != reference_losses[s]]
  assert not mismatched, f"losses differ from the uninterrupted run at steps {mismatched[:5]}"


def _assert_one_line_error(out, pattern):
  assert out.returncode == 2, (out.returncode, out.stderr)
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert "Traceback" not in out.stderr
  assert pattern in lines[0], lines[0]


def _train_main(capsys, args) -> subprocess.CompletedProcess:
  """launch.train.main(args) in process, as a CompletedProcess (returncode, stdout, stderr)."""
  status = exit_status(train_cli.main, [str(a) for a in args])
  out = capsys.readouterr()
  return subprocess.CompletedProcess(args, status, out.out, out.err)


@pytest.mark.parametrize("overrides, pattern", [
    (["--config.data.path=/no/such/input.txt"], "does not exist"),
    (["--config.train.batchsize=4"], "did you mean 'train.batch_size'"),
    (["--config.train.steps=2.5"], "--config.train.steps must be an integer"),
    (["--config.train.batch_size=12"], "data-parallel size mesh.data x mesh.fsdp = 8"),
    (["--config.mesh.cpu_devices=-2"], "config.mesh.cpu_devices must be -1"),
], ids=["missing-data", "unknown-key", "float-for-int", "batch-vs-mesh", "cpu-devices"])
def test_bad_input_is_one_sentence(overrides, pattern, tmp_path, capsys):
  """In process (8 devices: a batch of 12 does not split over them)."""
  workdir = tmp_path / "run"
  out = _train_main(capsys, _args(workdir, *overrides))
  _assert_one_line_error(out, pattern)
  assert not workdir.exists()  # nothing written


def test_bad_input_in_a_real_process_is_one_line(env, tmp_path):
  """What a shell sees: nothing but the one line on stderr (no library noise), exit status 2."""
  workdir = tmp_path / "run"
  out = _run(_cmd(workdir, "--config.data.path=/no/such/input.txt"), env)
  _assert_one_line_error(out, "does not exist")
  assert out.stdout == "" and not workdir.exists()


@pytest.mark.slow
def test_cpu_devices_split_the_batch_over_cores(env, tmp_path):
  """mesh.cpu_devices makes JAX's CPU backend that many devices and the mesh data-parallel
  (a real process: the devices are chosen before JAX starts)."""
  out = _run(_cmd(tmp_path / "run", "--config.mesh.cpu_devices=2", "--config.train.steps=4",
                  "--config.eval.every=2", "--config.model.num_layers=1"), env)
  assert out.returncode == 0, out.stderr
  assert "mesh: data=2 x fsdp=1 x tensor=1 over 2 cpu device(s)" in out.stdout, out.stdout


def test_different_model_in_workdir_is_refused(e2e_workdir, capsys):
  workdir, _ = e2e_workdir
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  out = _train_main(capsys, _args(workdir, "--config.train.steps=40",
                                  "--config.model.num_layers=3"))
  _assert_one_line_error(out, "holds a run of a different model (model.num_layers is 2 "
                              "there, 3 here)")
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert after == before


def test_help(capsys):
  out = _train_main(capsys, ["--help"])
  assert out.returncode == 0 and "--workdir" in out.stdout and "--config" in out.stdout


@pytest.mark.parametrize("body, pattern", [
    ('def get_config():\n  raise RuntimeError("boom")\n',
     "Could not load --config {path} (line 2): RuntimeError: boom."),
    ("x = (\n", "Could not load --config {path} (line 1): SyntaxError: '(' was never closed"),
    ("def get_config():\n  return 3\n", "--config {path}: get_config() returned int, not an "
                                        "ml_collections.ConfigDict"),
], ids=["raises", "syntax-error", "not-a-config"])
def test_a_broken_config_file_is_one_sentence(body, pattern, tmp_path, capsys):
  path = tmp_path / "broken.py"
  path.write_text(body)
  assert exit_status(train_cli.main, ["--config", str(path), "--workdir",
                                      str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: " + pattern.format(path=path)) and err.count("\n") == 1, err
  assert not (tmp_path / "run").exists()


def test_resume_on_another_character_table_is_refused(small_text, tmp_path, capsys):
  """Same-size character tables with different characters would silently remap the ids."""
  other = tmp_path / "other.txt"
  other.write_text(small_text.read_text().replace("F", "Q"))  # 'Q' is not in small_text
  workdir = tmp_path / "run"
  args = ["--config", "configs/tiny.py", "--workdir", str(workdir), "--quiet",
          "--config.model.num_layers=1", "--config.eval.every=0",
          f"--config.data.cache_dir={tmp_path / 'cache'}"]
  assert exit_status(train_cli.main, [*args, "--config.train.steps=1",
                                      f"--config.data.path={small_text}"]) == 0
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert exit_status(train_cli.main, [*args, "--config.train.steps=2",
                                      f"--config.data.path={other}"]) == 2
  # (stderr also has the text cache's progress line for other.txt: data preparation does not
  # follow --quiet)
  errors = [line for line in capsys.readouterr().err.splitlines() if "tokenizing" not in line]
  assert len(errors) == 1 and errors[0].startswith("error: The checkpoint of step 1 in "), errors
  assert errors[0].endswith(
      "was trained on another character table than the data here has (only there: 'F'; only "
      "here: 'Q'; id 8: 'F' there, 'Q' here); resume on the same text or use another "
      "--workdir."), errors
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def _blocked_writing(pid: int) -> bool:
  """Whether the process's main thread waits in a write to a full pipe (Linux)."""
  return "pipe_write" in pathlib.Path(f"/proc/{pid}/wchan").read_text()


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(env, tmp_path):
  """The second Ctrl-C comes while the first one's stop is still under way. To be sure it is
  (a tiny run finishes its step and save in a fraction of a second), the run's stdout is a
  one-page pipe that is not read until the end, like a terminal paused with Ctrl-S: the run
  blocks at its next printed line, and a stop prints at least one more."""
  proc = _start(_cmd(tmp_path, *RESUME_ARGS, "--config.eval.every=1",
                     "--config.eval.batches=1"), env)
  fcntl.fcntl(proc.stdout, fcntl.F_SETPIPE_SZ, 4096)  # before the run has printed anything
  deadline = time.time() + 180
  while not _blocked_writing(proc.pid) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, proc.communicate()
  assert _blocked_writing(proc.pid), "the run never filled its stdout pipe"
  proc.send_signal(signal.SIGINT)
  lines = []  # other lines may come first
  while not any("Ctrl-C again" in line for line in lines) and len(lines) < 20:
    lines.append(proc.stderr.readline())
  assert "Ctrl-C again to exit at once" in "".join(lines), lines
  assert proc.poll() is None  # still stopping: blocked on its output
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == 130, stderr
  assert "interrupted; exited at once without saving (checkpoints saved before are kept)" in (
      stderr) and "Traceback" not in stderr


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_while_the_first_finishes(env, tmp_path,
                                                                     reference_losses):
  first = _start(_cmd(tmp_path, *RESUME_ARGS, "--quiet"), env)
  deadline = time.time() + 180
  while not (tmp_path / "run.lock").exists() and first.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  second = _run(_cmd(tmp_path, *RESUME_ARGS), env)
  _, stderr = first.communicate(timeout=240)
  assert first.returncode == 0, stderr
  _assert_one_line_error(second, f"--workdir '{tmp_path}' is in use by the run of pid "
                                 f"{first.pid} on host ")
  losses = _losses(tmp_path)  # the first run, unharmed
  assert losses == reference_losses and _checkpoints(tmp_path)[-1] == 300
  assert not (tmp_path / "run.lock").exists()


@pytest.fixture
def read_only_dir(tmp_path):
  """An empty read-only tmpfs mount (chmod does not stop root); skipped where mounting is not
  allowed."""
  yield from mounted_tmpfs(tmp_path / "ro", "size=64k,ro", "a read-only tmpfs")


@pytest.mark.parametrize("case, pattern", [
    ("parent-is-a-file", "cannot be created: '{base}/file' is a file, not a directory."),
    ("checkpoints-is-a-file", "cannot hold checkpoints: '{base}/run/checkpoints' is a file"),
    ("read-only-checkpoints", "is not writable: cannot write in '{base}/run/checkpoints' "
                              "(Read-only file system)."),
], ids=["parent-is-a-file", "checkpoints-is-a-file", "read-only-checkpoints"])
def test_unwritable_workdir_is_one_sentence(case, pattern, tmp_path, capsys, request):
  workdir = tmp_path / "run"
  if case == "parent-is-a-file":
    (tmp_path / "file").write_text("")
    workdir = tmp_path / "file" / "run"
  elif case == "checkpoints-is-a-file":
    workdir.mkdir()
    (workdir / "checkpoints").write_text("")
  else:
    ro = request.getfixturevalue("read_only_dir")
    workdir.mkdir()
    (workdir / "checkpoints").symlink_to(ro)
  argv = ["--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(workdir)]
  t = time.perf_counter()
  assert exit_status(train_cli.main, argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: --workdir "), err
  assert pattern.format(base=tmp_path) in err, err
  assert time.perf_counter() - t < 30  # before anything is compiled
