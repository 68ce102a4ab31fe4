"""model/tokenizer.py: GPT-2 BPE from the packaged rank file, the character vocabulary, and
incremental decoding."""

import hashlib
import json

import pytest

from model import tokenizer as tok
from model.errors import NotFoundError, UserError

# Emoji (incl. a ZWJ sequence), CJK, Hangul, combining marks, control whitespace.
UNICODE_TEXT = ("Héllo, wörld! 😀🚀👩‍👩‍👧 日本語のテキスト 한국어 e\u0301 n\u0303 Ω≈ç√\n\n"
                "\ttabs  and   spaces\r\nnew lines 12345 it's we'll <html> ")


@pytest.fixture(scope="module")
def gpt2():
  return tok.get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def shakespeare_text(shakespeare_path):
  return shakespeare_path.read_text(encoding="utf-8")


def test_gpt2_ranks_ship_with_the_package(monkeypatch):
  monkeypatch.delenv(tok.GPT2_BPE_ENV, raising=False)
  with open(tok.PACKAGED_GPT2_BPE, "rb") as f:  # whisper's gpt2.tiktoken
    assert hashlib.sha256(f.read()).hexdigest() == (
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930")
  gpt2 = tok.get_tokenizer("gpt2")
  assert gpt2.encode("Hello world") == [15496, 995] and gpt2.vocab_size == 50257


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
  with pytest.raises(NotFoundError, match=f"nope.tiktoken.*{tok.GPT2_BPE_ENV}"):
    tok.get_tokenizer("gpt2")
  with pytest.raises(NotFoundError, match="nope.tiktoken"):
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
  with pytest.raises(UserError, match="'z'"):
    char.encode("abz")
  with pytest.raises(UserError, match="3"):
    char.decode([0, 3])
  with pytest.raises(UserError, match="text"):
    tok.get_tokenizer("char")
  with pytest.raises(UserError, match="'sentencepiece'"):
    tok.get_tokenizer("sentencepiece")
  with pytest.raises(UserError, match="'bogus'"):
    tok.tokenizer_from_dict({"name": "bogus"})


def test_text_stream_holds_back_split_characters(gpt2):
  tokenizer = gpt2
  ids = tokenizer.encode("\U0001F642 ok \u65e5\u672c\u8a9e!")  # characters split across tokens
  stream = tok.TextStream(tokenizer)
  pieces = [stream.push([i]) for i in ids] + [stream.flush()]
  assert "".join(pieces) == tokenizer.decode(ids)
  assert all(tok.REPLACEMENT_CHAR not in p for p in pieces)


@pytest.mark.parametrize("content, message", [
    (b"garbage\n", r"is not a tiktoken rank file \(Error parsing line b'garbage'"),
    (b"IQ== 0\nIg== 1\n", r"holds 2 ranks, not GPT-2's 50,256"),
], ids=["not-ranks", "too-few"])
def test_a_bad_bpe_file_is_one_sentence(content, message, monkeypatch, tmp_path):
  path = tmp_path / "bad.tiktoken"
  path.write_bytes(content)
  monkeypatch.setenv(tok.GPT2_BPE_ENV, str(path))
  with pytest.raises(UserError, match=rf"^GPT-2 BPE file '{path}' {message}.*"
                                      rf"{tok.GPT2_BPE_ENV}"):
    tok.get_tokenizer("gpt2")


def test_hugging_face_tokenizer_files_encode_as_tiktoken(gpt2, tmp_path, shakespeare_text):
  """model/hf/tokenizer.py makes vocab.json / merges.txt from the packaged ranks (no network);
  transformers' GPT-2 tokenizer read from them encodes and decodes exactly as tiktoken."""
  transformers = pytest.importorskip("transformers")
  from model.hf.tokenizer import bpe_merges, gpt2_ranks, save_hf_gpt2_tokenizer
  save_hf_gpt2_tokenizer(gpt2, tmp_path, model_max_length=1024)
  ranks = gpt2_ranks(gpt2)
  assert len(ranks) == 50256 and len(bpe_merges(ranks)) == 50000  # GPT-2's 50,000 merges
  text = ("Hello world!  Ünïcödé 日本語 🤗\n\n  tabs\there <|endoftext|>ROMEO:\r\n O Romeo, "
          "Romeo! wherefore art thou   Romeo? 1234567 it's we're 'quoted'\u00a0nbsp "
          + shakespeare_text[:5000])
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
  ids = gpt2.encode(text)
  assert hf.encode(text) == ids
  assert hf.decode(ids) == text
  assert hf.eos_token_id == 50256 and len(hf) == 50257
