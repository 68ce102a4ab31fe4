"""The encoder (bert) and encoder-decoder (encdec) families from the shared blocks: attention
direction, padding, the cross-attention cache, generation and beam search, and one training
step on every mesh shape. Float32 on CPU: equalities hold to 1e-5 relative (rel_err), exact
where no arithmetic differs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import adamw_start, rel_err
from model import encdec
from model.decode import seq2seq
from model.config import ModelConfig
from model.encoder import Encoder
from model.decode.fill_mask import fill_mask
from model.families import build, init_params
from model.layout import convert_layout
from sharding import make_mesh, shard_batch
from training.data.mlm import mask_tokens
from training.data.pairs import infill, pack_pair, reverse_pairs
from training.data.sources import special_ids

V = 40
SPECIALS = special_ids(V - 4)  # pad 36, bos 37, eos 38, mask 39


def bert_cfg(**kw):
  base = dict(family="bert", vocab_size=V, block_size=16, num_layers=2, num_heads=4, d_model=32,
              type_vocab_size=2, embed_norm=True, norm_placement="post", activation="gelu",
              head_bias=True, pad_id=SPECIALS["pad_id"], mask_id=SPECIALS["mask_id"])
  return ModelConfig(**{**base, **kw})


def encdec_cfg(**kw):
  base = dict(family="encdec", vocab_size=V, block_size=16, num_layers=2, num_decoder_layers=1,
              num_heads=4, d_model=32, embed_norm=True, head_bias=True, **SPECIALS)
  return ModelConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def params_of(cfg):
  """Random parameters with non-trivial LayerNorms and biases (all parameters drawn)."""
  p = init_params(cfg, jax.random.key(1))
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def tokens(shape, seed=0, high=V - 4):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape), jnp.int32)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_encoder_sees_both_directions_and_ignores_padding(scan):
  cfg = bert_cfg(scan_layers=scan)
  p = convert_layout(params_of(bert_cfg()), cfg)
  apply = jax.jit(lambda x, m=None: Encoder(cfg).apply({"params": p}, x, m))
  x = tokens((2, 12))
  later = x.at[:, 9].set((x[:, 9] + 1) % (V - 4))
  out, out_later = apply(x), apply(later)
  assert out.shape == (2, 12, cfg.padded_vocab_size)
  assert float(jnp.max(jnp.abs(out[:, :9] - out_later[:, :9]))) > 1e-3  # bidirectional
  # A padded batch: row 0 padded from 7 on with arbitrary tokens, masked out.
  mask = jnp.ones((2, 12), bool).at[0, 7:].set(False)
  junk = x.at[0, 7:].set(tokens((5,), seed=3))
  padded = apply(junk, mask)
  short = apply(x[:1, :7])
  assert rel_err(padded[0, :7], short[0]) < 1e-5
  assert rel_err(padded[1], out[1]) < 1e-5
  # hidden states [B, T, D], the same in both layouts
  hidden = jax.jit(lambda: Encoder(cfg).apply({"params": p}, x, return_hidden=True))()
  loop_p = params_of(bert_cfg())
  loop_hidden = jax.jit(lambda: Encoder(bert_cfg()).apply({"params": loop_p}, x,
                                                          return_hidden=True))()
  assert hidden.shape == (2, 12, cfg.d_model) and rel_err(hidden, loop_hidden) < 1e-5


def test_token_types_change_the_output():
  cfg = bert_cfg()
  p = params_of(cfg)
  x = tokens((1, 8))
  apply = jax.jit(lambda x, types=None: Encoder(cfg).apply({"params": p}, x, None, types))
  a, b = apply(x), apply(x, jnp.ones_like(x))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_decoder_is_causal_encoder_bidirectional_and_source_padding_ignored(scan):
  cfg = encdec_cfg(scan_layers=scan)
  p = convert_layout(params_of(encdec_cfg()), cfg)
  apply = jax.jit(lambda s, t, m=None: build(cfg).apply({"params": p}, s, t, m))
  src, tgt = tokens((2, 10)), tokens((2, 9), seed=1)
  out = apply(src, tgt)
  assert out.shape == (2, 9, cfg.padded_vocab_size)
  changed = apply(src, tgt.at[:, 5].set((tgt[:, 5] + 1) % (V - 4)))
  assert float(jnp.max(jnp.abs(out[:, :5] - changed[:, :5]))) == 0.0  # causal
  assert float(jnp.max(jnp.abs(out[:, 5:] - changed[:, 5:]))) > 1e-3
  later_src = apply(src.at[:, 8].set((src[:, 8] + 1) % (V - 4)), tgt)
  assert float(jnp.max(jnp.abs(out[:, 0] - later_src[:, 0]))) > 1e-3  # every target position
  mask = jnp.ones((2, 10), bool).at[0, 6:].set(False)
  padded = apply(src.at[0, 6:].set(tokens((4,), seed=4)), tgt, mask)
  assert rel_err(padded[0], apply(src[:1, :6], tgt[:1])[0]) < 1e-5
  assert rel_err(padded[1], out[1]) < 1e-5


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_cached_decoding_equals_the_full_forward(scan, placement):
  cfg = encdec_cfg(scan_layers=scan, norm_placement=placement,
                   position_embedding="sinusoidal" if placement == "post" else "learned",
                   embed_scale=placement == "post")
  p = convert_layout(params_of(encdec_cfg(norm_placement=placement,
                                          position_embedding=cfg.position_embedding,
                                          embed_scale=cfg.embed_scale)), cfg)
  src, tgt = tokens((2, 10)), tokens((2, 7), seed=1)
  mask = jnp.ones((2, 10), bool).at[1, 4:].set(False)
  full = jax.jit(lambda: build(cfg).apply({"params": p}, src, tgt, mask))()
  cache = jax.jit(lambda: encdec.start_cache(p, cfg, src, mask, 16))()
  decode = jax.jit(lambda t, pos, c: encdec.decode(p, cfg, t, pos, c))
  # the first 3 target tokens in one call, then one at a time
  first, cache = decode(tgt[:, :3], jnp.broadcast_to(jnp.arange(3), (2, 3)), cache)
  steps = [first]
  for t in range(3, 7):
    logits, cache = decode(tgt[:, t:t + 1], jnp.full((2, 1), t), cache)
    steps.append(logits)
  assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_unequal_halves_decode_with_the_cache_and_generate_as_the_full_forward(scan):
  """A decoder with its own heads (2 vs the encoder's 4), MLP width and layers: the cached
  decode equals the full forward, and greedy generation the uncached argmax."""
  base = encdec_cfg(num_decoder_heads=2, decoder_d_mlp=48, num_decoder_layers=2)
  cfg = base.replace(scan_layers=scan)
  p = convert_layout(params_of(base), cfg)
  assert p["dec" if scan else "dec_0"]["cross"]["c_q"]["kernel"].shape[-2:] == (2, 16)
  src, tgt = tokens((2, 10)), tokens((2, 7), seed=1)
  mask = jnp.ones((2, 10), bool).at[1, 4:].set(False)
  full = jax.jit(lambda: build(cfg).apply({"params": p}, src, tgt, mask))()
  cache = jax.jit(lambda: encdec.start_cache(p, cfg, src, mask, 16))()
  decode = jax.jit(lambda t, pos, c: encdec.decode(p, cfg, t, pos, c))
  steps = []
  for t in range(7):
    logits, cache = decode(tgt[:, t:t + 1], jnp.full((2, 1), t), cache)
    steps.append(logits)
  assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5
  sources = [list(np.asarray(tokens((9,), seed=s))) for s in range(2)]
  for src_row, (ids, stopped) in zip(sources, seq2seq.generate(p, cfg, sources,
                                                                 max_new_tokens=6)):
    want = list(_greedy_reference(p, cfg, jnp.asarray([src_row]), 6)[0])
    assert ids == (want[:want.index(cfg.eos_id)] if stopped else want)


def _greedy_reference(p, cfg, src, n):
  """Greedy decoding by re-running the full forward on the growing target (no cache)."""
  mask = jnp.ones(src.shape, bool)
  out = jnp.full((src.shape[0], n + 1), cfg.bos_id, jnp.int32)
  forward = jax.jit(lambda tgt: build(cfg).apply({"params": p}, src, tgt, mask))
  for t in range(n):  # full forward on the whole buffer; position t sees only tokens <= t
    logits = forward(out[:, :-1])[:, t, :cfg.vocab_size]
    out = out.at[:, t + 1].set(jnp.argmax(logits, -1).astype(jnp.int32))
  return np.asarray(out[:, 1:])


def test_greedy_generation_equals_uncached_argmax_and_one_beam():
  cfg = encdec_cfg()
  p = params_of(cfg)
  sources = [list(np.asarray(tokens((9,), seed=s))) for s in range(3)]
  sources[1] = sources[1][:5]
  outs = seq2seq.generate(p, cfg, sources, max_new_tokens=8)
  for src, (ids, stopped) in zip(sources, outs):
    want = list(_greedy_reference(p, cfg, jnp.asarray([src]), 8)[0])
    if cfg.eos_id in want:
      assert stopped and ids == want[:want.index(cfg.eos_id)]
    else:
      assert not stopped and ids == want
  src, mask = seq2seq.pad_sources(sources, cfg)
  seqs, _ = seq2seq._beam_loop(p, src, mask, 1.0, cfg=cfg, max_new_tokens=8, num_beams=1,
                               early_stopping=False)
  beam = [seq2seq._cut(r, cfg.eos_id)[0] for r in np.asarray(seqs[:, 0, 1:])]
  assert beam == [ids for ids, _ in outs]
  # sampling: deterministic by seed, and different seeds differ somewhere
  a = seq2seq.generate(p, cfg, sources, max_new_tokens=8, temperature=1.0, seed=1)
  assert a == seq2seq.generate(p, cfg, sources, max_new_tokens=8, temperature=1.0, seed=1)
  assert a != seq2seq.generate(p, cfg, sources, max_new_tokens=8, temperature=1.0, seed=2)


def test_generation_bad_input_is_one_sentence():
  cfg = encdec_cfg()
  p = params_of(cfg)
  with pytest.raises(Exception, match="more than the model's 16 positions"):
    seq2seq.generate(p, cfg, [[1] * 17], max_new_tokens=4)
  with pytest.raises(Exception, match="deterministic"):
    seq2seq.generate(p, cfg, [[1, 2]], max_new_tokens=4, num_beams=2, temperature=0.5)


def test_fill_mask_candidates_are_the_softmax_at_the_mask():
  cfg = bert_cfg()
  p = params_of(cfg)
  m = cfg.mask_id
  rows = [[1, 2, m, 4, 5], [m, 7, 8, 9, 10, 11, m]]
  results = fill_mask(p, cfg, rows, mask_id=m, top_k=3, exclude=range(V - 4, V))
  assert [[pos for pos, _ in r] for r in results] == [[2], [0, 6]]
  logits = jax.jit(lambda x: Encoder(cfg).apply({"params": p}, x))(
      jnp.asarray([rows[1]]))[0, 6, :V]
  probs = np.asarray(jax.nn.softmax(jnp.where(jnp.arange(V) >= V - 4, -jnp.inf, logits)))
  want = np.argsort(-probs)[:3]
  got = results[1][1][1]
  assert [t for t, _ in got] == list(want)
  assert np.allclose([q for _, q in got], probs[want], rtol=1e-5)


def test_mlm_masking_follows_bert():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 36, 200_000)
  inputs, targets = mask_tokens(np.random.default_rng(1), x, base_vocab=36, mask_id=39,
                                probability=0.15)
  chosen = targets >= 0
  assert abs(chosen.mean() - 0.15) < 0.005
  assert np.array_equal(targets[chosen], x[chosen]) and np.array_equal(inputs[~chosen],
                                                                       x[~chosen])
  as_mask = (inputs[chosen] == 39).mean()
  kept = (inputs[chosen] == x[chosen]).mean()
  assert abs(as_mask - 0.8) < 0.01 and abs(kept - (0.1 + 0.1 / 36)) < 0.01


def _task_batch(cfg, B, seed):
  rng = np.random.default_rng(seed)
  if cfg.family == "bert":
    rows = [np.concatenate(mask_tokens(rng, rng.integers(0, V - 4, 16), base_vocab=V - 4,
                                       mask_id=cfg.mask_id, probability=0.3))
            for _ in range(B)]
  else:
    rows = [pack_pair(rng.integers(0, V - 4, rng.integers(3, 17)),
                      rng.integers(0, V - 4, rng.integers(1, 16)), 16, 16, SPECIALS)
            for _ in range(B)]
  return np.stack(rows).astype(np.int32)


def _two_steps(cfg, mesh, host_state=None):
  width = 32 if cfg.family == "bert" else 33
  state, step, initial = adamw_start(cfg, mesh, (8, width), host_state, label_smoothing=0.1)
  out = []
  for i in range(2):
    state, metrics = step(state, shard_batch(_task_batch(cfg, 8, i), mesh))
    out.append((float(metrics["loss"]), float(metrics["accuracy"])))
  return out, initial


@pytest.mark.parametrize("family", ["bert", pytest.param("encdec", marks=pytest.mark.slow)])
def test_one_training_step_is_the_same_on_every_mesh(family):
  """Two steps (label smoothing on) give the single-device losses on (8,1,1), (1,8,1),
  (2,2,2) and (1,2,4) (data, fsdp, tensor): 8 heads (the encdec decoder's 4, and its own MLP
  width), so tensor=4 splits them."""
  make = bert_cfg if family == "bert" else functools.partial(  # unequal halves: 8 vs 4 heads
      encdec_cfg, num_decoder_heads=4, decoder_d_mlp=96)
  cfg = make(num_heads=8, vocab_size=V, padded_vocab_size=64, num_layers=1)
  want, host = _two_steps(cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
    got, _ = _two_steps(cfg, make_mesh(*shape), host)
    for (loss, acc), (want_loss, want_acc) in zip(got, want):
      assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (shape, got, want)
      assert acc == want_acc, (shape, got, want)


def test_text_infilling_replaces_spans_with_one_mask_each():
  """BART's noise: the kept tokens stay in order, each masked run becomes one mask token, and
  about `ratio` of the positions are noised."""
  rng = np.random.default_rng(0)
  tokens = np.arange(2000, dtype=np.int32)
  mask_id = 5000
  out = infill(rng, tokens, mask_id=mask_id, ratio=0.3, span=3.0)
  kept = out[out != mask_id]
  assert np.all(np.diff(kept) > 0)  # a subsequence, in order
  assert 0.28 < 1 - len(kept) / len(tokens) < 0.34
  # a gap in the kept ids (removed tokens) is always marked by at least one mask
  positions = np.flatnonzero(out != mask_id)
  for a, b in zip(positions[:-1], positions[1:]):
    if out[b] - out[a] > 1:
      assert b - a > 1, f"tokens {out[a]}..{out[b]} removed without a mask"


def test_reverse_pairs_and_their_rows(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("x" * 40 + "\nabc\n\nhello there\nzy\n")  # the split: 95% of 61 characters

  class Data(dict):
    __getattr__ = dict.get

  data = Data(path=str(text), tokenizer="char", val_fraction=0.05, cache_dir=None)
  pairs, tok, _, what = reverse_pairs(data, 16)
  decoded = {k: [(tok.decode(s), tok.decode(t)) for s, t in v] for k, v in pairs.items()}
  assert decoded == {"train": [("abc", "cba"), ("hello there", "ereht olleh")],
                     "val": [("zy", "yz")]}
  assert "1 lines longer than the model's positions left out" in what
  specials = special_ids(tok.vocab_size)
  row = pack_pair(pairs["train"][0][0], pairs["train"][0][1], 16, 16, specials)
  assert row.shape == (33,) and list(row[3:16]) == [specials["pad_id"]] * 13
  assert list(row[16:21]) == [specials["bos_id"], *tok.encode("cba"), specials["eos_id"]]
