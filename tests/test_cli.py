"""launch/cli.py: every entry point fails the same way, in one `error:` sentence with status 2:
a config file that raises anything (or exits), a missing config, an unknown key, a bad value
(a key given twice names the value that failed), non-finite numbers, bad flags, an XLA_FLAGS
value XLA refuses (asked of XLA before anything runs, once per value); overrides given to
main(argv) in-process reach the config (ml_collections reads them from sys.argv); a Ctrl-C
that lands in a garbage-collection callback still ends the program (a real process: the
signal is the point). Nothing here compiles a step."""

import subprocess
import sys

import pytest

from conftest import REPO, exit_status, subprocess_env
from launch import aot as aot_cli
from launch import benchmark as benchmark_cli
from launch import cli
from launch import prepare as prepare_cli
from launch import sample as sample_cli
from launch import tpu as tpu_cli
from launch import train as train_cli

TINY = "configs/tiny.py"


def _one_error(capsys, main, argv) -> str:
  assert exit_status(main, argv) == 2
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
  return lines[0][len("error: "):]


def _tpu_train(argv):
  """launch.tpu train hands --config and its overrides to launch.train on the workers; it
  reads them here first, the same way."""
  argv = list(argv)
  if "--config" in argv:  # launch.tpu's --config is a plain string flag: --config=PATH
    i = argv.index("--config")
    argv[i:i + 2] = [f"--config={argv[i + 1]}"]
  return tpu_cli.main(["train", "--name=n", "--zone=z", "--workdir=gs://b/r", "--dry_run",
                       *argv])


def _entry_points(tmp_path):
  """(main, the arguments it needs besides --config)."""
  return {"train": (train_cli.main, ["--workdir", str(tmp_path / "run")]),
          "benchmark": (benchmark_cli.main, []), "aot": (aot_cli.main, []),
          "tpu-train": (_tpu_train, [])}


CONFIG_FLAG_CASES = [
    (["--config", "/no/such/config.py"], "Config file '/no/such/config.py' does not exist."),
    (["--config", TINY, "--config.train.batchsize=4"],
     "Unknown config key 'train.batchsize' in --config.train.batchsize (did you mean "
     "'train.batch_size'?)."),
    (["--config", TINY, "--config.train.steps=abc"],
     "--config.train.steps must be an integer (it is 50 in configs/tiny.py); got 'abc'."),
    # a key given twice: the value that failed is named, wherever it is
    (["--config", TINY, "--config.train.steps=10", "--config.train.steps=abc"],
     "--config.train.steps must be an integer (it is 50 in configs/tiny.py); got 'abc'."),
    (["--config", TINY, "--config.train.steps=abc", "--config.train.steps=10"],
     "--config.train.steps must be an integer (it is 50 in configs/tiny.py); got 'abc'."),
    (["--config", TINY, "--config.train.steps", "10", "--config.train.steps", "abc"],
     "--config.train.steps must be an integer (it is 50 in configs/tiny.py); got 'abc'."),
    ([], "Flag --config is required."),
]
CONFIG_FLAG_IDS = ["missing-config", "unknown-key", "bad-value", "twice-last-bad",
                   "twice-first-bad", "twice-without-equals", "no-config"]


def _config_flag_params():
  """Every entry point with every case, except the space form (--config.k v) for launch.tpu,
  which takes overrides as --config.<key>=value only (it passes them on to the workers)."""
  for entry in ["train", "benchmark", "aot", "tpu-train"]:
    for (argv, message), name in zip(CONFIG_FLAG_CASES, CONFIG_FLAG_IDS):
      if entry == "tpu-train" and "--config.train.steps" in argv:
        continue
      yield pytest.param(entry, argv, message, id=f"{name}-{entry}")


@pytest.mark.parametrize("entry, argv, message", list(_config_flag_params()))
def test_config_flag_errors_are_the_same_everywhere(entry, argv, message, tmp_path, capsys):
  main, extra = _entry_points(tmp_path)[entry]
  if entry == "tpu-train" and not argv:
    message = "--config is required, e.g. --config=configs/gpt2.py."
  assert _one_error(capsys, main, argv + extra) == message
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("body, message", [
    ('def get_config():\n  raise RuntimeError("boom")\n', "(line 2): RuntimeError: boom."),
    ('def get_config():\n  return {}["model"]\n', "(line 2): KeyError: 'model'."),
    ("import sys\nsys.exit(3)\n", "(line 2): it called sys.exit(3)."),
    ("x = (\n", "(line 1): SyntaxError: '(' was never closed."),
    ("import no_such_module_here\n", "(line 1): ModuleNotFoundError: No module named "
                                     "'no_such_module_here'."),
    ("x = 1\n", ": it defines no get_config() function."),
    ("def get_config():\n  try:\n    import no_such_module_here\n  except ImportError:\n"
     "    raise RuntimeError('install it')\n", "(line 5): RuntimeError: install it."),
], ids=["RuntimeError", "KeyError", "sys.exit", "SyntaxError", "ImportError", "no-get_config",
        "raised-while-handling"])
@pytest.mark.parametrize("entry", ["train", "benchmark", "aot", "tpu-train"])
def test_a_config_file_raising_anything_is_one_sentence(entry, body, message, tmp_path, capsys):
  path = tmp_path / "broken.py"
  path.write_text(body)
  main, extra = _entry_points(tmp_path)[entry]
  assert _one_error(capsys, main, ["--config", str(path), *extra]) == (
      f"Could not load --config {path}{'' if message[0] == ':' else ' '}{message}")


@pytest.mark.parametrize("override", [
    "optimizer.lr=nan", "optimizer.lr=inf", "optimizer.min_lr=-inf", "optimizer.clip=nan",
    "optimizer.weight_decay=inf", "optimizer.eps=nan", "optimizer.b2=nan",
    "data.val_fraction=nan", "model.attn_dropout=nan"])
@pytest.mark.parametrize("entry", ["train", "benchmark"])
def test_non_finite_numbers_are_refused(entry, override, tmp_path, capsys):
  main, extra = _entry_points(tmp_path)[entry]
  key, value = override.split("=")
  shown = {"nan": "nan", "inf": "inf", "-inf": "-inf"}[value]
  assert _one_error(capsys, main, ["--config", TINY, f"--config.{override}", *extra]) == (
      f"config.{key} must be a finite number, got {shown}.")


def test_overrides_reach_the_config_in_process(tmp_path):
  """ml_collections defines the override flags from sys.argv; cli.parse makes them come from
  the argv it is given, and a second call in one process starts afresh."""
  before = list(sys.argv)
  for steps in ("7", "9"):
    cli.parse(train_cli.FLAGS, "", ["--config", TINY, f"--config.train.steps={steps}",
                                    "--workdir", str(tmp_path)])
    assert cli.load_config(train_cli.FLAGS).train.steps == int(steps)
  assert sys.argv == before
  cli.parse(train_cli.FLAGS, "", ["--config", TINY, "--workdir", str(tmp_path)])
  assert cli.load_config(train_cli.FLAGS).train.steps == 50


@pytest.mark.parametrize("main, argv, message", [
    (benchmark_cli.main, ["--config", TINY, "--steps=0"], "--steps must be a positive integer, "
                                                          "got '0'."),
    (benchmark_cli.main, ["--config", TINY, "--mode=fast"], "--mode must be one of train, "
                                                            "sample, all, got 'fast'."),
    (benchmark_cli.main, ["--config", TINY, "--wat"], "Unknown flag --wat; see --help."),
    (sample_cli.main, ["--num_samples=x", "--workdir=/tmp"], "--num_samples must be an integer, "
                                                             "got 'x'."),
    (sample_cli.main, ["--wat=1"], "Unknown flag --wat; see --help."),
    (prepare_cli.main, ["--input=x.txt"], "Flag --out_dir is required."),
    (prepare_cli.main, ["--out_dir=/tmp/x", "--val_fraction=abc"], "--val_fraction must be a "
                                                                   "number, got 'abc'."),
], ids=["bound", "enum", "unknown-flag", "sample-int", "sample-unknown", "prepare-required",
        "prepare-float"])
def test_other_flag_errors_are_one_sentence(main, argv, message, capsys):
  assert _one_error(capsys, main, argv) == message


# ---------------------------------------------------------------------------------------------
# XLA_FLAGS, asked of XLA before anything runs; Ctrl-C, one line and status 130


@pytest.mark.parametrize("flags, message", [
    ("--xla_bogus_flag=1", "XLA_FLAGS holds a flag XLA does not know: --xla_bogus_flag=1 "
                           "(XLA_FLAGS='--xla_bogus_flag=1'); correct or remove it."),
    ("--xla_cpu_use_fusion_emitters=false --xla_bogus_flag=1 --xla_other_bogus=2",
     "XLA_FLAGS holds flags XLA does not know: --xla_bogus_flag=1, --xla_other_bogus=2"),
    ("--xla_backend_optimization_level=abc",
     "XLA_FLAGS: XLA cannot read the value 'abc' of --xla_backend_optimization_level"),
    ("xla_bogus", "XLA_FLAGS 'xla_bogus' does not start with --, so XLA reads it as a file of "
                  "flags, and there is no such file"),
])
def test_a_bad_xla_flags_is_one_sentence_before_anything_runs(flags, message, tiny_run, tmp_path,
                                                              capsys, monkeypatch):
  """In-process, XLA has parsed the test's own flags already: without the check the commands
  below would succeed. Nothing is written."""
  workdir, _ = tiny_run
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert message in _one_error(capsys, sample_cli.main, ["--workdir", str(workdir),
                                                         "--max_new_tokens", "2"])
  assert message in _one_error(capsys, train_cli.main, ["--config", TINY, "--workdir",
                                                        str(tmp_path / "run")])
  assert not (tmp_path / "run").exists()


GC_INTERRUPT = """
import gc, os, signal, sys, time
from absl import flags
from launch import cli

def during_collection(phase, info):  # JAX runs a gc callback of its own at every collection
  if phase == "start" and not getattr(during_collection, "sent", False):
    during_collection.sent = True
    os.kill(os.getpid(), signal.SIGINT)
    sum(range(100000))  # Python code runs here: the signal arrives inside the callback

def body(args):
  gc.callbacks.append(during_collection)
  gc.collect()
  gc.callbacks.remove(during_collection)
  time.sleep(2)
  print("went on")
  return 0

sys.exit(cli.run(body, flags.FlagValues(), "", [], interrupted="nothing written"))
"""


def test_ctrl_c_inside_a_garbage_collection_callback_still_stops(tmp_path):
  """Python ignores (prints and drops) an exception raised in a gc callback or __del__; a
  Ctrl-C that lands there must still end the program: exit 130, one line, nothing after."""
  script = tmp_path / "gc_interrupt.py"
  script.write_text(GC_INTERRUPT)
  out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                       env=subprocess_env(XLA_FLAGS=""), timeout=60)
  assert out.returncode == 130, out.stderr
  assert out.stderr.strip().splitlines() == ["interrupted; nothing written"]
  assert "went on" not in out.stdout


def test_xla_flags_accepted_once_are_not_asked_again(monkeypatch, tmp_path):
  """The child process runs once per new XLA_FLAGS value: then this process remembers it, and
  a new process finds the file under the cache directory."""
  from training import xla_flags  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path))
  flags = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"
  children, real_run = [], subprocess.run
  monkeypatch.setattr(xla_flags.subprocess, "run",
                      lambda *args, **kwargs: children.append(args) or real_run(*args, **kwargs))
  xla_flags.check_xla_flags(flags)
  xla_flags.check_xla_flags(flags)
  assert len(children) == 1
  monkeypatch.setattr(xla_flags, "_PARSED", set())  # as a new process
  xla_flags.check_xla_flags(flags)
  assert len(children) == 1 and list((tmp_path / "xla_flags").iterdir())
