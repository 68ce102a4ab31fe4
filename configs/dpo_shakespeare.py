"""DPO (data.task=preference, training/dpo.py) on the shipped preference set: the reference is
the starting model, with LoRA its adapters switched off, without LoRA a frozen copy.

  python -m launch.train --config configs/shakespeare_char.py:cpu --workdir runs/shakespeare_char_cpu
  python -m launch.train --config configs/dpo_shakespeare.py:cpu --workdir runs/dpo_cpu
  python -m launch.train --config configs/dpo_shakespeare.py:cpu_full --workdir runs/dpo_cpu_full
  python -m launch.plot runs/dpo_cpu --metric accuracy/reward --out dpo.png

The data: the preference set shipped with the package
(training/data/assets/shakespeare_preference.jsonl, made by make_shakespeare_preference.py
beside it): the end of a line of tiny shakespeare as the prompt, the line that follows as
"chosen", the same line with its words shuffled as "rejected"; its last 10% (43 pairs) held out.
":cpu" starts from the quick start's character model (init_from runs/shakespeare_char_cpu; its
64-character context holds a pair) with rank-8 adapters on every projection; ":cpu_full" trains
every weight against a frozen copy of them. Both: sigmoid loss with beta 0.5, 200 steps of 16
rows (a pair or two per row, packed), the held-out pairs evaluated before the first step and
every 20 (eval.batches x batch_size = 48 rows hold the 38 rows of held-out pairs: each pair
once), logging val_accuracy/reward (the implicit reward's accuracy, ties half: 0.5 at step 0)
and TRL's val_rewards/accuracies. beta 0.5, not TRL's 0.1: with 0.1 and lr 5e-3 the policy
drifted tens of nats from the reference (the chosen completions' log-probability fell from
-32 to -120) and the held-out accuracy wandered between 87% and 96%. The default does the
same on GPT-2 BPE from GPT-2 124M (downloaded) with a context of 256 (not measured here).
"""

from configs import shakespeare_char
from configs.common import base_config, model_section
from model.errors import UserError

VARIANTS = ("", "cpu", "cpu_full")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of dpo_shakespeare.py; use "
                    f"configs/dpo_shakespeare.py or configs/dpo_shakespeare.py:cpu "
                    f"(:cpu_full without LoRA).")
  if variant.startswith("cpu"):
    c = shakespeare_char.get_config("cpu")
    c.init_from = "runs/shakespeare_char_cpu"
    c.train.batch_size = 16
    c.optimizer.lr = 1e-3 if variant == "cpu" else 1e-4
    if variant == "cpu":
      c.train.lora.rank = 8
      c.train.lora.targets = "c_attn,c_proj,c_fc"
    c.train.dpo.beta = 0.5
    c.eval.batches = 3
  else:
    c = base_config()
    c.init_from = "gpt2"
    c.model = model_section("gpt2", padded_vocab_size=50304, block_size=256)
    c.data.tokenizer = "gpt2"
    c.train.batch_size = 16
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.targets = "c_attn,c_proj,c_fc"
    c.train.dpo.beta = 0.1
    c.optimizer.lr = 5e-4
    c.eval.batches = 4
  c.data.task = "preference"
  c.data.source = "jsonl"
  c.data.path = ""  # the shipped set
  c.train.steps = 200
  c.train.dpo.loss = "sigmoid"
  c.optimizer.min_lr = c.optimizer.lr / 10
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.0
  c.eval.every = 20
  c.eval.at_start = True
  c.checkpoint.every = 200
  c.log.every = 10
  return c
