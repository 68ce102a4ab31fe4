"""What `python -m launch.sample` needs besides the model: prompts, flag checks, output.

Everything here is plain Python (no jax work), so the CLI checks its inputs before it loads
or compiles anything, and tests can call it directly. A user mistake raises
`SampleInputError` (a ValueError) whose message is one sentence naming the bad value.

Prompts: `--prompt TEXT` (repeatable; `FILE:path` reads a whole file as one prompt, nanoGPT's
convention) and `--prompt_file PATH` (several prompts separated by lines holding only `---`).
Without either, the default prompt is "<|endoftext|>" for a tokenizer with an end-of-text
token (GPT-2 BPE: an unconditional sample, as GPT-2 was trained with documents joined by it)
and "\\n" otherwise (a character model: nanoGPT's default).

Batch rows are prompt-major: row = prompt_index * num_samples + sample_index.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence, TextIO

from model.tokenizer import GPT2_BPE_ENV, Tokenizer, get_tokenizer, tokenizer_from_dict

PROMPT_SEPARATOR = "---"  # a line holding only this separates prompts in a prompt file
FILE_PREFIX = "FILE:"  # --prompt FILE:path reads the whole file as one prompt
SAMPLE_SEPARATOR = "---------------"  # printed after each sample (nanoGPT's sample.py)
STOP_EOT, STOP_LENGTH = "eot", "max_new_tokens"  # why a sample ended
DEFAULT_MAX_NEW_TOKENS = 256  # when --max_new_tokens is not given (and the block has room)
REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class SampleInputError(ValueError):
  """A bad command-line value; str(error) is one sentence naming it."""


# ---------------------------------------------------------------------------------------------
# Flags


def check_settings(*, max_new_tokens: int | None, num_samples: int, temperature: float, top_k: int,
                   top_p: float, seed: int) -> None:
  """The numeric sampling flags, in the ranges `model.sampling.generate` accepts."""
  if max_new_tokens is not None and max_new_tokens < 1:
    raise SampleInputError(f"--max_new_tokens must be at least 1, got {max_new_tokens}.")
  if num_samples < 1:
    raise SampleInputError(f"--num_samples must be at least 1, got {num_samples}.")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise SampleInputError(
        f"--temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")
  if top_k < 0:
    raise SampleInputError(f"--top_k must be >= 0 (0 means off), got {top_k}.")
  if not 0 < top_p <= 1:  # also refuses NaN
    raise SampleInputError(f"--top_p must be in (0, 1] (1 means off), got {top_p}.")
  if not 0 <= seed < 2**32:
    raise SampleInputError(f"--seed must be in [0, 2**32), got {seed}.")


# ---------------------------------------------------------------------------------------------
# Prompts


def _read_text(path: str, flag: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise SampleInputError(f"{flag}: file {path!r} does not exist.") from None
  except IsADirectoryError:
    raise SampleInputError(f"{flag}: {path!r} is a directory, not a text file.") from None
  except UnicodeDecodeError:
    raise SampleInputError(f"{flag}: file {path!r} is not UTF-8 text.") from None
  except OSError as e:
    raise SampleInputError(f"{flag}: cannot read {path!r} ({e.strerror or e}).") from None


def split_prompt_file(text: str) -> list[str]:
  """The prompts of a prompt file: blocks separated by lines holding only `---`; each block
  loses the newline that ends its last line ("a\\nb\\n---\\nc\\n" -> ["a\\nb", "c"])."""
  blocks, lines = [], []
  for line in text.splitlines(keepends=True):
    if line.rstrip("\r\n") == PROMPT_SEPARATOR:
      blocks.append(lines)
      lines = []
    else:
      lines.append(line)
  blocks.append(lines)
  prompts = []
  for block in blocks:
    prompt = "".join(block)
    prompts.append(prompt[:-1] if prompt.endswith("\n") else prompt)
  return prompts


def read_prompts(prompts: Sequence[str] | None, prompt_file: str | None) -> list[str] | None:
  """The --prompt values (FILE:path read whole) followed by --prompt_file's prompts; None when
  neither flag was given (the caller picks the tokenizer's default prompt)."""
  out = []
  for prompt in prompts or ():
    if prompt.startswith(FILE_PREFIX):
      prompt = _read_text(prompt[len(FILE_PREFIX):], f"--prompt {prompt}")
    out.append(prompt)
  if prompt_file is not None:
    out.extend(split_prompt_file(_read_text(prompt_file, "--prompt_file")))
  return out if (prompts or prompt_file is not None) else None


def default_prompt(tokenizer: Tokenizer) -> str:
  """"<|endoftext|>" for GPT-2 BPE (an unconditional sample), "\\n" for a character model."""
  return "<|endoftext|>" if tokenizer.eot_id is not None else "\n"


def _name(index: int, text: str, count: int) -> str:
  shown = text if len(text) <= 40 else text[:37] + "..."
  return f"The prompt {shown!r}" if count == 1 else f"Prompt {index + 1} ({shown!r})"


def _tokens(n: int) -> str:
  return f"{n} token" if n == 1 else f"{n} tokens"


def encode_prompts(tokenizer: Tokenizer, texts: Sequence[str], *, vocab_size: int,
                   block_size: int, max_new_tokens: int | None) -> list[list[int]]:
  """Token ids of each prompt, checked: not empty, every id inside the model's vocabulary,
  and prompt + max_new_tokens within block_size (there is no sliding window); with
  max_new_tokens None, room for at least one new token."""
  if not texts:
    raise SampleInputError("--prompt_file holds no prompts.")
  encoded = []
  for i, text in enumerate(texts):
    name = _name(i, text, len(texts))
    try:
      ids = tokenizer.encode(text)
    except ValueError as e:
      raise SampleInputError(f"{name} cannot be encoded: {e}") from None
    if not ids:
      raise SampleInputError(f"{name} is empty; a prompt needs at least one token.")
    if max(ids) >= vocab_size:
      raise SampleInputError(
          f"{name} encodes to token id {max(ids)}, outside the model's vocabulary of "
          f"{vocab_size} tokens.")
    if max_new_tokens is None and len(ids) >= block_size:
      raise SampleInputError(
          f"{name} is {_tokens(len(ids))}, which leaves no room for new tokens in the "
          f"model's block_size ({block_size}).")
    if max_new_tokens is not None and len(ids) + max_new_tokens > block_size:
      raise SampleInputError(
          f"{name} is {_tokens(len(ids))}; with --max_new_tokens={max_new_tokens} that is "
          f"{len(ids) + max_new_tokens}, more than the model's block_size ({block_size}).")
    encoded.append(ids)
  return encoded


def default_max_new_tokens(encoded: Sequence[Sequence[int]], block_size: int) -> int:
  """Without --max_new_tokens: DEFAULT_MAX_NEW_TOKENS, or fewer if the longest prompt leaves
  less room in the block."""
  return min(DEFAULT_MAX_NEW_TOKENS, block_size - max(len(ids) for ids in encoded))


# ---------------------------------------------------------------------------------------------
# Tokenizer


def choose_tokenizer(saved: dict[str, Any] | None, vocab_size: int) -> Tokenizer:
  """The tokenizer a checkpoint recorded (`to_dict()` form), or GPT-2 BPE when it recorded
  none (a Hugging Face checkpoint, or a run on synthetic data); it must cover the model's
  vocabulary."""
  try:
    tokenizer = get_tokenizer("gpt2") if saved is None else tokenizer_from_dict(saved)
  except (ValueError, FileNotFoundError) as e:
    raise SampleInputError(str(e)) from None
  except OSError:  # tiktoken's download failed
    raise SampleInputError(
        f"Could not download the GPT-2 BPE files (no network?); set {GPT2_BPE_ENV} to a "
        f"tiktoken-format gpt2.tiktoken file.") from None
  if tokenizer.vocab_size < vocab_size:
    raise SampleInputError(
        f"The model's vocabulary ({vocab_size} tokens) is larger than its tokenizer's "
        f"({tokenizer.name}, {tokenizer.vocab_size}), so its samples cannot be decoded.")
  return tokenizer


def stop_token(tokenizer: Tokenizer, vocab_size: int, stop: bool = True) -> int | None:
  """The id that ends a sample: the tokenizer's end-of-text, if it is in the model's
  vocabulary and stopping is wanted; else None."""
  eot = tokenizer.eot_id
  return eot if stop and eot is not None and eot < vocab_size else None


# ---------------------------------------------------------------------------------------------
# Output


def format_sample(prompt: str, completion: str) -> str:
  """Text mode: the prompt, its completion, then a separator line (as nanoGPT prints)."""
  return f"{prompt}{completion}\n{SAMPLE_SEPARATOR}\n"


def sample_record(*, row: int, num_samples: int, prompt: str, completion: str,
                  tokens: Sequence[int], stopped: bool, seconds: float,
                  batch_tokens: int) -> dict[str, Any]:
  """One --json line. tokens_per_sec is the whole batch's new tokens over the generation's
  wall time (compilation included; python -m launch.benchmark measures speed)."""
  return {
      "prompt_index": row // num_samples, "sample_index": row % num_samples,
      "prompt": prompt, "completion": completion, "token_ids": [int(t) for t in tokens],
      "num_tokens": len(tokens), "stop_reason": STOP_EOT if stopped else STOP_LENGTH,
      "seconds": round(seconds, 6),
      "tokens_per_sec": round(batch_tokens / seconds, 3) if seconds > 0 else None,
  }


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


class StreamPrinter:
  """Prints `generate_stream` chunks (run with include_eot=True) in the order and format of
  text mode: sample 0 appears as it is generated; the next sample is printed (what it has so
  far, then live) once sample 0 has ended, and so on. `finish()` prints the rest."""

  def __init__(self, tokenizer: Tokenizer, row_prompts: Sequence[str], eot_id: int | None,
               out: TextIO):
    self._rows = [TextStream(tokenizer) for _ in row_prompts]
    self._prompts = list(row_prompts)
    self._done = [False] * len(row_prompts)
    self._eot_id = eot_id
    self._out = out
    self._current = 0
    self._write(self._prompts[0])

  def push(self, chunk: Sequence[Sequence[int]]) -> None:
    for b, new in enumerate(chunk):
      new = list(new)
      if self._eot_id is not None and self._eot_id in new:
        new, self._done[b] = new[:new.index(self._eot_id)], True
      if b == self._current:
        self._write(self._rows[b].push(new))
      else:
        self._rows[b].ids.extend(new)
    self._advance()

  def finish(self) -> tuple[list[list[int]], list[bool]]:
    """Prints the remaining samples; returns each row's tokens and whether it hit eot."""
    stopped = list(self._done)
    self._done = [True] * len(self._rows)
    self._advance()
    return [row.ids for row in self._rows], stopped

  def _advance(self) -> None:
    while self._current < len(self._rows) and self._done[self._current]:
      self._write(self._rows[self._current].flush() + f"\n{SAMPLE_SEPARATOR}\n")
      self._current += 1
      if self._current < len(self._rows):
        row = self._rows[self._current]
        pending, row.ids = row.ids, []
        self._write(self._prompts[self._current] + row.push(pending))

  def _write(self, text: str) -> None:
    if text:
      self._out.write(text)
      self._out.flush()
