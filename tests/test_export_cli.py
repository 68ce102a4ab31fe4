"""python -m launch.export: a trained run becomes a Hugging Face GPT-2 (or, for a Llama-style
run, Llama) checkpoint that transformers loads with the same logits (character and GPT-2 BPE
runs, biases or none, either layer layout, a padded vocabulary); a non-empty folder is refused
and nothing is overwritten."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import built_once, exit_status, rel_err, tiny_run_config
from launch import export as export_cli
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
