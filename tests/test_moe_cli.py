"""A mixture of experts through the command-line tools: configs/moe_shakespeare.py:cpu trains
(the losses and each expert's load logged), `launch.plot --metric moe_load` draws the load,
the run is exported (MixtralForCausalLM: the same logits), evaluated as transformers scores it,
sampled as generate does and fine-tuned from; bad input is one sentence and exit status 2."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, exit_status, hf_window_loss
from launch import eval as eval_cli
from launch import export as export_cli
from launch import plot as plot_cli
from launch import sample as sample_cli
from launch import train as train_cli
from model.decode.sampling import generate
from model.families import build
from model.tokenizer import tokenizer_from_dict
from training.metrics import read_metrics
from training.weights import load_weights


def _train_args(workdir, shakespeare_path, *extra):
  return ["--config", "configs/moe_shakespeare.py:cpu", "--workdir", str(workdir),
          f"--config.data.path={shakespeare_path}", "--config.eval.every=0", "--quiet",
          "--config.train.steps=4", "--config.train.batch_size=8", "--config.log.every=1",
          "--config.checkpoint.every=4", *extra]


@pytest.mark.slow
def test_moe_shakespeare_trains_plots_exports_evaluates_samples_and_fine_tunes(
    tmp_path, capsys, shakespeare_path):
  run, ft = tmp_path / "run", tmp_path / "ft"
  assert exit_status(train_cli.main, _train_args(run, shakespeare_path,
                                                 "--config.mesh.expert=4")) == 0, (
      capsys.readouterr().err)
  model = json.loads((run / "config.json").read_text())["model"]
  assert (model["num_experts"], model["num_experts_per_tok"], model["expert_d_mlp"]) == (8, 2, 192)
  rows = read_metrics(run)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    assert len(r["moe_load"]) == 8 and abs(sum(r["moe_load"]) - 1) < 1e-5
    assert r["moe_aux_loss"] >= 1.0 and r["moe_dropped"] == 0.0 and r["loss"] > 0

  image = tmp_path / "load.png"
  capsys.readouterr()
  assert exit_status(plot_cli.main, [str(run), "--metric", "moe_load", "--out",
                                     str(image)]) == 0
  assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  w = load_weights(run)
  tok = tokenizer_from_dict(w.tokenizer)
  capsys.readouterr()
  assert exit_status(sample_cli.main, ["--workdir", str(run), "--prompt", "ROMEO:",
                                       "--temperature", "0", "--max_new_tokens", "16"]) == 0
  want = generate(w.params, w.cfg, [tok.encode("ROMEO:")], max_new_tokens=16, temperature=0.0)
  assert tok.decode(want.tokens[0]) in capsys.readouterr().out

  # fine-tuning from the run: its shape (experts) from its weights, whatever the config says
  assert exit_status(train_cli.main, [
      "--config", "configs/llama_shakespeare.py:cpu", "--workdir", str(ft),
      f"--config.data.path={shakespeare_path}", f"--config.init_from={run}",
      "--config.eval.every=0", "--quiet", "--config.train.steps=2",
      "--config.train.batch_size=8", "--config.checkpoint.every=2"]) == 0
  assert json.loads((ft / "config.json").read_text())["model"]["num_experts"] == 8

  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_dir = tmp_path / "hf"
  assert exit_status(export_cli.main, ["--workdir", str(ft), "--out", str(hf_dir)]) == 0
  assert "MixtralForCausalLM" in capsys.readouterr().out
  exported = transformers.MixtralForCausalLM.from_pretrained(hf_dir).eval()
  tokens = np.random.default_rng(0).integers(0, 65, (2, 64))
  with torch.no_grad():
    theirs = exported(torch.from_numpy(tokens)).logits.numpy()
  fw = load_weights(ft)
  ours = np.asarray(build(fw.cfg).apply({"params": fw.params}, jnp.asarray(tokens)))
  np.testing.assert_allclose(ours[..., :65], theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
  held_out = tmp_path / "held_out.txt"
  held_out.write_text(shakespeare_path.read_text()[-1500:])
  capsys.readouterr()
  assert exit_status(eval_cli.main, ["--workdir", str(ft), "--data", f"text:{held_out}",
                                     "--json", "--quiet"]) == 0
  result = json.loads(capsys.readouterr().out)
  ids = np.asarray(tok.encode(held_out.read_text()), np.int64)
  hf_loss, count = hf_window_loss(exported, ids, 64, 64)
  assert result["tokens"] == count
  np.testing.assert_allclose(result["loss"], hf_loss, rtol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--config.model.num_experts_per_tok=9"],
     "error: config.model.num_experts_per_tok (9) must be between 1 and num_experts (8): each "
     "token goes to that many different experts."),
    (["--config.mesh.expert=4", "--config.model.num_experts=6"],
     "error: config.mesh.expert (4) must divide model.num_experts (6): each device holds the "
     "same number of experts."),
    (["--config.model.moe_layers=every:x"],
     "error: config.model.moe_layers must be 'all', 'every:K' (K >= 1) or a comma-separated "
     "list of layer indices below num_layers (4), got 'every:x'."),
])
def test_bad_moe_settings_are_one_sentence_and_exit_2(tmp_path, capsys, shakespeare_path, extra,
                                                      message):
  capsys.readouterr()
  assert exit_status(train_cli.main, _train_args(tmp_path / "run", shakespeare_path,
                                                 *extra)) == 2
  err = capsys.readouterr().err.strip().splitlines()  # (a first run tokenizes, with progress)
  assert err[-1] == message and sum(line.startswith("error") for line in err) == 1, err
  assert not (tmp_path / "run").exists()


def test_a_checkpoint_with_deepseeks_router_is_one_sentence(tmp_path, capsys):
  ckpt = tmp_path / "deepseek"
  shutil.copytree(REPO / "tests" / "fixtures" / "hf_mixtral", ckpt)
  config = json.loads((ckpt / "config.json").read_text())
  config.update(model_type="deepseek_v3", n_group=8, topk_group=4, n_routed_experts=4)
  (ckpt / "config.json").write_text(json.dumps(config))
  capsys.readouterr()
  assert exit_status(sample_cli.main, ["--init_from", str(ckpt), "--prompt", "To be"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and (
      "model_type 'deepseek_v3' routes its experts with DeepSeek-V3's group-limited top-k"
      in err[0]) and "not implemented here" in err[0], err
