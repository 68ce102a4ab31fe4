"""Tokenizers: GPT-2 BPE from the offline rank file, and the character vocabulary."""

import json
import os

import pytest

from model import tokenizer as tok

# Emoji (incl. a ZWJ sequence), CJK, Hangul, combining marks, control whitespace.
UNICODE_TEXT = ("Héllo, wörld! 😀🚀👩‍👩‍👧 日本語のテキスト 한국어 e\u0301 n\u0303 Ω≈ç√\n\n"
                "\ttabs  and   spaces\r\nnew lines 12345 it's we'll <html> ")


@pytest.fixture(scope="module")
def gpt2():
  if not os.environ.get(tok.GPT2_BPE_ENV):
    pytest.skip(f"{tok.GPT2_BPE_ENV} is not set (offline GPT-2 BPE file)")
  return tok.get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_path):
  return shakespeare_path.read_text(encoding="utf-8")


def test_gpt2_known_ids(gpt2):
  assert gpt2.encode("Hello world") == [15496, 995]
  assert gpt2.vocab_size == 50257
  assert gpt2.eot_id == 50256
  assert gpt2.name == "gpt2"


def test_gpt2_endoftext_is_special(gpt2):
  assert gpt2.encode("<|endoftext|>") == [50256]
  ids = gpt2.encode("a<|endoftext|>b")
  assert ids[1] == 50256 and len(ids) == 3
  assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_gpt2_round_trips_unicode(gpt2):
  ids = gpt2.encode(UNICODE_TEXT)
  assert all(0 <= i < gpt2.vocab_size for i in ids)
  assert gpt2.decode(ids) == UNICODE_TEXT


def test_gpt2_encode_batch_and_dict(gpt2):
  assert gpt2.encode_batch(["Hello world", "<|endoftext|>"]) == [[15496, 995], [50256]]
  restored = tok.tokenizer_from_dict(json.loads(json.dumps(gpt2.to_dict())))
  assert restored.encode(UNICODE_TEXT) == gpt2.encode(UNICODE_TEXT)


def test_missing_bpe_file_names_file_and_variable(monkeypatch, tmp_path):
  missing = tmp_path / "nope.tiktoken"
  monkeypatch.setenv(tok.GPT2_BPE_ENV, str(missing))
  with pytest.raises(FileNotFoundError, match=f"nope.tiktoken.*{tok.GPT2_BPE_ENV}"):
    tok.get_tokenizer("gpt2")
  with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
    tok.get_tokenizer("gpt2", bpe_path=missing)


def test_char_tokenizer_on_shakespeare(shakespeare_text):
  char = tok.get_tokenizer("char", text=shakespeare_text)
  assert char.vocab_size == 65
  assert char.eot_id is None and char.name == "char"
  assert char.chars == sorted(set(shakespeare_text))
  assert char.encode("\n !") == [0, 1, 2]  # nanoGPT's shakespeare_char stoi
  sample = shakespeare_text[:2000]
  assert char.decode(char.encode(sample)) == sample


def test_char_tokenizer_saves_and_restores(shakespeare_text):
  char = tok.CharTokenizer.from_text(shakespeare_text)
  saved = json.loads(json.dumps(char.to_dict()))
  restored = tok.tokenizer_from_dict(saved)
  assert isinstance(restored, tok.CharTokenizer)
  assert restored.chars == char.chars
  assert restored.encode("To be, or not to be") == char.encode("To be, or not to be")


def test_char_tokenizer_unicode_round_trip():
  char = tok.CharTokenizer.from_text(UNICODE_TEXT)
  assert char.decode(char.encode(UNICODE_TEXT)) == UNICODE_TEXT


def test_char_tokenizer_errors():
  char = tok.CharTokenizer.from_text("abc")
  with pytest.raises(ValueError, match="'z'"):
    char.encode("abz")
  with pytest.raises(ValueError, match="3"):
    char.decode([0, 3])
  with pytest.raises(ValueError, match="text"):
    tok.get_tokenizer("char")
  with pytest.raises(ValueError, match="'sentencepiece'"):
    tok.get_tokenizer("sentencepiece")
  with pytest.raises(ValueError, match="'bogus'"):
    tok.tokenizer_from_dict({"name": "bogus"})
