"""Fine-tuning (config.init_from): a new run starts from Hugging Face or earlier weights, with
a new optimizer state at step 0, and the weights give the model's shape (the config file's
shapes are replaced; what only changes how it runs, a shorter context and a padded vocabulary
stay the config's); its first loss is the loss of those weights on its first batch; a shape
the command line sets that the weights fix otherwise, or data they cannot read, is one
sentence before anything is written."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exit_status, hf_window_loss, rel_err, tiny_run_config
from launch import eval as eval_cli
from launch import export as export_cli
from launch import train as train_cli
from model.hf import load_hf_gpt2
from model.tokenizer import get_tokenizer
from model.gpt import GPT
from training.checkpoint import read_run_meta
from training.data import make_source
from training.loop import train
from training.metrics import read_metrics
from training.run import build_run
from training.step import cross_entropy
from training.weights import load_weights

HF_DIR = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf_gpt2_tiny"  # V 96, P 32


def _config(shakespeare_path, **changes):
  """tiny_run_config for 2 steps of batch 8, logged every step, no eval, saved at the end;
  section__key=value `changes` over those."""
  settings = dict(train__steps=2, train__batch_size=8, log__every=1, eval__every=0,
                  checkpoint__every=100)
  return tiny_run_config(shakespeare_path, **{**settings, **changes})


def _loss(cfg, params, batch):
  logits = GPT(cfg).apply({"params": params}, jnp.asarray(batch[:, :-1]))
  return float(cross_entropy(logits, jnp.asarray(batch[:, 1:])))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_first_loss_is_the_pretrained_models_loss_on_the_first_batch(tmp_path, shakespeare_path,
                                                                     scan_layers):
  """configs/tiny.py (2 layers of width 64, 4 heads) starting from the fixture (2 layers of
  width 16): the fixture's shape; the config's block_size 16 (of its 32 positions), padded
  vocabulary and layer layout."""
  c = _config(shakespeare_path)
  c.model.block_size, c.model.padded_vocab_size, c.model.scan_layers = 16, 128, scan_layers
  c.init_from = str(HF_DIR)
  summary = train(c, str(tmp_path), quiet=True)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2] and summary["step"] == 2
  saved = json.loads((tmp_path / "config.json").read_text())["model"]
  assert (saved["num_layers"], saved["d_model"], saved["num_heads"], saved["vocab_size"],
          saved["padded_vocab_size"], saved["block_size"], saved["scan_layers"]) == (
              2, 16, 4, 96, 128, 16, scan_layers)  # the model it trained

  run = build_run(c)  # the same batches, no workdir
  batch = run.source.get_batch("train", 0)
  cfg, params = load_hf_gpt2(HF_DIR, block_size=16)
  before = _loss(cfg, params, batch)
  assert rel_err(rows[0]["loss"], before) < 1e-5
  step, meta = read_run_meta(tmp_path)
  assert step == 2 and meta["config"]["init_from"] == str(HF_DIR)
  trained = load_weights(tmp_path)  # it trained: a lower loss on the same first batch
  assert _loss(trained.cfg, trained.params, batch) < before - 1e-4


def test_init_from_an_earlier_run_and_resume_ignores_it(tmp_path, shakespeare_path):
  first = _config(shakespeare_path)
  train(first, str(tmp_path / "a"), quiet=True)
  second = _config(shakespeare_path, train__seed=7, optimizer__lr=2e-3)
  assert (second.train.seed, second.optimizer.lr) == (7, 2e-3)  # the overrides hold
  second.init_from = str(tmp_path / "a")
  train(second, str(tmp_path / "b"), quiet=True)
  rows = read_metrics(tmp_path / "b")
  w = load_weights(tmp_path / "a")
  batch = build_run(second).source.get_batch("train", 0)
  assert not np.array_equal(batch, build_run(first).source.get_batch("train", 0))  # seed 7's
  assert rel_err(rows[0]["loss"], _loss(w.cfg, w.params, batch)) < 1e-5
  assert rows[0]["lr"] == pytest.approx(2e-3 / 6, rel=1e-6)  # warm-up step 0 of 5, lr 2e-3
  # Rerun with more steps: it resumes from its own checkpoint, even with init_from gone.
  (tmp_path / "a" / "checkpoints").rename(tmp_path / "a-moved")
  second.train.steps = 3
  summary = train(second, str(tmp_path / "b"), quiet=True)
  assert summary["step"] == 3 and [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]


@pytest.fixture(scope="module")
def other_characters(tmp_path_factory, shakespeare_path):
  """A one-step run on another character table (the first 20,000 characters of tiny
  shakespeare, 'z' made 'Z')."""
  root = tmp_path_factory.mktemp("other_chars")
  text = root / "other.txt"
  text.write_text(shakespeare_path.read_text()[:20_000].replace("z", "Z"))
  c = _config(text, train__steps=1)
  c.model.vocab_size = 65  # the run's shape; the data has fewer characters
  summary = train(c, str(root / "run"), quiet=True)
  assert summary["step"] == 1
  return root / "run"


BAD = {
    "missing": (["--config.init_from={tmp}/nowhere"], "{tmp}/nowhere"),
    "clash": (["--config.init_from=" + str(HF_DIR), "--config.model.d_model=32"],
              f"--config.model.d_model=32 does not fit config.init_from='{HF_DIR}': its weights "
              "make model.d_model 16; leave the flag out"),
    "num-layers": (["--config.init_from=" + str(HF_DIR), "--config.model.num_layers=12"],
                   "--config.model.num_layers=12 does not fit config.init_from="),
    "vocab": (["--config.init_from=" + str(HF_DIR), "--config.data.tokenizer=gpt2"],
              f"config.init_from='{HF_DIR}' has a vocabulary of 96 tokens, fewer than the "
              "data's 50,257 (gpt2 tokens)"),
    "long-block": (["--config.init_from=" + str(HF_DIR), "--config.model.block_size=64"],
                   "--config.model.block_size=64 does not fit config.init_from="
                   f"'{HF_DIR}': its weights make model.block_size at most its 32 positions"),
    "char-table": (["--config.init_from={other}"], "characters there, 65 here; only here: "),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_init_from_is_one_sentence_and_writes_nothing(case, tmp_path, capsys,
                                                          shakespeare_path, request):
  args, expected = BAD[case]
  other = request.getfixturevalue("other_characters") if case == "char-table" else ""
  capsys.readouterr()  # what making the fixture printed
  fill = lambda a: a.replace("{tmp}", str(tmp_path)).replace("{other}", str(other))
  workdir = tmp_path / "run"
  status = exit_status(train_cli.main, [
      "--config", "configs/tiny.py", "--workdir", str(workdir),
      f"--config.data.path={shakespeare_path}", *map(fill, args)])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2
  assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
  assert fill(expected) in err[0], err[0]
  if case == "char-table":
    assert "was trained on another character table than the data here has (" in err[0]
  assert not workdir.exists()


@pytest.mark.slow
def test_finetune_config_takes_any_gpt2_shape_from_its_weights(tmp_path, capsys,
                                                               shakespeare_path):
  """configs/finetune_shakespeare.py from a transformers-saved GPT-2 of a shape no preset has
  (3 layers of width 48, 6 heads, MLP 80, 128 positions), nothing about its shape on the
  command line: the first logged loss is transformers' loss on that batch; the exported run
  gives transformers the run's logits; launch.eval on the run equals transformers' loss on the
  export; config.json records the model trained; a clashing --config.model.num_layers is one
  sentence."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=48, n_layer=3,
                                      n_head=6, n_inner=80, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, initializer_range=0.1)
  weights = tmp_path / "small_gpt2"
  transformers.GPT2LMHeadModel(hf_config).save_pretrained(weights)
  capsys.readouterr()  # transformers' progress bar
  workdir = tmp_path / "ft"
  args = ["--config", "configs/finetune_shakespeare.py", "--workdir", str(workdir),
          f"--config.init_from={weights}", f"--config.data.path={shakespeare_path}",
          "--config.train.steps=2", "--config.train.batch_size=8",
          "--config.train.grad_accum=1", "--config.eval.every=0",
          "--config.checkpoint.every=2", "--config.model.dtype=float32",
          "--config.model.block_size=64", "--quiet"]
  assert exit_status(train_cli.main, [*args, "--config.model.num_layers=12"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      "error: --config.model.num_layers=12 does not fit config.init_from=") and (
          "its weights make model.num_layers 3" in err[0]), err
  assert not workdir.exists()

  assert exit_status(train_cli.main, args) == 0, capsys.readouterr().err
  saved = json.loads((workdir / "config.json").read_text())["model"]
  assert (saved["num_layers"], saved["d_model"], saved["num_heads"], saved["d_mlp"],
          saved["vocab_size"], saved["padded_vocab_size"], saved["block_size"]) == (
              3, 48, 6, 80, 50257, 50304, 64)
  # The first logged loss: transformers' loss on the first batch.
  c = json.loads((workdir / "config.json").read_text())
  data = make_source(build_run(train_cli.cli.check_config(
      "configs/finetune_shakespeare.py", [f"--config.data.path={shakespeare_path}"])).config.data,
      seq_len=64, global_batch_size=8, seed=c["train"]["seed"])
  batch = torch.from_numpy(data.get_batch("train", 0)).long()
  hf_model = transformers.GPT2LMHeadModel.from_pretrained(weights).eval()
  with torch.no_grad():
    hf_loss = float(hf_model(batch, labels=batch).loss)
  assert rel_err(read_metrics(workdir)[0]["loss"], hf_loss) < 1e-5

  # Export -> transformers: the run's logits.
  out = tmp_path / "exported"
  assert exit_status(export_cli.main, ["--workdir", str(workdir), "--out", str(out)]) == 0
  exported = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  w = load_weights(workdir)
  tokens = np.random.default_rng(0).integers(0, 50257, (2, 40))
  ours = GPT(w.cfg).apply({"params": w.params}, jnp.asarray(tokens))[..., :50257]
  with torch.no_grad():
    theirs = exported(torch.from_numpy(tokens)).logits.numpy()
  assert rel_err(ours, theirs) < 1e-5  # float32 (measured 5e-7)

  # launch.eval on the run: transformers' loss of the export on the same windows.
  held_out = tmp_path / "held_out.txt"
  held_out.write_text(shakespeare_path.read_text()[-2000:])
  capsys.readouterr()
  assert exit_status(eval_cli.main, ["--workdir", str(workdir), "--data", f"text:{held_out}",
                                     "--json", "--quiet"]) == 0
  result = json.loads(capsys.readouterr().out)
  ids = np.asarray(get_tokenizer("gpt2").encode(held_out.read_text()), np.int64)
  expected, count = hf_window_loss(exported, ids, 64, 64)
  assert result["tokens"] == count and rel_err(result["loss"], expected) < 1e-5
