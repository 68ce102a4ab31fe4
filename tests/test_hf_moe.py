"""Mixtures of experts and Qwen3 from and to Hugging Face: MixtralForCausalLM (top-2 of 4),
Qwen3MoeForCausalLM (top-4 of 8, renormalised, a dense first layer, heads of 16 dimensions),
OlmoeForCausalLM (top-2 of 8, not renormalised) and the dense Qwen3ForCausalLM: logits in both
layer layouts and through the KV cache, the load-balancing loss, greedy generation, export,
presets' parameter counts, bad input.

Fixtures: tests/fixtures/make_hf_moe_fixture.py (random 2-layer models of width 32 and their
transformers outputs). Float32 parity: per element within 1e-4 of the largest logit.
"""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import get_config
from model.decode.sampling import generate
from model.errors import UserError
from model.families import abstract_params, build, count_params
from model.hf import HF_CLASSES, export_type, load_hf, save_hf
from model.kv_cache import init_cache
from model.moe import MOE_COLLECTION, moe_metrics
from training.perf.flops import flops_per_token

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
NAMES = ("mixtral", "qwen3_moe", "olmoe", "qwen3")
MOE_NAMES = NAMES[:3]


@pytest.fixture(scope="module")
def expected():
  return dict(np.load(FIXTURES / "hf_moe_expected.npz"))


def assert_parity(got, want, tol=1e-4):
  """Per element within tol of the reference's largest magnitude (float32 logits)."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol * np.abs(want).max())


@functools.partial(jax.jit, static_argnames="cfg")
def forward(cfg, params, tokens_BT):
  logits, sown = build(cfg).apply({"params": params}, tokens_BT, mutable=[MOE_COLLECTION])
  aux = moe_metrics(sown[MOE_COLLECTION], cfg)["moe_aux_loss"] if cfg.num_experts else 0.0
  return logits[..., :cfg.vocab_size], aux


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_load_balancing_loss_equal_transformers(expected, name, scan_layers):
  cfg, params = load_hf(FIXTURES / f"hf_{name}", scan_layers=scan_layers)
  logits, aux = forward(cfg, params, jnp.asarray(expected[f"{name}_tokens"]))
  assert_parity(logits, expected[f"{name}_logits"])
  if cfg.num_experts:
    np.testing.assert_allclose(aux, expected[f"{name}_aux"], rtol=1e-5)


def test_the_fixtures_configs_are_read_whole():
  mixtral = load_hf(FIXTURES / "hf_mixtral")[0]
  qwen = load_hf(FIXTURES / "hf_qwen3_moe")[0]
  olmoe = load_hf(FIXTURES / "hf_olmoe")[0]
  dense = load_hf(FIXTURES / "hf_qwen3")[0]
  assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.router, mixtral.rope_theta,
          mixtral.router_aux_loss_coef, mixtral.qk_norm) == (4, 2, "topk_softmax", 1e6, 1e-3,
                                                             "none")
  assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.router, qwen.norm_topk_prob,
          qwen.moe_layers, qwen.sparse_layers, qwen.expert_mlp, qwen.d_mlp, qwen.head_dim,
          qwen.qk_norm) == (8, 4, "softmax_topk", True, "1", (False, True), 24, 40, 16, "head")
  assert (olmoe.router, olmoe.norm_topk_prob, olmoe.qk_norm, olmoe.expert_mlp) == (
      "softmax_topk", False, "full", 24)
  assert (dense.num_experts, dense.head_size, dense.qk_norm, dense.tie_embeddings) == (
      0, 16, "head", True)


@pytest.mark.parametrize("name", NAMES)
def test_cached_decode_equals_transformers(expected, name):
  """Prefill 24 tokens, then one token at a time through the KV cache (the routing of one new
  token at a time)."""
  cfg, params = load_hf(FIXTURES / f"hf_{name}", scan_layers=name == "qwen3_moe")
  tokens = expected[f"{name}_tokens"]
  step = jax.jit(lambda p, t, pos, c: build(cfg).apply({"params": p}, t, positions_BT=pos,
                                                        cache=c))
  logits, cache = step(params, jnp.asarray(tokens[:, :24]),
                       jnp.broadcast_to(jnp.arange(24), (2, 24)), init_cache(cfg, 2, 64))
  outs = [np.asarray(logits)]
  for t in range(24, 40):
    logits, cache = step(params, jnp.asarray(tokens[:, t:t + 1]), jnp.full((2, 1), t), cache)
    outs.append(np.asarray(logits))
  assert_parity(np.concatenate(outs, axis=1)[..., :cfg.vocab_size], expected[f"{name}_logits"])


@pytest.mark.parametrize("name, scan_layers", [("mixtral", False), ("qwen3_moe", True),
                                               ("olmoe", True), ("qwen3", False)])
def test_greedy_generation_equals_transformers_over_48_tokens(expected, name, scan_layers):
  cfg, params = load_hf(FIXTURES / f"hf_{name}", scan_layers=scan_layers)
  out = generate(params, cfg, [expected[f"{name}_prompt"][0].tolist()], max_new_tokens=48,
                 temperature=0.0)
  np.testing.assert_array_equal(out.tokens[0], expected[f"{name}_greedy"])


@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_round_trip(tmp_path, name):
  cfg, params = load_hf(FIXTURES / f"hf_{name}")
  assert save_hf(params, cfg, tmp_path / "out") == name
  again_cfg, again = load_hf(tmp_path / "out")
  assert again_cfg == cfg
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


RANDOM_MODELS = {
    "mixtral": dict(num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=4, router="softmax_topk",
                      norm_topk_prob=False, qk_norm="head", head_size=16, expert_d_mlp=24,
                      moe_layers="every:2", num_layers=4, scan_layers=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, router="softmax_topk",
                  qk_norm="full", tie_embeddings=False),
    "qwen3": dict(qk_norm="head", head_size=16, num_kv_heads=1),
}


@pytest.mark.parametrize("name", RANDOM_MODELS)
def test_our_random_models_exported_give_transformers_the_same_logits(transformers_lib,
                                                                      tmp_path, name):
  """Random weights (norms and routers too) -> save_hf -> transformers' class: the same
  logits over 48 positions (qwen3_moe: the scan layout of dense and sparse layers
  alternating)."""
  torch, transformers = transformers_lib
  cfg = get_config("llama-tiny", **{**dict(vocab_size=96, block_size=64, num_layers=2,
                                           d_model=32, num_heads=4, d_mlp=40),
                                    **RANDOM_MODELS[name]})
  rng = np.random.default_rng(len(name))
  params = jax.tree_util.tree_map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(np.float32), abstract_params(cfg))
  assert export_type(cfg) == name
  save_hf(params, cfg, tmp_path / "random")
  model = getattr(transformers, HF_CLASSES[name]).from_pretrained(tmp_path / "random").eval()
  tokens = rng.integers(0, 96, (2, 48))
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens)).logits.numpy()
  assert_parity(forward(cfg, params, jnp.asarray(tokens))[0], theirs)


def test_live_parity_of_the_fixtures_on_fresh_tokens(transformers_lib):
  torch, transformers = transformers_lib
  tokens = np.random.default_rng(7).integers(0, 300, (2, 64))
  for name in NAMES:
    cls = getattr(transformers, HF_CLASSES[name])
    model = cls.from_pretrained(FIXTURES / f"hf_{name}").eval()
    with torch.no_grad():
      out = model(torch.from_numpy(tokens), output_router_logits=name != "qwen3")
    cfg, params = load_hf(FIXTURES / f"hf_{name}")
    logits, aux = forward(cfg, params, jnp.asarray(tokens))
    assert_parity(logits, out.logits.numpy())
    if cfg.num_experts:
      np.testing.assert_allclose(aux, float(out.aux_loss), rtol=1e-5)


# --- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, total, active", [
    ("mixtral-8x7b", 46.70, 12.88), ("qwen3-30b-a3b", 30.53, 3.35), ("olmoe-1b-7b", 6.92, 1.28),
    ("qwen3-0.6b", 0.596, 0.596)])
def test_presets_have_the_published_parameter_counts(preset, total, active):
  cfg = get_config(preset)
  assert count_params(cfg) / 1e9 == pytest.approx(total, abs=0.005)
  assert count_params(cfg, active=True) / 1e9 == pytest.approx(active, abs=0.005)


def test_flops_count_the_active_parameters():
  """6 N + 12 L T H K with N the non-embedding parameters a token uses: Mixtral's 2 of 8
  experts per layer (and the router), heads of 128."""
  cfg = get_config("mixtral-8x7b")
  D, F, L, H, G, K, E, V = 4096, 14336, 32, 32, 8, 128, 8, 32000
  per_layer = D * H * K * 2 + D * 2 * G * K + 2 * 3 * D * F + D * E + 2 * D
  N = L * per_layer + D + V * D  # the untied head is a matmul, the embedding a lookup
  assert flops_per_token(cfg, 4096) == 6 * N + 12 * L * 4096 * H * K


# --- bad input ---------------------------------------------------------------------------------

def _edited_copy(tmp_path, name, **changes):
  out = tmp_path / "ckpt"
  shutil.copytree(FIXTURES / f"hf_{name}", out)
  data = json.loads((out / "config.json").read_text())
  data.update(changes)
  (out / "config.json").write_text(json.dumps(data))
  return out


@pytest.mark.parametrize("name, changes, message", [
    ("mixtral", dict(model_type="deepseek_v3", n_group=8, topk_group=4),
     r"model_type 'deepseek_v3' routes its experts with DeepSeek-V3's group-limited top-k of "
     r"sigmoid scores .* which is not implemented here; the routers here are Mixtral's"),
    ("mixtral", dict(router_jitter_noise=0.1), r"router_jitter_noise 0.1 is not implemented"),
    ("mixtral", dict(num_experts_per_tok=5),
     r"num_experts_per_tok \(5\) must be between 1 and num_experts \(4\)"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=16),
     r"sliding-window attention \(sliding_window 16\) is not implemented here"),
    ("olmoe", dict(clip_qkv=8.0), r"clip_qkv 8.0 is not implemented here"),
])
def test_unsupported_checkpoints_are_one_sentence(tmp_path, name, changes, message):
  with pytest.raises(UserError, match=message):
    load_hf(_edited_copy(tmp_path, name, **changes))


@pytest.mark.parametrize("changes, message", [
    (dict(num_shared_experts=1), r"MixtralForCausalLM has no shared experts"),
    (dict(moe_layers="1"), r"MixtralForCausalLM makes every layer sparse"),
    (dict(router="softmax_topk", norm_topk_prob=False),
     r"MixtralForCausalLM routes with a softmax then the top-k probabilities renormalised"),
    (dict(qk_norm="full", head_size=16), r"OlmoeForCausalLM .* head_size=16"),
])
def test_models_hugging_face_cannot_express_are_one_sentence(changes, message):
  cfg = get_config("llama-tiny", vocab_size=64, num_layers=2, d_model=32, num_heads=4,
                   num_experts=4, **changes)
  with pytest.raises(UserError, match=message):
    export_type(cfg)
