"""Logits filtering, sampling statistics and the KV-cache generate loop
(model/decode/sampling.py)."""

import functools
import importlib.util
import pathlib

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import model
import model.kv_cache
from model.decode import logits as logits_lib
from model.decode import sampling
from model.errors import UserError
from model.decode.sampling import (Buckets, choose_buckets, filter_logits, generate,
                                   generate_stream, sample_token)
from model.hf import load_hf_gpt2
from model.gpt import GPT

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
HF_DIR = FIXTURES / "hf_gpt2_tiny"
HF_GREEDY = FIXTURES / "hf_gpt2_tiny_greedy.npz"

# Upper 1e-6 quantiles of the chi-square distribution by degrees of freedom: the x with
# P(X > x) = 1e-6, found by bisection on mpmath.gammainc(df / 2, x / 2, inf, regularized=True)
# (df = 2 gives 2 ln(1e6) = 27.631 exactly). A correct sampler fails a test at most with
# probability 1e-6 (and, with the fixed seeds, either always or never).
CHI2_CRITICAL_1E6 = {1: 23.928127, 2: 27.631021, 3: 30.66485, 4: 33.376842, 5: 35.888187}
# Most generate calls share these padded shapes, so the tests compile few loops.
BUCKETS = Buckets(batch=4, prompt_len=16, cache_len=32, out_len=16)


def _finite(x):
  return np.isfinite(np.asarray(x))


def _softmax(x):
  return np.asarray(jax.nn.softmax(jnp.asarray(x)))


@pytest.fixture(scope="module")
def cfg():
  return model.get_config("tiny")


def _random_params(cfg, seed=0):
  """N(0, 0.3) around GPT-2's init (1 for norm scales, 0 elsewhere), drawn with numpy (fast,
  no compilation). Freshly initialised params only echo the last token under greedy
  decoding, which would make the generation tests weak."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    base = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(base + 0.3 * rng.standard_normal(shape.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, model.abstract_params(cfg))


@pytest.fixture(scope="module")
def params(cfg):
  """Random tiny-model params (`_random_params`)."""
  return _random_params(cfg)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens_BT):
  return GPT(cfg).apply({"params": params}, tokens_BT)


def _greedy_without_cache(params, cfg, prompt, new_tokens):
  """Token-by-token argmax of full forward passes (no KV cache) over a right-padded buffer
  (causal attention: the padding after a position does not change its logits)."""
  seq = list(prompt)
  for _ in range(new_tokens):
    buf = np.zeros((1, cfg.block_size), np.int32)
    buf[0, :len(seq)] = seq
    logits_V = np.asarray(_forward(cfg, params, buf))[0, len(seq) - 1, :cfg.vocab_size]
    seq.append(int(np.argmax(logits_V)))
  return seq[len(prompt):]


def _sliding_greedy_without_cache(params, cfg, prompt, new_tokens, window_shift):
  """The documented rule of model/decode/sampling.py, written out with full forward passes: the
  token
  at index n of the sequence is the argmax of a forward pass over seq[w:n] at positions 0..,
  where w moves to n - (T - W + 1) whenever n - w would exceed T."""
  T, W = cfg.block_size, window_shift
  seq, w = list(prompt), 0
  while len(seq) < len(prompt) + new_tokens:
    n = len(seq)
    if n - w > T:
      w = n - (T - W + 1)
    context = seq[w:n]
    assert len(context) <= T and (w == 0 or len(context) >= T - W + 1)
    buf = np.zeros((1, T), np.int32)
    buf[0, :len(context)] = context
    logits_V = np.asarray(_forward(cfg, params, buf))[0, len(context) - 1, :cfg.vocab_size]
    seq.append(int(np.argmax(logits_V)))
  return seq[len(prompt):]


# ---------------------------------------------------------------------------------------------
# filter_logits


def test_top_p_and_top_k_keep_the_two_most_likely():
  logits = jnp.array([6.0, 4.0, 2.0, 1.0, 0.2])
  for out in (filter_logits(logits, top_p=0.95), filter_logits(logits, top_k=2)):
    np.testing.assert_array_equal(_finite(out), [True, True, False, False, False])
    np.testing.assert_allclose(_softmax(out)[:2], [0.881, 0.119], atol=1e-3)


def test_temperature_divides_logits():
  logits = jnp.array([1.0, -0.5, 2.0, 0.3])
  np.testing.assert_allclose(_softmax(filter_logits(logits, temperature=0.5)),
                             _softmax(logits / 0.5), rtol=1e-6)
  np.testing.assert_allclose(filter_logits(logits, temperature=0.5), logits / 0.5, rtol=1e-6)


def test_temperature_zero_is_argmax_with_lowest_index_on_ties():
  out = filter_logits(jnp.array([0.1, 3.0, -2.0, 1.0]), temperature=0.0)
  np.testing.assert_array_equal(_finite(out), [False, True, False, False])
  assert float(out[1]) == 3.0
  tied = filter_logits(jnp.array([1.0, 5.0, 2.0, 5.0]), temperature=0.0)
  np.testing.assert_array_equal(_finite(tied), [False, True, False, False])


def test_top_k_ties_keep_exactly_k_lower_index_first():
  logits = jnp.array([1.0, 3.0, 2.0, 3.0, 2.0, 0.0])
  np.testing.assert_array_equal(_finite(filter_logits(logits, top_k=1)), [0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(_finite(filter_logits(logits, top_k=3)), [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(_finite(filter_logits(logits, top_k=100)), [1] * 6)
  # Equal logits everywhere: top-k keeps the first k.
  np.testing.assert_array_equal(_finite(filter_logits(jnp.zeros(5), top_k=2)), [1, 1, 0, 0, 0])


def test_tiny_top_p_keeps_only_the_argmax():
  out = filter_logits(jnp.array([0.5, 2.0, 1.9, -1.0]), top_p=1e-6)
  np.testing.assert_array_equal(_finite(out), [False, True, False, False])
  tied = filter_logits(jnp.array([0.5, 2.0, 2.0]), temperature=3.0, top_p=1e-6)
  np.testing.assert_array_equal(_finite(tied), [False, True, False])


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.0), dict(top_k=3),
                                      dict(top_p=0.5), dict(temperature=2.0, top_k=6, top_p=0.9)])
def test_padded_vocab_entries_are_always_filtered(settings):
  logits = jnp.array([[1.0, 0.5, 2.0, -1.0, 0.0, 50.0, 60.0, 70.0]] * 2)
  out = filter_logits(logits, vocab_size=5, **settings)
  assert out.dtype == jnp.float32 and out.shape == (2, 8)
  assert np.all(np.asarray(out)[:, 5:] == -np.inf)
  assert np.all(_finite(out)[:, 2])  # the most likely real token survives


def test_traced_settings_match_python_settings_without_recompiling():
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 2, (3, 16)), jnp.float32)
  jitted = jax.jit(filter_logits, static_argnames="vocab_size")
  for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.6),
                                    (0.9, 5, 0.8)]:
    expected = filter_logits(logits, temperature, top_k, top_p, vocab_size=14)
    got = jitted(logits, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
                 vocab_size=14)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert jitted._cache_size() == 1


def test_each_row_takes_its_own_settings_and_every_variant_serves_its_rows():
  """One value per row: each row filtered as alone; a row gets the same result from the
  smallest variant that serves it and from every larger one (logits.VARIANTS); static_mode
  picks the smallest variant serving all rows."""
  rng = np.random.default_rng(5)
  logits = jnp.asarray(np.round(rng.normal(0, 2, (5, 300)) * 2) / 2, jnp.float32)  # ties
  # greedy, temperature only, top-k with top-p (TOP_K); top-p alone, top_k > 128 (SORTED)
  t, k, p = (np.array([0.0, 0.7, 1.0, 1.3, 0.9], np.float32), np.array([0, 0, 5, 0, 150]),
             np.array([1.0, 1.0, 0.9, 0.6, 0.8], np.float32))
  got = np.asarray(filter_logits(logits, t, k, p, vocab_size=290))
  for b in range(5):
    alone = filter_logits(logits[b], float(t[b]), int(k[b]), float(p[b]), vocab_size=290)
    np.testing.assert_array_equal(got[b], alone)
  assert [logits_lib.static_mode(t[:n], k[:n], p[:n]) for n in (1, 2, 3, 4, 5)] == [
      logits_lib.GREEDY, logits_lib.PLAIN, logits_lib.TOP_K, logits_lib.SORTED,
      logits_lib.SORTED]
  for n, smallest in ((1, logits_lib.GREEDY), (2, logits_lib.PLAIN), (3, logits_lib.TOP_K)):
    for mode in range(smallest, len(logits_lib.VARIANTS)):
      out = logits_lib._filter_jit(  # pylint: disable=protected-access
          logits[:n], t[:n], k[:n], p[:n], mode=mode, vocab_size=290)
      np.testing.assert_array_equal(out, got[:n], err_msg=logits_lib.VARIANTS[mode])
  # Drawn: the greedy row is its argmax; every row draws from what its filter kept.
  drawn = np.asarray(sample_token(jax.random.key(0), logits, t, k, p, vocab_size=290))
  assert drawn[0] == np.argmax(np.asarray(logits[0]))
  assert np.isfinite(got[np.arange(5), drawn]).all()


def test_invalid_python_settings_raise():
  for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_k=1.5), dict(top_p=0.0),
              dict(top_p=1.5)):
    with pytest.raises(UserError, match=next(iter(bad))):
      filter_logits(jnp.zeros(4), **bad)


# ---------------------------------------------------------------------------------------------
# Sampling statistics


def _reference_probs(logits, temperature, top_k, top_p, vocab_size):
  """The filtered, renormalised distribution, computed directly in numpy."""
  scaled = np.asarray(logits, np.float64)[:vocab_size] / temperature
  probs = np.exp(scaled - scaled.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")[:top_k]
  kept = order[:np.searchsorted(np.cumsum(probs[order] / probs[order].sum()), top_p) + 1]
  out = np.zeros(len(logits))
  out[kept] = probs[kept] / probs[kept].sum()
  return out


def _assert_chi_square(draws, expected_probs):
  counts = np.bincount(np.asarray(draws), minlength=len(expected_probs))
  assert counts[expected_probs == 0].sum() == 0, f"filtered tokens were drawn: {counts}"
  kept = expected_probs > 0
  expected = expected_probs[kept] * len(draws)
  chi2 = float(np.sum((counts[kept] - expected) ** 2 / expected))
  critical = CHI2_CRITICAL_1E6[int(kept.sum()) - 1]
  assert chi2 < critical, f"chi2 {chi2:.2f} >= {critical} for counts {counts} vs {expected}"


def test_sampling_frequencies_match_the_filtered_distribution():
  # Index 7 is padded vocabulary (with the largest logit); top-k 5 then top-p 0.9 keeps
  # tokens 1, 3, 5, 0 (cumulative renormalised mass 0.49, 0.75, 0.89, 0.97).
  logits = jnp.array([1.0, 2.5, 0.3, 2.0, -1.0, 1.5, 0.0, 9.0])
  settings = dict(temperature=0.8, top_k=5, top_p=0.9, vocab_size=7)
  expected = _reference_probs(logits, **settings)
  assert np.count_nonzero(expected) == 4
  num_draws = 20_000

  filtered = filter_logits(logits, **settings)
  np.testing.assert_allclose(_softmax(filtered), expected, atol=1e-6)
  draws = jax.jit(lambda k: jax.random.categorical(k, filtered, shape=(num_draws,)))(
      jax.random.key(1234))
  _assert_chi_square(draws, expected)

  # sample_token draws one token per row of a [num_draws, V] batch.
  draws = sample_token(jax.random.key(4321), jnp.broadcast_to(logits, (num_draws, 8)), **settings)
  _assert_chi_square(draws, expected)


def test_sample_token_greedy_and_batched_shapes():
  logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 11)), jnp.float32)
  tokens = sample_token(jax.random.key(0), logits, temperature=0.0)
  assert tokens.shape == (2, 3) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))
  sampled = sample_token(jax.random.key(0), logits, top_k=2, vocab_size=9)
  assert sampled.shape == (2, 3) and sampled.dtype == jnp.int32
  top2 = np.argsort(-np.asarray(logits)[..., :9], axis=-1)[..., :2]
  assert np.all(np.any(top2 == np.asarray(sampled)[..., None], axis=-1))


# ---------------------------------------------------------------------------------------------
# generate


def test_buckets():
  assert choose_buckets(3, 5, 10, 64) == Buckets(4, 8, 16, 16)
  assert choose_buckets(1, 20, 30, 64) == Buckets(1, 32, 64, 32)
  assert choose_buckets(1, 60, 4, 64) == Buckets(1, 64, 64, 8)
  assert choose_buckets(2, 500, 400, 1000) == Buckets(2, 512, 1000, 512)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_greedy_with_cache_equals_full_forward_argmax(cfg, params, scan_layers):
  cfg = cfg.replace(scan_layers=scan_layers)
  prompts = [[7], [3, 1, 4, 1, 5], list(range(20, 31))]
  # Params come in the loop layout; generate converts them to cfg's layout.
  result = generate(params, cfg, prompts, max_new_tokens=12, temperature=0.0)
  assert result.buckets == BUCKETS  # 3 rows + 1 dummy row, prompts right-padded to 16
  # The reference runs the loop layout (the same function; compiled once for both cases).
  loop_cfg = cfg.replace(scan_layers=False)
  expected = [_greedy_without_cache(params, loop_cfg, p, 12) for p in prompts]
  assert result.tokens == expected
  assert result.stopped == [False] * 3 and result.decode_steps == 11


@pytest.mark.parametrize("cache_reads", ["filled", "all"])
def test_rows_stop_independently_on_eot_and_the_loop_ends_early(cfg, params, cache_reads):
  """Rows stop inside a chunk of DECODE_CHUNK tokens and stay stopped; the loop's step count
  is the tokens', not a multiple of the chunk."""
  new_tokens = 12
  greedy = functools.partial(generate, params, cfg, max_new_tokens=new_tokens, temperature=0.0,
                             buckets=BUCKETS, cache_reads=cache_reads)
  row0, row_never = [9, 2, 33], [5]
  full0, full_never = greedy([row0, row_never]).tokens
  row1 = row0 + full0[:3]  # three tokens further along the same greedy path
  (full1,) = greedy([row1]).tokens
  # eot: a token that row 0 first produces at step >= 4 (so row 1, 3 steps ahead, stops first).
  eot = next(t for i, t in enumerate(full0) if i >= 4 and t not in full0[:i] + full_never)
  stops = [full0.index(eot), full1.index(eot)]
  assert stops[0] != stops[1], "test setup: the rows should stop at different steps"

  result = greedy([row0, row1], eot_id=eot)
  assert result.tokens == [full0[:stops[0]], full1[:stops[1]]]
  assert result.stopped == [True, True]
  assert result.decode_steps == max(stops) < new_tokens - 1  # the loop ended early

  with_eot = greedy([row0, row1], eot_id=eot, include_eot=True)
  assert with_eot.tokens == [full0[:stops[0] + 1], full1[:stops[1] + 1]]

  # A row that never produces eot runs to max_new_tokens while the others have stopped.
  mixed = greedy([row0, row_never, row1], eot_id=eot)
  assert mixed.tokens == [full0[:stops[0]], full_never, full1[:stops[1]]]
  assert mixed.stopped == [True, False, True] and mixed.decode_steps == new_tokens - 1


def test_invalid_requests_raise_clear_errors(cfg, params):
  with pytest.raises(UserError, match=r"Prompt 0 \(65 tokens\) is longer than the model's "
                     r"block_size \(64\)"):
    generate(params, cfg, [[1] * 65, [2]], max_new_tokens=10)
  with pytest.raises(UserError, match=r"window_shift must be an integer in \[1, block_size = "
                     r"64\], got 0"):
    generate(params, cfg, [[1]], max_new_tokens=100, window_shift=0)
  with pytest.raises(UserError, match="Prompt 1 is empty"):
    generate(params, cfg, [[1, 2], []], max_new_tokens=4)
  with pytest.raises(UserError, match="non-empty list"):
    generate(params, cfg, [], max_new_tokens=4)
  with pytest.raises(UserError, match=r"outside \[0, 128\)"):
    generate(params, cfg, [[1, 128]], max_new_tokens=4)
  with pytest.raises(UserError, match="max_new_tokens"):
    generate(params, cfg, [[1]], max_new_tokens=0)
  with pytest.raises(UserError, match="top_p"):
    generate(params, cfg, [[1]], max_new_tokens=4, top_p=0.0)
  with pytest.raises(UserError, match="cache_len 32 < 40"):
    generate(params, cfg, [[1] * 20], max_new_tokens=20, buckets=BUCKETS)
  with pytest.raises(UserError, match="Prompt 0 is empty"):
    generate_stream(params, cfg, [[]], max_new_tokens=4)  # raised before the first next()


@pytest.fixture(scope="module")
def short_model(cfg, params):
  """The tiny model cut to block size 16 (positions 0..15 of its embedding)."""
  short = cfg.replace(block_size=16)
  return short, dict(params, wpe={"embedding": params["wpe"]["embedding"][:16]})


@pytest.mark.parametrize("window_shift", [None, 1, 16])
def test_greedy_past_the_context_window_equals_the_no_cache_rule(short_model, window_shift):
  cfg, params = short_model
  # Rows of different lengths move their windows at different steps; 100 tokens move them
  # many times (default shift 16 // 4 = 4; 1: nanoGPT's rule, a re-read every token; 16: the
  # window restarts from the last token alone).
  prompts = [[7], [3, 1, 4, 1, 5, 9, 2, 6], list(range(20, 36))]
  result = generate(params, cfg, prompts, max_new_tokens=100, temperature=0.0,
                    window_shift=window_shift)
  shift = sampling.check_window_shift(window_shift, cfg.block_size)
  expected = [_sliding_greedy_without_cache(params, cfg, p, 100, shift) for p in prompts]
  assert result.tokens == expected
  assert all(len(row) == 100 for row in result.tokens)
  assert result.decode_steps == 99


def test_window_start_rule():
  # T = 8, W = 3: the context grows to 8 tokens, then restarts with the last 6.
  starts, w = [], 0
  for n in range(1, 20):
    w = sampling.window_start(n, w, 8, 3)
    starts.append(w)
  assert [n - w for n, w in zip(range(1, 20), starts)] == [
      1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 6, 7, 8, 6, 7, 8, 6, 7]


def test_sampling_past_the_window_streams_and_stops_like_generate(short_model):
  cfg, params = short_model
  prompts = [[4, 8, 15], [16, 23, 42, 7, 1]]
  kwargs = dict(max_new_tokens=40, temperature=0.9, top_k=20, seed=5)
  full = generate(params, cfg, prompts, **kwargs)
  chunks = list(generate_stream(params, cfg, prompts, chunk_size=7, **kwargs))
  assert [sum((c[b] for c in chunks), []) for b in range(2)] == full.tokens
  # eot past the window: the row stops there and the others go on.
  eot = full.tokens[0][30]
  stopped = generate(params, cfg, prompts, eot_id=eot, **kwargs)
  assert stopped.tokens[0] == full.tokens[0][:full.tokens[0].index(eot)]
  assert stopped.stopped[0]


def test_same_seed_same_tokens_other_seed_other_tokens(cfg, params):
  prompts = [[4, 8, 15], [16, 23, 42, 7, 1]]
  kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=50, buckets=BUCKETS)
  run = lambda seed: generate(params, cfg, prompts, seed=seed, **kwargs).tokens
  first = run(0)
  assert all(len(row) == 12 for row in first)
  assert run(0) == first
  assert run(1) != first
  # A row's randomness depends on (seed, row index, step), not on the other rows.
  alone = generate(params, cfg, prompts[:1], seed=0, **kwargs)
  assert alone.tokens == first[:1]


def test_no_recompilation_within_a_bucket(cfg, params):
  def cache_sizes():
    return sampling._prefill._cache_size(), sampling._decode._cache_size()

  result = generate(params, cfg, [list(range(1, 13)), [4], [5, 6]], max_new_tokens=12,
                    temperature=0.0)
  assert result.buckets == BUCKETS
  before = cache_sizes()
  # Other prompt lengths, batch size, token count, seed and eot: the same buckets.
  result = generate(params, cfg, [list(range(30, 39)), [12, 13], [14], list(range(15))],
                    max_new_tokens=16, temperature=0.0, seed=3, eot_id=1)
  assert result.buckets == BUCKETS
  assert cache_sizes() == before
  # Sampling settings within one variant (model/decode/logits.py) are traced values too:
  # top-k up to TOP_K_BOUND with or without top-p, and the full sort.
  generate(params, cfg, [[1, 2]], max_new_tokens=12, temperature=0.7, top_k=5, top_p=0.9,
           buckets=BUCKETS)
  generate(params, cfg, [[3], [4, 5, 6]], max_new_tokens=10, temperature=1.3, top_k=0,
           top_p=0.5, seed=7, buckets=BUCKETS)
  before = cache_sizes()
  generate(params, cfg, [[3]], max_new_tokens=12, temperature=0.2, top_k=9, buckets=BUCKETS)
  generate(params, cfg, [[3]], max_new_tokens=12, temperature=1.1, top_k=128, top_p=0.7,
           buckets=BUCKETS)
  generate(params, cfg, [[3], [9]], max_new_tokens=12, temperature=0.9, top_k=300, top_p=0.8,
           buckets=BUCKETS)
  assert cache_sizes() == before
  # A new bucket compiles once more (so the checks above can fail).
  result = generate(params, cfg, [[1]], max_new_tokens=3, temperature=0.0)
  assert result.buckets == Buckets(1, 4, 4, 8)
  assert cache_sizes() == (before[0] + 1, before[1] + 1)


def test_stream_yields_the_same_tokens_as_generate(cfg, params):
  prompts = [[4, 8, 15], [16, 23, 42, 7, 1]]
  kwargs = dict(max_new_tokens=11, temperature=0.9, top_k=20, seed=5, buckets=BUCKETS)
  chunks = list(generate_stream(params, cfg, prompts, chunk_size=4, **kwargs))
  assert len(chunks) == 4  # prefill's first token, then 4 + 4 + 2 decode steps
  joined = [sum((chunk[b] for chunk in chunks), []) for b in range(len(prompts))]
  assert joined == generate(params, cfg, prompts, **kwargs).tokens


def test_bfloat16_tokens_are_float32_tokens_where_the_logits_decide(cfg, params):
  """bf16 compute (scan layout), greedy: at every step the float32 forward over the same
  prefix picks the same token wherever its top-two gap is over 6% of the logits' scale (bf16's
  logits are within ~3% of float32's here: measured 0.3 at a scale of 10; a gap moves by twice
  that at most); at least 16 of the 48 steps are such. Sampling with top-k 1 draws the same
  tokens as greedy."""
  cfg16 = cfg.replace(dtype="bfloat16", scan_layers=True)
  prompts = [[1, 2, 3], [9], [40, 41, 42, 43, 44], [100]]
  run = functools.partial(generate, params, cfg16, prompts, max_new_tokens=12, buckets=BUCKETS)
  tokens16 = run(temperature=0.0).tokens
  assert run(temperature=0.8, top_k=1, seed=4).tokens == tokens16
  decided = 0
  for prompt, row in zip(prompts, tokens16):
    seq = prompt + row
    buf = np.zeros((1, cfg.block_size), np.int32)
    buf[0, :len(seq)] = seq
    logits_NV = np.asarray(_forward(cfg, params, buf))[0, len(prompt) - 1:len(seq) - 1]
    top2_N2 = np.sort(logits_NV, axis=-1)[:, -2:]
    margin = 0.06 * np.abs(logits_NV).max()
    must_agree = top2_N2[:, 1] - top2_N2[:, 0] > margin
    np.testing.assert_array_equal(np.asarray(row)[must_agree],
                                  np.argmax(logits_NV, axis=-1)[must_agree])
    decided += int(must_agree.sum())
  assert decided >= 16, decided


# ---------------------------------------------------------------------------------------------
# Parity with Hugging Face transformers


def _hf_greedy_expected():
  data = np.load(HF_GREEDY)
  prompts = [row[:n].tolist() for row, n in zip(data["prompts"], data["lengths"])]
  return prompts, data["tokens"].tolist()


def test_greedy_matches_transformers_recorded():
  cfg, params = load_hf_gpt2(HF_DIR)
  prompts, expected = _hf_greedy_expected()
  result = generate(params, cfg, prompts, max_new_tokens=len(expected[0]), temperature=0.0)
  assert result.tokens == expected


def test_greedy_matches_transformers_live():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  spec = importlib.util.spec_from_file_location(
      "make_hf_greedy_fixture", FIXTURES / "make_hf_greedy_fixture.py")
  fixture = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fixture)
  cfg, params = load_hf_gpt2(HF_DIR)
  hf_model = fixture.load_model()
  prompts, _ = _hf_greedy_expected()
  expected = [fixture.hf_greedy(hf_model, p, fixture.NEW_TOKENS) for p in prompts]
  result = generate(params, cfg, prompts, max_new_tokens=fixture.NEW_TOKENS, temperature=0.0)
  assert result.tokens == expected


# ---------------------------------------------------------------------------------------------
# The decode step that moves only what it must (issue 14): same tokens as before it


def _reference_top_k_top_p(logits_V, top_k, top_p):
  """The filter before lax.top_k: a stable sort of the whole row (kept here as the reference)."""
  V = logits_V.shape[0]
  order_V = np.argsort(-logits_V, kind="stable")
  sorted_V = logits_V[order_V]
  keep_V = (top_k <= 0) | (np.arange(V) < top_k)
  probs_V = _softmax(np.where(keep_V, sorted_V, -np.inf))
  mass_before_V = np.concatenate([[0.0], np.cumsum(probs_V)[:-1]])
  keep_V &= (top_p >= 1) | (mass_before_V < top_p)
  keep_V[0] = True
  out = np.full(V, -np.inf, np.float32)
  out[order_V[keep_V]] = logits_V[order_V[keep_V]]
  return out


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (7, 1.0), (40, 0.9), (128, 0.5), (129, 1.0),
                                         (0, 0.7), (500, 0.95)])
def test_top_k_by_lax_top_k_keeps_the_sorted_set(top_k, top_p):
  """V = 1000 with many ties (logits rounded to 0.5): lax.top_k (0 < k <= TOP_K_BOUND) and the
  full sort (other k) keep exactly the reference's entries, ties to the lower index."""
  rng = np.random.default_rng(top_k)
  logits = np.round(rng.normal(0, 2, (3, 1000)) * 2) / 2
  got = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), 1.0, top_k, top_p))
  for row, got_row in zip(logits.astype(np.float32), got):
    expected = _reference_top_k_top_p(row, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got_row), np.isfinite(expected))
    np.testing.assert_array_equal(got_row[np.isfinite(got_row)], expected[np.isfinite(expected)])


SAMPLING_BEFORE = FIXTURES / "sampling_before.npz"


@pytest.mark.parametrize("cache_reads", ["filled", "all"])
def test_same_tokens_as_the_sampler_before_the_rewrite(cfg, params, cache_reads):
  """tests/fixtures/make_sampling_fixture.py recorded these with main's sampler (a5b278f), one
  token per loop iteration: the same with DECODE_CHUNK tokens per iteration, reading the
  filled cache or all of it."""
  spec = importlib.util.spec_from_file_location("make_sampling_fixture",
                                                FIXTURES / "make_sampling_fixture.py")
  fixture = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fixture)
  data = np.load(SAMPLING_BEFORE)
  prompts = [[t for t in row if t >= 0] for row in data["prompts"].tolist()]
  assert prompts == [list(p) for p in fixture.PROMPTS]
  for name, (temperature, top_k, top_p, seed) in fixture.CASES.items():
    result = generate(params, cfg, prompts, max_new_tokens=fixture.NEW_TOKENS,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      buckets=fixture.BUCKETS, cache_reads=cache_reads)
    assert result.tokens == data[name].tolist(), name


@pytest.fixture(scope="module")
def grouped_long_model():
  """A Llama-style model (rotary positions, 4 query heads on 2 key/value heads) with room for
  a 384-slot cache, three chunks of model.kv_cache.CACHE_CHUNK (128); random params as
  `params`'s."""
  cfg = model.get_config("llama-tiny", vocab_size=128, block_size=384, num_layers=2,
                         num_heads=4, num_kv_heads=2, d_model=32, d_mlp=48)
  return cfg, _random_params(cfg, seed=1)


def test_cache_reads_all_and_filled_over_many_chunks_equal_the_uncached_forward(
    grouped_long_model):
  """Rows of 1, 140 and 270 prompt tokens in a cache of three 128-slot chunks, grouped heads:
  reading every chunk (a GPU's default: the short rows' chunks mostly masked) and reading the
  filled ones give the uncached forward's greedy tokens, and the same sampled tokens."""
  cfg, params = grouped_long_model
  assert model.kv_cache.cache_chunk_size(384) * 3 == 384 and cfg.kv_heads < cfg.num_heads
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 128, n).tolist() for n in (1, 140, 270)]
  run = functools.partial(generate, params, cfg, prompts, max_new_tokens=12,
                          buckets=Buckets(batch=4, prompt_len=384, cache_len=384, out_len=16))
  greedy = {reads: run(temperature=0.0, cache_reads=reads).tokens for reads in ("all", "filled")}
  assert greedy["all"] == greedy["filled"] == [
      _greedy_without_cache(params, cfg, p, 12) for p in prompts]
  sampled = {reads: run(temperature=1.0, top_k=20, seed=3, cache_reads=reads).tokens
             for reads in ("all", "filled")}
  assert sampled["all"] == sampled["filled"] != greedy["all"]


# name: (temperature, top_k, top_p, eot_id): launch.sample's default (0.8, top-k 200) sorts.
SETTINGS = {"greedy": (0.0, 0, 1.0, None), "temperature": (0.8, 0, 1.0, None),
            "top_k": (1.0, 40, 1.0, None), "top_k_200": (0.8, 200, 1.0, None),
            "top_p": (1.0, 0, 0.9, None), "top_k_top_p": (1.2, 20, 0.9, None),
            "eos": (0.9, 20, 1.0, 5)}


def host_tests(jaxpr, trips: tuple[int, ...]) -> int:
  """How many times a GPU reads a predicate on the host running `jaxpr`: XLA's GPU backend
  copies to the host the test of a while loop, each time it runs (n + 1 times for a loop of n
  iterations), and the predicate or index of a conditional (`cond`, which `lax.switch` is too),
  each time it runs (then the branch taken: the costliest one is counted). A loop or
  conditional inside a scan (a `fori_loop` with a static trip count) counts once per
  iteration of the scan. A while loop at depth d (0: the outermost) runs trips[d] iterations
  each time (the decode loop's chunks; the attention's filled cache chunks)."""
  def count(jaxpr, times, depth):
    n = 0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "while":
        iters = trips[depth]
        n += times * (iters + 1)
        n += count(eqn.params["cond_jaxpr"].jaxpr, times * (iters + 1), depth + 1)
        n += count(eqn.params["body_jaxpr"].jaxpr, times * iters, depth + 1)
      elif name == "cond":
        n += times + max(count(b.jaxpr, times, depth) for b in eqn.params["branches"])
      elif name == "scan":
        n += count(eqn.params["jaxpr"].jaxpr, times * eqn.params["length"], depth)
      else:
        n += sum(count(sub, times, depth) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return n
  return count(jaxpr.jaxpr, 1, 0)


def _decode_jaxpr(cfg, params, settings, cache_reads):
  temperature, top_k, top_p, eot_id = settings
  run = sampling._start(params, cfg, [[1, 2, 3], [4]], 16, temperature, top_k, top_p, 0, eot_id,
                        BUCKETS, cache_reads=cache_reads)  # pylint: disable=protected-access
  decode = functools.partial(sampling._decode,  # pylint: disable=protected-access
                             cfg=cfg, mode=run.mode, cache_chunks=run.cache_chunks)
  return run, jax.make_jaxpr(decode)(params, run.state, jnp.int32(16), run.settings)


@pytest.mark.parametrize("cache_reads", ["all", "filled"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_decode_loop_tests_on_the_host_once_per_chunk_of_tokens(cfg, params, setting,
                                                                    cache_reads):
  """From the decode loop's jaxpr (`host_tests`' rule), two chunks of DECODE_CHUNK tokens:
  reading every cache chunk (a GPU's default), one host test per chunk and one at the end,
  whatever the sampling setting; reading the filled part (one chunk of the 32-slot cache),
  each layer's attention adds a loop of its own per token (2 tests for its 1 iteration)."""
  run, jaxpr = _decode_jaxpr(cfg, params, SETTINGS[setting], cache_reads)
  chunk = sampling.DECODE_CHUNK
  assert chunk >= 8
  if cache_reads == "all":  # 1 / DECODE_CHUNK per token
    assert run.cache_chunks == 1
    count, expected = host_tests(jaxpr, (2,)), 3
  else:
    assert run.cache_chunks is None
    count, expected = host_tests(jaxpr, (2, 1)), 3 + 2 * chunk * cfg.num_layers * 2
  assert count == expected, f"{setting}: {count} host tests in 2 chunks, not {expected}"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_top_k_up_to_the_bound_never_sorts_the_vocabulary(cfg, params, setting):
  """The decode loop sorts the whole vocabulary only for settings lax.top_k cannot serve
  (top-p without top-k, top_k > TOP_K_BOUND)."""
  _, jaxpr = _decode_jaxpr(cfg, params, SETTINGS[setting], "all")
  V = cfg.padded_vocab_size
  def sorts(jaxpr):
    return [e for e in jaxpr.eqns if e.primitive.name == "sort"
            and e.invars[0].aval.shape[-1] == V] + [
                s for e in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(e.params)
                for s in sorts(sub)]
  assert bool(sorts(jaxpr.jaxpr)) == (setting in ("top_k_200", "top_p"))


def test_cache_reads_auto_is_every_chunk_on_a_gpu_only():
  assert sampling.cache_chunks_for("auto", 512, platform="gpu") == 4
  assert sampling.cache_chunks_for("auto", 512, platform="tpu") is None
  assert sampling.cache_chunks_for("auto", 512, platform="cpu") is None
  assert sampling.cache_chunks_for("all", 96) == 1  # not a multiple of 128: one chunk
  with pytest.raises(UserError, match=r"cache_reads must be one of auto, filled, all; got 'some'"):
    sampling.cache_chunks_for("some", 512)
