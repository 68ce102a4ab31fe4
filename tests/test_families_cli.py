"""The BERT-style encoder and the encoder-decoder from the command line, in subprocesses: exact
resume after SIGKILL for both families (tiny versions of configs/bert_shakespeare.py and
configs/transformer_reverse.py), launch.sample's fill-mask and source -> target output on runs
and Hugging Face checkpoints (text and --json), a TSV run, and one-sentence errors (exit 2)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
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
def env(tmp_path_factory):
  e = dict(os.environ)
  e.pop("FLAXGPT_DATA_DIR", None)
  e.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="",
           FLAXGPT_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
  return e


def _train_cmd(family, workdir, *extra):
  config, overrides = FAMILIES[family]
  return [sys.executable, "-m", "launch.train", "--config", config, "--workdir", str(workdir),
          *TINY, *overrides, *extra]


def _run(cmd, env, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _module(module, *args, env, timeout=300):
  return _run([sys.executable, "-m", module, *map(str, args)], env, timeout)


def _checkpoints(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _rows(workdir):
  rows = read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), "each step must be logged once"
  return {r["step"]: r for r in rows}


def _one_line_error(out, pattern):
  assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
  """Per family: an uninterrupted reference run, and a run SIGKILLed after its first
  checkpoint, then resumed."""
  out = {}
  for family in FAMILIES:
    reference = tmp_path_factory.mktemp(f"{family}_reference")
    done = _run(_train_cmd(family, reference, "--quiet"), env)
    assert done.returncode == 0, done.stderr
    killed = tmp_path_factory.mktemp(f"{family}_killed")
    proc = subprocess.Popen(_train_cmd(family, killed), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not _checkpoints(killed) and proc.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = _checkpoints(killed)
    resumed = _run(_train_cmd(family, killed), env)
    assert resumed.returncode == 0, resumed.stderr
    out[family] = (reference, killed, saved, resumed.stdout)
  return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sigkill_resume_is_exact(runs, family):
  reference, killed, saved, stdout = runs[family]
  assert saved and saved[-1] < STEPS
  assert f"resumed from the checkpoint of step {saved[-1]}" in stdout
  want, got = _rows(reference), _rows(killed)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  keys = ("loss", "accuracy", "val_loss", "val_accuracy", "val_exact_match")
  mismatched = [s for s in got if any(got[s].get(k) != want[s].get(k) for k in keys)]
  assert not mismatched, f"metrics differ from the uninterrupted run at steps {mismatched[:5]}"
  assert "accuracy" in want[STEPS] and "val_accuracy" in want[STEPS]
  if family == "encdec":
    assert "val_exact_match" in want[STEPS]


def test_sample_seq2seq_run_text_json_and_beams(runs, env):
  workdir = runs["encdec"][0]
  out = _module("launch.sample", "--workdir", workdir, "--prompt", "To be, or not",
                "--prompt", "ROMEO:", "--max_new_tokens", "20", env=env)
  assert out.returncode == 0, out.stderr
  blocks = out.stdout.split("---------------\n")
  assert blocks[0].startswith("To be, or not\n=> ") and blocks[1].startswith("ROMEO:\n=> ")
  # beams up to the default length: every one of the 64 target positions
  js = _module("launch.sample", "--workdir", workdir, "--prompt", "To be, or not", "--json",
               "--num_beams", "3", env=env)
  assert js.returncode == 0, js.stderr
  record = json.loads(js.stdout.strip().splitlines()[0])
  assert record["prompt"] == "To be, or not" and record["num_tokens"] <= 64
  assert record["stop_reason"] in ("eos", "max_new_tokens")


def test_sample_fill_mask_run_text_and_json(runs, env):
  workdir = runs["bert"][0]
  out = _module("launch.sample", "--workdir", workdir, "--prompt", "To b[MASK], or not",
                "--top_k", "3", env=env)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[0] == "To b[MASK], or not" and lines[1].startswith("=> To b")
  assert lines[2].startswith("  [MASK] 1 (token 4): ") and lines[2].count("'") == 6
  js = _module("launch.sample", "--workdir", workdir, "--prompt", "[MASK]o be", "--json",
               env=env)
  assert js.returncode == 0, js.stderr
  record = json.loads(js.stdout)
  (mask,) = record["masks"]
  probs = [c["probability"] for c in mask["candidates"]]
  assert mask["position"] == 0 and len(probs) == 5 and probs == sorted(probs, reverse=True)
  assert record["filled"].endswith("o be")


def test_sample_hugging_face_bert_and_bart(env):
  out = _module("launch.sample", "--init_from", BERT_DIR, "--prompt", "the [MASK] of york",
                "--json", env=env)
  assert out.returncode == 0, out.stderr
  record = json.loads(out.stdout)
  assert len(record["masks"]) == 1 and record["masks"][0]["position"] == 2  # after [CLS], the
  assert all(c["token"] not in ("[CLS]", "[SEP]", "[PAD]", "[MASK]")
             for c in record["masks"][0]["candidates"])
  out = _module("launch.sample", "--init_from", BART_DIR, "--prompt", "Good morrow",
                "--num_beams", "2", "--max_new_tokens", "6", env=env)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("Good morrow\n=> ")


def test_tsv_run_trains_and_reports_exact_match(env, tmp_path):
  tsv = tmp_path / "pairs.tsv"
  tsv.write_text("".join(f"{w}\t{w.upper()}\n" for w in
                         ["king", "queen", "rook", "pawn", "knight", "bishop"] * 4))
  out = _module("launch.train", "--config", "configs/transformer_reverse.py", "--workdir",
                tmp_path / "run", *TINY, "--config.model.num_decoder_layers=1",
                "--config.data.task=tsv", f"--config.data.path={tsv}", "--config.train.steps=4",
                "--config.eval.every=4", "--config.eval.exact_match=4", env=env)
  assert out.returncode == 0, out.stderr
  assert "exact match" in out.stdout
  assert "val_exact_match" in _rows(tmp_path / "run")[4]


@pytest.mark.parametrize("case", ["no-tab", "long-source"])
def test_bad_tsv_is_one_sentence(case, env, tmp_path):
  tsv = tmp_path / "bad.tsv"
  bad = "a\tb\nno tab here\n" if case == "no-tab" else "a\tb\n" + "x" * 80 + "\ty\n"
  tsv.write_text(bad * 3)
  out = _module("launch.train", "--config", "configs/transformer_reverse.py", "--workdir",
                tmp_path / "run", "--config.data.task=tsv", f"--config.data.path={tsv}",
                env=env)
  _one_line_error(out, f"{tsv}:2: " + ("a line must be source<TAB>target" if case == "no-tab"
                                       else "the source has 80 tokens, more than the model's "
                                            "64 positions"))
  assert not (tmp_path / "run").exists()


def test_bad_sampling_input_is_one_sentence(runs, env):
  bert_run, encdec_run = runs["bert"][0], runs["encdec"][0]
  _one_line_error(_module("launch.sample", "--init_from", BERT_DIR, "--prompt", "no mask",
                          env=env), "has no [MASK]: fill-mask needs at least one [MASK]")
  _one_line_error(_module("launch.sample", "--workdir", bert_run, "--prompt", "plain", env=env),
                  "has no [MASK]")
  _one_line_error(_module("launch.sample", "--workdir", encdec_run, "--prompt", "x" * 100,
                          env=env), "has 100 tokens, more than the model's 64 positions")
  _one_line_error(_module("launch.eval", "--init_from", BERT_DIR, "--data",
                          "text:training/data/assets/tinyshakespeare.txt",
                          env=env),
                  "measures a causal language model's perplexity, and "
                  f"{BERT_DIR} is a model.family='bert' model")
  _one_line_error(_module("launch.export", "--workdir", bert_run, "--out", encdec_run / "x",
                          env=env), "needs model.family='gpt'")
