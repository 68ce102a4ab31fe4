"""launch.sample for the encoder and encoder-decoder families (launch/sample.py dispatches here
when the weights' model.family is "bert" or "encdec").

encdec (a run of configs/transformer_reverse.py, or a BART checkpoint): each prompt is a source,
the output its generated target: greedy unless --temperature / --top_k / --top_p are given
(GPT's defaults do not apply), or beam search with --num_beams K (--length_penalty; model/
seq2seq.py states the rule, which is transformers'). Text mode prints the source, "=> " and the
output, then the separator; --json one object per output (completion = the output).

bert (a run of configs/bert_shakespeare.py, or a BERT checkpoint): fill-mask. Each prompt must
hold the mask token ("[MASK]"); for every mask the --top_k likeliest tokens (default 5) are
printed with their probabilities; --json gives {"prompt_index", "prompt", "filled" (each mask
replaced by its likeliest token), "masks": [{"position", "candidates": [{"token", "token_id",
"probability"}]}]}.

A flag that acts only on other families (FAMILY_FLAGS: --num_beams on a GPT, --window_shift on
a BERT, ...) is refused rather than ignored.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax

from model.errors import UserError
from model.tokenizer import WithSpecials, tokenizer_from_dict

SEPARATOR = "---------------"
DEFAULT_CANDIDATES = 5

# The flags that act only on some model families; given for another family they would do
# nothing, so they are refused (decoders have no beam search: they sample, or decode greedily
# with --temperature 0).
FAMILY_FLAGS = {
    "num_beams": ("encdec",), "length_penalty": ("encdec",), "window_shift": ("gpt",),
    "stream": ("gpt",), "no_stop": ("gpt",), "temperature": ("gpt", "encdec"),
    "top_p": ("gpt", "encdec"), "seed": ("gpt", "encdec"), "num_samples": ("gpt", "encdec"),
    "max_new_tokens": ("gpt", "encdec"),
}
FAMILY_NAMES = {"gpt": "decoder-only (gpt)", "bert": "encoder (bert)",
                "encdec": "encoder-decoder (encdec)"}


def check_family_flags(flags, family: str) -> None:
  """Each flag given must act on this model family (FAMILY_FLAGS)."""
  for name, families in FAMILY_FLAGS.items():
    if flags[name].present and family not in families:
      raise UserError(f"--{name} is for {' and '.join(FAMILY_NAMES[f] for f in families)} "
                      f"models and would do nothing for this {FAMILY_NAMES[family]} model; "
                      f"leave it out.")
  if flags["length_penalty"].present and flags.num_beams == 1:
    raise UserError("--length_penalty scores beam search's hypotheses and would do nothing "
                    "without --num_beams above 1; give both, or leave it out.")


def family_tokenizer(saved: dict[str, Any] | None, cfg, directory: str | None = None):
  """A run's data tokenizer with its model's special ids, or a checkpoint's own tokenizer
  (model/hf/tokenizer.py) for a Hugging Face BERT / BART."""
  if saved is None:
    from model.hf.tokenizer import load_hf_tokenizer  # pylint: disable=import-outside-toplevel
    return load_hf_tokenizer(directory)
  base = tokenizer_from_dict(saved)
  if base.vocab_size > cfg.vocab_size:
    raise UserError(f"The model's vocabulary ({cfg.vocab_size}) is smaller than its "
                    f"tokenizer's ({base.vocab_size}).")
  return WithSpecials(base, vocab_size=cfg.vocab_size, mask_id=cfg.mask_id)


def _encode(tokenizer, text: str, name: str) -> list[int]:
  try:
    return tokenizer.encode(text)
  except UserError as e:
    raise UserError(f"{name} cannot be encoded: {e}") from None


def check_prompts(flags, cfg, tokenizer, prompts: list[str], name_of) -> list[list[int]]:
  """Token ids of each prompt, checked for this family: one sentence naming the bad prompt."""
  if not prompts:
    if cfg.family == "encdec":
      raise UserError("Give --prompt: the source text (an encoder-decoder model has no "
                      "unconditional sample).")
    raise UserError(f"Give --prompt: a text holding {tokenizer.mask_token} to fill.")
  rows = []
  for i, text in enumerate(prompts):
    name = name_of(i, text, len(prompts))
    ids = _encode(tokenizer, text, name)
    if not ids:
      raise UserError(f"{name} is empty.")
    if len(ids) > cfg.block_size:
      raise UserError(f"{name} has {len(ids)} tokens, more than the model's {cfg.block_size} "
                      f"positions (block_size).")
    if cfg.family == "bert" and tokenizer.mask_id not in ids:
      raise UserError(f"{name} has no {tokenizer.mask_token}: fill-mask needs at least one "
                      f"{tokenizer.mask_token} to fill.")
    rows.append(ids)
  if cfg.family == "encdec" and flags.num_beams < 1:
    raise UserError(f"--num_beams must be at least 1, got {flags.num_beams}.")
  return rows


def _settings(flags) -> dict[str, Any]:
  """Sampling settings for encdec: greedy unless given on the command line."""
  given = lambda name: flags[name].present
  return dict(temperature=flags.temperature if given("temperature") else 0.0,
              top_k=flags.top_k if given("top_k") else 0,
              top_p=flags.top_p if given("top_p") else 1.0)


def run(flags, cfg, params, tokenizer, prompts: list[str], rows: list[list[int]], label: str,
        status) -> int:
  """Generates (encdec) or fills masks (bert) and prints; returns the exit status."""
  start = time.perf_counter()
  if cfg.family == "encdec":
    from model.decode import seq2seq  # pylint: disable=import-outside-toplevel
    settings = _settings(flags)
    n = flags.num_samples
    sources = [r for r in rows for _ in range(n)]
    max_new = min(flags.max_new_tokens, cfg.block_size) if cfg.position_embedding == "learned" \
        else flags.max_new_tokens
    status(f"{label}: {len(sources)} output(s) of up to {max_new} tokens, "
           + (f"beam search with {flags.num_beams} beams" if flags.num_beams > 1 else
              "greedy" if settings["temperature"] == 0 else "sampling"))
    outs = seq2seq.generate(params, cfg, sources, max_new_tokens=max_new, seed=flags.seed,
                            num_beams=flags.num_beams, length_penalty=flags.length_penalty,
                            **settings)
    seconds = time.perf_counter() - start
    total = sum(len(ids) for ids, _ in outs)
    for b, (ids, stopped) in enumerate(outs):
      prompt, text = prompts[b // n], tokenizer.decode(ids)
      if flags.json:
        record = {"prompt_index": b // n, "sample_index": b % n, "prompt": prompt,
                  "completion": text, "token_ids": ids, "num_tokens": len(ids),
                  "stop_reason": "eos" if stopped else "max_new_tokens",
                  "seconds": round(seconds, 6)}
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
      else:
        sys.stdout.write(f"{prompt}\n=> {text}\n{SEPARATOR}\n")
    sys.stdout.flush()
    status(f"{total} new tokens in {seconds:.2f}s (compilation included)")
    return 0
  from model.decode.fill_mask import fill_mask  # pylint: disable=import-outside-toplevel
  top_k = flags.top_k if flags["top_k"].present else DEFAULT_CANDIDATES
  specials = [i for i in (cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.mask_id,
                          getattr(tokenizer, "cls_id", None), getattr(tokenizer, "sep_id", None))
              if i is not None and i >= 0]
  status(f"{label}: fill-mask, the {top_k} likeliest tokens per {tokenizer.mask_token}")
  results = fill_mask(params, cfg, rows, mask_id=tokenizer.mask_id, top_k=top_k,
                      exclude=specials)
  for i, (prompt, ids, masks) in enumerate(zip(prompts, rows, results)):
    filled = list(ids)
    for position, candidates in masks:
      filled[position] = candidates[0][0]
    entries = [{"position": position,
                "candidates": [{"token": tokenizer.decode([t]), "token_id": t,
                                "probability": round(p, 6)} for t, p in candidates]}
               for position, candidates in masks]
    if flags.json:
      sys.stdout.write(json.dumps({"prompt_index": i, "prompt": prompt,
                                   "filled": tokenizer.decode(filled), "masks": entries},
                                  ensure_ascii=False) + "\n")
      continue
    lines = [prompt, f"=> {tokenizer.decode(filled)}"]
    for k, entry in enumerate(entries):
      shown = ", ".join(f"{c['token']!r} {c['probability']:.3f}" for c in entry["candidates"])
      lines.append(f"  {tokenizer.mask_token} {k + 1} (token {entry['position']}): {shown}")
    sys.stdout.write("\n".join(lines) + f"\n{SEPARATOR}\n")
  sys.stdout.flush()
  jax.effects_barrier()
  status(f"filled {sum(len(m) for m in results)} mask(s) in "
         f"{time.perf_counter() - start:.2f}s (compilation included)")
  return 0
