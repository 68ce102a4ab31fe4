"""Hugging Face GPT-2 import/export: parity with transformers' logits, and clear errors.

Relative error: conftest.rel_err(a, b) = max|a - b| / max|b| with b the transformers logits;
parity means rel <= 1e-5 in float32 (measured <= 5e-7). The fixture
(tests/fixtures/make_hf_fixture.py) is a tiny random GPT2LMHeadModel with random layer norms
and biases.
"""

import functools
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model.errors import NotFoundError, UserError
from model.hf import load_hf_gpt2, save_hf_gpt2
from model.blocks import MASK_VALUE
from model.families import abstract_params
from model.gpt import GPT

from conftest import rel_err

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
HF_DIR = FIXTURES / "hf_gpt2_tiny"
PARITY = 1e-5



@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(cfg, params, tokens_BT):
  return GPT(cfg).apply({"params": params}, tokens_BT)


@pytest.fixture(scope="module")
def expected():
  data = np.load(FIXTURES / "hf_gpt2_tiny_expected.npz")
  return data["tokens"], data["logits"]


@pytest.fixture(scope="module")
def loaded():
  return load_hf_gpt2(HF_DIR)


def copy_checkpoint(tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(HF_DIR, tmp_path / "ckpt"))


def edit_config(directory, **changes):
  path = directory / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---------------------------------------------------------------------------------------------
# Parity


def test_config_from_fixture(loaded):
  cfg, params = loaded
  assert (cfg.vocab_size, cfg.block_size, cfg.d_model, cfg.num_layers, cfg.num_heads,
          cfg.d_mlp) == (96, 32, 16, 2, 4, 64)
  assert cfg.activation == "gelu_tanh" and cfg.tie_embeddings and not cfg.scan_layers
  assert "lm_head" not in params
  shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), params)
  assert shapes == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), abstract_params(cfg))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_parity_with_stored_transformers_logits(expected, scan_layers):
  tokens, logits = expected
  cfg, params = load_hf_gpt2(HF_DIR, scan_layers=scan_layers)
  assert ("h" in params) == scan_layers
  assert rel_err(forward(cfg, params, tokens), logits) <= PARITY


def test_no_prefix_buffers_and_untied_head(tmp_path, expected):
  """Keys without "transformer.", attention-mask buffers, and a separate lm_head (here 2 * wte,
  so the logits must double)."""
  tokens, logits = expected
  directory = copy_checkpoint(tmp_path)
  tensors = {k.removeprefix("transformer."): v
             for k, v in load_file(directory / "model.safetensors").items()}
  for i in range(2):
    tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  tensors["lm_head.weight"] = 2 * tensors["wte.weight"]
  save_file(tensors, directory / "model.safetensors")
  edit_config(directory, tie_word_embeddings=False)
  cfg, params = load_hf_gpt2(directory)
  assert not cfg.tie_embeddings and params["lm_head"]["kernel"].shape == (16, 96)
  assert rel_err(forward(cfg, params, tokens), 2 * logits) <= PARITY


def test_overrides_pad_vocab_and_crop_positions(expected):
  tokens, logits = expected
  cfg, params = load_hf_gpt2(HF_DIR, padded_vocab_size=128, block_size=24, attention="xla",
                             embd_dropout=0.0)
  assert cfg.padded_vocab_size == 128 and cfg.attention == "xla"
  assert params["wte"]["embedding"].shape == (128, 16)
  assert params["wpe"]["embedding"].shape == (24, 16)
  out = forward(cfg, params, tokens)
  assert rel_err(out[..., :96], logits) <= PARITY
  assert bool((out[..., 96:] == MASK_VALUE).all())


def test_dtype_arguments():
  cfg, params = load_hf_gpt2(HF_DIR, dtype="bfloat16", param_dtype="bfloat16")
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree_util.tree_leaves(params))


def test_bad_overrides():
  with pytest.raises(UserError, match="num_layers"):
    load_hf_gpt2(HF_DIR, num_layers=3)
  with pytest.raises(UserError, match="block_size 64 .* n_positions 32"):
    load_hf_gpt2(HF_DIR, block_size=64)
  with pytest.raises(UserError, match="'n_embd'"):
    load_hf_gpt2(HF_DIR, n_embd=32)


def test_save_round_trip(tmp_path, loaded):
  cfg, params = loaded
  scan_cfg, scan_params = load_hf_gpt2(HF_DIR, scan_layers=True)
  save_hf_gpt2(scan_params, scan_cfg, tmp_path / "out")
  cfg2, params2 = load_hf_gpt2(tmp_path / "out")
  assert cfg2 == cfg
  same = jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, params2)
  assert all(jax.tree_util.tree_leaves(same))


# ---------------------------------------------------------------------------------------------
# Loading by name (the hub is mocked: tests must not use the network)


def test_by_name_downloads_config_and_safetensors(monkeypatch):
  calls = []

  def fake_download(repo_id, allow_patterns):
    calls.append((repo_id, allow_patterns))
    return str(HF_DIR)

  monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
  cfg, _ = load_hf_gpt2("gpt2")
  assert calls == [("openai-community/gpt2", ["config.json", "model.safetensors"])]
  assert cfg.vocab_size == 96


def test_by_name_offline_and_unknown(monkeypatch):
  from huggingface_hub import errors

  def offline(repo_id, allow_patterns):
    raise errors.LocalEntryNotFoundError("Cannot reach the Hub. Check your connection.")

  monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
  with pytest.raises(NotFoundError, match="'gpt2-medium'.*no network.*local directory"):
    load_hf_gpt2("gpt2-medium")

  def unknown(repo_id, allow_patterns):
    raise errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError, "404")

  monkeypatch.setattr("huggingface_hub.snapshot_download", unknown)
  with pytest.raises(UserError, match="Unknown checkpoint 'someone/gpt9'"):
    load_hf_gpt2("someone/gpt9")


# ---------------------------------------------------------------------------------------------
# Errors name the file (and tensor)


def test_missing_directory_and_file_path(tmp_path):
  with pytest.raises(NotFoundError, match="nowhere.*gpt2-medium"):
    load_hf_gpt2(tmp_path / "nowhere")
  with pytest.raises(UserError, match="config.json.*is a file"):
    load_hf_gpt2(HF_DIR / "config.json")


def test_missing_config_or_weights(tmp_path):
  directory = copy_checkpoint(tmp_path)
  (directory / "model.safetensors").unlink()
  with pytest.raises(NotFoundError, match="model.safetensors"):
    load_hf_gpt2(directory)
  (directory / "config.json").unlink()
  with pytest.raises(NotFoundError, match="config.json"):
    load_hf_gpt2(directory)


def test_malformed_config(tmp_path):
  directory = copy_checkpoint(tmp_path)
  (directory / "config.json").write_text('{"n_embd": 16,')
  with pytest.raises(UserError, match="config.json is not valid JSON"):
    load_hf_gpt2(directory)
  (directory / "config.json").write_text("[1, 2]")
  with pytest.raises(UserError, match="config.json must hold a JSON object"):
    load_hf_gpt2(directory)


@pytest.mark.parametrize("changes, message", [
    (dict(activation_function="swish"), "activation_function 'swish'"),
    (dict(model_type="llama"), "model_type 'llama'"),
    (dict(n_head=5), "config.json.*d_model"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_config(tmp_path, changes, message):
  directory = copy_checkpoint(tmp_path)
  edit_config(directory, **changes)
  with pytest.raises(UserError, match=message):
    load_hf_gpt2(directory)


def test_missing_tensor_wrong_shape_and_corrupt_file(tmp_path):
  directory = copy_checkpoint(tmp_path)
  weights = directory / "model.safetensors"
  tensors = load_file(weights)
  save_file({k: v for k, v in tensors.items() if "h.1.mlp.c_fc.bias" not in k}, weights)
  with pytest.raises(UserError, match=r"model.safetensors has no tensor 'h.1.mlp.c_fc.bias'"):
    load_hf_gpt2(directory)
  tensors["transformer.h.0.attn.c_proj.weight"] = np.zeros((16, 8), np.float32)
  save_file(tensors, weights)
  with pytest.raises(UserError, match=r"model.safetensors.*'h.0.attn.c_proj.weight'.*\(16, 8\)"):
    load_hf_gpt2(directory)
  weights.write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match="model.safetensors is not a readable safetensors"):
    load_hf_gpt2(directory)


def test_untied_config_without_lm_head(tmp_path):
  directory = copy_checkpoint(tmp_path)
  edit_config(directory, tie_word_embeddings=False)
  with pytest.raises(UserError, match="no tensor 'lm_head.weight'"):
    load_hf_gpt2(directory)


# ---------------------------------------------------------------------------------------------
# Live comparisons with transformers (skipped where torch / transformers are missing)


def test_pytorch_bin_checkpoint(tmp_path, expected):
  torch = pytest.importorskip("torch")
  tokens, logits = expected
  directory = copy_checkpoint(tmp_path)
  weights = directory / "model.safetensors"
  torch.save({k: torch.from_numpy(v) for k, v in load_file(weights).items()},
             directory / "pytorch_model.bin")
  weights.unlink()
  cfg, params = load_hf_gpt2(directory)
  assert rel_err(forward(cfg, params, tokens), logits) <= PARITY


def hf_logits(transformers_lib, directory, tokens):
  torch, transformers = transformers_lib
  model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens)).long()).logits.float().numpy()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_live_parity_on_fresh_tokens(transformers_lib, scan_layers):
  tokens = np.random.default_rng(7).integers(0, 96, (3, 32))
  cfg, params = load_hf_gpt2(HF_DIR, scan_layers=scan_layers)
  assert rel_err(forward(cfg, params, tokens),
                 hf_logits(transformers_lib, HF_DIR, tokens)) <= PARITY


@pytest.mark.parametrize("activation, tie", [("relu", False), ("gelu", True)])
def test_live_parity_of_saved_random_model(transformers_lib, tmp_path, loaded, activation, tie):
  """Our random weights (every bias and norm random) -> save_hf_gpt2 -> transformers."""
  cfg = loaded[0].replace(activation=activation, tie_embeddings=tie)
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), abstract_params(cfg))
  save_hf_gpt2(params, cfg, tmp_path / "random")
  tokens = rng.integers(0, 96, (2, 32))
  assert rel_err(forward(cfg, params, tokens),
                 hf_logits(transformers_lib, tmp_path / "random", tokens)) <= PARITY
