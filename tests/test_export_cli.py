"""python -m launch.export: a trained run becomes a Hugging Face GPT-2 (or, for a Llama-style
run, Llama) checkpoint that transformers loads with the same logits (character and GPT-2 BPE
runs, biases or none, either layer layout, a padded vocabulary) and that launch.sample and
launch.eval --init_from read back with its own tokenizer; a non-empty folder is refused and
nothing is overwritten; no export writes into, replaces or deletes a run's workdir; of two
exports to one folder the later is refused; Ctrl-C writes nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (REPO, built_once, exit_status, rel_err, subprocess_env, tiny_run_config,
                      tree_fingerprint)
from launch import eval as eval_cli
from launch import export as export_cli
from launch import sample as sample_cli
from model.gpt import GPT
from training.loop import train
from training.weights import load_weights


def _train(workdir, shakespeare_path, **changes):
  c = tiny_run_config(shakespeare_path, train__steps=3, train__batch_size=8, eval__every=0,
                      log__every=1, checkpoint__every=100)
  for key, value in changes.items():
    section, name = key.split("__")
    c[section][name] = value
  train(c, str(workdir), quiet=True)
  return workdir


@pytest.fixture(scope="module")
def char_run(shakespeare_path):
  """A character run without biases (as the quick start's model), made once per test run."""
  return built_once("export_char_run",
                    lambda path: _train(path, shakespeare_path, model__use_bias=False))


@pytest.fixture(scope="module")
def bpe_run(shakespeare_path):
  """A GPT-2 BPE run, vocabulary padded to 50304, scan_layers layout, made once per test run."""
  return built_once("export_bpe_run", lambda path: _train(
      path, shakespeare_path, data__tokenizer="gpt2", model__padded_vocab_size=50304,
      model__scan_layers=True, model__block_size=32))


# A Llama-style run: rotary positions, RMSNorm, SwiGLU, 2 key/value heads of 4, no biases.
LLAMA = dict(model__position_embedding="rotary", model__norm="rmsnorm",
             model__activation="swiglu", model__num_kv_heads=2, model__use_bias=False,
             model__d_mlp=96)


@pytest.fixture(scope="module")
def llama_run(shakespeare_path):
  return built_once("export_llama_run", lambda path: _train(path, shakespeare_path, **LLAMA))


def _export(capsys, *args):
  status = exit_status(export_cli.main, list(args))
  out = capsys.readouterr()
  return status, out.out, out.err


def _same_logits(transformers_lib, workdir, out):
  torch, transformers = transformers_lib
  w = load_weights(workdir)
  V = w.cfg.vocab_size
  ids = np.random.default_rng(0).integers(0, V, (2, w.cfg.block_size))
  ours = np.asarray(GPT(w.cfg).apply({"params": w.params}, jnp.asarray(ids)))[..., :V]
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(ids)).logits.numpy()
  assert theirs.shape == ours.shape
  assert rel_err(ours, theirs) < 1e-5  # float32 (measured 4e-7)


def test_character_run_exports_with_its_vocabulary(char_run, tmp_path, capsys, transformers_lib):
  out = tmp_path / "hf"
  status, stdout, err = _export(capsys, "--workdir", str(char_run), "--out", str(out))
  assert status == 0, err
  assert sorted(os.listdir(out)) == ["config.json", "flaxgpt_tokenizer.json",
                                     "model.safetensors"]
  assert "character-level model" in stdout and "flaxgpt_tokenizer.json" in stdout
  vocab = json.loads((out / "flaxgpt_tokenizer.json").read_text())
  assert vocab["name"] == "char" and len(vocab["chars"]) == 65
  _same_logits(transformers_lib, char_run, out)
  assert (out / "model.safetensors").stat().st_mode & 0o044  # readable by others, as any file
  assert not [p for p in os.listdir(tmp_path) if "export-" in p]  # no temporary folders left


def test_gpt2_bpe_run_exports_a_tokenizer_transformers_loads(bpe_run, tmp_path, capsys,
                                                             shakespeare_path, transformers_lib):
  out = tmp_path / "hf"
  status, _, err = _export(capsys, "--workdir", str(bpe_run), "--out", str(out), "--step", "3")
  assert status == 0, err
  _same_logits(transformers_lib, bpe_run, out)
  hf = transformers_lib[1].AutoTokenizer.from_pretrained(out)
  from model.tokenizer import get_tokenizer
  text = shakespeare_path.read_text()[:2000] + "<|endoftext|>"
  assert hf.encode(text) == get_tokenizer("gpt2").encode(text)
  assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257


@pytest.mark.parametrize("scan_layers", [False, True])
def test_llama_run_exports_as_llama_that_transformers_loads(llama_run, tmp_path, capsys,
                                                            shakespeare_path, scan_layers,
                                                            transformers_lib):
  transformers = transformers_lib[1]
  run = llama_run
  if scan_layers:  # the same model trained in the scan layout
    run = _train(tmp_path / "scan", shakespeare_path, model__scan_layers=True, **LLAMA)
  out = tmp_path / "hf"
  status, stdout, err = _export(capsys, "--workdir", str(run), "--out", str(out))
  assert status == 0, err
  assert "LlamaForCausalLM.from_pretrained" in stdout
  config = json.loads((out / "config.json").read_text())
  assert (config["model_type"], config["num_key_value_heads"], config["hidden_act"]) == (
      "llama", 2, "silu")
  assert isinstance(transformers.AutoModelForCausalLM.from_pretrained(out),
                    transformers.LlamaForCausalLM)
  _same_logits(transformers_lib, run, out)


def test_force_replaces_and_non_empty_is_refused(char_run, tmp_path, capsys):
  out = tmp_path / "hf"
  out.mkdir()
  keep = out / "mine.txt"
  keep.write_text("precious")
  status, _, err = _export(capsys, "--workdir", str(char_run), "--out", str(out))
  assert status == 2 and err.count("\n") == 1
  assert "is not empty (it holds mine.txt); choose a new or empty folder, or pass --force" in err
  assert keep.read_text() == "precious" and os.listdir(out) == ["mine.txt"]
  status, _, err = _export(capsys, "--workdir", str(char_run), "--out", str(out), "--force")
  assert status == 0, err
  assert "mine.txt" not in os.listdir(out) and (out / "model.safetensors").exists()


def test_bad_inputs_are_one_sentence_and_write_nothing(char_run, tmp_path, capsys,
                                                       shakespeare_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  post_ln = _train(tmp_path / "post", shakespeare_path, model__norm_placement="post")
  cases = {
      "out-is-a-file": (["--workdir", str(char_run), "--out", str(a_file)], "is a file"),
      "missing-workdir": (["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                          "does not exist"),
      "post-ln": (["--workdir", str(post_ln), "--out", str(tmp_path / "o")],
                  "needs model.norm_placement='pre' (Hugging Face GPT-2 has no other)"),
      "no-step": (["--workdir", str(char_run), "--out", str(tmp_path / "o"), "--step", "7"],
                  "step 7"),
      "no-out": (["--workdir", str(char_run)], "--out"),
      "the-run-itself": (["--workdir", str(char_run), "--out", str(char_run), "--force"],
                         "would replace the run itself"),
      "above-the-run": (["--workdir", str(char_run), "--out", str(char_run.parent), "--force"],
                        "would replace the run itself"),
  }
  for name, (args, expected) in cases.items():
    status, stdout, err = _export(capsys, *args)
    assert status == 2, name
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (name, err)
  assert not (tmp_path / "o").exists() and a_file.read_text() == "x"
  assert (char_run / "checkpoints").is_dir() and (char_run / "metrics.jsonl").exists()


def test_an_export_never_writes_into_or_deletes_a_run(char_run, tmp_path, capsys):
  """--out inside the run being exported (its checkpoints/, with and without --force, or a new
  folder in it), inside another run, or a folder holding another run with --force: one
  sentence each, and both runs byte for byte as they were (the exported run still samples)."""
  run = tmp_path / "run"  # copies: a build that deletes must not touch the shared run
  shutil.copytree(char_run, run)
  other = tmp_path / "runs" / "other"
  shutil.copytree(char_run, other)
  before = {r: tree_fingerprint(r) for r in (run, other)}
  mine = f"is inside {str(run.resolve())!r}, the workdir of the run being exported; an export " \
         f"never writes into a run's workdir"
  theirs = f"is inside {str(other.resolve())!r}, the workdir of a training run"
  cases = {
      "its-checkpoints-force": ([run / "checkpoints", "--force"], mine),
      "its-checkpoints": ([run / "checkpoints"], mine),
      "a-new-folder-in-it": ([run / "hf"], mine),
      "another-runs-checkpoints": ([other / "checkpoints", "--force"], theirs),
      "holding-another-run": ([tmp_path / "runs", "--force"],
                              f"holds {str(other.resolve())!r}, the workdir of a training run, "
                              f"which --force would delete"),
  }
  for name, (args, expected) in cases.items():
    status, _, err = _export(capsys, "--workdir", str(run), "--out", *map(str, args))
    assert status == 2 and err.count("\n") == 1 and expected in err, (name, err)
    assert {r: tree_fingerprint(r) for r in (run, other)} == before, name
  assert not (run / "hf").exists()
  status, out, err = _sample(capsys, "--workdir", str(run), "--max_new_tokens", "4", "--json")
  assert status == 0, err


def test_of_two_exports_to_one_new_folder_the_later_is_refused(char_run, tmp_path, capsys,
                                                               monkeypatch):
  """Export A (in process) checks --out (absent) and writes; meanwhile export B (a real process)
  exports the same run to the same --out and finishes. A must then fail with a sentence and
  leave B's export as B wrote it."""
  from model import hf as hf_module  # pylint: disable=import-outside-toplevel
  out, real_save, other = tmp_path / "hf", hf_module.save_hf, {}

  def save_while_another_export_finishes(params, cfg, path):
    kind = real_save(params, cfg, path)
    other["process"] = subprocess.run(
        [sys.executable, "-m", "launch.export", "--workdir", str(char_run), "--out", str(out)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    other["files"] = tree_fingerprint(out)
    return kind

  monkeypatch.setattr(hf_module, "save_hf", save_while_another_export_finishes)
  status, stdout, err = _export(capsys, "--workdir", str(char_run), "--out", str(out))
  assert other["process"].returncode == 0, other["process"].stderr
  assert "model.safetensors" in other["files"]
  assert status == 2 and err.count("\n") == 1 and not stdout, err
  assert "changed while this export was being written (another export to the same folder?)" \
      in err, err
  assert tree_fingerprint(out) == other["files"]  # B's export, untouched
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left


def _sample(capsys, *args):
  status = exit_status(sample_cli.main, list(args))
  out = capsys.readouterr()
  return status, out.out, out.err


SAMPLE = ("--prompt", "ROMEO:", "--temperature", "0", "--max_new_tokens", "8", "--no_stop",
          "--json", "--quiet")


@pytest.mark.parametrize("run_name", ["char_run", "llama_run", "bpe_run"])
def test_every_export_reads_back_with_its_own_tokenizer(run_name, request, tmp_path, capsys,
                                                        shakespeare_path):
  """launch.sample and launch.eval --init_from the export give the run's greedy tokens and
  loss: a character GPT-2 and a character Llama (flaxgpt_tokenizer.json), a GPT-2 BPE run."""
  run = request.getfixturevalue(run_name)
  out = tmp_path / "hf"
  status, _, err = _export(capsys, "--workdir", str(run), "--out", str(out))
  assert status == 0, err
  results = []
  for source in (["--workdir", str(run)], ["--init_from", str(out)]):
    status, stdout, err = _sample(capsys, *source, *SAMPLE)
    assert status == 0, err
    results.append(json.loads(stdout))
  assert results[0]["token_ids"] == results[1]["token_ids"] and results[0]["completion"] == (
      results[1]["completion"])
  held_out = tmp_path / "held_out.txt"
  held_out.write_text(shakespeare_path.read_text()[-800:])
  losses = []
  for source in (["--workdir", str(run)], ["--init_from", str(out)]):
    status = exit_status(eval_cli.main, [*source, "--data", f"text:{held_out}", "--json",
                                         "--quiet"])
    stdout, err = capsys.readouterr()
    assert status == 0, err
    losses.append(json.loads(stdout))
  assert losses[0]["tokens"] == losses[1]["tokens"]
  assert rel_err(losses[1]["loss"], losses[0]["loss"]) < 1e-5


def _interrupt_export(args, when_exists, tmp_path):
  """`python -m launch.export args`, sent SIGINT as soon as a path `when_exists` (a glob in
  tmp_path) appears: (returncode, stderr)."""
  proc = subprocess.Popen([sys.executable, "-m", "launch.export", *args], cwd=REPO,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 240
  while not list(tmp_path.glob(when_exists)) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=120)
  return proc.returncode, stderr


@pytest.mark.slow
def test_ctrl_c_during_an_export_writes_nothing_and_a_rerun_exports(bpe_run, tmp_path, capsys):
  """SIGINT while a real export writes (its temporary folder exists; GPT-2's tokenizer files
  take seconds to make): exit 130, one line, no traceback; a new --out is not created and an
  earlier export --force was replacing is byte for byte as it was; a rerun exports in full."""
  new, earlier = tmp_path / "new", tmp_path / "earlier"
  status, _, err = _export(capsys, "--workdir", str(bpe_run), "--out", str(earlier))
  assert status == 0, err
  before = tree_fingerprint(earlier)
  for out, force in ((new, []), (earlier, ["--force"])):
    returncode, stderr = _interrupt_export(
        ["--workdir", str(bpe_run), "--out", str(out), *force], f"{out.name}.export-tmp-*",
        tmp_path)
    assert returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted; nothing written; --out is as it was"]
    assert not new.exists() and tree_fingerprint(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]  # nothing half-written
  status, stdout, err = _export(capsys, "--workdir", str(bpe_run), "--out", str(new))
  assert status == 0 and stdout.startswith(f"wrote {new}"), err
  assert tree_fingerprint(new) == before  # the same export, whole
