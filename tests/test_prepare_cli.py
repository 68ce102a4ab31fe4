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
