"""The BERT-style encoder and the encoder-decoder from the command line: exact resume after
SIGKILL for both families (tiny versions of configs/bert_shakespeare.py and
configs/transformer_reverse.py; real processes), launch.sample's fill-mask and source -> target
output on runs and Hugging Face checkpoints (text and --json), a TSV run, and one-sentence
errors (exit 2); those through the entry points' main(argv), in process."""

import json
import pathlib
import signal
import subprocess
import sys

import pytest

from conftest import (ONE_DEVICE_XLA_FLAGS, REPO, built_once, exit_status,
                      signal_after_first_checkpoint, subprocess_env)
from launch import eval as eval_cli
from launch import export as export_cli
from launch import sample as sample_cli
from launch import train as train_cli
from training.metrics import read_metrics

FIXTURES = REPO / "tests" / "fixtures"
BERT_DIR, BART_DIR = FIXTURES / "hf_bert_tiny", FIXTURES / "hf_bart_tiny"
STEPS = 60
TINY = ("--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.d_mlp=64",
        "--config.model.num_heads=2", "--config.train.batch_size=8", "--config.log.every=1",
        f"--config.train.steps={STEPS}", "--config.eval.every=30", "--config.eval.batches=2",
        "--config.checkpoint.every=10", "--config.checkpoint.keep=2",
        "--config.mesh.cpu_devices=0")
FAMILIES = {
    "bert": ("configs/bert_shakespeare.py", ()),
    "encdec": ("configs/transformer_reverse.py",
               ("--config.model.num_decoder_layers=1", "--config.eval.exact_match=8")),
}


@pytest.fixture(scope="module")
def env():
  """One JAX device (with LLVM's optimisation: runs of many steps); the packaged text."""
  e = subprocess_env(XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
  e.pop("FLAXGPT_DATA_DIR", None)
  return e


def _train_args(family, workdir, *extra):
  config, overrides = FAMILIES[family]
  return ["--config", config, "--workdir", str(workdir), *TINY, *overrides, *extra]


def _train_cmd(family, workdir, *extra):
  return [sys.executable, "-m", "launch.train", *_train_args(family, workdir, *extra)]


def _run(cmd, env, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _main(capsys, main, *args):
  """An entry point's main(argv) in process: (exit status, stdout, stderr)."""
  status = exit_status(main, [str(a) for a in args])
  out = capsys.readouterr()
  return status, out.out, out.err


def _checkpoints(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _rows(workdir):
  rows = read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), "each step must be logged once"
  return {r["step"]: r for r in rows}


def _one_line_error(status, stdout, stderr, pattern):  # pylint: disable=unused-argument
  assert status == 2, (status, stdout, stderr)
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert pattern in lines[0], lines[0]


def _reference(family, env):
  """The family's uninterrupted run (a real process, as the killed run it is compared with),
  made once per test run."""
  def build(workdir):
    done = _run(_train_cmd(family, workdir, "--quiet"), env)
    assert done.returncode == 0, done.stderr
  return built_once(f"{family}_reference", build)


def _short_run(family):
  """A 4-step run of the family's tiny config, through launch.train.main in process (made once
  per test run): what the sampling tests read."""
  def build(workdir):
    args = _train_args(family, workdir, "--config.train.steps=4", "--config.eval.every=0",
                       "--config.checkpoint.every=4", "--quiet")
    assert exit_status(train_cli.main, args) == 0
  return built_once(f"{family}_short_run", build)


@pytest.fixture(scope="module")
def bert_run():
  return _short_run("bert")


@pytest.fixture(scope="module")
def encdec_run():
  return _short_run("encdec")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sigkill_resume_is_exact(family, env, tmp_path):
  """A run SIGKILLed after its first checkpoint and rerun logs the uninterrupted run's
  metrics, step for step."""
  reference, killed = _reference(family, env), tmp_path / "killed"
  rc, _, _ = signal_after_first_checkpoint(_train_cmd(family, killed), env,
                                           lambda: _checkpoints(killed), signal.SIGKILL)
  assert rc == -signal.SIGKILL, "the run ended before it could be killed"
  saved = _checkpoints(killed)
  resumed = _run(_train_cmd(family, killed), env)
  assert resumed.returncode == 0, resumed.stderr
  assert saved and saved[-1] < STEPS
  assert f"resumed from the checkpoint of step {saved[-1]}" in resumed.stdout
  want, got = _rows(reference), _rows(killed)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  keys = ("loss", "accuracy", "val_loss", "val_accuracy", "val_exact_match")
  mismatched = [s for s in got if any(got[s].get(k) != want[s].get(k) for k in keys)]
  assert not mismatched, f"metrics differ from the uninterrupted run at steps {mismatched[:5]}"
  assert "accuracy" in want[STEPS] and "val_accuracy" in want[STEPS]
  if family == "encdec":
    assert "val_exact_match" in want[STEPS]


def test_sample_seq2seq_run_text_json_and_beams(encdec_run, capsys):
  status, out, err = _main(capsys, sample_cli.main, "--workdir", encdec_run, "--prompt",
                           "To be, or not", "--prompt", "ROMEO:", "--max_new_tokens", "20")
  assert status == 0, err
  blocks = out.split("---------------\n")
  assert blocks[0].startswith("To be, or not\n=> ") and blocks[1].startswith("ROMEO:\n=> ")
  # beams up to the default length: every one of the 64 target positions
  status, out, err = _main(capsys, sample_cli.main, "--workdir", encdec_run, "--prompt",
                           "To be, or not", "--json", "--num_beams", "3")
  assert status == 0, err
  record = json.loads(out.strip().splitlines()[0])
  assert record["prompt"] == "To be, or not" and record["num_tokens"] <= 64
  assert record["stop_reason"] in ("eos", "max_new_tokens")


def test_sample_fill_mask_run_text_and_json(bert_run, capsys):
  status, out, err = _main(capsys, sample_cli.main, "--workdir", bert_run, "--prompt",
                           "To b[MASK], or not", "--top_k", "3")
  assert status == 0, err
  lines = out.splitlines()
  assert lines[0] == "To b[MASK], or not" and lines[1].startswith("=> To b")
  assert lines[2].startswith("  [MASK] 1 (token 4): ") and lines[2].count("'") == 6
  status, out, err = _main(capsys, sample_cli.main, "--workdir", bert_run, "--prompt",
                           "[MASK]o be", "--json")
  assert status == 0, err
  record = json.loads(out)
  (mask,) = record["masks"]
  probs = [c["probability"] for c in mask["candidates"]]
  assert mask["position"] == 0 and len(probs) == 5 and probs == sorted(probs, reverse=True)
  assert record["filled"].endswith("o be")


def test_sample_hugging_face_bert_and_bart(capsys):
  status, out, err = _main(capsys, sample_cli.main, "--init_from", BERT_DIR, "--prompt",
                           "the [MASK] of york", "--json")
  assert status == 0, err
  record = json.loads(out)
  assert len(record["masks"]) == 1 and record["masks"][0]["position"] == 2  # after [CLS], the
  assert all(c["token"] not in ("[CLS]", "[SEP]", "[PAD]", "[MASK]")
             for c in record["masks"][0]["candidates"])
  status, out, err = _main(capsys, sample_cli.main, "--init_from", BART_DIR, "--prompt",
                           "Good morrow", "--num_beams", "2", "--max_new_tokens", "6")
  assert status == 0, err
  assert out.startswith("Good morrow\n=> ")


def test_tsv_run_trains_and_reports_exact_match(tmp_path, capsys):
  tsv = tmp_path / "pairs.tsv"
  tsv.write_text("".join(f"{w}\t{w.upper()}\n" for w in
                         ["king", "queen", "rook", "pawn", "knight", "bishop"] * 4))
  status, out, err = _main(capsys, train_cli.main, *_train_args(
      "encdec", tmp_path / "run", "--config.data.task=tsv", f"--config.data.path={tsv}",
      "--config.train.steps=4", "--config.eval.every=4", "--config.eval.exact_match=4"))
  assert status == 0, err
  assert "exact match" in out
  assert "val_exact_match" in _rows(tmp_path / "run")[4]


@pytest.mark.parametrize("case", ["no-tab", "long-source"])
def test_bad_tsv_is_one_sentence(case, tmp_path, capsys):
  tsv = tmp_path / "bad.tsv"
  bad = "a\tb\nno tab here\n" if case == "no-tab" else "a\tb\n" + "x" * 80 + "\ty\n"
  tsv.write_text(bad * 3)
  _one_line_error(*_main(capsys, train_cli.main, "--config", "configs/transformer_reverse.py",
                         "--workdir", tmp_path / "run", "--config.data.task=tsv",
                         f"--config.data.path={tsv}"),
                  f"{tsv}:2: " + ("a line must be source<TAB>target" if case == "no-tab"
                                  else "the source has 80 tokens, more than the model's "
                                       "64 positions"))
  assert not (tmp_path / "run").exists()


def test_bad_sampling_input_is_one_sentence(bert_run, encdec_run, capsys, tmp_path):
  _one_line_error(*_main(capsys, sample_cli.main, "--init_from", BERT_DIR, "--prompt",
                         "no mask"), "has no [MASK]: fill-mask needs at least one [MASK]")
  _one_line_error(*_main(capsys, sample_cli.main, "--workdir", bert_run, "--prompt", "plain"),
                  "has no [MASK]")
  _one_line_error(*_main(capsys, sample_cli.main, "--workdir", encdec_run, "--prompt",
                         "x" * 100), "has 100 tokens, more than the model's 64 positions")
  _one_line_error(*_main(capsys, eval_cli.main, "--init_from", BERT_DIR, "--data",
                         "text:training/data/assets/tinyshakespeare.txt"),
                  "measures a causal language model's perplexity, and "
                  f"{BERT_DIR} is a model.family='bert' model")
  _one_line_error(*_main(capsys, export_cli.main, "--workdir", bert_run, "--out",
                         tmp_path / "x"), "needs model.family='gpt'")
