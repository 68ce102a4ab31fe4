"""DPO runs without LoRA (training/dpo.py, training/adapters.py: REFERENCE): the reference is a
frozen copy of the starting weights, never trained nor saved; the run evaluates its starting
point (eval.at_start: TRL's reward accuracy 0, ours 0.5, the loss log 2), resumes exactly, and
refuses to resume on other weights."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import built_once, copy_of, exit_status
from launch import train as train_cli
from model import lora
from training.metrics import read_metrics
from training.weights import load_weights

BASE = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_gpt2_tiny"
PAIRS = [("Hi\n", "yes there\n", "there yes\n"), ("Ok\n", "go on\n", "on go\n"),
         ("A\n", "b c d\n", "d c b\n"), ("So\n", "it is\n", "is it\n")] * 3


def _pairs_file(folder: pathlib.Path) -> pathlib.Path:
  path = folder / "pairs.jsonl"
  path.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), p))) + "\n"
                          for p in PAIRS))
  return path


def _train(workdir, steps, data, base=BASE):
  """A full fine-tune DPO run of GPT-2's fixture at a constant learning rate: checkpoints at
  2 and 4, the val pairs evaluated at steps 0, 2 and 4."""
  return exit_status(train_cli.main, [
      "--config", "configs/tiny.py", "--workdir", str(workdir), "--quiet",
      f"--config.init_from={base}", "--config.data.task=preference",
      "--config.data.source=jsonl", f"--config.data.path={data}",
      "--config.data.val_fraction=0.25", "--config.model.block_size=32",
      f"--config.train.steps={steps}", "--config.optimizer.lr=1e-2",
      "--config.optimizer.min_lr=1e-2", "--config.optimizer.warmup_steps=0",
      "--config.checkpoint.every=2", "--config.log.every=1", "--config.eval.every=2",
      "--config.eval.at_start=True"])


@pytest.fixture(scope="session")
def dpo_run():
  """A 4-step DPO run without LoRA, made once."""
  def build(workdir):
    workdir.mkdir(parents=True)
    assert _train(workdir / "run", 4, _pairs_file(workdir)) == 0
  return built_once("dpo_full_run", build)


def test_dpo_without_lora_moves_away_from_a_frozen_copy_of_its_start(dpo_run):
  """Step 0 (before any update) is the reference itself: loss log 2, every reward 0, our reward
  accuracy 0.5 and TRL's 0; after 4 steps the policy has moved from it (positive margins) while
  the reference stayed the fixture's weights (they are what the checkpoints are checked
  against); the checkpoints hold the model alone, every weight trained, and name the weights
  the reference is a copy of."""
  run = dpo_run / "run"
  rows = read_metrics(run)
  start = rows[0]
  assert start["step"] == 0 and "loss" not in start
  assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-7)
  assert start["val_rewards/margins"] == 0 and start["val_rewards/accuracies"] == 0
  assert start["val_accuracy/reward"] == 0.5
  assert 0 < start["val_accuracy/logp"] < 1  # the fixture's own preference, not a tie
  assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts there
  end = [r for r in rows if r["step"] == 4 and "val_loss" in r][-1]
  assert end["val_rewards/margins"] > 0.1 and end["val_loss"] < 0.6
  meta = json.loads((run / "checkpoints" / "4" / "meta" / "metadata").read_text())
  assert meta["dpo_reference"]["init_from"] == str(BASE)
  assert "reference" not in (run / "checkpoints" / "4" / "state" / "_METADATA").read_text()
  trained = jax.device_get(load_weights(run).params)
  assert not lora.has_adapters(trained) and "reference" not in trained
  fixture = load_file(BASE / "model.safetensors")
  assert np.any(trained["h_1"]["mlp"]["c_fc"]["kernel"]
                != fixture["transformer.h.1.mlp.c_fc.weight"])


def test_dpo_run_resumes_exactly_and_refuses_another_reference(dpo_run, other_base, tmp_path,
                                                               capsys):
  """The run's checkpoint of step 4 removed, rerunning to 4 resumes from step 2 (the reference
  re-read from init_from): the same losses and bit-identical weights as 4 steps at once. On
  other weights of the same shape: one sentence naming both, exit 2, the checkpoints kept."""
  resumed = copy_of(dpo_run, tmp_path) / "run"
  for path in (resumed / "checkpoints").glob("4*"):
    path.rename(tmp_path / path.name)
  capsys.readouterr()
  assert _train(resumed, 6, resumed.parent / "pairs.jsonl", other_base) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "holds a DPO run against another reference" in err[0], err
  assert str(BASE) in err[0] and str(other_base) in err[0]
  assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2"]
  assert _train(resumed, 4, resumed.parent / "pairs.jsonl") == 0
  expected = read_metrics(dpo_run / "run")
  assert [r.get("loss") for r in read_metrics(resumed)] == [r.get("loss") for r in expected]
  jax.tree_util.tree_map(np.testing.assert_array_equal, load_weights(resumed).params,
                         load_weights(dpo_run / "run").params)
