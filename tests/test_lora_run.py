"""LoRA runs (config.train.lora): exact resume, checkpoints that hold the adapters and name
their base, a different base refused, and the bad inputs as one sentence with nothing written."""

import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import built_once, copy_of, exit_status
from launch import export as export_cli
from launch import train as train_cli
from model import lora
from training.metrics import read_metrics
from training.weights import load_weights

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
GPT2_BASE = FIXTURES / "hf_gpt2_tiny"  # 2 layers of width 16, 96 tokens, 32 positions
# A LoRA run of GPT-2's fixture on tiny shakespeare characters: parts of the fused c_attn (q, v)
# and whole kernels (o, the MLP's c_fc) at a constant learning rate, checkpoints at 2 and 4.
LORA_ARGS = ("--config", "configs/tiny.py", "--config.model.block_size=16",
             "--config.train.lora.rank=4", "--config.train.lora.alpha=8",
             "--config.train.lora.targets=q,v,o,c_fc", "--config.optimizer.lr=1e-2",
             "--config.optimizer.min_lr=1e-2",
             "--config.optimizer.warmup_steps=0", "--config.eval.every=0",
             "--config.checkpoint.every=2", "--config.log.every=1", "--quiet")


def _train(workdir, steps, base=GPT2_BASE, *extra):
  return exit_status(train_cli.main, [*LORA_ARGS, "--workdir", str(workdir),
                                      f"--config.init_from={base}",
                                      f"--config.train.steps={steps}", *extra])


@pytest.fixture(scope="session")
def lora_run():
  """A 4-step LoRA run of GPT-2's fixture, made once."""
  def build(workdir):
    assert _train(workdir, 4) == 0
  return built_once("lora_run", build)


def test_lora_run_resumes_exactly_and_saves_only_adapters(lora_run, tmp_path):
  """2 steps, then rerun to 4: the same losses and bit-identical adapters as 4 steps at once;
  the checkpoints hold the adapters (no base kernel) and name the base by its fingerprint; the
  base of the run (read back with them) is the fixture's, untouched."""
  resumed = tmp_path / "resumed"
  assert _train(resumed, 2) == 0
  assert _train(resumed, 4) == 0
  assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(lora_run)]
  a, b = load_weights(lora_run), load_weights(resumed)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)
  assert a.cfg.lora_rank == 4 and a.cfg.lora_targets == "q,v,o,c_fc"
  state = json.loads((lora_run / "checkpoints" / "4" / "state" / "_METADATA").read_text())
  names = json.dumps(state)
  assert "lora_a_q" in names and "lora_b" in names and "kernel" not in names
  meta = json.loads((lora_run / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["lora_base"]["init_from"] == str(GPT2_BASE)
  assert len(meta["lora_base"]["fingerprint"]) == 16
  fixture = load_file(GPT2_BASE / "model.safetensors")
  adapters, base = lora.split_adapters(jax.device_get(a.params))
  np.testing.assert_array_equal(base["h_1"]["mlp"]["c_fc"]["kernel"],
                                fixture["transformer.h.1.mlp.c_fc.weight"])
  assert np.any(adapters["h_1"]["attn"]["c_attn"]["lora_b_v"] != 0)


def test_adapters_on_another_base_are_refused(lora_run, other_base, tmp_path, capsys):
  """Resuming on another base, or exporting the run when its base changed: one sentence that
  names both, exit 2, the run's checkpoints as they were, nothing exported."""
  run = copy_of(lora_run, tmp_path)
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  capsys.readouterr()
  assert _train(run, 6, other_base) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "holds LoRA adapters for another base" in err[0], err
  assert str(GPT2_BASE) in err[0] and str(other_base) in err[0]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
  meta = run / "checkpoints" / "4" / "meta" / "metadata"
  saved = json.loads(meta.read_text())
  saved["lora_base"]["init_from"] = str(other_base)
  meta.write_text(json.dumps(saved))
  out = tmp_path / "export"
  assert exit_status(export_cli.main, ["--workdir", str(run), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "holds LoRA adapters for another base" in err[0], err
  assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--config.train.lora.rank=0"], "config.train.lora.rank must be a positive whole number "
                                     "(the adapters' rank), got 0"),
    (["--config.train.lora.rank=17"], "config.train.lora.rank (17) is larger than the "
                                      "attn/c_attn matrix (16 x 16 per part) allows: at most 16"),
    (["--config.train.lora.targets=q,gate"], "'gate' matches no projection of this model; its "
                                             "projections are q, k, v, o, up, down"),
    (["--config.train.lora.targets=c_kv"], "'c_kv' matches no projection"),
    (["--config.init_from="], "config.train.lora.rank=4 trains adapters on existing weights: "
                              "set config.init_from"),
])
def test_bad_lora_settings_are_one_sentence_and_nothing_is_written(tmp_path, capsys, args,
                                                                   expected):
  workdir = tmp_path / "run"
  status = exit_status(train_cli.main, [*LORA_ARGS, "--workdir", str(workdir),
                                        f"--config.init_from={GPT2_BASE}", *args])
  err = [line for line in capsys.readouterr().err.strip().splitlines()
         if not line.startswith("tokenizing ")]  # the data cache's progress, on first use
  assert status == 2
  assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
  assert not workdir.exists()
