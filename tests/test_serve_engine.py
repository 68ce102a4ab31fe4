"""The serving engine without a port (training/serve/engine.py, model/decode/slots.py):
batching is real (requests decoded together give exactly the tokens they give alone, and
model.decode.sampling.generate's), nothing compiles after warm-up, and text never splits a
character or leaks a stop string (training/serve/detokenize.py)."""

import threading

import jax
import numpy as np
import pytest

from conftest import MESH_CFG
from model.config import get_config
from model.decode.sampling import Buckets, generate
from model.families import init_params
from model.tokenizer import CharTokenizer, get_tokenizer
from sharding import make_mesh
from training.serve.detokenize import IncrementalText
from training.serve.engine import Engine, EngineConfig
from training.serve.requests import Request

EMOJI_CJK = "Hello 👋🏽 世界！ café — 東京の寿司🍣 is good 😀. Ünïcödé ✓"


@pytest.mark.slow
def test_32_concurrent_requests_give_the_tokens_they_give_alone():
  """A Llama-style model (rotary, grouped-query cache), prompts of 5-200 tokens, max_tokens
  1-128, greedy and seeded sampling: concurrent == alone == generate; peak slots > 1; no
  program compiled after warm-up."""
  cfg = get_config("llama-tiny", num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                   d_mlp=128, vocab_size=97, block_size=336)
  params = init_params(cfg, jax.random.key(1))
  tok = CharTokenizer([chr(32 + i) for i in range(97)])
  engine = Engine(params, cfg, tok, EngineConfig(slots=8, decode_steps=8, top_n=2,
                                                 max_prefills=2, max_queue=64,
                                                 prompt_logprobs=False))
  engine.compile()
  engine.start()
  rng = np.random.default_rng(0)
  requests = [Request(prompt=rng.integers(0, 97, int(rng.integers(5, 201))).tolist(),
                      max_tokens=int(rng.integers(1, 129)), seed=i, choice=0,
                      temperature=[0.0, 0.9][i % 2], top_k=[0, 0, 20, 0][i % 4],
                      top_p=[1.0, 1.0, 1.0, 0.8][i % 4]) for i in range(32)]
  try:
    alone = [engine.generate(r, timeout=300).token_ids for r in requests[:8]]
    results = [None] * len(requests)

    def run(i):
      results[i] = engine.generate(requests[i], timeout=600).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    engine.stop()
  assert results[:8] == alone
  assert engine.peak_active == 8 and engine.compiles_after_warmup == 0
  one = Buckets(batch=1, prompt_len=256, cache_len=336, out_len=128)  # one compile per variant
  for r, got in zip(requests, results):
    assert len(got) == r.max_tokens
    want = generate(params, cfg, [r.prompt], max_new_tokens=r.max_tokens, buckets=one,
                    temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed)
    assert got == want.tokens[0]


@pytest.mark.parametrize("data,tensor", [(1, 8), (8, 1)], ids=["tensor8", "data8"])
def test_a_sharded_mesh_serves_the_tokens_of_one_device(data, tensor):
  """The 8 CPU devices split the heads, MLP and vocabulary (tensor) or the slots (data):
  requests served together give generate's tokens on one device (greedy and seeded)."""
  cfg = get_config("tiny", **MESH_CFG)  # block 16: one prompt bucket
  params = init_params(cfg, jax.random.key(2))
  tok = CharTokenizer([chr(48 + i) for i in range(cfg.vocab_size)])
  mesh = make_mesh(data, 1, tensor)
  engine = Engine(params, cfg, tok, EngineConfig(slots=8, decode_steps=4, top_n=1,
                                                 prompt_logprobs=False,
                                                 sampling=("greedy", "sorted")), mesh=mesh)
  assert engine.programs.params["h_0"]["attn"]["c_attn"]["kernel"].sharding.mesh == mesh
  rng = np.random.default_rng(1)
  requests = [Request(prompt=rng.integers(0, 64, int(rng.integers(2, 9))).tolist(),
                      max_tokens=int(rng.integers(4, 9)), seed=i,
                      temperature=0.0 if i % 3 else 0.8, top_k=0 if i % 3 else 10)
              for i in range(10)]
  results = [None] * len(requests)
  engine.start()
  try:
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, engine.generate(requests[i], timeout=300).token_ids)) for i in range(len(requests))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    engine.stop()
  assert engine.peak_active > 1 and engine.compiles_after_warmup == 0
  one = Buckets(batch=1, prompt_len=8, cache_len=16, out_len=8)  # one compile per variant
  for r, got in zip(requests, results):
    want = generate(params, cfg, [r.prompt], max_new_tokens=r.max_tokens, buckets=one,
                    temperature=r.temperature, top_k=r.top_k, seed=r.seed)
    assert got == want.tokens[0]


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_text_streams_whole_characters_and_holds_back_stop_strings(name):
  """Real splits: GPT-2 BPE cuts emoji and CJK characters into byte tokens; a stop string
  that spans tokens is never released, even in part."""
  tok = get_tokenizer("gpt2") if name == "gpt2" else CharTokenizer.from_text(EMOJI_CJK)
  ids = tok.encode(EMOJI_CJK)
  if name == "gpt2":
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
  text = IncrementalText(tok, tok.encode("Hello "))
  pieces = [text.push(i) for i in ids] + [text.finish()]
  assert "".join(pieces) == EMOJI_CJK and not any("\ufffd" in p for p in pieces)
  stop = "寿司🍣"
  text = IncrementalText(tok, [], stop=["zzz", stop])
  pieces = [text.push(i) for i in ids] + [text.finish()]
  assert "".join(pieces) == EMOJI_CJK[:EMOJI_CJK.index(stop)] and text.stopped
  assert not any(stop[0] in p for p in pieces)
