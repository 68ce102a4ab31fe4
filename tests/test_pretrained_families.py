"""Hugging Face BERT and BART import: parity with transformers, beam search as transformers'
generate, the checkpoints' tokenizers, and clear errors.

conftest.rel_err(a, b) = max|a - b| / max|b| with b transformers' float32 output; parity is
rel <= 1e-5 (measured <= 2.2e-6).
The fixtures (tests/fixtures/make_hf_families_fixture.py) are tiny random BertForMaskedLM and
BartForConditionalGeneration models with random layer norms and biases, their tokenizers, and
transformers' outputs for fixed inputs; with torch + transformers installed the same models
are also compared live on fresh inputs.
"""

import functools
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model import build
from model.decode import seq2seq
from model.errors import UserError
from model.hf.tokenizer import load_hf_tokenizer
from model.hf import checkpoint_config, load_hf, load_hf_gpt2
from model.families import abstract_params

from conftest import rel_err

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
BERT_DIR, BART_DIR = FIXTURES / "hf_bert_tiny", FIXTURES / "hf_bart_tiny"
PARITY = 1e-5
# What the stored beams were made with (make_hf_families_fixture.BEAM_SETTINGS): num_beams=4,
# max_new_tokens=12, do_sample=False, early_stopping=False, length_penalty=1.0,
# no_repeat_ngram_size=0, min_length=0, no forced bos / eos tokens.
BEAMS, BEAM_TOKENS = 4, 12



@pytest.fixture(scope="module")
def expected():
  return dict(np.load(FIXTURES / "hf_families_expected.npz"))


@functools.partial(jax.jit, static_argnames=("cfg", "hidden"))
def bert_forward(cfg, params, tokens, mask, types, hidden=False):
  return build(cfg).apply({"params": params}, tokens, mask, types, return_hidden=hidden)


@functools.partial(jax.jit, static_argnames=("cfg",))
def bart_forward(cfg, params, src, tgt, src_mask):
  return build(cfg).apply({"params": params}, src, tgt, src_mask)


# ---------------------------------------------------------------------------------------------
# Configs and parity with the stored outputs


def test_configs_from_fixtures():
  cfg, params = load_hf(BERT_DIR)
  assert (cfg.family, cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.d_mlp,
          cfg.type_vocab_size) == ("bert", 120, 16, 2, 48, 2)
  assert (cfg.norm_placement, cfg.activation, cfg.embed_norm, cfg.mlm_head, cfg.head_bias) == (
      "post", "gelu", True, True, True)
  assert (cfg.mask_id, cfg.pad_id) == (4, 0)  # from vocab.txt / tokenizer.json
  same = lambda a, b: (jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), a)
                       == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), b))
  assert same(params, abstract_params(cfg))
  cfg, params = load_hf(BART_DIR)
  assert (cfg.family, cfg.num_layers, cfg.decoder_layers, cfg.position_offset) == (
      "encdec", 2, 2, 2)
  assert (cfg.bos_id, cfg.eos_id, cfg.pad_id, cfg.mask_id) == (2, 2, 1, 4)
  assert same(params, abstract_params(cfg))
  assert checkpoint_config(str(BART_DIR)) == cfg


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bert_parity_with_stored_logits_and_hidden_states(expected, scan_layers):
  cfg, params = load_hf(BERT_DIR, scan_layers=scan_layers)
  assert ("h" in params) == scan_layers
  args = expected["bert_tokens"], expected["bert_mask"], expected["bert_types"]
  assert rel_err(bert_forward(cfg, params, *args), expected["bert_logits"]) <= PARITY
  assert rel_err(bert_forward(cfg, params, *args, hidden=True),
                 expected["bert_hidden"]) <= PARITY


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bart_parity_with_stored_logits(expected, scan_layers):
  cfg, params = load_hf(BART_DIR, scan_layers=scan_layers)
  assert ("enc" in params and "dec" in params) == scan_layers
  logits = bart_forward(cfg, params, expected["bart_src"], expected["bart_tgt"],
                        expected["bart_src_mask"])
  assert rel_err(logits, expected["bart_logits"]) <= PARITY


def test_bert_model_checkpoint_gives_hidden_states(tmp_path, expected):
  """A BertModel: keys without "bert.", no cls.predictions, a pooler (not read)."""
  tensors = {k.removeprefix("bert."): v
             for k, v in load_file(BERT_DIR / "model.safetensors").items()
             if not k.startswith("cls.")}
  tensors["pooler.dense.weight"] = np.zeros((16, 16), np.float32)
  tensors["pooler.dense.bias"] = np.zeros((16,), np.float32)
  out = tmp_path / "bert_model"
  out.mkdir()
  save_file(tensors, out / "model.safetensors")
  config = json.loads((BERT_DIR / "config.json").read_text())
  (out / "config.json").write_text(json.dumps(dict(config, architectures=["BertModel"])))
  cfg, params = load_hf(out)
  assert not cfg.mlm_head and not cfg.head_bias and "mlm" not in params
  args = expected["bert_tokens"], expected["bert_mask"], expected["bert_types"]
  assert rel_err(bert_forward(cfg, params, *args, hidden=True),
                 expected["bert_hidden"]) <= PARITY
  with pytest.raises(UserError, match="no masked-LM head.*return_hidden=True"):
    build(cfg).apply({"params": params}, *args)


# ---------------------------------------------------------------------------------------------
# Beam search as transformers' generate(num_beams=4)


def _beam_rows(src, mask):
  return [[int(t) for t in row[m.astype(bool)]] for row, m in zip(src, mask)]


def _ours(cfg, params, sources, eos_id):
  outs = seq2seq.generate(params, cfg, sources, max_new_tokens=BEAM_TOKENS, num_beams=BEAMS,
                          length_penalty=1.0)
  return [ids + [eos_id] if ended else ids for ids, ended in outs]


def test_beam_search_equals_stored_transformers_beams(expected):
  cfg, params = load_hf(BART_DIR)
  want = [[int(t) for t in row if t >= 0] for row in expected["beam_out"]]
  got = _ours(cfg, params, _beam_rows(expected["beam_src"], expected["beam_src_mask"]),
              cfg.eos_id)
  assert got == want
  # the fixture is one where beam search matters: some beams end, and greedy differs
  assert any(r[-1] == cfg.eos_id for r in want) and any(r[-1] != cfg.eos_id for r in want)
  greedy = seq2seq.generate(params, cfg, _beam_rows(expected["beam_src"],
                                                    expected["beam_src_mask"]),
                            max_new_tokens=BEAM_TOKENS)
  assert [ids for ids, _ in greedy] != [r[:-1] if r[-1] == cfg.eos_id else r for r in want]


# ---------------------------------------------------------------------------------------------
# BART whose encoder and decoder differ (tests/fixtures/make_hf_bart_unequal_fixture.py)

# name: (encoder heads, decoder heads, encoder FFN, decoder FFN, encoder layers, decoder layers)
UNEQUAL = {"a": (2, 6, 96, 160, 3, 1), "b": (6, 3, 40, 72, 1, 2)}


@pytest.fixture(scope="module")
def unequal_expected():
  return dict(np.load(FIXTURES / "hf_bart_unequal_expected.npz"))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", list(UNEQUAL))
def test_bart_with_unequal_halves_parity_and_beams(name, scan_layers, unequal_expected):
  """Each half its own heads, MLP width and layer count: logits within PARITY of transformers'
  and beam search equal to its generate(num_beams=4), in both layer layouts."""
  enc_heads, dec_heads, enc_ffn, dec_ffn, enc_layers, dec_layers = UNEQUAL[name]
  cfg, params = load_hf(FIXTURES / f"hf_bart_unequal_{name}", scan_layers=scan_layers)
  assert (cfg.num_heads, cfg.decoder_heads, cfg.d_mlp, cfg.decoder_mlp, cfg.num_layers,
          cfg.decoder_layers) == UNEQUAL[name]
  assert (cfg.decoder().num_heads, cfg.decoder().d_mlp) == (dec_heads, dec_ffn)
  same = lambda a, b: (jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), a)
                       == jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), b))
  assert same(params, abstract_params(cfg))
  e = {k[2:]: v for k, v in unequal_expected.items() if k.startswith(f"{name}_")}
  logits = bart_forward(cfg, params, e["src"], e["tgt"], e["src_mask"])
  assert rel_err(logits, e["logits"]) <= PARITY
  want = [[int(t) for t in row if t >= 0] for row in e["beam_out"]]
  assert _ours(cfg, params, _beam_rows(e["beam_src"], e["beam_src_mask"]), cfg.eos_id) == want
  assert any(r[-1] == cfg.eos_id for r in want) and any(r[-1] != cfg.eos_id for r in want)


# ---------------------------------------------------------------------------------------------
# Tokenizers


TEXTS = ["To be, or not to be: that is the question.", "the [MASK] of york",
         "ÉLAN vital, naïve café", "  spaced   out\ttabs\n", "[MASK][MASK] king"]


def test_wordpiece_tokenizer_reads_either_file(tmp_path):
  tok = load_hf_tokenizer(BERT_DIR)
  ids = tok.encode("the [MASK] of york")
  assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and tok.mask_id in ids
  assert tok.decode(ids) == "the of york"  # special tokens dropped
  only_vocab = tmp_path / "vocab_only"
  only_vocab.mkdir()
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(BERT_DIR / name, only_vocab / name)
  other = load_hf_tokenizer(only_vocab)
  assert [other.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
  assert other.mask_id == tok.mask_id == 4


def test_missing_tokenizer_files(tmp_path):
  shutil.copy(BERT_DIR / "config.json", tmp_path / "config.json")
  with pytest.raises(UserError, match="has no tokenizer files"):
    load_hf_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# Errors


def test_gpt2_loader_refuses_bert_in_one_sentence():
  with pytest.raises(UserError, match=r"model_type 'bert' is not a GPT-2 checkpoint"):
    load_hf_gpt2(BERT_DIR)


def test_unsupported_model_type_and_bad_overrides(tmp_path):
  ckpt = pathlib.Path(shutil.copytree(BART_DIR, tmp_path / "t5"))
  config = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps(dict(config, model_type="t5")))
  with pytest.raises(UserError, match="model_type 't5' is not supported; supported: gpt2, "
                                      "bert, bart"):
    load_hf(ckpt)
  with pytest.raises(UserError, match="block_size 64 exceeds the checkpoint's "
                                      "max_position_embeddings 32"):
    load_hf(BERT_DIR, block_size=64)
  with pytest.raises(UserError, match="Cannot override num_layers"):
    load_hf(BART_DIR, num_layers=3)
  cfg, params = load_hf(BART_DIR, block_size=16)
  assert params["wpe"]["embedding"].shape == (16 + 2, 16)


# ---------------------------------------------------------------------------------------------
# Live comparison with transformers


def test_live_bert_parity_on_fresh_inputs(transformers_lib):
  torch, transformers = transformers_lib
  model = transformers.BertForMaskedLM.from_pretrained(BERT_DIR).eval()
  rng = np.random.default_rng(11)
  tokens = rng.integers(0, 120, (3, 32)).astype(np.int32)
  mask = (np.arange(32)[None] < np.array([[32], [20], [5]])).astype(np.int32)
  types = (np.arange(32)[None] >= np.array([[16], [10], [2]])).astype(np.int32)
  t = lambda x: torch.from_numpy(x).long()
  with torch.no_grad():
    want = model(t(tokens), attention_mask=t(mask), token_type_ids=t(types)).logits.numpy()
  for scan in (False, True):
    cfg, params = load_hf(BERT_DIR, scan_layers=scan)
    assert rel_err(bert_forward(cfg, params, tokens, mask, types), want) <= PARITY


def _live_bart_check(transformers_lib, directory, seed: int, scan_layers: bool) -> None:
  """Logits and beams of the checkpoint in `directory` on fresh inputs against transformers'
  model itself."""
  torch, transformers = transformers_lib
  model = transformers.BartForConditionalGeneration.from_pretrained(directory).eval()
  rng = np.random.default_rng(seed)
  src = rng.integers(3, 300, (3, 16)).astype(np.int32)
  mask = (np.arange(16)[None] < np.array([[16], [9], [4]])).astype(np.int32)
  tgt = rng.integers(3, 300, (3, 11)).astype(np.int32)
  tgt[:, 0] = 2
  t = lambda x: torch.from_numpy(x).long()
  with torch.no_grad():
    want = model(input_ids=t(src), attention_mask=t(mask), decoder_input_ids=t(tgt)).logits
    beams = model.generate(input_ids=t(src), attention_mask=t(mask), num_beams=BEAMS,
                           max_new_tokens=BEAM_TOKENS, do_sample=False, early_stopping=False,
                           length_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
                           forced_bos_token_id=None, forced_eos_token_id=None).numpy()
  cfg, params = load_hf(directory, scan_layers=scan_layers)
  assert rel_err(bart_forward(cfg, params, src, tgt, mask), want.numpy()) <= PARITY
  want_ids = []
  for row in beams[:, 1:]:
    ids = [int(i) for i in row]
    want_ids.append(ids[:ids.index(2) + 1] if 2 in ids else ids)
  assert _ours(cfg, params, _beam_rows(src, mask), cfg.eos_id) == want_ids


def test_live_bart_parity_and_beam_search(transformers_lib):
  _live_bart_check(transformers_lib, BART_DIR, seed=12, scan_layers=True)


@pytest.mark.parametrize("name", list(UNEQUAL))
def test_live_bart_with_unequal_halves(transformers_lib, name):
  """The same on fresh inputs against transformers' model itself."""
  _live_bart_check(transformers_lib, FIXTURES / f"hf_bart_unequal_{name}", seed=13,
                   scan_layers=False)


def test_live_tokenizers_equal_autotokenizer(transformers_lib):
  _, transformers = transformers_lib
  for directory in (BERT_DIR, BART_DIR):
    want = transformers.AutoTokenizer.from_pretrained(directory)
    ours = load_hf_tokenizer(directory)
    texts = TEXTS if directory == BERT_DIR else [t.replace("[MASK]", "<mask>") for t in TEXTS]
    assert [ours.encode(t) for t in texts] == [want(t).input_ids for t in texts]
    assert ours.mask_id == want.mask_token_id
    ids = want(texts[0]).input_ids
    assert ours.decode(ids) == want.decode(ids, skip_special_tokens=True)
