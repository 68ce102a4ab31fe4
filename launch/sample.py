"""Sample from a trained or a pretrained GPT with the jitted KV-cache decode loop.

  python -m launch.sample --workdir DIR [--prompt TEXT ...] [--num_samples N] ...
  python -m launch.sample --init_from gpt2|gpt2-medium|gpt2-large|gpt2-xl|HF_DIR ...

--workdir samples the latest checkpoint of a `launch.train` run (or --step) with the run's
tokenizer; --init_from a Hugging Face GPT-2 (a Hub name, downloaded once, or a local
directory with config.json and model.safetensors) with GPT-2 BPE (offline: set
FLAXGPT_GPT2_BPE to a gpt2.tiktoken file). All prompts x --num_samples run as one batch.

Prompts: --prompt TEXT (repeat it for several; FILE:path reads a whole file as one prompt),
--prompt_file PATH (prompts separated by lines holding only ---). Default: "<|endoftext|>"
for GPT-2 BPE, "\\n" for a character model. A sample stops at <|endoftext|> (unless
--no_stop) or after --max_new_tokens (default: 256, or what fits in the block size);
prompt + max_new_tokens must fit in the block size (there is no sliding window).

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

import argparse
import json
import logging
import os
import sys
import time
from typing import Any, NamedTuple

import jax

from model import pretrained
from model.config import ModelConfig
from model.sampling import generate, generate_stream
from model.sample_cli import (DEFAULT_MAX_NEW_TOKENS, SampleInputError, StreamPrinter,
                              check_settings, choose_tokenizer, default_max_new_tokens,
                              default_prompt, encode_prompts, format_sample, read_prompts,
                              sample_record, stop_token)
from training.checkpoint import Checkpointer, checkpoint_dir, load_for_inference
from training.errors import UserError

STREAM_CHUNK = 8  # decode steps between printed pieces with --stream


class _Parser(argparse.ArgumentParser):
  """argparse that reports a mistake as one `error:` line (exit status 2), like the rest."""

  def error(self, message):
    fail(message[0].upper() + message[1:].rstrip(".") + ".")


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = _Parser(prog="python -m launch.sample", description=__doc__,
              formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group()
  source.add_argument("--workdir", help="a launch.train workdir: its latest checkpoint")
  source.add_argument("--init_from", metavar="NAME_OR_DIR", help="gpt2, gpt2-medium, "
                      "gpt2-large, gpt2-xl (or another Hub repo id, downloaded once) or a "
                      "local Hugging Face GPT-2 checkpoint directory")
  p.add_argument("--step", type=int, help="--workdir: this checkpoint instead of the latest")
  p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for "
                 "several; FILE:path reads a file as one prompt")
  p.add_argument("--prompt_file", metavar="PATH",
                 help="prompts separated by lines holding only ---")
  p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (default: 1)")
  p.add_argument("--max_new_tokens", type=int, help="most tokens generated per sample "
                 f"(default: {DEFAULT_MAX_NEW_TOKENS}, or what fits in the block)")
  p.add_argument("--temperature", type=float, default=0.8,
                 help="0 is greedy (default: 0.8, as nanoGPT)")
  p.add_argument("--top_k", type=int, default=200, help="keep the k likeliest tokens; 0 is "
                 "off (default: 200, as nanoGPT)")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling, in (0, 1]; 1 is "
                 "off (default: 1.0)")
  p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: "
                 "the checkpoint's; float32 for Hugging Face checkpoints)")
  p.add_argument("--no_stop", action="store_true",
                 help="do not stop a sample at <|endoftext|>")
  output = p.add_mutually_exclusive_group()
  output.add_argument("--stream", action="store_true", help="print text as it is generated")
  output.add_argument("--json", action="store_true", help="one JSON object per sample per line")
  p.add_argument("--quiet", action="store_true", help="no status lines on stderr")
  args = p.parse_args(argv)
  if args.workdir is None and args.init_from is None:
    p.error("give --workdir (a training run) or --init_from (a Hugging Face GPT-2)")
  if args.step is not None and args.workdir is None:
    p.error("--step needs --workdir")
  return args


# ---------------------------------------------------------------------------------------------
# The model: its config and tokenizer first (to check the prompts), then the parameters.


def _describe_workdir(workdir: str, step: int | None, dtype: str | None):
  if "://" not in workdir and not os.path.exists(workdir):
    raise UserError(f"--workdir {workdir!r} does not exist.")
  if not checkpoint_dir(workdir).is_dir():
    raise UserError(f"--workdir {workdir!r} has no checkpoints/ directory; train first with "
                    f"python -m launch.train --workdir {workdir}.")
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = step if step is not None else ckpt.latest_step()
    meta = ckpt.read_meta(step)  # UserError if there is no (such) checkpoint
  finally:
    ckpt.close()
  cfg = ModelConfig(**meta["model"])
  return (cfg.replace(dtype=dtype) if dtype else cfg), meta.get("tokenizer"), step


def describe_model(args):
  """(ModelConfig, tokenizer dict or None, step or None, label), without reading weights."""
  if args.workdir is not None:
    cfg, tokenizer, step = _describe_workdir(args.workdir, args.step, args.dtype)
    return cfg, tokenizer, step, f"{args.workdir} step {step}"
  directory = pretrained.resolve_checkpoint_dir(args.init_from)  # downloads a Hub name
  cfg = pretrained.config_from_hf(pretrained.read_hf_config(directory),
                                  dtype=args.dtype or "float32", source=directory)
  return cfg, None, None, args.init_from


def load_params(args, cfg, step):
  if args.workdir is not None:
    params = load_for_inference(args.workdir, step=step)[1]
  else:
    params = pretrained.load_hf_gpt2(args.init_from, dtype=cfg.dtype)[1]
  # Weights in the compute dtype: decoding reads every weight each step, so bf16 halves that.
  return jax.tree_util.tree_map(lambda x: x.astype(cfg.compute_dtype), params)


# Mistakes that end in one `error:` line: ours, and the clear errors of checkpoint loading.
USER_ERRORS = (UserError, SampleInputError, ValueError, OSError, ImportError)


# ---------------------------------------------------------------------------------------------
# Generation and output


class Batch(NamedTuple):
  """One generate call: every prompt x --num_samples, prompt-major."""
  cfg: Any
  params: Any
  tokenizer: Any
  rows: list[list[int]]  # prompt token ids, one entry per sample
  row_prompts: list[str]
  eot_id: int | None
  label: str


def prepare(args) -> Batch:
  """Checks the flags and prompts against the model (before reading its weights), then loads
  it. Exits with one `error:` line on a user mistake."""
  try:
    check_settings(max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   seed=args.seed)
    prompts = read_prompts(args.prompt, args.prompt_file)
  except SampleInputError as e:
    fail(str(e))
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about read-only directories
  try:
    cfg, saved_tokenizer, step, label = describe_model(args)
    tokenizer = choose_tokenizer(saved_tokenizer, cfg.vocab_size)
    prompts = prompts if prompts is not None else [default_prompt(tokenizer)]
    encoded = encode_prompts(tokenizer, prompts, vocab_size=cfg.vocab_size,
                             block_size=cfg.block_size, max_new_tokens=args.max_new_tokens)
    params = load_params(args, cfg, step)
  except USER_ERRORS as e:
    fail(str(e))
  if args.max_new_tokens is None:
    args.max_new_tokens = default_max_new_tokens(encoded, cfg.block_size)
  n = args.num_samples
  return Batch(cfg, params, tokenizer, rows=[ids for ids in encoded for _ in range(n)],
               row_prompts=[text for text in prompts for _ in range(n)],
               eot_id=stop_token(tokenizer, cfg.vocab_size, stop=not args.no_stop), label=label)


def _sampling_kwargs(args, batch: Batch):
  return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed, eot_id=batch.eot_id)


def stream_batch(args, batch: Batch) -> tuple[int, float]:
  """--stream: prints as tokens arrive; returns (new tokens, seconds)."""
  start = time.perf_counter()
  printer = StreamPrinter(batch.tokenizer, batch.row_prompts, batch.eot_id, sys.stdout)
  for chunk in generate_stream(batch.params, batch.cfg, batch.rows, chunk_size=STREAM_CHUNK,
                               include_eot=True, **_sampling_kwargs(args, batch)):
    printer.push(chunk)
  tokens, _ = printer.finish()
  return sum(map(len, tokens)), time.perf_counter() - start


def print_batch(args, batch: Batch) -> tuple[int, float]:
  """Text or --json after the whole batch is generated; returns (new tokens, seconds)."""
  result = generate(batch.params, batch.cfg, batch.rows, **_sampling_kwargs(args, batch))
  for b, (tokens, stopped) in enumerate(zip(result.tokens, result.stopped)):
    completion = batch.tokenizer.decode(tokens)
    if args.json:
      record = sample_record(row=b, num_samples=args.num_samples, prompt=batch.row_prompts[b],
                             completion=completion, tokens=tokens, stopped=stopped,
                             seconds=result.seconds, batch_tokens=result.num_tokens)
      sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
      sys.stdout.write(format_sample(batch.row_prompts[b], completion))
  sys.stdout.flush()
  return result.num_tokens, result.seconds


def _status(args, text):
  if not args.quiet:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  batch = prepare(args)
  _status(args, f"sampling {batch.label}: {len(batch.rows)} sample(s) of up to "
                f"{args.max_new_tokens} tokens, {batch.tokenizer.name} tokenizer, "
                f"{batch.cfg.dtype} compute")
  try:
    num_tokens, seconds = (stream_batch if args.stream else print_batch)(args, batch)
  except BrokenPipeError:  # e.g. piped into `head`: stop quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1
  except KeyboardInterrupt:
    return 130
  _status(args, f"{num_tokens} new tokens in {seconds:.2f}s ({num_tokens / seconds:,.0f} "
                f"tokens/s, compilation included)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
