"""Text files -> a prepared directory (training/data/bin.py): the `text` source and
`launch.prepare --input`.

The first (1 - val_fraction) of all characters is train, the rest val (nanoGPT's split); files
after the first are separated by <|endoftext|> where the tokenizer has one. With no path the
text is tiny shakespeare: $FLAXGPT_DATA_DIR/tinyshakespeare.txt, else the copy in
training/data/assets/. Text is encoded in pieces cut where GPT-2's pre-tokenizer cannot join
characters, so the tokens equal those of encoding the whole text.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import urllib.request
from typing import Any

from model.errors import NotFoundError, UserError
from model.tokenizer import HF_PREFIX, get_tokenizer
from training.data.bin import (BinWriter, Progress, build_cached, cache_key, cache_root,
                               check_out_dir, check_tokenizer, write_prepared)

DATA_DIR_ENV = "FLAXGPT_DATA_DIR"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# Shipped with the package, so that the quick start needs no network.
PACKAGED_SHAKESPEARE = pathlib.Path(__file__).parent / "assets" / SHAKESPEARE_FILE
CHUNK_CHARS = 1 << 20  # text is encoded in pieces of about this many characters


def resolve_text_paths(path: str) -> list[str]:
  """A file, comma-separated files, or glob patterns -> existing file paths, in order."""
  paths = []
  for part in (p.strip() for p in path.split(",")):
    if not part:
      continue
    if glob.has_magic(part):
      matches = sorted(glob.glob(os.path.expanduser(part)))
      if not matches:
        raise NotFoundError(f"No file matches the text pattern {part!r}.")
      paths.extend(matches)
      continue
    part = os.path.expanduser(part)
    if not os.path.isfile(part):
      what = "is a directory, not a text file" if os.path.isdir(part) else "does not exist"
      raise NotFoundError(f"Text file {part!r} {what}.")
    paths.append(part)
  if not paths:
    raise UserError(f"No text file given in {path!r}.")
  return paths


def text_paths(path: str, cache_dir: str = "") -> list[str]:
  """data.path's files (`resolve_text_paths`), or tiny shakespeare when it is empty."""
  return resolve_text_paths(path) if path else [tiny_shakespeare_path(cache_dir)]


def tiny_shakespeare_path(cache_dir: str = "") -> str:
  """$FLAXGPT_DATA_DIR/tinyshakespeare.txt, else the copy shipped with the package, else (an
  install without it) the char-rnn file downloaded once to the cache and checked."""
  data_dir = os.environ.get(DATA_DIR_ENV)
  if data_dir:
    path = os.path.join(data_dir, SHAKESPEARE_FILE)
    if not os.path.isfile(path):
      raise NotFoundError(f"{path!r} does not exist (from ${DATA_DIR_ENV}).")
    return path
  if PACKAGED_SHAKESPEARE.is_file():
    return str(PACKAGED_SHAKESPEARE)
  path = cache_root(cache_dir) / SHAKESPEARE_FILE
  if not path.exists():
    _download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
  return str(path)


def _download(url: str, path: pathlib.Path, sha256: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      content = response.read()
  except OSError as e:
    raise UserError(f"Could not download {url} ({e}); set ${DATA_DIR_ENV} to a directory "
                    f"holding {SHAKESPEARE_FILE} or give data.path.") from None
  if hashlib.sha256(content).hexdigest() != sha256:
    raise UserError(f"The file downloaded from {url} does not have the expected sha256 {sha256}.")
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(content)
  os.replace(tmp, path)


def tokenizer_key(name: str) -> Any:
  """What identifies a tokenizer in a cache key: its name, and for "hf:DIR" the path, size and
  mtime of DIR/tokenizer.json (another tokenizer there is another cache entry)."""
  if not name.startswith(HF_PREFIX):
    return name
  path = os.path.join(os.path.abspath(os.path.expanduser(name[len(HF_PREFIX):])),
                      "tokenizer.json")
  if not os.path.isfile(path):
    raise NotFoundError(f"data.tokenizer={name!r}: {path} does not exist (hf:DIR names a "
                        f"Hugging Face checkpoint directory with a tokenizer.json).")
  stat = os.stat(path)
  return [path, stat.st_size, stat.st_mtime_ns]


def cached_text_dir(paths: list[str], tokenizer_name: str, val_fraction: float, *,
                    cache_dir: str = "", quiet: bool = False) -> pathlib.Path:
  """Prepared directory for text files, keyed by their paths, sizes and mtimes."""
  check_tokenizer(tokenizer_name)
  _check_val_fraction(val_fraction)
  stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
  key = cache_key({"kind": "text", "files": stats, "tokenizer": tokenizer_key(tokenizer_name),
                   "val_fraction": val_fraction})
  out_dir = cache_root(cache_dir) / "text" / f"{pathlib.Path(paths[0]).stem}-{key}"
  return build_cached(out_dir, lambda d: prepare_text(paths, tokenizer_name, d,
                                                     val_fraction=val_fraction, quiet=quiet))


def _check_val_fraction(val_fraction: float) -> None:
  if not 0 < val_fraction < 1:
    raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")


def read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"Text file {path!r} is not UTF-8 ({e.reason} at byte {e.start}).") from None


def _safe_cut(text: str, lo: int, hi: int) -> int | None:
  """A position in (lo, hi] just after a newline with non-space on both sides. GPT-2's
  pre-tokenizer never joins characters across such a point, so encoding the pieces on either
  side separately gives exactly the tokens of encoding the whole text."""
  i = text.rfind("\n", lo, hi)
  while i > lo:
    if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
      return i + 1
    i = text.rfind("\n", lo, i)
  return None


def split_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
  """`text` in pieces of at most about `chunk_chars` cut at safe points (see `_safe_cut`)."""
  pieces, start = [], 0
  while len(text) - start > chunk_chars:
    cut = _safe_cut(text, start + chunk_chars // 2, start + chunk_chars)
    if cut is None:
      break
    pieces.append(text[start:cut])
    start = cut
  pieces.append(text[start:])
  return pieces


def _text_segments(texts: list[str], val_fraction: float, eot_id: int | None):
  """(split, text, end_with_eot) in order: the first (1 - val_fraction) of all characters is
  train (nanoGPT's convention); files after the first are separated by <|endoftext|>."""
  total = sum(len(t) for t in texts)
  cut, offset = int(total * (1 - val_fraction)), 0
  for n, text in enumerate(texts):
    eot = eot_id is not None and n < len(texts) - 1
    here = min(max(cut - offset, 0), len(text))
    if here > 0:
      yield "train", text[:here], eot and here == len(text)
    if here < len(text):
      yield "val", text[here:], eot
    offset += len(text)


def prepare_text(paths: list[str], tokenizer_name: str, out_dir: str | os.PathLike, *,
                 val_fraction: float = 0.1, quiet: bool = False, force: bool = False
                 ) -> dict[str, Any]:
  """Tokenize text files into out_dir/{train,val}.bin + meta.json; returns meta + seconds.
  out_dir must be new or empty unless `force` (then its prepared files are replaced)."""
  check_tokenizer(tokenizer_name)
  _check_val_fraction(val_fraction)
  check_out_dir(out_dir, force)
  texts = [read_text(p) for p in paths]
  charset = "".join(sorted(set().union(*map(set, texts))))
  if not charset:
    raise UserError(f"Text file(s) {', '.join(paths)} are empty.")
  tokenizer = get_tokenizer(tokenizer_name, text=charset)
  progress = Progress(f"tokenizing {pathlib.Path(paths[0]).name}" +
                      (f" (+{len(paths) - 1} files)" if len(paths) > 1 else ""),
                      sum(map(len, texts)), "characters", quiet)

  def pieces(writer: BinWriter) -> None:
    for split, text, eot in _text_segments(texts, val_fraction, tokenizer.eot_id):
      chunks = split_text(text)
      for i in range(0, len(chunks), 8):
        group = chunks[i:i + 8]
        encoded = tokenizer.encode_batch(group)
        for ids in encoded:
          writer.write(split, ids)
        progress.update(sum(map(len, group)), sum(map(len, encoded)))
      if eot:
        writer.write(split, [tokenizer.eot_id])
    progress.close()

  return write_prepared(out_dir, tokenizer, {"source": "text:" + ",".join(paths)}, pieces)
