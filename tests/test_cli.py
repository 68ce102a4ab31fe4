"""launch/cli.py: every entry point fails the same way, in one `error:` sentence with status 2:
a config file that raises anything (or exits), a missing config, an unknown key, a bad value
(a key given twice names the value that failed), non-finite numbers, bad flags; and overrides
given to main(argv) in-process reach the config (ml_collections reads them from sys.argv).
All in-process: nothing here compiles a step."""

import sys

import pytest

from conftest import exit_status
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
