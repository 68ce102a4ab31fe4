"""Sample from a trained or a pretrained model with a jitted KV-cache decode loop: a GPT
continues the prompt; an encoder-decoder (a transformer_reverse-style run, a BART checkpoint)
generates a target for each prompt as its source (greedy, sampling or --num_beams beam
search); an encoder (a bert run, a BERT checkpoint) fills each [MASK] of the prompt
(launch/sample_families.py says how those two print).

  python -m launch.sample --workdir DIR [--prompt TEXT ...] [--num_samples N] ...
  python -m launch.sample --init_from gpt2|gpt2-medium|gpt2-large|gpt2-xl|HF_DIR ...

--workdir samples the latest checkpoint of a `launch.train` run (or --step) with the run's
tokenizer; --init_from a Hugging Face GPT-2 (a Hub name, downloaded once, or a local
directory with config.json and model.safetensors) with GPT-2 BPE (its ranks ship with the
package). All prompts x --num_samples run as one batch.

Chats: --chat takes messages (a JSON list, or a JSONL file of conversations), renders them with
the model's chat template and its generation prompt, and stops each reply at the template's
end-of-turn token (launch/sample_chat.py).

Prompts: --prompt TEXT (repeat it for several; FILE:path reads a whole file as one prompt),
--prompt_file PATH (prompts separated by lines holding only ---). Default: "<|endoftext|>"
for GPT-2 BPE, "\\n" for a character model. A sample stops at <|endoftext|> (unless
--no_stop) or after --max_new_tokens (default: 256). A prompt must fit in the model's block
size T; new tokens may go past it: the context window then slides (model/decode/sampling.py): each
token is predicted from at most the last T tokens and at least the last T - W + 1, where W is
--window_shift (default T // 4; 1 is nanoGPT's rule, every token sees exactly the last T, at
the cost of re-reading T tokens per new token).

Output: each sample's prompt + completion followed by a line of dashes (--stream: the same
text as it is generated); --json: one object per sample per line with prompt_index,
sample_index, prompt, completion, token_ids, num_tokens, stop_reason (eot|max_new_tokens),
seconds and tokens_per_sec (the whole batch's new tokens per second of generation,
compilation included). Mistakes print one `error:` line and exit with status 2.

Examples:
  python -m launch.sample --workdir /tmp/shakespeare --prompt "ROMEO:" --num_samples 3
  python -m launch.sample --init_from gpt2 --prompt "Hello, I'm a language model," \\
      --max_new_tokens 40 --top_k 50 --stream
  python -m launch.sample --init_from gpt2 --prompt_file prompts.txt --temperature 0 --json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, NamedTuple, Sequence, TextIO

import jax
from absl import flags

from launch import cli, sample_chat, sample_families
from model.errors import UserError
from model.decode.sampling import (check_prompt, check_settings, check_window_shift, generate,
                                   generate_stream)
from model.tokenizer import GPT2_BPE_ENV, TextStream, get_tokenizer, tokenizer_from_dict
from training.weights import WORKDIR, describe_weights, load_weights, own_tokenizer_dir

STREAM_CHUNK = 8  # decode steps between printed pieces with --stream
PROMPT_SEPARATOR = "---"  # a line holding only this separates prompts in a prompt file
FILE_PREFIX = "FILE:"  # --prompt FILE:path reads the whole file as one prompt
SAMPLE_SEPARATOR = "---------------"  # printed after each sample (nanoGPT's sample.py)
STOP_EOT, STOP_LENGTH = "eot", "max_new_tokens"  # why a sample ended
DEFAULT_MAX_NEW_TOKENS = 256  # when --max_new_tokens is not given

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A launch.train workdir: its latest checkpoint.",
                    flag_values=FLAGS)
flags.DEFINE_string("init_from", None, "gpt2, gpt2-medium, gpt2-large, gpt2-xl (or another Hub "
                    "repo id, downloaded once) or a local Hugging Face GPT-2, BERT or BART "
                    "checkpoint directory.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "--workdir: this checkpoint instead of the latest.",
                     flag_values=FLAGS)
flags.DEFINE_multi_string("prompt", None, "A prompt; repeat for several; FILE:path reads a "
                          "file as one prompt.", flag_values=FLAGS)
flags.DEFINE_string("prompt_file", None, "Prompts separated by lines holding only ---.",
                    flag_values=FLAGS)
flags.DEFINE_integer("num_samples", 1, "Samples per prompt.", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", DEFAULT_MAX_NEW_TOKENS, "Most tokens generated per "
                     "sample; may exceed the block size (the context window slides).",
                     flag_values=FLAGS)
flags.DEFINE_integer("window_shift", None, "Past the block size T: how far the context window "
                     "moves each time it is full (default T // 4; 1: every token sees exactly "
                     "the last T tokens, as nanoGPT).", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.8, "0 is greedy (nanoGPT's default is 0.8).",
                   flag_values=FLAGS)
flags.DEFINE_integer("top_k", 200, "Keep the k likeliest tokens; 0 is off (nanoGPT: 200).",
                     flag_values=FLAGS)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling, in (0, 1]; 1 is off.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Random seed.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the "
                  "checkpoint's; float32 for Hugging Face checkpoints).", flag_values=FLAGS)
flags.DEFINE_integer("num_beams", 1, "Encoder-decoder models: beam search with this many "
                     "beams (1: sampling / greedy).", flag_values=FLAGS)
flags.DEFINE_float("length_penalty", 1.0, "Beam search: a finished hypothesis scores its summed "
                   "log-probability / length ** length_penalty.", flag_values=FLAGS)
flags.DEFINE_string("chat", None, "Chat: a JSON list of messages (or a JSONL file of "
                    "conversations), rendered with the model's chat template and its "
                    "generation prompt; replies stop at its end-of-turn token.",
                    flag_values=FLAGS)
flags.DEFINE_string("chat_template", None, "--chat: 'default' or a .jinja file instead of the "
                    "model's own template.", flag_values=FLAGS)
flags.DEFINE_bool("no_stop", False, "Do not stop a sample at <|endoftext|>.", flag_values=FLAGS)
flags.DEFINE_bool("stream", False, "Print text as it is generated.", flag_values=FLAGS)
flags.DEFINE_bool("json", False, "One JSON object per sample per line.", flag_values=FLAGS)
flags.DEFINE_bool("quiet", False, "No status lines on stderr.", flag_values=FLAGS)


def check_flags() -> None:
  """The flags on their own, before any model is read."""
  if FLAGS.workdir is not None and FLAGS.init_from is not None:
    raise UserError("--init_from is not allowed with --workdir: give one of them.")
  if FLAGS.workdir is None and FLAGS.init_from is None:
    raise UserError("Give --workdir (a training run) or --init_from (a Hugging Face GPT-2).")
  if FLAGS.step is not None and FLAGS.workdir is None:
    raise UserError("--step needs --workdir.")
  if FLAGS.stream and FLAGS.json:
    raise UserError("--stream is not allowed with --json: give one of them.")
  if FLAGS.num_samples < 1:
    raise UserError(f"--num_samples must be at least 1, got {FLAGS.num_samples}.")
  if FLAGS.chat is not None and (FLAGS.prompt or FLAGS.prompt_file is not None):
    raise UserError("--chat is not allowed with --prompt or --prompt_file: give one of them.")
  if FLAGS.chat_template is not None and FLAGS.chat is None:
    raise UserError("--chat_template needs --chat.")
  check_settings(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                 max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed, prefix="--")


# ---------------------------------------------------------------------------------------------
# Prompts


def _read_text(path: str, flag: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except FileNotFoundError:
    raise UserError(f"{flag}: file {path!r} does not exist.") from None
  except IsADirectoryError:
    raise UserError(f"{flag}: {path!r} is a directory, not a text file.") from None
  except UnicodeDecodeError:
    raise UserError(f"{flag}: file {path!r} is not UTF-8 text.") from None
  except OSError as e:
    raise UserError(f"{flag}: cannot read {path!r} ({e.strerror or e}).") from None


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


def default_prompt(tokenizer) -> str:
  """"<|endoftext|>" for GPT-2 BPE (an unconditional sample), "\\n" for a character model or a
  checkpoint's own tokenizer (which starts it with its begin-of-text token, if it has one)."""
  return "<|endoftext|>" if tokenizer.name == "gpt2" else "\n"


def _prompt_name(index: int, text: str, count: int) -> str:
  shown = text if len(text) <= 40 else text[:37] + "..."
  return f"The prompt {shown!r}" if count == 1 else f"Prompt {index + 1} ({shown!r})"


def encode_prompts(tokenizer, texts: Sequence[str], *, vocab_size: int,
                   block_size: int) -> list[list[int]]:
  """Token ids of each prompt, with the checks `generate` makes (its check_prompt),
  naming the prompt by its text."""
  if not texts:
    raise UserError("--prompt_file holds no prompts.")
  encoded = []
  for i, text in enumerate(texts):
    name = _prompt_name(i, text, len(texts))
    try:
      ids = tokenizer.encode(text)
    except UserError as e:
      raise UserError(f"{name} cannot be encoded: {e}") from None
    check_prompt(ids, vocab_size=vocab_size, block_size=block_size, name=name)
    encoded.append(ids)
  return encoded


# ---------------------------------------------------------------------------------------------
# The model: its config and tokenizer first (to check the prompts), then the parameters.


def choose_tokenizer(saved: dict[str, Any] | None, vocab_size: int,
                     hf_source: str | None = None):
  """The tokenizer a checkpoint recorded (`to_dict()` form); for a Hugging Face checkpoint
  (`hf_source`, recording none) GPT-2 BPE, or for a Llama its own tokenizer.json; GPT-2 BPE for
  a run on synthetic data. It must cover the model's vocabulary."""
  try:
    own = None if saved is not None or hf_source is None else own_tokenizer_dir(hf_source)
    if own is not None:
      from model.hf.tokenizer import load_hf_tokenizer  # pylint: disable=import-outside-toplevel
      tokenizer = load_hf_tokenizer(own)
    else:
      tokenizer = get_tokenizer("gpt2") if saved is None else tokenizer_from_dict(saved)
  except UserError:
    raise
  except OSError:  # tiktoken's download failed
    raise UserError(
        f"Could not download the GPT-2 BPE files (no network?); set {GPT2_BPE_ENV} to a "
        f"tiktoken-format gpt2.tiktoken file.") from None
  if tokenizer.vocab_size < vocab_size:
    raise UserError(
        f"The model's vocabulary ({vocab_size} tokens) is larger than its tokenizer's "
        f"({tokenizer.name}, {tokenizer.vocab_size}), so its samples cannot be decoded.")
  return tokenizer


def stop_token(tokenizer, vocab_size: int, stop: bool = True) -> int | None:
  """The id that ends a sample: the tokenizer's end-of-text, if it is in the model's
  vocabulary and stopping is wanted; else None."""
  eot = tokenizer.eot_id
  return eot if stop and eot is not None and eot < vocab_size else None


def _source() -> dict[str, Any]:
  if FLAGS.workdir is not None:
    return {"name_or_dir": FLAGS.workdir, "kind": WORKDIR}
  return {"name_or_dir": FLAGS.init_from}


def describe_model():
  """(ModelConfig, tokenizer dict or None, step or None, label), without reading weights."""
  w = describe_weights(**_source(), step=FLAGS.step, dtype=FLAGS.dtype)
  return w.cfg, w.tokenizer, w.step, w.label


def load_params(cfg):
  # FLAGS.step, not the described step: without --step, a newest step whose arrays are
  # damaged falls back (with a warning) to the newest one that restores.
  params = load_weights(**_source(), step=FLAGS.step, dtype=cfg.dtype).params
  # Weights in the compute dtype: decoding reads every weight each step, so bf16 halves that.
  return jax.tree_util.tree_map(lambda x: x.astype(cfg.compute_dtype), params)


class Batch(NamedTuple):
  """One generate call: every prompt x --num_samples, prompt-major
  (row = prompt_index * num_samples + sample_index)."""
  cfg: Any
  params: Any
  tokenizer: Any
  rows: list[list[int]]  # prompt token ids, one entry per sample
  row_prompts: list[str]
  eot_id: int | None
  label: str
  max_new_tokens: int


def prepare() -> Batch:
  """Checks the flags and prompts against the model (before reading its weights), then loads
  it. Raises UserError on a mistake."""
  check_flags()
  prompts = read_prompts(FLAGS.prompt, FLAGS.prompt_file)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about read-only directories
  try:
    cfg, saved_tokenizer, step, label = describe_model()
    if cfg.family != "gpt":
      return _prepare_family(cfg, saved_tokenizer, label, prompts)
    tokenizer = choose_tokenizer(saved_tokenizer, cfg.vocab_size, FLAGS.init_from)
    eot_id = stop_token(tokenizer, cfg.vocab_size, stop=not FLAGS.no_stop)
    if FLAGS.chat is not None:
      prompts, encoded, eot_id = _chat_prompts(tokenizer, cfg)
    else:
      prompts = prompts if prompts is not None else [default_prompt(tokenizer)]
      encoded = encode_prompts(tokenizer, prompts, vocab_size=cfg.vocab_size,
                               block_size=cfg.block_size)
    check_window_shift(FLAGS.window_shift, cfg.block_size, prefix="--")
    params = load_params(cfg)
  except (ValueError, OSError) as e:  # ours, and the clear errors of checkpoint loading
    raise UserError(str(e)) from None
  max_new_tokens = FLAGS.max_new_tokens
  n = FLAGS.num_samples
  return Batch(cfg, params, tokenizer, rows=[ids for ids in encoded for _ in range(n)],
               row_prompts=[text for text in prompts for _ in range(n)], eot_id=eot_id,
               label=label, max_new_tokens=max_new_tokens)


def _chat_prompts(tokenizer, cfg) -> tuple[list[str], list[list[int]], int | None]:
  """--chat's rendered conversations, their ids (checked) and the end-of-turn id."""
  conversations = sample_chat.read_conversations(FLAGS.chat)
  from model.hf import resolve_checkpoint_dir  # pylint: disable=import-outside-toplevel
  hf_dir = None if FLAGS.init_from is None else resolve_checkpoint_dir(FLAGS.init_from)
  template = sample_chat.chat_template(tokenizer, workdir=FLAGS.workdir, hf_dir=hf_dir,
                                       override=FLAGS.chat_template)
  texts, encoded = sample_chat.chat_rows(template, tokenizer, conversations)
  for (_, where), ids in zip(conversations, encoded):
    check_prompt(ids, vocab_size=cfg.vocab_size, block_size=cfg.block_size, name=where)
  eot = sample_chat.end_of_turn(template, tokenizer, cfg.vocab_size)
  return texts, encoded, None if FLAGS.no_stop else eot


class FamilyBatch(NamedTuple):
  """An encoder (fill-mask) or encoder-decoder (source -> target) job
  (launch/sample_families.py)."""
  cfg: Any
  params: Any
  tokenizer: Any
  prompts: list[str]
  rows: list[list[int]]
  label: str


def _prepare_family(cfg, saved_tokenizer, label, prompts) -> FamilyBatch:
  directory = None
  if saved_tokenizer is None:
    from model.hf import resolve_checkpoint_dir  # pylint: disable=import-outside-toplevel
    directory = resolve_checkpoint_dir(FLAGS.init_from)
  tokenizer = sample_families.family_tokenizer(saved_tokenizer, cfg, directory)
  rows = sample_families.check_prompts(FLAGS, cfg, tokenizer, prompts or [], _prompt_name)
  return FamilyBatch(cfg, load_params(cfg), tokenizer, prompts, rows, label)


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


class StreamPrinter:
  """Prints `generate_stream` chunks (run with include_eot=True) in the order and format of
  text mode: sample 0 appears as it is generated; the next sample is printed (what it has so
  far, then live) once sample 0 has ended, and so on. `finish()` prints the rest."""

  def __init__(self, tokenizer, row_prompts: Sequence[str], eot_id: int | None, out: TextIO):
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


def _sampling_kwargs(batch: Batch):
  return dict(max_new_tokens=batch.max_new_tokens, temperature=FLAGS.temperature,
              top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed, eot_id=batch.eot_id,
              window_shift=FLAGS.window_shift)


def stream_batch(batch: Batch) -> tuple[int, float]:
  """--stream: prints as tokens arrive; returns (new tokens, seconds)."""
  start = time.perf_counter()
  printer = StreamPrinter(batch.tokenizer, batch.row_prompts, batch.eot_id, sys.stdout)
  for chunk in generate_stream(batch.params, batch.cfg, batch.rows, chunk_size=STREAM_CHUNK,
                               include_eot=True, **_sampling_kwargs(batch)):
    printer.push(chunk)
  tokens, _ = printer.finish()
  return sum(map(len, tokens)), time.perf_counter() - start


def print_batch(batch: Batch) -> tuple[int, float]:
  """Text or --json after the whole batch is generated; returns (new tokens, seconds)."""
  result = generate(batch.params, batch.cfg, batch.rows, **_sampling_kwargs(batch))
  for b, (tokens, stopped) in enumerate(zip(result.tokens, result.stopped)):
    completion = batch.tokenizer.decode(tokens)
    if FLAGS.json:
      record = sample_record(row=b, num_samples=FLAGS.num_samples,
                             prompt=batch.row_prompts[b], completion=completion, tokens=tokens,
                             stopped=stopped, seconds=result.seconds,
                             batch_tokens=result.num_tokens)
      sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
      sys.stdout.write(format_sample(batch.row_prompts[b], completion))
  sys.stdout.flush()
  return result.num_tokens, result.seconds


def _status(text: str) -> None:
  if not FLAGS.quiet:
    print(text, file=sys.stderr, flush=True)


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  batch = prepare()
  if isinstance(batch, FamilyBatch):
    return sample_families.run(FLAGS, batch.cfg, batch.params, batch.tokenizer, batch.prompts,
                               batch.rows, f"sampling {batch.label}", _status)
  _status(f"sampling {batch.label}: {len(batch.rows)} sample(s) of up to "
          f"{batch.max_new_tokens} tokens, {batch.tokenizer.name} tokenizer, "
          f"{batch.cfg.dtype} compute")
  try:
    num_tokens, seconds = (stream_batch if FLAGS.stream else print_batch)(batch)
  except BrokenPipeError:  # e.g. piped into `head`: stop quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  except KeyboardInterrupt:
    return 130
  _status(f"{num_tokens} new tokens in {seconds:.2f}s ({num_tokens / seconds:,.0f} "
          f"tokens/s, compilation included)")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
