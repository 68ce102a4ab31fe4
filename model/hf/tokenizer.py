"""Hugging Face tokenizer files: GPT-2's written (vocab.json, merges.txt, made offline from the
tiktoken ranks the package carries), and a BERT / BART checkpoint's read (`load_hf_tokenizer`,
through the `tokenizers` library: pip install 'flaxgpt[hf]').

tiktoken stores BPE as ranks of byte strings; Hugging Face's GPT2Tokenizer wants the same
vocabulary with every byte written as GPT-2's printable stand-in character (`bytes_to_unicode`)
and the merges as pairs. The pairs follow from the ranks: byte-pair encoding a token's bytes
with only the ranks below its own ends in exactly two parts, the pair whose merge made it.

    save_hf_gpt2_tokenizer(get_tokenizer("gpt2"), "out/", model_max_length=1024)
    transformers.GPT2TokenizerFast.from_pretrained("out/")   # encodes as tiktoken does

    tok = load_hf_tokenizer("bert-dir/")   # tokenizer.json, or BERT's vocab.txt
    tok.encode("the [MASK] of it")         # [CLS] ... [SEP] ids, as AutoTokenizer gives them
"""

from __future__ import annotations

import functools
import json
import os

from model.errors import UserError

VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
EOT = "<|endoftext|>"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map of the 256 byte values to printable characters: printable Latin-1 bytes stand
  for themselves, the others for chr(256 + k) in byte order (openai/gpt-2's encoder.py)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _unicode(token: bytes) -> str:
  table = bytes_to_unicode()
  return "".join(table[b] for b in token)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The merges, in rank order, that build every multi-byte token from its bytes."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    if len(token) < 2:
      continue
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
      best = None
      for i in range(len(parts) - 1):
        r = ranks.get(parts[i] + parts[i + 1])
        if r is not None and r < rank and (best is None or r < best[0]):
          best = (r, i)
      if best is None:
        break
      i = best[1]
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
      raise UserError(f"The BPE ranks are not GPT-2-style: token {token!r} (rank {rank}) is not "
                      f"one merge of lower-ranked tokens.")
    merges.append((parts[0], parts[1]))
  return merges


def gpt2_ranks(tokenizer) -> dict[bytes, int]:
  """The ordinary (non-special) tokens of a model.tokenizer.GPT2Tokenizer: bytes -> id."""
  enc = tokenizer._enc  # pylint: disable=protected-access
  return {b: enc.encode_single_token(b) for b in enc.token_byte_values()}


def save_hf_gpt2_tokenizer(tokenizer, directory: str | os.PathLike,
                           model_max_length: int = 1024) -> list[str]:
  """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of the
  GPT-2 tokenizer into `directory`; returns the file names."""
  ranks = gpt2_ranks(tokenizer)
  vocab = {_unicode(token): rank for token, rank in ranks.items()}
  vocab[EOT] = tokenizer.eot_id
  merges = bpe_merges(ranks)
  special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
  config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {str(tokenizer.eot_id): {
                "content": EOT, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False, "special": True}}, **special}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, VOCAB_FILE), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(directory, MERGES_FILE), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{_unicode(a)} {_unicode(b)}\n" for a, b in merges)
  with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(directory, SPECIAL_TOKENS_FILE), "w", encoding="utf-8") as f:
    json.dump(special, f, indent=2)
  return [VOCAB_FILE, MERGES_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE]


# ---------------------------------------------------------------------------------------------
# Reading a BERT / BART checkpoint's tokenizer

TOKENIZER_FILE, WORDPIECE_FILE = "tokenizer.json", "vocab.txt"
TOKENIZER_FILES = (TOKENIZER_FILE, WORDPIECE_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE,
                   VOCAB_FILE, MERGES_FILE)
_MASKS, _CLS, _SEP, _PAD = ("[MASK]", "<mask>"), ("[CLS]", "<s>"), ("[SEP]", "</s>"), \
    ("[PAD]", "<pad>")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}).") from None
  return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _vocabulary(directory: str) -> dict[str, int] | None:
  """token -> id from tokenizer.json (its model's vocab and added tokens) or vocab.txt; None
  when the directory has neither."""
  path = os.path.join(directory, TOKENIZER_FILE)
  if os.path.isfile(path):
    data = _read_json(path)
    vocab = (data.get("model") or {}).get("vocab")
    out = dict(vocab) if isinstance(vocab, dict) else {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
      out = {piece[0]: i for i, piece in enumerate(vocab)}
    for added in data.get("added_tokens") or []:
      out[added["content"]] = added["id"]
    return out
  path = os.path.join(directory, WORDPIECE_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return {line.rstrip("\n"): i for i, line in enumerate(f)}
  return None


def special_tokens(directory: str) -> dict[str, str]:
  """The mask / cls / sep / pad token texts a checkpoint's tokenizer files name (its
  tokenizer_config.json or special_tokens_map.json, else BERT's or BART's usual ones found in
  the vocabulary)."""
  vocab = _vocabulary(directory) or {}
  named = {**_read_json(os.path.join(directory, SPECIAL_TOKENS_FILE)),
           **_read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE))}
  out = {}
  for key, usual in (("mask", _MASKS), ("cls", _CLS), ("sep", _SEP), ("pad", _PAD)):
    text = _token_text(named.get(f"{key}_token"))
    if text is None or text not in vocab:
      text = next((u for u in usual if u in vocab), None)
    if text is not None:
      out[key] = text
  return out


def special_ids(directory: str) -> dict[str, int]:
  """{"mask_id", "pad_id"} of a checkpoint's tokenizer files (those it has); {} without them.
  Needs no `tokenizers`."""
  vocab = _vocabulary(directory)
  if vocab is None:
    return {}
  tokens = special_tokens(directory)
  return {f"{k}_id": vocab[tokens[k]] for k in ("mask", "pad") if k in tokens}


class HFTokenizer:
  """A Hugging Face checkpoint's own tokenizer, with the interface of model/tokenizer.py's:
  `encode` adds the model's special tokens as transformers does ([CLS] ... [SEP] for BERT,
  <s> ... </s> for BART, <|begin_of_text|> first for Llama 3) and reads a literal mask token
  ("[MASK]", "<mask>") as mask_id; `encode_batch` (pieces of a training text, joined by eot_id
  between documents) adds none; `decode` drops the special tokens."""

  def __init__(self, tokenizer, directory: str):
    self._tok = tokenizer
    self._tok.no_padding()
    self._tok.no_truncation()
    self.directory = os.path.abspath(directory)
    self.name = f"hf:{os.path.basename(os.path.normpath(directory))}"
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    names = special_tokens(directory)
    # the end of a text, where sampling stops (a Llama's <|end_of_text|>; BERT has none)
    eos = _token_text(_read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE)).get("eos_token"))
    self.eot_id: int | None = tokenizer.token_to_id(eos) if eos else None
    ids = {k: tokenizer.token_to_id(v) for k, v in names.items()}
    self.mask_token = names.get("mask", "[MASK]")
    self.mask_id, self.cls_id, self.sep_id, self.pad_id = (
        ids.get(k) for k in ("mask", "cls", "sep", "pad"))

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text).ids)

  def encode_batch(self, texts) -> list[list[int]]:
    return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of `text` without added special tokens (a rendered chat brings its own) and
    each token's character span, as transformers' apply_chat_template reads them."""
    encoding = self._tok.encode(text, add_special_tokens=False)
    return list(encoding.ids), [tuple(o) for o in encoding.offsets]

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def num_bytes(self, ids) -> int:
    return len(self.decode(ids).encode("utf-8"))

  def to_dict(self) -> dict:
    """What a run records (model.tokenizer.tokenizer_from_dict reads the files again)."""
    return {"name": "hf", "path": self.directory, "vocab_size": self.vocab_size}

  def __repr__(self) -> str:
    return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_hf_tokenizer(directory: str | os.PathLike) -> HFTokenizer:
  """The tokenizer of a Hugging Face checkpoint directory: its tokenizer.json, or (BERT)
  vocab.txt with tokenizer_config.json's do_lower_case (default True). UserError when it has
  neither, or when the `tokenizers` library is missing."""
  directory = os.fspath(directory)
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError(f"Reading the tokenizer of {directory} needs the tokenizers library (pip "
                    f"install 'flaxgpt[hf]').") from None
  path = os.path.join(directory, TOKENIZER_FILE)
  wordpiece = os.path.join(directory, WORDPIECE_FILE)
  try:
    if os.path.isfile(path):
      tok = tokenizers.Tokenizer.from_file(path)
    elif os.path.isfile(wordpiece):
      config = _read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE))
      names = special_tokens(directory)
      tok = tokenizers.BertWordPieceTokenizer(
          wordpiece, lowercase=config.get("do_lower_case", True),
          strip_accents=config.get("strip_accents"),
          handle_chinese_chars=config.get("tokenize_chinese_chars", True),
          unk_token=_token_text(config.get("unk_token")) or "[UNK]",
          sep_token=names.get("sep", "[SEP]"), cls_token=names.get("cls", "[CLS]"),
          pad_token=names.get("pad", "[PAD]"), mask_token=names.get("mask", "[MASK]"))
    else:
      raise UserError(f"{directory} has no tokenizer files ({TOKENIZER_FILE}, or BERT's "
                      f"{WORDPIECE_FILE}); copy the checkpoint's tokenizer next to its "
                      f"config.json.")
  except Exception as e:  # tokenizers raises its own Exception type for bad files
    if isinstance(e, UserError):
      raise
    raise UserError(f"The tokenizer files in {directory} cannot be read ({e}).") from None
  return HFTokenizer(tok, directory)
