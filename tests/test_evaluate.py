"""training/evaluate.py: the window rule, equality with transformers' loss for the same weights
and windows (stride = block and stride < block) on 8 devices, and with the training loop's own
val loss for the loop's windows."""

import math

import numpy as np
import pytest

from conftest import hf_window_loss, rel_err, tiny_run_config
from sharding import make_mesh
from training import evaluate as ev
from training.data import make_source
from training.loop import train
from training.metrics import read_metrics
from training.weights import load_weights


def test_plan_scores_every_target_once():
  for n, T, S in [(17, 16, 16), (100, 16, 16), (100, 16, 5), (100, 16, 1), (33, 16, 16),
                  (50, 8, 3)]:
    windows = ev.plan_windows(n, block_size=T, stride=S)
    targets = [w.start + t + 1 for w in windows for t in range(w.first_scored, w.length)]
    assert targets == list(range(1, n)), (n, T, S)
    assert all(1 <= w.length <= T for w in windows)
    for w in windows[1:]:  # after the first window: at least T - S + 1 tokens of context
      assert w.first_scored + 1 >= T - S + 1 or w.first_scored == 0
  assert [(w.start, w.length, w.first_scored) for w in ev.plan_windows(40, block_size=16,
                                                                       stride=16)] == [
      (0, 16, 0), (16, 16, 0), (32, 7, 0)]
  assert [(w.start, w.length, w.first_scored) for w in ev.plan_windows(30, block_size=16,
                                                                       stride=8)] == [
      (0, 16, 0), (8, 16, 8), (16, 13, 8)]
  with pytest.raises(ValueError, match="16 tokens, fewer than one window of the model's "
                                       "block_size \\+ 1 = 17"):
    ev.plan_windows(16, block_size=16)
  with pytest.raises(ValueError, match=r"--stride must be an integer in \[1, block_size = 16\]"):
    ev.plan_windows(100, block_size=16, stride=17)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2,
                                   n_head=4, layer_norm_epsilon=1e-4, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # non-default layer-norm parameters
    for name, p in model.named_parameters():
      if "ln" in name:
        p.add_(0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("hf") / "gpt2"
  model.save_pretrained(path)
  return model, path


@pytest.mark.parametrize("stride", [16, 5])
def test_equals_transformers_for_the_same_windows(hf_model, stride):
  model, path = hf_model
  ids = np.random.default_rng(1).integers(0, 96, 150).astype(np.int64)
  mesh = make_mesh(-1, 1, 1)  # 8 devices, data parallel
  w = load_weights(path, mesh=mesh)
  result = ev.evaluate(w.params, w.cfg, ids, mesh=mesh, stride=stride, batch_size=3,
                       num_bytes=149, quiet=True)
  expected, count = hf_window_loss(model, ids, 16, stride)
  assert result.tokens == count == 149
  assert rel_err(result.loss, expected) < 1e-5
  assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
  assert result.bits_per_byte == pytest.approx(result.loss * 149 / math.log(2) / 149)


def test_equals_the_training_loops_val_loss_for_its_windows(tmp_path, shakespeare_path):
  c = tiny_run_config(shakespeare_path, train__steps=4, eval__every=4, eval__batches=2,
                      log__every=1, checkpoint__every=100)
  train(c, str(tmp_path), quiet=True)
  val_loss = read_metrics(tmp_path)[-1]["val_loss"]
  source = make_source(c.data, seq_len=c.model.block_size, global_batch_size=c.train.batch_size,
                       seed=c.train.seed)
  rows = np.concatenate([source.get_batch("val", i) for i in range(2)])  # the loop's windows
  T = c.model.block_size
  windows = [ev.Window(start=r * (T + 1), length=T, first_scored=0) for r in range(len(rows))]
  mesh = make_mesh(-1, 1, 1)
  w = load_weights(tmp_path, mesh=mesh)
  nats, count = ev.score(w.params, w.cfg, rows.reshape(-1), windows, mesh=mesh, quiet=True)
  assert count == len(rows) * T
  assert rel_err(nats / count, val_loss) < 1e-5
