"""Packed rows (model/segments.py, training/lm_inputs.py): a row of several documents gives each
document's logits, loss and gradients exactly as the document run alone, for GPT-2-shaped
(learned positions) and Llama-shaped (rotary, grouped-query) models, with every kernel (the
reference einsums, jax.nn.dot_product_attention's XLA path, splash in interpret mode), both
layer layouts, remat, on the (data, fsdp, tensor) meshes; the prefix-LM's prefix too; an
imported Llama's packed row against transformers' logits of each document alone.

"Alone" is each document as its own row at positions 0.., followed by filler tokens it cannot
see (attention is causal), one forward pass for all of them (no mesh, the reference kernel).
float32 throughout: logits to 1e-5 relative per element; the loss to 1e-5; gradients (sums
over ~400 tokens' contributions in another order) to 1e-5 relative per element with an absolute
floor of 1e-5 x the array's largest entry.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from model.config import ModelConfig
from model.families import init_params
from model.gpt import GPT
from model.hf import load_hf
from model.layout import convert_layout
from sharding import DEFAULT_RULES, activate, make_mesh
from training.lm_inputs import lm_inputs
from training.step import loss_and_metrics, token_cross_entropy

T = 128  # splash needs a multiple of 128
GPT2 = dict(vocab_size=96, block_size=T, num_layers=2, num_heads=4, d_model=64)
LLAMA = dict(GPT2, num_kv_heads=2, position_embedding="rotary", norm="rmsnorm",
             activation="swiglu", use_bias=False, tie_embeddings=False)
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def pack(rng, rows: int, vocab: int, prefix_lm: bool = False):
  """(a packed batch [rows, 3 (T + 1)], the documents, where each sits: (row, start)).
  Documents of 5 to 60 tokens fill each row to at most T tokens; the rest (and column T) is
  padding. Every token but a document's first is a target; for the prefix-LM, only those after
  a prefix of 2 to 10 tokens."""
  batch = np.zeros((rows, 3, T + 1), np.int32)
  docs, where = [], []
  for r in range(rows):
    t, seg = 0, 1
    while True:
      n = int(rng.integers(5, 61))
      if t + n > T:
        break
      doc = rng.integers(0, vocab, n).astype(np.int32)
      batch[r, 0, t:t + n], batch[r, 1, t:t + n] = doc, seg
      first = 1 + (int(rng.integers(1, min(10, n - 1))) if prefix_lm else 0)
      batch[r, 2, t + first:t + n] = 1
      docs.append((doc, first))
      where.append((r, t))
      t, seg = t + n, seg + 1
  return jnp.asarray(batch.reshape(rows, -1)), docs, where


def alone(docs):
  """Each document as its own row at positions 0.. followed by filler (token 0), with its
  loss weights and (for the prefix-LM) its prefix."""
  tokens = np.zeros((len(docs), T), np.int32)
  weights = np.zeros((len(docs), T), np.float32)
  for i, (doc, first) in enumerate(docs):
    tokens[i, :len(doc)] = doc
    weights[i, first - 1:len(doc) - 1] = 1  # output t predicts token t + 1
  prefix = np.arange(T)[None] < np.array([first for _, first in docs])[:, None]
  return jnp.asarray(tokens), jnp.asarray(weights), jnp.asarray(prefix)


@functools.partial(jax.jit, static_argnames="cfg")
def alone_logits_and_grads(cfg, params, tokens, weights, prefix, total):
  """The documents' logits and d(sum of their scored losses / total)/d params."""
  def loss(p):
    logits = GPT(cfg).apply({"params": p}, tokens,
                            prefix_BT=prefix if cfg.prefix_lm else None)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    return jnp.sum(token_cross_entropy(logits, targets) * weights) / total, logits
  (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, logits, grads


def packed_logits_and_grads(cfg, params, batch, mesh):
  """The packed rows' logits (GPT with their segment ids and prefix) and the step's loss
  (training/step.py: loss_and_metrics, packed layout) with its gradients, on `mesh`."""
  def loss(p):
    return loss_and_metrics(p, cfg, batch, None, False, layout="packed")[0]

  def logits(p):
    lm = lm_inputs(cfg, batch, "packed")
    return GPT(cfg).apply({"params": p}, lm.inputs_BT, segment_ids_BT=lm.segment_ids_BT,
                          prefix_BT=lm.prefix_BT)
  with activate(mesh, DEFAULT_RULES):
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, jax.jit(logits)(params), grads


def assert_grads_equal(grads, ref):
  """Per element, as the module docstring says; the trees' structures first (a zip over the
  leaves alone stops at the shorter list)."""
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(ref)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree_util.tree_leaves(ref), strict=True):
    r = np.asarray(r)
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-5 * np.abs(r).max(),
                               err_msg=jax.tree_util.keystr(path))


CASES = [  # (shape, kernel, scan_layers, remat, mesh, prefix-LM)
    ("gpt2", "xla", False, "none", (8, 1, 1), False),
    ("gpt2", "auto", True, "full", (1, 8, 1), False),
    ("gpt2", "splash", False, "full", (2, 2, 2), False),
    ("llama", "xla", True, "none", (1, 1, 8), False),
    ("llama", "auto", False, "full", (2, 2, 2), False),
    ("llama", "splash", True, "none", (8, 1, 1), False),
    ("gpt2", "splash", True, "none", (2, 1, 4), True),
    ("llama", "auto", False, "none", (1, 8, 1), True),
    ("llama", "xla", False, "full", (2, 2, 2), True),
]


@pytest.mark.parametrize("shape,kernel,scan,remat,mesh,prefix_lm", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_a_packed_row_is_each_document_alone(shape, kernel, scan, remat, mesh, prefix_lm):
  base = ModelConfig(**(GPT2 if shape == "gpt2" else LLAMA), prefix_lm=prefix_lm)
  cfg = base.replace(attention=kernel, scan_layers=scan, remat=remat)
  params = convert_layout(init_params(base, jax.random.key(1)), cfg)
  batch, docs, where = pack(np.random.default_rng(2), 8, base.vocab_size, prefix_lm)
  loss, logits, grads = packed_logits_and_grads(cfg, params, batch, make_mesh(*mesh))

  tokens, weights, prefix = alone(docs)
  ref_loss, ref_logits, ref_grads = alone_logits_and_grads(
      base.replace(attention="xla"), convert_layout(params, base), tokens, weights, prefix,
      jnp.sum(weights))
  logits, ref_logits = np.asarray(logits), np.asarray(ref_logits)
  for i, ((doc, _), (row, start)) in enumerate(zip(docs, where)):
    np.testing.assert_allclose(logits[row, start:start + len(doc)], ref_logits[i, :len(doc)],
                               rtol=1e-5, atol=1e-5 * np.abs(ref_logits[i]).max())
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  assert_grads_equal(convert_layout(grads, base), ref_grads)


def test_the_loss_is_exact_under_gradient_accumulation():
  """Micro-batches with different numbers of scored targets (one scores nothing): the train
  step in 4 micro-batches gives the whole batch's loss sum(nll w) / sum(w) (not a mean of
  their means) and its gradients (SGD with momentum: after one step its trace is the
  gradient, compared element by element), and the counts add up; so does the eval step."""
  import optax  # pylint: disable=import-outside-toplevel
  from training.state import create_train_state  # pylint: disable=import-outside-toplevel
  from training.step import eval_step, train_step  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(**GPT2, attention="xla")
  tx = optax.sgd(0.1, momentum=0.9)
  state = create_train_state(cfg, tx, make_mesh(1, 1, 1, devices=jax.devices()[:1]), 0)[0]
  batch, _, _ = pack(np.random.default_rng(3), 8, cfg.vocab_size, prefix_lm=False)
  batch = batch.at[1, 2 * (T + 1):].set(0).at[5, 2 * (T + 1):].set(0)  # micro-batch 1: none
  out = {}
  for k in (1, 4):
    step = jax.jit(lambda s, b, k=k: train_step(s, b, cfg=cfg, tx=tx, schedule=lambda _: 0.1,
                                                grad_accum=k, layout="packed"))
    out[k] = jax.device_get(step(state, batch))
  (s1, m1), (s4, m4) = out[1], out[4]
  weights = lm_inputs(cfg, batch, "packed").weights_BT
  assert m1["scored_tokens"] == m4["scored_tokens"] == float(jnp.sum(weights))
  assert m1["padding_share"] == m4["padding_share"] > 0
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
  p0 = jax.device_get(state.params)
  assert_grads_equal(s4.opt_state[0].trace, s1.opt_state[0].trace)
  means = [float(loss_and_metrics(p0, cfg, batch[j::4], None, False, layout="packed")[0])
           for j in range(4)]
  # what a mean of the micro-batches' means would give: far outside the tolerance above
  assert abs(np.mean(means) - m1["loss"]) > 100 * 1e-6 * m1["loss"]
  evals = [jax.jit(lambda p, b, k=k: eval_step(p, b, cfg=cfg, grad_accum=k, layout="packed"))(
      p0, batch) for k in (1, 4)]
  np.testing.assert_allclose(float(evals[1]["loss"]), m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(float(evals[0]["loss"]), m1["loss"], rtol=1e-6)


def test_document_masks_keep_the_documents_of_a_window_apart():
  """data.document_mask: a window of documents joined by <|endoftext|> gives each document the
  logits of the document alone with <|endoftext|> at position 0 before it; off, the step's
  loss is today's, bit for bit."""
  cfg = ModelConfig(**GPT2)
  eot = cfg.vocab_size - 1
  params = init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(4)
  docs = [rng.integers(0, eot, n) for n in (40, 30, 57)]
  window = np.concatenate([docs[0], [eot], docs[1], [eot], docs[2]])[:T + 1]
  batch = jnp.asarray(window[None], jnp.int32)
  lm = lm_inputs(cfg, batch, "tokens", eot)
  forward = jax.jit(lambda tokens, seg: GPT(cfg).apply({"params": params}, tokens,
                                                       segment_ids_BT=seg))
  logits = np.asarray(forward(lm.inputs_BT, lm.segment_ids_BT))
  alone_docs = [docs[0], np.concatenate([[eot], docs[1]]), np.concatenate([[eot], docs[2]])]
  ref = np.asarray(forward(*alone([(d, 1) for d in alone_docs])[:1], None))
  for i, (start, doc) in enumerate(zip((0, 40, 71), alone_docs)):
    n = min(len(doc), T - start)
    np.testing.assert_allclose(logits[0, start:start + n], ref[i, :n], rtol=1e-5,
                               atol=1e-5 * np.abs(ref[i]).max())
  step_loss = jax.jit(lambda b, eot_id: loss_and_metrics(params, cfg, b, None, False,
                                                         eot_id=eot_id)[0],
                      static_argnames="eot_id")
  masked, plain = step_loss(batch, eot_id=eot), step_loss(batch, eot_id=None)
  today = jax.jit(lambda b: jnp.mean(token_cross_entropy(
      GPT(cfg).apply({"params": params}, b[:, :-1]), b[:, 1:])))(batch)
  assert float(plain) == float(today) and float(masked) != float(plain)


@pytest.mark.parametrize("kernel", ["xla", "auto", "splash"])
def test_the_prefix_sees_itself_both_ways_and_nothing_after_it(kernel):
  """Prefix-LM: changing a later prefix token changes an earlier prefix position's output;
  changing a continuation token changes no prefix position (nor anything before it), and no
  other segment."""
  cfg = ModelConfig(**LLAMA, prefix_lm=True, attention=kernel)
  params = init_params(cfg, jax.random.key(0))
  batch, docs, where = pack(np.random.default_rng(5), 2, cfg.vocab_size, prefix_lm=True)
  lm = lm_inputs(cfg, batch, "packed")
  forward = jax.jit(lambda tokens: GPT(cfg).apply(
      {"params": params}, tokens, segment_ids_BT=lm.segment_ids_BT, prefix_BT=lm.prefix_BT))
  base = np.asarray(forward(lm.inputs_BT))
  (doc, first), (row, start) = docs[1], where[1]
  assert np.asarray(lm.prefix_BT)[row, start:start + len(doc)].sum() == first
  changed = lambda t: np.asarray(forward(lm.inputs_BT.at[row, t].set(
      (lm.inputs_BT[row, t] + 1) % cfg.vocab_size)))
  later_prefix = changed(start + first - 1)
  assert np.abs(later_prefix[row, start] - base[row, start]).max() > 1e-4
  continuation = changed(start + first + 1)
  np.testing.assert_array_equal(continuation[row, :start + first + 1],
                                base[row, :start + first + 1])
  assert np.abs(continuation[row, start + first + 1:start + len(doc)]
                - base[row, start + first + 1:start + len(doc)]).max() > 1e-4
  np.testing.assert_array_equal(continuation[row, start + len(doc):],
                                base[row, start + len(doc):])
  np.testing.assert_array_equal(continuation[1 - row], base[1 - row])


def test_an_imported_llamas_packed_row_is_transformers_on_each_document(transformers_lib):
  """tests/fixtures/hf_llama_gqa (a random LlamaForCausalLM: 2 key/value heads, Llama 3 rope
  scaling) imported; one packed row's logits per document against transformers' logits of
  that document alone (float32: conftest.rel_err, the largest error per element relative to
  the largest logit, <= 1e-5; measured <= 1.2e-6)."""
  torch, transformers = transformers_lib
  cfg, params = load_hf(FIXTURES / "hf_llama_gqa")
  hf = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "hf_llama_gqa",
                                                     dtype=torch.float32).eval()
  rng = np.random.default_rng(6)
  docs = [rng.integers(0, cfg.vocab_size, n) for n in (23, 50, 9, 31)]
  seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])
  tokens = np.concatenate(docs)
  ours = np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(tokens[None], jnp.int32),
                                   segment_ids_BT=jnp.asarray(seg[None], jnp.int32)))
  starts = np.cumsum([0] + [len(d) for d in docs])
  for doc, start in zip(docs, starts):
    with torch.no_grad():
      theirs = hf(torch.as_tensor(doc[None], dtype=torch.long)).logits[0].numpy()
    assert rel_err(ours[0, start:start + len(doc), :cfg.vocab_size], theirs) <= 1e-5


def test_prefix_lm_sampling_prefills_the_prompt_both_ways():
  """launch.sample's generate on a prefix-LM run: greedy tokens from the KV-cache loop equal
  the argmax of a non-cached forward over prompt + tokens so far with the prompt as the
  prefix, and differ from the same weights' causal greedy tokens (weights scaled by 8, so the
  random model's choices depend on what it sees)."""
  from model.decode.sampling import generate  # pylint: disable=import-outside-toplevel
  cfg = ModelConfig(**dict(GPT2, block_size=64), prefix_lm=True)
  params = jax.tree_util.tree_map(lambda x: x * 8 if x.ndim >= 2 else x,
                                  init_params(cfg, jax.random.key(2)))
  prompt = [5, 17, 3, 40, 22, 9, 61]
  out = generate(params, cfg, [prompt], max_new_tokens=12, temperature=0.0).tokens[0]
  seq = jnp.asarray([prompt + out], jnp.int32)
  prefix = jnp.arange(seq.shape[1])[None] < len(prompt)
  logits = jax.jit(lambda s, p: GPT(cfg).apply({"params": params}, s, prefix_BT=p))(seq, prefix)
  assert list(np.asarray(jnp.argmax(logits[0, len(prompt) - 1:-1], -1))) == out
  causal = generate(params, cfg.replace(prefix_lm=False), [prompt], max_new_tokens=12,
                    temperature=0.0).tokens[0]
  assert causal != out


@pytest.mark.slow
def test_launch_train_with_document_masks(tmp_path, capsys):
  """data.document_mask=true through launch.train: the windows' documents (joined by
  <|endoftext|>, GPT-2 BPE) are kept apart in the step, so the first step's loss differs from
  the same run without it; both train, and the run records the setting."""
  import json  # pylint: disable=import-outside-toplevel
  from conftest import exit_status  # pylint: disable=import-outside-toplevel
  from launch import train as train_cli  # pylint: disable=import-outside-toplevel
  text = tmp_path / "docs.txt"
  text.write_text("<|endoftext|>".join(f"Document {i}: " + "speak, speak. " * (3 + i % 7)
                                       for i in range(60)))
  losses = {}
  for mask in (False, True):
    workdir = tmp_path / f"run_{mask}"
    assert exit_status(train_cli.main, [
        "--config", "configs/tiny.py", "--workdir", str(workdir), f"--config.data.path={text}",
        "--config.data.tokenizer=gpt2", "--config.model.num_layers=1",
        "--config.train.steps=2", "--config.log.every=1", "--config.eval.every=0",
        f"--config.data.document_mask={str(mask).lower()}"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses[mask] = rows[0]["loss"]
    assert json.loads((workdir / "config.json").read_text())["data"]["document_mask"] is mask
  assert abs(losses[True] - losses[False]) > 1e-4
