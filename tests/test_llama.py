"""The Llama-style decoder (rotary positions, RMSNorm, SwiGLU, grouped-query attention) against
transformers' LlamaForCausalLM: logits, greedy generation, export, layouts, meshes, bad input.

Fixtures (tests/fixtures/make_hf_llama_fixture.py): three random 2-layer LlamaForCausalLM of
width 32 with 4 query heads: "mha" (4 key/value heads, untied head, rope theta 1e4), "gqa" (2,
untied, theta 5e5 with the Llama 3 rope scaling, saved in shards), "mqa" (1, tied head,
attention biases); transformers' float32 logits and 64 greedy tokens for each.
Relative error: conftest.rel_err, max|a - b| / max|b|; float32 parity is 1e-5 (measured <= 1.7e-6).
"""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import adamw_start, assert_close, exit_status, hf_window_loss, rel_err
from launch import eval as eval_cli
from launch import export as export_cli
from launch import sample as sample_cli
from launch import train as train_cli
from model.config import ModelConfig, get_config
from model.decode.sampling import generate
from model.errors import UserError
from model.families import abstract_params, build, count_params, init_params
from model.hf import load_hf, load_hf_gpt2
from model.hf.llama import save_hf_llama
from model.hf.tokenizer import load_hf_tokenizer
from model.kv_cache import init_cache
from sharding import DEFAULT_RULES, activate, make_mesh, place_params, shard_batch
from training.perf.flops import flops_per_token, formula
from training.weights import load_weights

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
NAMES = ("mha", "gqa", "mqa")
PARITY = 1e-5


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(FIXTURES / "hf_llama_expected.npz"))


@functools.partial(jax.jit, static_argnames="cfg")
def forward(cfg, params, tokens_BT):
  return build(cfg).apply({"params": params}, tokens_BT)


def logits_of(cfg, params, tokens):
  return np.asarray(forward(cfg, params, jnp.asarray(tokens)))[..., :cfg.vocab_size]


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers(expected, name, scan_layers):
  cfg, params = load_hf(FIXTURES / f"hf_llama_{name}", scan_layers=scan_layers)
  assert cfg.kv_heads == {"mha": 4, "gqa": 2, "mqa": 1}[name]
  assert cfg.tie_embeddings == (name == "mqa") and ("lm_head" in params) != cfg.tie_embeddings
  assert ("h" in params) == scan_layers
  tokens = expected[f"{name}_tokens"]
  assert rel_err(logits_of(cfg, params, tokens), expected[f"{name}_logits"]) <= PARITY


def test_fixture_configs_are_read_whole():
  mha = load_hf(FIXTURES / "hf_llama_mha")[0]
  gqa = load_hf(FIXTURES / "hf_llama_gqa")[0]  # sharded: model.safetensors.index.json
  mqa = load_hf(FIXTURES / "hf_llama_mqa")[0]
  assert (mha.position_embedding, mha.norm, mha.activation) == ("rotary", "rmsnorm", "swiglu")
  assert (mha.rope_theta, mha.rope_scaling) == (10000.0, "none")
  assert (gqa.rope_theta, gqa.rope_scaling, gqa.rope_factor, gqa.rope_original_positions) == (
      500000.0, "llama3", 8.0, 16)
  assert (mqa.qkv_bias_on, mqa.proj_bias_on, mqa.mlp_bias_on) == (True, True, False)
  assert not mha.use_bias and mha.block_size == 128 and mha.d_mlp == 48


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_equals_the_full_forward(expected, name):
  """Prefill 24 tokens, then one token at a time through the KV cache of G heads."""
  cfg, params = load_hf(FIXTURES / f"hf_llama_{name}")
  tokens = expected[f"{name}_tokens"]
  module = build(cfg)
  cache = init_cache(cfg, 2, 64)
  assert cache["k"].shape == (2, 2, 64, cfg.kv_heads * cfg.head_dim)
  step = jax.jit(lambda p, t, pos, c: module.apply({"params": p}, t, positions_BT=pos, cache=c))
  logits, cache = step(params, jnp.asarray(tokens[:, :24]),
                       jnp.broadcast_to(jnp.arange(24), (2, 24)), cache)
  outs = [np.asarray(logits)]
  for t in range(24, 40):
    logits, cache = step(params, jnp.asarray(tokens[:, t:t + 1]), jnp.full((2, 1), t), cache)
    outs.append(np.asarray(logits))
  got = np.concatenate(outs, axis=1)[..., :cfg.vocab_size]
  assert rel_err(got, expected[f"{name}_logits"]) <= PARITY


@pytest.mark.parametrize("name, scan_layers", [("mha", False), ("gqa", True), ("mqa", False),
                                               ("mqa", True)])
def test_greedy_generation_equals_transformers_over_64_tokens(expected, name, scan_layers):
  cfg, params = load_hf(FIXTURES / f"hf_llama_{name}", scan_layers=scan_layers)
  prompt = expected[f"{name}_prompt"][0].tolist()
  out = generate(params, cfg, [prompt], max_new_tokens=64, temperature=0.0)
  np.testing.assert_array_equal(out.tokens[0], expected[f"{name}_greedy"])


def test_the_tokenizer_is_the_checkpoints(expected):
  tok = load_hf_tokenizer(FIXTURES / "hf_llama_mha")
  ids = tok.encode("To be, or not to be")
  assert ids[:8] == expected["mha_prompt"][0].tolist()
  assert ids[0] == 0  # <|begin_of_text|> first, from tokenizer.json's post-processor
  assert tok.decode(ids) == "To be, or not to be"


def test_on_a_data_2_by_tensor_4_mesh(expected):
  """The loaded GQA model (2 key/value heads: fewer than tensor=4) and the MHA one on a
  data=2 x tensor=4 mesh give transformers' logits."""
  mesh = make_mesh(2, 1, 4)
  for name in ("gqa", "mha"):
    cfg, params = load_hf(FIXTURES / f"hf_llama_{name}")
    with activate(mesh, DEFAULT_RULES):
      placed = place_params(params, cfg, mesh)
      tokens = shard_batch(np.asarray(expected[f"{name}_tokens"]), mesh)
      logits = np.asarray(jax.jit(lambda p, t, c=cfg: build(c).apply({"params": p}, t))(
          placed, tokens))[..., :cfg.vocab_size]
    assert rel_err(logits, expected[f"{name}_logits"]) <= PARITY, name


def _two_steps(cfg, mesh, host_state=None):
  state, step, initial = adamw_start(cfg, mesh, (8, 33), host_state)
  losses = []
  for i in range(2):
    batch = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 33)).astype(np.int32)
    state, metrics = step(state, shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return losses, initial


@pytest.mark.parametrize("kv_heads, scan_layers", [(2, True), (4, False)])
def test_training_steps_are_the_same_on_a_data_2_by_tensor_4_mesh(kv_heads, scan_layers):
  """Two AdamW steps on one batch of a Llama-style model (8 query heads) on one device and on
  data=2 x tensor=4: 2 key/value heads (not split over tensor) and 4 (split), loop and scan
  layouts."""
  cfg = get_config("llama-tiny", vocab_size=64, block_size=32, num_layers=2, d_model=64,
                   d_mlp=96, num_kv_heads=kv_heads, scan_layers=scan_layers, attention="xla")
  want, host = _two_steps(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  got, _ = _two_steps(cfg, make_mesh(2, 1, 4), host)
  assert want[1] < want[0]
  assert_close(got, want, 1e-5, "losses")


def test_save_and_load_round_trip(tmp_path, expected):
  cfg, params = load_hf(FIXTURES / "hf_llama_gqa")
  save_hf_llama(params, cfg, tmp_path / "out")
  again_cfg, again = load_hf(tmp_path / "out")
  assert again_cfg == cfg
  assert_close(again, params, 0.0, "params")  # the same tree, bit for bit


def hf_logits(transformers_lib, directory, tokens):
  torch, transformers = transformers_lib
  model = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens)).long()).logits.float().numpy()


@pytest.mark.parametrize("kv_heads, tie, theta, scaling", [
    (4, True, 500000.0, "none"), (2, False, 10000.0, "llama3"), (1, False, 500000.0, "llama3")])
def test_our_random_model_saved_loads_in_transformers_with_the_same_logits(
    transformers_lib, tmp_path, kv_heads, tie, theta, scaling):
  """Random weights (norms too) -> save_hf_llama -> LlamaForCausalLM: the same logits, over
  48 positions (past rope_original_positions, where the scaling bends the frequencies)."""
  cfg = get_config("llama-tiny", vocab_size=96, block_size=64, num_layers=2, d_model=32,
                   num_heads=4, d_mlp=40, num_kv_heads=kv_heads, tie_embeddings=tie,
                   rope_theta=theta, rope_scaling=scaling, rope_original_positions=16)
  rng = np.random.default_rng(kv_heads)
  params = jax.tree_util.tree_map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), abstract_params(cfg))
  save_hf_llama(params, cfg, tmp_path / "random")
  tokens = rng.integers(0, 96, (2, 48))
  assert rel_err(logits_of(cfg, params, tokens),
                 hf_logits(transformers_lib, tmp_path / "random", tokens)) <= PARITY


def test_live_parity_of_the_fixtures_on_fresh_tokens(transformers_lib):
  tokens = np.random.default_rng(11).integers(0, 300, (3, 64))
  for name in NAMES:
    cfg, params = load_hf(FIXTURES / f"hf_llama_{name}", scan_layers=True)
    assert rel_err(logits_of(cfg, params, tokens),
                   hf_logits(transformers_lib, FIXTURES / f"hf_llama_{name}", tokens)) <= PARITY


# --- shapes, counts and bad input ----------------------------------------------------------

@pytest.mark.parametrize("preset, params_millions", [
    ("smollm2-135m", 134.5), ("llama3.2-1b", 1235.8), ("llama3-8b", 8030.3)])
def test_presets_have_the_published_parameter_counts(preset, params_millions):
  assert abs(count_params(get_config(preset)) / 1e6 - params_millions) < 0.1


def test_gqa_shrinks_the_kv_projections_and_the_cache():
  full = get_config("smollm2-135m", num_kv_heads=9)
  gqa = get_config("smollm2-135m")
  shapes = abstract_params(gqa)
  assert shapes["h_0"]["attn"]["c_kv"]["kernel"].shape == (576, 2, 3, 64)
  assert set(abstract_params(full)["h_0"]["attn"]) == {"c_attn", "c_proj"}
  assert jax.eval_shape(lambda: init_cache(gqa, 1, 64))["k"].shape[-1] * 3 == jax.eval_shape(
      lambda: init_cache(full, 1, 64))["k"].shape[-1]
  # the FLOPs formula: 6N counts SwiGLU's three matrices and the smaller K/V projections
  D, F, L, G, H, K = 576, 1536, 30, 3, 9, 64
  per_layer = D * H * K * 2 + D * 2 * G * K + 3 * D * F + 2 * D
  N = L * per_layer + D + 49152 * D
  assert flops_per_token(gqa, 2048) == 6 * N + 12 * L * 2048 * D
  assert "SwiGLU" in formula(gqa) and "3 key/value heads" in formula(gqa)


def test_rmsnorm_and_swiglu_parameters():
  cfg = get_config("llama-tiny", vocab_size=64, num_layers=1)
  p = init_params(cfg, jax.random.key(0))
  assert set(p["h_0"]["ln_1"]) == {"scale"} and set(p["ln_f"]) == {"scale"}
  assert set(p["h_0"]["mlp"]) == {"c_gate", "c_fc", "c_proj"}
  assert all("bias" not in leaf for leaf in p["h_0"]["mlp"].values())
  assert "wpe" not in p


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=6, num_kv_heads=4, d_model=48),
     r"ModelConfig.num_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
    (dict(num_heads=4, d_model=36),
     r"position_embedding='rotary' needs an even head dimension, got d_model / num_heads = "
     r"36 / 4 = 9"),
    (dict(rope_scaling="yarn"), r"ModelConfig.rope_scaling must be one of none, llama3; got "),
    (dict(norm="batchnorm"), r"ModelConfig.norm must be one of layernorm, rmsnorm"),
])
def test_bad_configs_are_one_sentence(changes, message):
  with pytest.raises(UserError, match=message):
    get_config("llama-tiny", **changes)


def _edited_copy(tmp_path, **changes):
  out = tmp_path / "ckpt"
  shutil.copytree(FIXTURES / "hf_llama_mha", out)
  data = json.loads((out / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      data.pop(key, None)
    else:
      data[key] = value
  (out / "config.json").write_text(json.dumps(data))
  return out


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"rope scaling 'yarn' is not implemented here; supported: null \(none\) and 'llama3'"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"rope scaling 'dynamic' is not implemented here"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
     r"the llama3 rope scaling needs 'low_freq_factor'"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported; Llama's MLP here is SwiGLU"),
    (dict(head_dim=16), r"head_dim 16 is not hidden_size / num_attention_heads \(32 / 4\)"),
    (dict(num_key_value_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
])
def test_unsupported_hf_configs_are_one_sentence(tmp_path, changes, message):
  with pytest.raises(UserError, match=message):
    load_hf(_edited_copy(tmp_path, **changes))


def test_a_llama_checkpoint_is_not_read_as_gpt2_nor_given_a_gpt2_shape():
  with pytest.raises(UserError, match=r"model_type 'llama' is not a GPT-2 checkpoint"):
    load_hf_gpt2(FIXTURES / "hf_llama_mha")
  with pytest.raises(UserError, match=r"Cannot override position_embedding \('learned'\) when "
                                      r"loading a checkpoint whose weights fix it to 'rotary'"):
    load_hf(FIXTURES / "hf_llama_mha", position_embedding="learned")
  with pytest.raises(UserError, match=r"Cannot override num_kv_heads \(0\)"):
    load_hf(FIXTURES / "hf_llama_gqa", num_kv_heads=0)


def test_a_gpt2_config_still_builds_gpt2():
  cfg = ModelConfig()
  assert (cfg.kv_heads, cfg.norm, cfg.position_embedding, cfg.activation) == (
      12, "layernorm", "learned", "gelu_tanh")
  assert count_params(cfg) == 124_439_808


@pytest.mark.parametrize("window_shift", [1, 4])
def test_greedy_past_the_context_window_follows_the_sliding_rule(window_shift):
  """The GQA fixture cut to block size 16: generating 40 tokens moves each row's window many
  times (re-read at positions 0.., as for learned positions) and gives the documented rule's
  tokens, with rotary positions and 2 key/value heads."""
  from test_sampling import _sliding_greedy_without_cache  # pylint: disable=import-outside-toplevel
  cfg, params = load_hf(FIXTURES / "hf_llama_gqa", block_size=16)
  prompts = [[0, 5], [0, 53, 80, 269, 70, 13, 222, 275, 17, 40]]
  result = generate(params, cfg, prompts, max_new_tokens=40, temperature=0.0,
                    window_shift=window_shift)
  assert result.tokens == [_sliding_greedy_without_cache(params, cfg, p, 40, window_shift)
                           for p in prompts]


# --- the command-line tools --------------------------------------------------------------------

@pytest.mark.slow
def test_llama_shakespeare_trains_fine_tunes_exports_evaluates_and_samples(tmp_path, capsys,
                                                                          shakespeare_path):
  """configs/llama_shakespeare.py:cpu trains (4 steps); configs/finetune_shakespeare.py (a GPT-2
  config) fine-tunes from that run with the run's Llama shape, and a GPT-2 shape asked for on
  the command line is one sentence; the fine-tuned run exports as LlamaForCausalLM with the
  same logits, launch.eval scores it as transformers does, launch.sample continues greedily as
  generate does."""
  run, ft = tmp_path / "run", tmp_path / "ft"
  common = [f"--config.data.path={shakespeare_path}", "--config.eval.every=0", "--quiet"]
  assert exit_status(train_cli.main, [
      "--config", "configs/llama_shakespeare.py:cpu", "--workdir", str(run), *common,
      "--config.train.steps=4", "--config.train.batch_size=8", "--config.checkpoint.every=4"
  ]) == 0, capsys.readouterr().err
  model = json.loads((run / "config.json").read_text())["model"]
  assert (model["position_embedding"], model["norm"], model["activation"], model["num_kv_heads"],
          model["num_heads"], model["d_mlp"], model["vocab_size"]) == (
              "rotary", "rmsnorm", "swiglu", 2, 4, 384, 65)

  args = ["--config", "configs/finetune_shakespeare.py", "--workdir", str(ft), *common,
          f"--config.init_from={run}", "--config.data.tokenizer=char", "--config.train.steps=2",
          "--config.train.batch_size=8", "--config.train.grad_accum=1",
          "--config.checkpoint.every=2", "--config.model.dtype=float32"]
  capsys.readouterr()
  assert exit_status(train_cli.main, [*args, "--config.model.position_embedding=learned"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      "error: --config.model.position_embedding='learned' does not fit config.init_from=") and (
          "its weights make model.position_embedding 'rotary'" in err[0]), err
  assert not ft.exists()
  assert exit_status(train_cli.main, args) == 0, capsys.readouterr().err
  model = json.loads((ft / "config.json").read_text())["model"]
  assert (model["position_embedding"], model["num_kv_heads"], model["block_size"]) == (
      "rotary", 2, 64)

  # launch.sample on the run: generate's greedy tokens
  w = load_weights(ft)
  capsys.readouterr()
  assert exit_status(sample_cli.main, ["--workdir", str(ft), "--prompt", "ROMEO:",
                                       "--temperature", "0", "--max_new_tokens", "24"]) == 0
  out = capsys.readouterr().out
  from model.tokenizer import tokenizer_from_dict  # pylint: disable=import-outside-toplevel
  tok = tokenizer_from_dict(w.tokenizer)
  want = generate(w.params, w.cfg, [tok.encode("ROMEO:")], max_new_tokens=24, temperature=0.0)
  assert tok.decode(want.tokens[0]) in out

  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_dir = tmp_path / "hf"
  assert exit_status(export_cli.main, ["--workdir", str(ft), "--out", str(hf_dir)]) == 0
  exported = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  tokens = np.random.default_rng(0).integers(0, 65, (2, 64))
  with torch.no_grad():
    theirs = exported(torch.from_numpy(tokens)).logits.numpy()
  assert rel_err(logits_of(w.cfg, w.params, tokens), theirs) < PARITY
  held_out = tmp_path / "held_out.txt"
  held_out.write_text(shakespeare_path.read_text()[-1500:])
  capsys.readouterr()
  assert exit_status(eval_cli.main, ["--workdir", str(ft), "--data", f"text:{held_out}",
                                     "--json", "--quiet"]) == 0
  result = json.loads(capsys.readouterr().out)
  ids = np.asarray(tok.encode(held_out.read_text()), np.int64)
  hf_loss, count = hf_window_loss(exported, ids, 64, 64)
  assert result["tokens"] == count and rel_err(result["loss"], hf_loss) < 1e-5


def test_sample_and_eval_read_a_llama_checkpoint_with_its_own_tokenizer(tmp_path, capsys):
  directory = FIXTURES / "hf_llama_mha"
  cfg, params = load_hf(directory)
  tok = load_hf_tokenizer(directory)
  assert tok.eot_id == 1  # <|end_of_text|>, from tokenizer_config.json
  capsys.readouterr()
  assert exit_status(sample_cli.main, ["--init_from", str(directory), "--prompt", "To be",
                                       "--temperature", "0", "--max_new_tokens", "20",
                                       "--no_stop"]) == 0
  out = capsys.readouterr().out
  want = generate(params, cfg, [tok.encode("To be")], max_new_tokens=20, temperature=0.0)
  assert tok.encode("To be")[0] == 0 and tok.decode(want.tokens[0]) in out
  text = tmp_path / "text.txt"
  text.write_text("To be, or not to be, that is the question:\n" * 6)
  assert exit_status(eval_cli.main, ["--init_from", str(directory), "--data", f"text:{text}",
                                     "--json", "--quiet"]) == 0
  result = json.loads(capsys.readouterr().out)
  ids = np.asarray(tok.encode(text.read_text()), np.int32)
  assert result["tokens"] == len(ids) - 1
  T, nll = cfg.block_size, []  # windows of T inputs, each scoring targets not yet scored
  for begin in range(0, len(ids) - 1, T):
    inputs, targets = ids[begin:begin + T], ids[begin + 1:begin + T + 1]
    logits = logits_of(cfg, params, inputs[None, :len(targets)])[0].astype(np.float64)
    top = logits.max(-1)
    logsumexp = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    nll.extend(logsumexp - logits[np.arange(len(targets)), targets])
  nll = np.mean(nll)
  assert rel_err(result["loss"], nll) < 1e-5


@pytest.mark.slow
def test_fine_tuning_a_hugging_face_llama_reads_the_data_with_its_tokenizer(tmp_path, capsys,
                                                                           shakespeare_path):
  """configs/finetune_shakespeare.py from the GQA fixture: with the config's GPT-2 BPE data it
  is one sentence naming data.tokenizer=hf:DIR; with it, the data is read with the
  checkpoint's tokenizer.json (no <|begin_of_text|> inside the text), the first logged loss is
  the checkpoint's loss on the first batch, and launch.sample on the run uses that tokenizer."""
  from launch.cli import check_config  # pylint: disable=import-outside-toplevel
  from training.data import make_source  # pylint: disable=import-outside-toplevel
  from training.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  from training.run import build_run  # pylint: disable=import-outside-toplevel
  directory = FIXTURES / "hf_llama_gqa"
  ft = tmp_path / "ft"
  args = ["--config", "configs/finetune_shakespeare.py", "--workdir", str(ft),
          f"--config.init_from={directory}", f"--config.data.path={shakespeare_path}",
          "--config.train.steps=2", "--config.train.batch_size=8", "--config.train.grad_accum=1",
          "--config.eval.every=0", "--config.checkpoint.every=2", "--config.model.dtype=float32",
          "--config.model.block_size=64", "--quiet"]
  capsys.readouterr()
  assert exit_status(train_cli.main, args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "whose ids are its own tokenizer's" in err[0] and (
      f"--config.data.tokenizer=hf:{directory}" in err[0]), err
  assert not ft.exists()

  args.append(f"--config.data.tokenizer=hf:{directory}")
  assert exit_status(train_cli.main, args) == 0, capsys.readouterr().err
  saved = json.loads((ft / "config.json").read_text())
  assert saved["model"]["num_kv_heads"] == 2 and saved["model"]["rope_scaling"] == "llama3"
  from model.hf.tokenizer import content_sha256  # pylint: disable=import-outside-toplevel
  assert load_weights(ft).tokenizer == {"name": "hf", "path": str(directory), "vocab_size": 300,
                                        "sha256": content_sha256(directory)}
  run = build_run(check_config("configs/finetune_shakespeare.py",
                               [f"--config.data.path={shakespeare_path}", args[-1],
                                f"--config.init_from={directory}",
                                "--config.model.block_size=64"]))
  data = make_source(run.config.data, seq_len=64, global_batch_size=8,
                     seed=saved["train"]["seed"])
  batch = data.get_batch("train", 0)
  assert 0 not in batch[:, 1:]  # <|begin_of_text|> (id 0) only where a document starts
  cfg, params = load_hf(directory, block_size=64)
  logits = logits_of(cfg, params, batch[:, :-1]).astype(np.float64)
  top = logits.max(-1)
  logsumexp = np.log(np.exp(logits - top[..., None]).sum(-1)) + top
  rows, cols = np.meshgrid(np.arange(8), np.arange(64), indexing="ij")
  loss = np.mean(logsumexp - logits[rows, cols, batch[:, 1:]])
  assert rel_err(read_metrics(ft)[0]["loss"], loss) < 1e-5

  capsys.readouterr()
  assert exit_status(sample_cli.main, ["--workdir", str(ft), "--prompt", "ROMEO:",
                                       "--temperature", "0", "--max_new_tokens", "8"]) == 0
  assert "hf:hf_llama_gqa tokenizer" in capsys.readouterr().err


# config.json values that today's Llama configs hold, each made bad: (edit, field, message)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 1e4}
BAD_CONFIG_VALUES = {
    "heads-0": (dict(num_attention_heads=0),
                "num_attention_heads must be a positive integer, got 0."),
    "theta-null": (dict(rope_parameters=None, rope_theta=None),
                   "rope_theta must be a positive number, got None."),
    "eps-null": (dict(rms_norm_eps=None), "rms_norm_eps must be a positive number, got None."),
    "original-positions-null": (
        dict(rope_parameters=dict(LLAMA3, original_max_position_embeddings=None)),
        "rope_parameters.original_max_position_embeddings must be a positive integer, got None."),
    "hidden-size-string": (dict(hidden_size="32"),
                           "hidden_size must be a positive integer, got '32'."),
    "rope-factor-abc": (dict(rope_parameters=None, rope_theta=1e4,
                             rope_scaling=dict(LLAMA3, factor="abc")),
                        "rope_scaling.factor must be a positive number, got 'abc'."),
    "eps-nan": (dict(rms_norm_eps=float("nan")),
                "rms_norm_eps must be a positive number, got nan."),
}


@pytest.mark.parametrize("case", BAD_CONFIG_VALUES)
def test_a_bad_config_json_value_is_one_sentence_naming_file_and_field(case, tmp_path, capsys):
  """launch.sample --init_from a checkpoint whose config.json holds a value of the wrong type or
  range: exit 2 and one line "<dir>/config.json: <field> must be ..." (not a traceback)."""
  changes, message = BAD_CONFIG_VALUES[case]
  out = tmp_path / "ckpt"
  shutil.copytree(FIXTURES / "hf_llama_mha", out)
  data = json.loads((out / "config.json").read_text())
  data.update(changes)  # None stays: JSON's null
  (out / "config.json").write_text(json.dumps(data))
  status = exit_status(sample_cli.main, ["--init_from", str(out), "--prompt", "To be"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and err == [f"error: {out}/config.json: {message}"], err


def test_a_config_json_without_model_type_is_one_sentence_not_a_guess(tmp_path, capsys):
  out = tmp_path / "ckpt"
  shutil.copytree(FIXTURES / "hf_llama_mha", out)
  data = json.loads((out / "config.json").read_text())
  del data["model_type"]
  (out / "config.json").write_text(json.dumps(data))
  status = exit_status(sample_cli.main, ["--init_from", str(out), "--prompt", "To be"])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 2 and err == [
      f"error: {out}/config.json has no model_type; a Hugging Face checkpoint's config.json "
      f"names its model (\"model_type\": one of gpt2, bert, bart, llama, qwen3, mixtral, "
      f"qwen3_moe, olmoe)."], err
