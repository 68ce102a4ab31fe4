"""python -m launch.eval end to end on a trained tiny run: text and bin data, --json, the
numbers' definitions, and one-sentence errors for bad input."""

import json
import math

import numpy as np
import pytest

from conftest import exit_status
from launch import eval as eval_cli
from launch import prepare as prepare_cli

HF_DIR = "tests/fixtures/hf_gpt2_tiny"  # GPT-2 BPE ids 0..95, block 32


@pytest.fixture(scope="module")
def run(tiny_run):
  """conftest's tiny run (a character model, block 64)."""
  return tiny_run[0]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, shakespeare_path):
  path = tmp_path_factory.mktemp("text") / "held_out.txt"
  path.write_text(shakespeare_path.read_text()[-3000:])
  return path


def _eval(capsys, *args):
  status = exit_status(eval_cli.main, [str(a) for a in args])
  out = capsys.readouterr()
  return status, out.out, out.err


def test_text_and_bin_give_the_same_numbers(run, held_out, tmp_path, capsys, shakespeare_path):
  status, out, err = _eval(capsys, "--workdir", run, "--data", f"text:{held_out}", "--json",
                           "--stride", "32")
  assert status == 0, err
  r = json.loads(out)
  assert set(r) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "windows"}
  assert r["tokens"] == 2999 and r["bytes"] == len(held_out.read_bytes()) - 1  # ASCII text
  assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
  assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / r["bytes"])
  assert "scoring: 100.0%" in err and "ETA" in err  # the progress line
  # The same text prepared with the run's vocabulary (the whole text: the same characters).
  text = tmp_path / "all.txt"
  text.write_text(shakespeare_path.read_text() + held_out.read_text())
  status = exit_status(prepare_cli.main, ["--input", str(text), "--tokenizer", "char",
                                          "--out_dir", str(tmp_path / "bin"), "--val_fraction",
                                          str(3000 / len(text.read_text()))])
  assert status == 0
  capsys.readouterr()
  status, out, err = _eval(capsys, "--workdir", run, "--data", f"bin:{tmp_path / 'bin'}:val",
                           "--json", "--stride", "32", "--quiet")
  assert status == 0, err
  assert err == ""
  b = json.loads(out)
  # The val split's tokens as text: the same stream, so the same windows and numbers.
  from model.tokenizer import tokenizer_from_dict
  meta = json.loads((tmp_path / "bin" / "meta.json").read_text())
  val = np.fromfile(tmp_path / "bin" / "val.bin", dtype=meta["dtype"])
  same = tmp_path / "val.txt"
  same.write_text(tokenizer_from_dict(meta["tokenizer"]).decode(val))
  status, out, err = _eval(capsys, "--workdir", run, "--data", f"text:{same}", "--json",
                           "--stride", "32", "--quiet")
  t = json.loads(out)
  assert b["tokens"] == t["tokens"] == len(val) - 1 and b["windows"] == t["windows"]
  assert b["loss"] == pytest.approx(t["loss"], rel=1e-6) and b["bytes"] == t["bytes"]


def test_text_output_and_max_tokens(run, held_out, capsys):
  status, out, err = _eval(capsys, "--workdir", run, "--data", f"text:{held_out}",
                           "--max_tokens", "500")
  assert status == 0, err
  assert "perplexity" in out and "499 tokens (499 bytes) in 8 windows of 64, stride 64" in out


BAD = {
    "short": (["--data", "text:{short}"], "fewer than one window of the model's block_size + 1"),
    "kind": (["--data", "csv:x"], "--data must be text:PATH, bin:DIR[:train|val], "
                                  "tfds:NAME:SPLIT or chat:FILE, got 'csv:x'"),
    "missing-text": (["--data", "text:{tmp}/none.txt"], "does not exist"),
    "stride": (["--data", "text:{held_out}", "--stride", "65"],
               "--stride must be an integer in [1, block_size = 64], got 65"),
    "max-tokens": (["--data", "text:{held_out}", "--max_tokens", "1"], "at least 2"),
    "step": (["--data", "text:{held_out}", "--step", "99"], "step 99"),
    "both": (["--data", "text:{held_out}", "--init_from", HF_DIR], "Give one of --workdir"),
    "tokenizer": (["--data", "text:{unicode}"], "is not in the character vocabulary"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_sentence(case, run, held_out, tmp_path, capsys):
  short = tmp_path / "short.txt"
  short.write_text("ROMEO:\n" * 3)
  unicode = tmp_path / "u.txt"
  unicode.write_text("caf\u00e9 " * 100)
  args, expected = BAD[case]
  args = [a.format(short=short, tmp=tmp_path, held_out=held_out, unicode=unicode) for a in args]
  status, out, err = _eval(capsys, "--workdir", run, *args)
  assert status == 2 and out == ""
  assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_init_from_a_hugging_face_directory(tmp_path, capsys):
  # Text whose GPT-2 BPE ids stay below the fixture's 96-token vocabulary: single letters and
  # single punctuation marks in turn (GPT-2's pre-tokenizer splits letters from punctuation, and
  # a one-character piece is its byte's id, 0..93 for '!'..'~').
  from model.tokenizer import get_tokenizer
  rng = np.random.default_rng(0)
  letters, marks = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "!#%&()*+,-./:;<=>?@[]^_{|}~"
  text = "".join(rng.choice(list(letters)) + rng.choice(list(marks)) for _ in range(200))
  tokens = get_tokenizer("gpt2").encode(text)
  assert max(tokens) < 96 and len(tokens) == 400
  path = tmp_path / "ids.txt"
  path.write_text(text)
  status, out, err = _eval(capsys, "--init_from", HF_DIR, "--data", f"text:{path}", "--json",
                           "--quiet")
  assert status == 0, err
  r = json.loads(out)
  assert r["block_size"] == 32 and r["tokens"] == len(tokens) - 1 and np.isfinite(r["loss"])
  # Ordinary text has GPT-2 ids beyond the model's 96: refused, not scored as garbage.
  path.write_text("Hello world, this is ordinary English text. " * 10)
  status, out, err = _eval(capsys, "--init_from", HF_DIR, "--data", f"text:{path}")
  assert status == 2 and "has token id" in err and "outside [0, 96), the model's vocabulary" in err


def test_tfds_spec_with_a_split_slice():
  from training.evaluate import parse_data_spec
  assert parse_data_spec("tfds:lm1b:test[:1%]") == ("tfds", "lm1b", "test[:1%]")
  assert parse_data_spec("tfds:mnist:3.0.1:train") == ("tfds", "mnist:3.0.1", "train")
  assert parse_data_spec("bin:/d/x:train") == ("bin", "/d/x", "train")
  assert parse_data_spec("bin:/d/x") == ("bin", "/d/x", "val")
