"""A run that reads its data with a Hugging Face tokenizer (data.tokenizer=hf:DIR) records it by
content (a hash of tokenizer.json and its special tokens), as a character run records its
table: another tokenizer.json of the same size and time in DIR is refused on resume, a
byte-identical copy in another folder is accepted on resume and by init_from; its export
carries the tokenizer files, and launch.sample / launch.eval --init_from the export give the
run's tokens and loss; a path to the file itself is one sentence naming the folder."""

import json
import os
import pathlib
import shutil

import pytest

from conftest import exit_status, rel_err, tree_fingerprint
from launch import eval as eval_cli
from launch import export as export_cli
from launch import prepare as prepare_cli
from launch import sample as sample_cli
from launch import train as train_cli
from training.checkpoint import read_run_meta
from training.metrics import read_metrics

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_llama_mha"  # 300 tokens


def _tokenizer_dir(path: pathlib.Path) -> pathlib.Path:
  path.mkdir(parents=True)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy2(FIXTURE / name, path / name)
  return path


def _swap_two_tokens(path: pathlib.Path) -> None:
  """tokenizer.json with the ids of 'e' and 't' swapped: as many bytes, the same mtime, other
  ids."""
  file = path / "tokenizer.json"
  stat = file.stat()
  vocab = json.loads(file.read_text())["model"]["vocab"]
  a, b = f'"e": {vocab["e"]},', f'"t": {vocab["t"]},'
  assert len(str(vocab["e"])) == len(str(vocab["t"]))
  text = file.read_text()
  swapped = text.replace(a, "\0").replace(b, f'"t": {vocab["e"]},').replace(
      "\0", f'"e": {vocab["t"]},')
  assert swapped != text and len(swapped) == len(text)
  file.write_text(swapped)
  os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _train(capsys, workdir, tokenizer_dir, steps, *extra):
  status = exit_status(train_cli.main, [
      "--config", "configs/tiny.py", "--workdir", str(workdir), "--quiet",
      f"--config.data.tokenizer=hf:{tokenizer_dir}", f"--config.train.steps={steps}",
      "--config.train.batch_size=8", "--config.eval.every=0", "--config.log.every=1",
      "--config.checkpoint.every=2", "--config.model.num_layers=1", *extra])
  # what stderr says but the progress of tokenizing the text
  return status, [line for line in capsys.readouterr().err.strip().splitlines()
                  if not line.startswith("tokenizing ")]


def test_the_run_records_its_tokenizer_by_content(tmp_path, capsys):
  tok, run = _tokenizer_dir(tmp_path / "tok"), tmp_path / "first"
  status, err = _train(capsys, run, tok, 2)
  assert status == 0, err
  record = read_run_meta(run)[1]["tokenizer"]
  assert record["name"] == "hf" and record["path"] == str(tok) and len(record["sha256"]) == 64

  # A byte-identical copy in another folder: the same tokenizer, on resume and for init_from.
  copy = _tokenizer_dir(tmp_path / "copy")
  work = tmp_path / "run"
  shutil.copytree(run, work)
  status, err = _train(capsys, work, copy, 4)
  assert status == 0, err
  assert [r["step"] for r in read_metrics(work)] == [1, 2, 3, 4]  # resumed at 2
  status, err = _train(capsys, tmp_path / "fine_tuned", copy, 2, f"--config.init_from={run}")
  assert status == 0, err

  # Another tokenizer.json of the same size and time in the run's own folder: refused.
  _swap_two_tokens(tok)
  before = tree_fingerprint(run)
  status, err = _train(capsys, run, tok, 4)
  assert status == 2 and len(err) == 1 and "Traceback" not in err[0], err
  assert (f"was trained with the tokenizer of {tok} (content {record['sha256'][:12]}), but the "
          f"data here is read with the tokenizer of {tok} (content ") in err[0], err
  assert tree_fingerprint(run) == before
  status, err = _train(capsys, tmp_path / "other", tok, 2, f"--config.init_from={run}")
  assert status == 2 and len(err) == 1 and "read the data with its tokenizer" in err[0], err
  assert not (tmp_path / "other").exists()


def _json(capsys, main, args):
  status = exit_status(main, args)
  out = capsys.readouterr()
  assert status == 0, out.err
  return json.loads(out.out)


def test_its_export_carries_the_tokenizer_and_reads_back(tmp_path, capsys, shakespeare_path):
  tok = _tokenizer_dir(tmp_path / "tok")
  run, out = tmp_path / "run", tmp_path / "hf"
  status, err = _train(capsys, run, tok, 2)
  assert status == 0, err
  assert exit_status(export_cli.main, ["--workdir", str(run), "--out", str(out)]) == 0
  stdout = capsys.readouterr().out
  assert "character-level" not in stdout and "AutoTokenizer.from_pretrained" in stdout
  assert (out / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
  assert json.loads((out / "flaxgpt_tokenizer.json").read_text())["name"] == "hf"
  sample = ["--prompt", "To be", "--temperature", "0", "--max_new_tokens", "8", "--no_stop",
            "--json", "--quiet"]
  ours = _json(capsys, sample_cli.main, ["--workdir", str(run), *sample])
  exported = _json(capsys, sample_cli.main, ["--init_from", str(out), *sample])
  assert ours["token_ids"] == exported["token_ids"] and ours["completion"] == (
      exported["completion"])
  held_out = tmp_path / "held_out.txt"
  held_out.write_text(shakespeare_path.read_text()[-1000:])
  data = ["--data", f"text:{held_out}", "--json", "--quiet"]
  ours = _json(capsys, eval_cli.main, ["--workdir", str(run), *data])
  exported = _json(capsys, eval_cli.main, ["--init_from", str(out), *data])
  assert ours["tokens"] == exported["tokens"] and rel_err(exported["loss"], ours["loss"]) < 1e-5
  transformers = pytest.importorskip("transformers")
  from model.hf.tokenizer import load_hf_tokenizer  # pylint: disable=import-outside-toplevel
  text = shakespeare_path.read_text()[:500]
  assert transformers.AutoTokenizer.from_pretrained(out).encode(text) == (
      load_hf_tokenizer(tok).encode(text))


def test_naming_the_tokenizer_file_instead_of_its_folder_is_one_sentence(tmp_path, capsys,
                                                                         small_text):
  status = exit_status(prepare_cli.main, ["--input", str(small_text), "--tokenizer",
                                          f"hf:{FIXTURE / 'tokenizer.json'}", "--out_dir",
                                          str(tmp_path / "data"), "--quiet"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1, err
  assert (f"{FIXTURE / 'tokenizer.json'} is a file; a Hugging Face tokenizer is named by the "
          f"folder that holds its tokenizer.json (hf:{FIXTURE})") in err[0], err
  assert not (tmp_path / "data").exists()


def test_eval_names_which_side_has_which_tokenizer(tiny_run, tmp_path, capsys, small_text):
  """A prepared folder of hf tokens scored by a character run: the sentence says the data was
  prepared with the hf tokenizer and the model reads characters (not the other way round)."""
  data = tmp_path / "data"
  assert exit_status(prepare_cli.main, ["--input", str(small_text), "--tokenizer",
                                        f"hf:{FIXTURE}", "--out_dir", str(data), "--quiet",
                                        "--val_fraction", "0.5"]) == 0
  capsys.readouterr()
  workdir, _ = tiny_run
  status = exit_status(eval_cli.main, ["--workdir", str(workdir), "--data", f"bin:{data}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and len(err) == 1, err
  assert (f"--data 'bin:{data}' was prepared with the tokenizer of {FIXTURE} (content ") in (
      err[0]) and "but the model reads a 65-character table" in err[0], err
