"""Training core at the step level: optimizer, schedule, accumulation, meshes, FLOPs, NaN stop."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import base_config
from model.config import get_config
from sharding import make_mesh, shard_batch
from training import flops
from training.checkpoint import Checkpointer
from training.errors import TrainingDiverged, UserError
from training.optimizer import decay_mask, lr_schedule, make_optimizer, schedule_from_config
from training.state import abstract_train_state, create_train_state
from training.step import abstract_like, compile_train_step, train_step


def _optimizer_config(**changes):
  opt = base_config().optimizer
  opt.update(dict(lr=1e-3, min_lr=1e-4, warmup_steps=2), **changes)
  return opt


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_schedule_warmup_peak_cosine_floor():
  lr = lr_schedule(1e-3, 1e-4, warmup_steps=100, decay_steps=2000)
  np.testing.assert_allclose(lr(0), 1e-3 / 101, rtol=1e-6)  # nanoGPT: lr * (it + 1) / (w + 1)
  np.testing.assert_allclose(lr(99), 1e-3 * 100 / 101, rtol=1e-6)
  np.testing.assert_allclose(lr(100), 1e-3, rtol=1e-6)  # peak
  np.testing.assert_allclose(lr(1050), 5.5e-4, rtol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose(lr(2000), 1e-4, rtol=1e-6)  # end
  np.testing.assert_allclose(lr(5000), 1e-4, rtol=1e-6)  # floor after decay_steps
  opt = _optimizer_config(warmup_steps=100)
  np.testing.assert_allclose(schedule_from_config(opt, 2000)(2000), 1e-4, rtol=1e-6)


def test_weight_decay_only_on_matrices(single_device_run):
  params = jax.device_get(single_device_run[1].params)  # tiny, one layer
  flat = {"/".join(str(k.key) for k in path): v for path, v in
          jax.tree_util.tree_flatten_with_path(decay_mask(params))[0]}
  assert flat["h_0/attn/c_attn/kernel"] and flat["h_0/mlp/c_fc/kernel"]
  assert not flat["h_0/attn/c_attn/bias"] and not flat["h_0/ln_1/scale"]
  assert not flat["ln_f/bias"] and not flat["wte/embedding"] and not flat["wpe/embedding"]
  with_emb = jax.tree_util.tree_leaves(decay_mask(params, decay_embeddings=True)["wte"])
  assert with_emb == [True]
  # Decay acts on a kernel (zero gradient, the parameter shrinks) but not on a bias.
  opt = _optimizer_config(weight_decay=0.5, clip=0.0)
  tx = make_optimizer(opt, 10)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  params["h_0"]["attn"]["c_attn"]["bias"] = np.ones_like(params["h_0"]["attn"]["c_attn"]["bias"])
  updates, _ = jax.jit(lambda p: tx.update(zeros, tx.init(p), p))(params)
  assert float(jnp.abs(updates["h_0"]["mlp"]["c_fc"]["kernel"]).max()) > 0
  assert float(jnp.abs(updates["h_0"]["attn"]["c_attn"]["bias"]).max()) == 0
  assert float(jnp.abs(updates["wte"]["embedding"]).max()) == 0


def _tokens(batch, seq_len, vocab, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)


def test_grad_accumulation_matches_one_big_batch(single_device_run):
  # Plain SGD, so the update is -lr * gradient and compares element by element (Adam's first
  # step, lr * g / (|g| + eps), would amplify rounding where a gradient is near zero).
  cfg = get_config("tiny", **_MESH_CFG)
  tx = optax.sgd(0.1)
  sched = lambda step: jnp.float32(0.1)
  state = single_device_run[1]
  state = state.replace(opt_state=tx.init(state.params))
  params0 = jax.device_get(state.params)
  tokens = jnp.asarray(_tokens(8, 16, 64))
  results = {}
  for k in (1, 4):
    step = jax.jit(lambda s, b, k=k: train_step(s, b, cfg=cfg, tx=tx, schedule=sched,
                                                grad_accum=k))
    results[k] = jax.device_get(step(state, tokens))
  (s1, m1), (s4, m4) = results[1], results[4]
  assert _rel_err(m4["loss"], m1["loss"]) <= 1e-5
  assert _rel_err(m4["grad_norm"], m1["grad_norm"]) <= 1e-5
  for p0, a, b in zip(jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(s4.params),
                      jax.tree_util.tree_leaves(s1.params)):
    assert _rel_err(a - p0, b - p0) <= 1e-5  # the updates themselves


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)])
def test_one_step_same_loss_on_every_mesh(shape, single_device_run):
  reference, initial = single_device_run
  losses, _ = _two_step_losses(make_mesh(*shape), initial)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)


# 8 heads and a 64-symbol vocabulary, so tensor=8 really splits heads, MLP and vocabulary.
_MESH_CFG = dict(num_layers=1, num_heads=8, d_model=64, vocab_size=64, block_size=16)


def _two_step_losses(mesh, host_state=None):
  cfg = get_config("tiny", **_MESH_CFG)
  opt = _optimizer_config()
  tx, sched = make_optimizer(opt, 10), schedule_from_config(opt, 10)
  abstract, shardings = abstract_train_state(cfg, tx, mesh)
  if host_state is None:  # the single-device reference, created the normal (sharded) way
    state, _ = create_train_state(cfg, tx, mesh, seed=0)
  else:  # the same initial values, laid out on `mesh`
    state = jax.device_put(host_state, shardings)
  step = compile_train_step(cfg, tx, sched, mesh, abstract, (8, 17), grad_accum=1)
  initial = jax.device_get(state)
  losses = []
  for i in range(2):
    state, metrics = step(state, shard_batch(_tokens(8, 16, 64, seed=i), mesh))
    losses.append(float(metrics["loss"]))
  return losses, initial


@pytest.fixture(scope="module")
def single_device_run():
  return _two_step_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def test_flops_per_token_gpt2_hand_computed():
  cfg = get_config("gpt2")
  # Parameters: wte 50257*768 + wpe 1024*768 + 12 blocks of 7,087,872 + ln_f 1536.
  assert flops.non_embedding_params(cfg) == 124_439_808 - 1024 * 768 == 123_653_376
  # 6 N + 12 L T D at T = 1024.
  assert flops.flops_per_token(cfg, 1024) == 6 * 123_653_376 + 12 * 12 * 1024 * 768
  assert flops.flops_per_token(cfg, 1024) == 855_166_464


def test_mfu_arithmetic_and_device_table():
  fpt = 855_166_464
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  # 100k tokens/s on one H100: 100e3 * 855.17e6 / 989e12 = 8.65%.
  assert math.isclose(flops.mfu(100e3, fpt, "NVIDIA H100 80GB HBM3", 1), 0.0864678, rel_tol=1e-5)
  assert math.isclose(flops.mfu(800e3, fpt, "NVIDIA H100 80GB HBM3", 8), 0.0864678, rel_tol=1e-5)
  assert flops.mfu(100e3, fpt, "cpu", 1) is None


def test_half_written_checkpoint_is_ignored(tmp_path, single_device_run):
  state = jax.device_put(single_device_run[1], jax.devices()[0])
  ckpt = Checkpointer(tmp_path, keep=2)
  ckpt.save(3, state, {"step": 3})
  ckpt.wait()
  ckpt.close()
  # What a process killed while saving step 7 leaves behind: orbax's temporary directory.
  junk = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
  (junk / "state").mkdir(parents=True)
  (junk / "state" / "garbage").write_text("half")
  ckpt = Checkpointer(tmp_path, read_only=True)
  assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
  restored, meta = ckpt.restore(abstract_like(state))
  assert meta == {"step": 3}
  np.testing.assert_array_equal(restored.params["wte"]["embedding"],
                                state.params["wte"]["embedding"])


def _tiny_run_config(shakespeare_path, **train):
  c = __import__("configs.tiny", fromlist=["get_config"]).get_config()
  c.data.path = str(shakespeare_path)
  c.model.num_layers = 1
  for key, value in train.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shakespeare_path):
  from training.loop import train
  c = _tiny_run_config(shakespeare_path, train__steps=20, optimizer__lr=1e30,
                       optimizer__min_lr=1e29, optimizer__warmup_steps=0, optimizer__clip=0.0,
                       checkpoint__every=1, eval__every=0, eval__batches=0)
  with pytest.raises(TrainingDiverged, match=r"became (nan|inf).* at step \d+"):
    train(c, str(tmp_path), quiet=True)
  ckpt = Checkpointer(tmp_path, read_only=True)
  last = ckpt.latest_step()
  assert last is not None and last < 20
  state_meta = ckpt.read_meta(last)
  assert state_meta["step"] == last
  rows = [r for r in __import__("training.metrics", fromlist=["x"]).read_metrics(tmp_path)]
  assert all(math.isfinite(r["loss"]) for r in rows)


def test_user_errors_before_compiling(tmp_path, shakespeare_path):
  from training.setup import prepare
  c = _tiny_run_config(shakespeare_path, train__batch_size=12, train__grad_accum=1)
  with pytest.raises(UserError, match="divisible by the data-parallel size"):
    prepare(c, tmp_path)  # mesh data=-1 is 8 devices here
  c = _tiny_run_config(pathlib.Path("/no/such/file.txt"))
  with pytest.raises(UserError, match="does not exist"):
    prepare(c, tmp_path)
  c = _tiny_run_config(shakespeare_path, mesh__data=3)
  with pytest.raises(UserError, match="mesh"):
    prepare(c, tmp_path)
  c = _tiny_run_config(shakespeare_path)
  c.model.vocab_size = 10
  with pytest.raises(UserError, match="smaller than the data's vocabulary"):
    prepare(c, tmp_path)
  assert not any(tmp_path.iterdir())


def _load_config(name, variant=None):
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  return module.get_config(variant) if variant else module.get_config()


@pytest.mark.parametrize("name, variant", [("tiny", None), ("shakespeare_char", None),
                                           ("shakespeare_char", "cpu"), ("gpt2", None),
                                           ("gpt2_xl", None)])
def test_configs_are_valid(name, variant):
  from model.config import field_names
  from training.setup import check_values, model_config
  c = _load_config(name, variant)
  check_values(c)
  assert set(c.model.keys()) == set(field_names())  # every ModelConfig field is a config key
  cfg = model_config(c, data_vocab_size=65 if c.data.tokenizer == "char" else 50257)
  assert c.train.batch_size % c.train.grad_accum == 0
  if name == "gpt2":  # nanoGPT's ~0.5M tokens per step: 12 x 1024 x 40
    assert (c.train.batch_size // c.train.grad_accum, cfg.block_size, c.train.grad_accum) == (
        12, 1024, 40)
    assert cfg.padded_vocab_size == 50304 and cfg.dtype == "bfloat16"
    assert (c.optimizer.lr, c.optimizer.min_lr, c.optimizer.warmup_steps, c.train.steps) == (
        6e-4, 6e-5, 2000, 600_000)
  if name == "gpt2_xl":
    assert cfg.scan_layers and cfg.remat != "none" and c.mesh.fsdp == -1
  if (name, variant) == ("shakespeare_char", None):
    assert (cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.block_size) == (6, 6, 384, 256)
    assert cfg.resid_dropout == 0.2 and not cfg.use_bias and c.eval.batches == 200
  if variant == "cpu":  # nanoGPT's CPU quick start
    assert (cfg.num_layers, cfg.num_heads, cfg.d_model, cfg.block_size) == (4, 4, 128, 64)
    assert (c.train.batch_size, c.train.steps, c.eval.batches, cfg.resid_dropout) == (
        12, 2000, 20, 0.0)


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown variant 'gpu'"):
    _load_config("shakespeare_char", "gpu")


def test_metrics_writer_drops_rows_after_resume_and_torn_lines(tmp_path):
  from training.metrics import MetricsWriter, read_metrics
  (tmp_path / "metrics.jsonl").write_text(
      '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"st')
  writer = MetricsWriter(tmp_path, start_step=2, tensorboard=False)
  writer.write({"step": 3, "loss": 1.5})
  writer.close()
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
                                    {"step": 3, "loss": 1.5}]


def test_cross_entropy_equals_optax_values_and_gradient():
  """The scatter-free cross-entropy is optax's, including with a masked padded vocabulary."""
  from training.step import cross_entropy  # pylint: disable=import-outside-toplevel
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 4.0
  logits = logits.at[..., 9:].set(-1e30)  # padded entries, as the model writes them
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 9)
  ref = lambda l: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(l, targets))
  ours = lambda l: cross_entropy(l, targets)
  assert _rel_err(ours(logits), ref(logits)) < 1e-6
  assert _rel_err(jax.grad(ours)(logits), jax.grad(ref)(logits)) < 1e-6
