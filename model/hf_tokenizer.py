"""GPT-2's tokenizer files for Hugging Face (vocab.json, merges.txt), made offline from the
tiktoken ranks the package carries.

tiktoken stores BPE as ranks of byte strings; Hugging Face's GPT2Tokenizer wants the same
vocabulary with every byte written as GPT-2's printable stand-in character (`bytes_to_unicode`)
and the merges as pairs. The pairs follow from the ranks: byte-pair encoding a token's bytes
with only the ranks below its own ends in exactly two parts, the pair whose merge made it.

    save_hf_gpt2_tokenizer(get_tokenizer("gpt2"), "out/", model_max_length=1024)
    transformers.GPT2TokenizerFast.from_pretrained("out/")   # encodes as tiktoken does
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
