"""Export a training run to a Hugging Face checkpoint that transformers loads: a GPT-2 run as
GPT2LMHeadModel, a Llama-style run (rotary positions, RMSNorm, SwiGLU, grouped-query attention:
configs/llama_shakespeare.py) as LlamaForCausalLM.

  python -m launch.export --workdir DIR [--step N] --out HF_DIR [--force]

Writes HF_DIR/config.json and model.safetensors from the run's latest (or --step) checkpoint,
plus the tokenizer: Hugging Face's GPT-2 tokenizer files (vocab.json, merges.txt, ...) for a
GPT-2 BPE run, or, for a character-level run, its vocabulary as flaxgpt_tokenizer.json (id i is
the i-th character of "chars"; transformers has no character tokenizer). Then

  transformers.AutoModelForCausalLM.from_pretrained("HF_DIR")   # the same logits as the run's

HF_DIR must be new or empty; --force replaces it (only once the new one is complete), never
with the run itself. A GPT-2 model without biases is written with zero biases (the same
function); models that neither class can express (sinusoidal positions, post-LN) and other mistakes
print one `error:` line and exit with status 2, with nothing written.
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
flags.mark_flags_as_required(["workdir", "out"], flag_values=FLAGS)


def _main(args: list[str]) -> int:
  cli.no_arguments(args)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns about read-only directories
  from training.export import export_hf  # pylint: disable=import-outside-toplevel  (jax)
  r = export_hf(FLAGS.workdir, FLAGS.out, step=FLAGS.step, force=FLAGS.force)
  print(f"wrote {r['out']}: {', '.join(r['files'])} (step {r['step']} of {FLAGS.workdir}, "
        f"vocabulary {r['vocab_size']}, block {r['block_size']})")
  cls = r["hf_class"]
  if r["tokenizer"] == "gpt2":
    print(f"load it: from transformers import AutoTokenizer, {cls}; "
          f"model = {cls}.from_pretrained({r['out']!r}); "
          f"tokenizer = AutoTokenizer.from_pretrained({r['out']!r})")
  else:
    print(f"load it: from transformers import {cls}; "
          f"model = {cls}.from_pretrained({r['out']!r})")
    print(f"note: this is a character-level model and transformers has no tokenizer for it; "
          f"its vocabulary is in {r['out']}/flaxgpt_tokenizer.json: token id i is the i-th "
          f"character of \"chars\" (ids = [chars.index(c) for c in text]).")
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run(_main, FLAGS, __doc__, argv)


if __name__ == "__main__":
  sys.exit(main())
