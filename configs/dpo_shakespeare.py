"""DPO (data.task=preference, training/dpo.py) with LoRA: the reference is the base with its
adapters switched off.

  python -m launch.train --config configs/shakespeare_char.py:cpu --workdir runs/shakespeare_char_cpu
  python -m launch.train --config configs/dpo_shakespeare.py:cpu --workdir runs/dpo_cpu
  python -m launch.plot runs/dpo_cpu --metric rewards/accuracies --out dpo.png

The data: the preference set shipped with the package
(training/data/assets/shakespeare_preference.jsonl, made by make_shakespeare_preference.py
beside it): the end of a line of tiny shakespeare as the prompt, the line that follows as
"chosen", the same line with its words shuffled as "rejected"; its last 10% held out. ":cpu"
starts from the quick start's character model (init_from runs/shakespeare_char_cpu; its
64-character context holds a pair), rank-8 adapters on every projection, sigmoid loss with
beta 0.1, 200 steps of 16 rows (each row several pairs, packed), evaluating the held-out pairs
every 20 steps (val_rewards/accuracies: TRL's reward accuracy). The default does the same on
GPT-2 BPE from GPT-2 124M (downloaded) with a context of 256.
"""

from configs import shakespeare_char
from configs.common import base_config, model_section
from model.errors import UserError

VARIANTS = ("", "cpu")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of dpo_shakespeare.py; use "
                    f"configs/dpo_shakespeare.py or configs/dpo_shakespeare.py:cpu.")
  if variant == "cpu":
    c = shakespeare_char.get_config("cpu")
    c.init_from = "runs/shakespeare_char_cpu"
    c.train.batch_size = 16
    c.train.lora.rank = 8
    c.train.lora.targets = "c_attn,c_proj,c_fc"
  else:
    c = base_config()
    c.init_from = "gpt2"
    c.model = model_section("gpt2", padded_vocab_size=50304, block_size=256)
    c.data.tokenizer = "gpt2"
    c.train.batch_size = 16
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.targets = "c_attn,c_proj,c_fc"
  c.data.task = "preference"
  c.data.source = "jsonl"
  c.data.path = ""  # the shipped set
  c.train.steps = 200
  c.train.dpo.loss = "sigmoid"
  c.train.dpo.beta = 0.1
  c.optimizer.lr = 5e-3
  c.optimizer.min_lr = 5e-4
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.0
  c.eval.every = 20
  c.eval.batches = 3
  c.checkpoint.every = 200
  c.log.every = 10
  return c
