"""python -m launch.prepare: text and TFDS corpora to token files, one-sentence errors."""

import json

import pytest

from conftest import exit_status
from launch import prepare as prepare_cli


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
