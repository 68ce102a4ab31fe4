"""Export a training run to a Hugging Face checkpoint that transformers loads: a GPT-2 run as
GPT2LMHeadModel, a Llama-style run (rotary positions, RMSNorm, SwiGLU, grouped-query attention:
configs/llama_shakespeare.py) as LlamaForCausalLM.

  python -m launch.export --workdir DIR [--step N] --out HF_DIR [--force] [--merge]

Writes HF_DIR/config.json and model.safetensors from the run's latest (or --step) checkpoint,
the tokenizer, and flaxgpt_tokenizer.json (what the ids mean, which `launch.sample --init_from
HF_DIR` and `launch.eval --init_from HF_DIR` read): Hugging Face's GPT-2 tokenizer files
(vocab.json, merges.txt, ...) for a GPT-2 BPE run; a copy of the tokenizer files a
data.tokenizer=hf:DIR run recorded (tokenizer.json, ...); for a character-level run its
vocabulary (id i is the i-th character of "chars"; transformers has no character tokenizer).
Then

  transformers.AutoModelForCausalLM.from_pretrained("HF_DIR")   # the same logits as the run's

A LoRA run (config.train.lora) is written as a PEFT adapter directory instead
(adapter_config.json naming its base, adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(base, HF_DIR)` loads, or with --merge as the whole model with
its adapters folded into the base (what PeftModel's merge_and_unload() gives).

HF_DIR must be new or empty; --force replaces it (only once the new one is complete), never
with a run's workdir or anything inside one or holding one. The export is written beside
HF_DIR and put in place only if HF_DIR is still what was checked, so of two exports to one
folder the later fails. A GPT-2 model without biases is written with zero biases (the same
function); models that neither class can express (sinusoidal positions, post-LN) and other
mistakes print one `error:` line and exit with status 2, with nothing written; Ctrl-C prints
one line and exits 130, with nothing written.
"""

from __future__ import annotations

import logging
import sys

from absl import flags

from launch import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "A launch.train workdir.", flag_values=FLAGS)
flags.DEFINE_integer("step", None, "This checkpoint instead of the latest.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "The Hugging Face checkpoint folder to write (new or empty).",
                    flag_values=FLAGS)
flags.DEFINE_bool("force", False, "Replace a non-empty --out.", flag_values=FLAGS)
flags.DEFINE_bool("merge", False, "A LoRA run: write the whole model with the adapters folded "
                  "into its base instead of a PEFT adapter directory.", flag_values=FLAGS)
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about read-only directories
  from training.export import export_hf  # pylint: disable=import-outside-toplevel  (jax)
  r = export_hf(FLAGS.workdir, FLAGS.out, step=FLAGS.step, force=FLAGS.force,
                merge=FLAGS.merge)
  print(f"wrote {r['out']}: {', '.join(r['files'])} (step {r['step']} of {FLAGS.workdir}, "
        f"vocabulary {r['vocab_size']}, block {r['block_size']})")
  cls = r["hf_class"]
  characters = r["tokenizer"] not in ("gpt2", "hf")  # no tokenizer transformers can load
  if r["adapter"]:
    print(f"load it: from peft import PeftModel; model = PeftModel.from_pretrained(base, "
          f"{r['out']!r})  # base: {cls}.from_pretrained(<its base_model_name_or_path>)")
  elif not characters:
    print(f"load it: from transformers import AutoTokenizer, {cls}; "
          f"model = {cls}.from_pretrained({r['out']!r}); "
          f"tokenizer = AutoTokenizer.from_pretrained({r['out']!r})")
  else:
    print(f"load it: from transformers import {cls}; "
          f"model = {cls}.from_pretrained({r['out']!r})")
  if characters:
    print(f"note: this is a character-level model and transformers has no tokenizer for it; "
          f"its vocabulary is in {r['out']}/flaxgpt_tokenizer.json: token id i is the i-th "
          f"character of \"chars\" (ids = [chars.index(c) for c in text]).")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv, interrupted="nothing written; --out is as it was")


if __name__ == "__main__":
  sys.exit(main())
