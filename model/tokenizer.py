"""Tokenizers: GPT-2 byte-pair encoding (tiktoken), a character vocabulary, and a Hugging Face
checkpoint's own tokenizer ("hf:DIR": its tokenizer.json, model/hf/tokenizer.py; e.g. a
Llama's, so that a run fine-tuning it reads data with the ids its weights mean).

All expose encode(str) -> list[int], decode(list[int]) -> str, vocab_size, eot_id (the
end-of-text id, or None), name, and to_dict() so that a checkpoint can record its tokenizer
(`tokenizer_from_dict` restores it; a character vocabulary is saved in full).

`TextStream` decodes a growing list of ids piece by piece (for printing samples as they are
generated) without splitting a character whose UTF-8 bytes span two tokens.

GPT-2's ranks ship with the package (model/assets/gpt2.tiktoken), so no download is needed;
FLAXGPT_GPT2_BPE points elsewhere (another tiktoken-format `gpt2.tiktoken`).
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Iterable

import numpy as np
import tiktoken
import tiktoken.load

from model.errors import NotFoundError, UserError

GPT2_BPE_ENV = "FLAXGPT_GPT2_BPE"
# GPT-2's ranks in tiktoken's format (the copy openai-whisper ships), so that the tokenizer
# needs no network; $FLAXGPT_GPT2_BPE overrides it.
PACKAGED_GPT2_BPE = pathlib.Path(__file__).parent / "assets" / "gpt2.tiktoken"
# GPT-2's pre-tokenisation regex (tiktoken_ext/openai_public.py).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257  # 50,256 byte-pair tokens + <|endoftext|>
TOKENIZER_NAMES = ("gpt2", "char", "hf:DIR")
HF_PREFIX = "hf:"  # data.tokenizer = "hf:DIR": a Hugging Face checkpoint directory's tokenizer
REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class GPT2Tokenizer:
  """GPT-2 BPE (50,257 ids; <|endoftext|> = 50256).

  `encode` maps the literal text "<|endoftext|>" to the special id 50256 (tiktoken's
  allowed_special="all"), so documents can be joined with it in plain text; every other
  string is encoded as ordinary text.
  """

  name = "gpt2"

  def __init__(self, encoding: tiktoken.Encoding):
    self._enc = encoding
    self.vocab_size: int = encoding.n_vocab
    self.eot_id: int | None = encoding.eot_token

  def encode(self, text: str) -> list[int]:
    return self._enc.encode(text, allowed_special="all")

  def encode_batch(self, texts: Iterable[str], num_threads: int = 8) -> list[list[int]]:
    return self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special="all")

  def decode(self, ids: Iterable[int]) -> str:
    return self._enc.decode([int(i) for i in ids])

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """encode(text) and each token's character span [start, end) in `text`."""
    ids = self.encode(text)
    starts = self._enc.decode_with_offsets(ids)[1]
    return ids, list(zip(starts, [*starts[1:], len(text)]))

  def num_bytes(self, ids: Iterable[int]) -> int:
    """The UTF-8 bytes the tokens stand for (whole, even where a character spans tokens)."""
    return len(self._enc.decode_bytes([int(i) for i in ids]))

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name}

  def __repr__(self) -> str:
    return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


def gpt2_encoding(bpe_path: str | os.PathLike | None = None) -> tiktoken.Encoding:
  """tiktoken's GPT-2 encoding, from `bpe_path`, else $FLAXGPT_GPT2_BPE, else the rank file
  shipped in model/assets/ (else, in an install without it, tiktoken's download)."""
  source = "bpe_path"
  if bpe_path is None:
    bpe_path, source = os.environ.get(GPT2_BPE_ENV) or None, f"${GPT2_BPE_ENV}"
  if bpe_path is None:
    if not PACKAGED_GPT2_BPE.is_file():
      return tiktoken.get_encoding("gpt2")
    bpe_path = PACKAGED_GPT2_BPE
  path = os.fspath(bpe_path)
  if not os.path.isfile(path):
    raise NotFoundError(
        f"GPT-2 BPE file {path!r} (from {source}) does not exist; point {GPT2_BPE_ENV} at a "
        f"tiktoken-format gpt2.tiktoken file, or unset it to use the one in the package.")
  return _load_encoding(path)


@functools.lru_cache(maxsize=4)
def _load_encoding(path: str) -> tiktoken.Encoding:
  try:
    ranks = tiktoken.load.load_tiktoken_bpe(path)
  except (OSError, ValueError) as e:  # unreadable, or a line that is not "<base64> <rank>"
    raise UserError(f"GPT-2 BPE file {path!r} is not a tiktoken rank file ("
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); point "
                    f"{GPT2_BPE_ENV} at GPT-2's gpt2.tiktoken, or unset it.") from None
  if len(ranks) != GPT2_EOT_ID:
    raise UserError(f"GPT-2 BPE file {path!r} holds {len(ranks):,} ranks, not GPT-2's "
                    f"{GPT2_EOT_ID:,}; point {GPT2_BPE_ENV} at GPT-2's gpt2.tiktoken, or unset "
                    f"it.")
  return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                           special_tokens={ENDOFTEXT: GPT2_EOT_ID})


class CharTokenizer:
  """One id per character; the vocabulary is the sorted distinct characters of a text
  (nanoGPT's shakespeare_char convention: 65 symbols for tiny shakespeare). No end-of-text."""

  name = "char"
  eot_id: int | None = None

  def __init__(self, chars: Iterable[str]):
    chars = list(chars)
    if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
      raise UserError("CharTokenizer needs a non-empty list of single characters.")
    if len(set(chars)) != len(chars):
      raise UserError("CharTokenizer characters must be distinct.")
    self.chars: list[str] = chars
    self._stoi = {c: i for i, c in enumerate(chars)}
    self.vocab_size: int = len(chars)

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    if not text:
      raise UserError("CharTokenizer.from_text needs a non-empty text.")
    return cls(sorted(set(text)))

  def encode(self, text: str) -> list[int]:
    try:
      return [self._stoi[c] for c in text]
    except KeyError as e:
      raise UserError(
          f"Character {e.args[0]!r} is not in the character vocabulary "
          f"({self.vocab_size} symbols).") from None

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """encode(text) and each token's character span (one character each)."""
    return self.encode(text), [(i, i + 1) for i in range(len(text))]

  def decode(self, ids: Iterable[int]) -> str:
    out = []
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise UserError(f"Token id {i} is outside the character vocabulary "
                        f"[0, {self.vocab_size}).")
      out.append(self.chars[i])
    return "".join(out)

  def num_bytes(self, ids: Iterable[int]) -> int:
    """The UTF-8 bytes of the characters the ids stand for."""
    sizes = np.array([len(c.encode("utf-8")) for c in self.chars])
    return int(sizes[np.asarray(list(ids), np.int64)].sum())

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "chars": "".join(self.chars)}

  def __repr__(self) -> str:
    return f"CharTokenizer(vocab_size={self.vocab_size})"


def char_table_difference(there: str, here: str) -> str:
  """How two character tables differ, in words ("only there: 'F'; only here: 'Q'; id 8: 'F'
  there, 'Q' here"): tables of one size with other characters give the ids other meanings."""
  diff = [f"id {i}: {a!r} there, {b!r} here" for i, (a, b) in enumerate(zip(there, here))
          if a != b]
  gone = "".join(sorted(set(there) - set(here)))
  added = "".join(sorted(set(here) - set(there)))
  parts = ([f"{len(there)} characters there, {len(here)} here"] if len(there) != len(here)
           else [])
  parts += [f"only there: {gone!r}"] * bool(gone) + [f"only here: {added!r}"] * bool(added)
  parts += diff[:3] + ([f"{len(diff) - 3} more ids differ"] if len(diff) > 3 else [])
  return "; ".join(parts)


Tokenizer = GPT2Tokenizer | CharTokenizer


def get_tokenizer(name: str = "gpt2", *, text: str | None = None,
                  bpe_path: str | os.PathLike | None = None) -> Tokenizer:
  """"gpt2" (BPE; ranks from `bpe_path`, $FLAXGPT_GPT2_BPE or the package) or "char" (from
  `text`)."""
  if name == "gpt2":
    return GPT2Tokenizer(gpt2_encoding(bpe_path))
  if name == "char":
    if text is None:
      raise UserError('get_tokenizer("char") needs text=... to build its vocabulary.')
    return CharTokenizer.from_text(text)
  if isinstance(name, str) and name.startswith(HF_PREFIX) and name[len(HF_PREFIX):]:
    from model.hf.tokenizer import load_hf_tokenizer  # pylint: disable=import-outside-toplevel
    return load_hf_tokenizer(os.path.expanduser(name[len(HF_PREFIX):]))
  raise UserError(f"Unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}.")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
  """Inverse of `to_dict()` (for a tokenizer stored with a checkpoint)."""
  name = d.get("name") if isinstance(d, dict) else None
  if name == "gpt2":
    return get_tokenizer("gpt2")
  if name == "char":
    if not isinstance(d.get("chars"), str):
      raise UserError("A saved char tokenizer needs its 'chars' string.")
    return CharTokenizer(d["chars"])
  if name == "hf" and isinstance(d.get("path"), str):
    return get_tokenizer(HF_PREFIX + d["path"])
  raise UserError(f"Unknown saved tokenizer {name!r}; expected a dict whose 'name' is one of "
                  f"{', '.join(TOKENIZER_NAMES)}.")


class TextStream:
  """Incremental decoding of one sample: `push` returns the text that is new and final.
  A trailing replacement character (a UTF-8 sequence cut between tokens) is held back until
  the next token completes it, so the pieces join to `decode(all tokens)`."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self.ids: list[int] = []
    self._shown = ""

  def push(self, ids: Iterable[int]) -> str:
    self.ids.extend(int(i) for i in ids)
    return self._advance(self._tokenizer.decode(self.ids).rstrip(REPLACEMENT_CHAR))

  def flush(self) -> str:
    return self._advance(self._tokenizer.decode(self.ids))

  def _advance(self, text: str) -> str:
    if not text.startswith(self._shown):  # cannot happen with UTF-8; never repeat text
      return ""
    new, self._shown = text[len(self._shown):], text
    return new


MASK_TEXT = "[MASK]"  # how a prompt writes the mask token of a bert run


class WithSpecials:
  """The tokenizer of a bert / encdec run: its data's tokenizer (`base`) plus the special ids
  the model appended after that vocabulary (training/data/tasks.py). `encode` turns each
  literal "[MASK]" into mask_id; `decode` shows mask_id as "[MASK]" and drops the other
  specials (pad, bos, eos)."""

  def __init__(self, base: Tokenizer, *, vocab_size: int, mask_id: int = -1):
    self.base, self.name = base, base.name
    self.vocab_size = vocab_size
    self.eot_id: int | None = None
    self.mask_id = mask_id if mask_id >= 0 else None
    self.mask_token = MASK_TEXT

  def encode(self, text: str) -> list[int]:
    pieces = text.split(MASK_TEXT) if self.mask_id is not None else [text]
    ids: list[int] = []
    for i, piece in enumerate(pieces):
      if i:
        ids.append(self.mask_id)
      if piece:
        ids.extend(self.base.encode(piece))
    return ids

  def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    out, run = [], []
    for i in (int(i) for i in ids):
      if i < self.base.vocab_size:
        run.append(i)
        continue
      if run:
        out.append(self.base.decode(run))
        run = []
      if i == self.mask_id:
        out.append(MASK_TEXT)
    if run:
      out.append(self.base.decode(run))
    return "".join(out)

  def num_bytes(self, ids: Iterable[int]) -> int:
    return len(self.decode(ids).encode("utf-8"))

  def to_dict(self) -> dict[str, Any]:
    return self.base.to_dict()
