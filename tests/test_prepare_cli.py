"""python -m launch.prepare: text and TFDS corpora to token files, one-sentence errors; Ctrl-C
writes nothing (a real process)."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, exit_status, subprocess_env, tree_fingerprint
from launch import prepare as prepare_cli

HF_TOKENIZER = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_llama_mha"


def test_prepare_cli_on_tfds_under_mock_data(tmp_path, capsys):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10):
    assert exit_status(prepare_cli.main, ["--tfds=tiny_shakespeare", "--tokenizer=char",
                                          "--val_split=test", f"--out_dir={tmp_path}",
                                          "--quiet"]) == 0
    assert exit_status(prepare_cli.main, ["--tfds=tiny_shakespeare", "--text_key=body",
                                          f"--out_dir={tmp_path / 'other'}"]) == 2
  out, err = capsys.readouterr()
  meta = json.loads((tmp_path / "meta.json").read_text())
  chars = meta["tokenizer"]["chars"]  # mock_data's text is random letters a-j and spaces
  assert meta["source"] == "tfds:tiny_shakespeare" and set(chars) <= set(" abcdefghij")
  assert f"vocab {len(chars)} (char)" in out and "tokens/s" in out
  assert "no feature 'body' (they have 'text')" in err


def test_prepare_cli_rejects_bad_input(small_text, tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  cases = [
      ([f"--input={tmp_path / 'missing.txt'}"], "missing.txt' does not exist"),
      ([f"--input={small_text}", "--tokenizer=bpe"], "Unknown tokenizer 'bpe'"),
      ([f"--input={small_text}", f"--out_dir={a_file}"], "is an existing file"),
  ]
  for argv, message in cases:
    argv = argv if any(a.startswith("--out_dir") for a in argv) else argv + [
        f"--out_dir={tmp_path / 'out'}"]
    assert exit_status(prepare_cli.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_prepare_cli_refuses_a_non_empty_out_dir_without_force(small_text, tmp_path, capsys):
  out_dir = tmp_path / "out"
  args = [f"--input={small_text}", "--tokenizer=char", f"--out_dir={out_dir}", "--quiet"]
  assert exit_status(prepare_cli.main, args) == 0
  before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
  capsys.readouterr()
  assert exit_status(prepare_cli.main, args + ["--tokenizer=gpt2"]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: Output directory '{out_dir}' is not empty (it holds meta.json, "
                 f"train.bin, val.bin); choose an empty or new one, or pass --force to replace "
                 f"its train.bin, val.bin, meta.json.\n")
  assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # the dataset is kept
  assert exit_status(prepare_cli.main, args + ["--tokenizer=gpt2", "--force"]) == 0
  assert json.loads((out_dir / "meta.json").read_text())["tokenizer"] == {"name": "gpt2"}


@pytest.mark.parametrize("content, message", [
    (None, "(from $FLAXGPT_GPT2_BPE) does not exist; point FLAXGPT_GPT2_BPE at"),
    (b"garbage\n", "is not a tiktoken rank file (Error parsing line b'garbage'"),
], ids=["missing", "garbage"])
def test_prepare_cli_with_a_bad_bpe_file_is_one_sentence(content, message, small_text, tmp_path,
                                                          monkeypatch, capsys):
  bpe = tmp_path / "gpt2.tiktoken"
  if content is not None:
    bpe.write_bytes(content)
  monkeypatch.setenv("FLAXGPT_GPT2_BPE", str(bpe))
  assert exit_status(prepare_cli.main, [f"--input={small_text}", "--tokenizer=gpt2",
                                        f"--out_dir={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: GPT-2 BPE file '{bpe}' ") and message in err, err
  assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def _interrupted_prepare(args, out_dir):
  """`python -m launch.prepare args` sent SIGINT once it writes (its temporary token file is
  in `out_dir`): (returncode, stderr)."""
  proc = subprocess.Popen([sys.executable, "-m", "launch.prepare", *args], cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while (not list(out_dir.glob("train.bin.tmp-*")) and proc.poll() is None
         and time.time() < deadline):
    time.sleep(0.005)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  return proc.returncode, stderr


@pytest.mark.slow
def test_ctrl_c_while_preparing_writes_nothing_and_a_rerun_prepares(shakespeare_path, small_text,
                                                                    tmp_path):
  """SIGINT while tiny shakespeare is tokenized (the Llama fixture's tokenizer: seconds): exit
  130, one line, no traceback; a new --out_dir is not left behind (empty, a rerun would take
  it), an earlier dataset --force was replacing is byte for byte as it was; the rerun prepares
  the whole dataset, the same files as a run never interrupted."""
  new, earlier, reference = tmp_path / "new", tmp_path / "earlier", tmp_path / "reference"
  assert exit_status(prepare_cli.main, [f"--input={small_text}", "--tokenizer=char",
                                        f"--out_dir={earlier}", "--quiet"]) == 0
  before = tree_fingerprint(earlier)
  args = [f"--input={shakespeare_path}", f"--tokenizer=hf:{HF_TOKENIZER}", "--quiet"]
  for out_dir, force in ((new, []), (earlier, ["--force"])):
    returncode, stderr = _interrupted_prepare([*args, f"--out_dir={out_dir}", *force], out_dir)
    assert returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        "interrupted; nothing written; --out_dir is as it was"], stderr
    assert not new.exists() and tree_fingerprint(earlier) == before
  assert exit_status(prepare_cli.main, [*args, f"--out_dir={new}"]) == 0
  assert exit_status(prepare_cli.main, [*args, f"--out_dir={reference}"]) == 0
  assert tree_fingerprint(new) == tree_fingerprint(reference)
