"""LoRA fine-tunes (config.train.lora, model/lora.py): low-rank adapters on a frozen base.

  python -m launch.train --config configs/lora_shakespeare.py --workdir runs/lora_gpt2   # downloads GPT-2
  python -m launch.train --config configs/lora_shakespeare.py:cpu --workdir runs/lora_cpu \
      --config.init_from=runs/shakespeare_char_cpu    # the quick start's run as the base
  python -m launch.export --workdir runs/lora_cpu --out hf/lora_cpu           # a PEFT adapter
  python -m launch.export --workdir runs/lora_cpu --out hf/lora_cpu_merged --merge

The default is configs/finetune_shakespeare.py (GPT-2 124M on GPT-2 BPE tiny shakespeare) with
rank-16 adapters (alpha 32) on every projection of the blocks (GPT-2's fused c_attn whole, its
attention and MLP c_proj, c_fc), lr 1e-3, no weight decay: the base gets no gradients and no
optimizer state. ":cpu" adapts a character model of tiny shakespeare (the quick start's run,
configs/shakespeare_char.py:cpu, given as init_from) with rank-8 adapters on q, v, o and the
MLP for 300 steps. Checkpoints hold the adapters and name their base by its fingerprint;
launch.export writes them as a PEFT adapter directory, --merge the whole model.
"""

from configs import finetune_shakespeare, shakespeare_char
from model.errors import UserError

VARIANTS = ("", "cpu")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of lora_shakespeare.py; use "
                    f"configs/lora_shakespeare.py or configs/lora_shakespeare.py:cpu.")
  if variant == "cpu":
    c = shakespeare_char.get_config("cpu")
    c.init_from = "runs/shakespeare_char_cpu"
    c.train.steps = 300
    c.train.lora.rank = 8
    c.train.lora.alpha = 16.0
    c.train.lora.targets = "q,v,o,c_fc,mlp/c_proj"
    c.optimizer.lr = 2e-3
    c.optimizer.min_lr = 2e-4
    c.optimizer.warmup_steps = 20
    c.eval.every = 50
    c.checkpoint.every = 300
  else:
    c = finetune_shakespeare.get_config()
    c.train.lora.rank = 16
    c.train.lora.alpha = 32.0
    c.train.lora.targets = "c_attn,c_proj,c_fc"
    c.optimizer.lr = 1e-3
    c.optimizer.min_lr = 1e-3
  c.optimizer.weight_decay = 0.0
  return c
