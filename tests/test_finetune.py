"""Fine-tuning (config.init_from): a new run starts from Hugging Face or earlier weights, with
a new optimizer state at step 0; its first loss is the loss of those weights on its first batch;
weights that do not fit the config are one sentence before anything is written."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exit_status, rel_err, tiny_run_config
from launch import train as train_cli
from model.pretrained import load_hf_gpt2
from model.transformer import GPT
from training.checkpoint import read_run_meta
from training.loop import train
from training.metrics import read_metrics
from training.run import build_run
from training.step import cross_entropy
from training.weights import load_weights

HF_DIR = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_gpt2_tiny"  # V 96, P 32


def _config(shakespeare_path, **changes):
  c = tiny_run_config(shakespeare_path, train__steps=2, train__batch_size=8, log__every=1,
                      eval__every=0, checkpoint__every=100, **changes)
  return c


def _hf_shaped(c, block_size=16, **model):
  """The fixture's architecture, block 16 (of its 32 positions), vocabulary padded to 128."""
  for name, value in dict(vocab_size=96, padded_vocab_size=128, num_layers=2, num_heads=4,
                          d_model=16, block_size=block_size, embd_dropout=0.0,
                          attn_dropout=0.0, resid_dropout=0.0, **model).items():
    c.model[name] = value
  return c


def _loss(cfg, params, batch):
  logits = GPT(cfg).apply({"params": params}, jnp.asarray(batch[:, :-1]))
  return float(cross_entropy(logits, jnp.asarray(batch[:, 1:])))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_first_loss_is_the_pretrained_models_loss_on_the_first_batch(tmp_path, shakespeare_path,
                                                                     scan_layers):
  c = _hf_shaped(_config(shakespeare_path), scan_layers=scan_layers)
  c.init_from = str(HF_DIR)
  summary = train(c, str(tmp_path), quiet=True)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2] and summary["step"] == 2

  run = build_run(c)  # the same batches, no workdir
  batch = run.source.get_batch("train", 0)
  cfg, params = load_hf_gpt2(HF_DIR, block_size=16)
  assert rel_err(rows[0]["loss"], _loss(cfg, params, batch)) < 1e-5
  assert rows[1]["loss"] != rows[0]["loss"]  # it trained
  step, meta = read_run_meta(tmp_path)
  assert step == 2 and meta["config"]["init_from"] == str(HF_DIR)


def test_init_from_an_earlier_run_and_resume_ignores_it(tmp_path, shakespeare_path):
  first = _config(shakespeare_path)
  train(first, str(tmp_path / "a"), quiet=True)
  second = _config(shakespeare_path, train__seed=7, optimizer__lr=1e-3)
  second.init_from = str(tmp_path / "a")
  train(second, str(tmp_path / "b"), quiet=True)
  rows = read_metrics(tmp_path / "b")
  w = load_weights(tmp_path / "a")
  batch = build_run(second).source.get_batch("train", 0)
  assert rel_err(rows[0]["loss"], _loss(w.cfg, w.params, batch)) < 1e-5
  # Rerun with more steps: it resumes from its own checkpoint, even with init_from gone.
  (tmp_path / "a" / "checkpoints").rename(tmp_path / "a-moved")
  second.train.steps = 3
  summary = train(second, str(tmp_path / "b"), quiet=True)
  assert summary["step"] == 3 and [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]


BAD = {
    "missing": (["--config.init_from={tmp}/nowhere"], "{tmp}/nowhere"),
    "clash": (["--config.init_from=" + str(HF_DIR), "--config.model.vocab_size=96",
               "--config.model.num_layers=2", "--config.model.d_model=32",
               "--config.model.num_heads=4"],
              "does not fit the config: model.d_model is 32 here and 16 in"),
    "vocab": (["--config.init_from=" + str(HF_DIR)],
              "model.vocab_size is 65 here and 96 in"),
    "long-block": (["--config.init_from=" + str(HF_DIR), "--config.model.vocab_size=96",
                    "--config.model.num_layers=2", "--config.model.d_model=16",
                    "--config.model.num_heads=4", "--config.model.block_size=64"],
                   "model.block_size 64 is more than the 32 positions"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_init_from_is_one_sentence_and_writes_nothing(case, tmp_path, capsys,
                                                          shakespeare_path):
  args, expected = BAD[case]
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  workdir = tmp_path / "run"
  status = exit_status(train_cli.main, [
      "--config", "configs/tiny.py", "--workdir", str(workdir),
      f"--config.data.path={shakespeare_path}", *args])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
  assert expected.replace("{tmp}", str(tmp_path)) in err[0]
  assert not workdir.exists()
