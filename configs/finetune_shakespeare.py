"""Fine-tune GPT-2 on tiny shakespeare, nanoGPT's config/finetune_shakespeare.py.

  python -m launch.train --config configs/finetune_shakespeare.py --workdir runs/ft
  python -m launch.train --config configs/finetune_shakespeare.py:gpt2-xl --workdir runs/ft-xl
  python -m launch.train --config configs/finetune_shakespeare.py --workdir runs/ft2 \
      --config.init_from=PATH          # a Hugging Face GPT-2 directory or an earlier run
  python -m launch.sample --workdir runs/ft --prompt "ROMEO:" --max_new_tokens 200

Starts from OpenAI's GPT-2 weights (`init_from`, downloaded from the Hugging Face Hub once; a
local Hugging Face directory or an earlier run's workdir works too), a new optimizer state at
step 0, then 20 steps of 32 x 1024 GPT-2 BPE tokens of the packaged tiny shakespeare at a small
constant learning rate (3e-5), evaluating every 5 steps. The weights give the model's shape,
whatever their size (the variant only names them: gpt2 by default; nanoGPT's is gpt2-xl,
which needs a large GPU: use --config.train.grad_accum to fit the batch); this file sets what
they leave to the run: bf16 compute, the vocabulary padded to 50304 rows, no dropout, and a
context of up to 1024 positions (fewer if the weights have fewer). The first logged loss is
the pretrained model's loss on the first batch.
"""

from configs.common import base_config, model_section
from model.errors import UserError

VARIANTS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def get_config(variant: str = ""):
  name = variant or "gpt2"
  if name not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of finetune_shakespeare.py; use one of "
                    f"{', '.join(VARIANTS)} (configs/finetune_shakespeare.py:gpt2-medium).")
  c = base_config()
  c.init_from = name
  # The weights replace the shapes; the vocabulary padded to 50304 (= 393 * 128) for faster
  # matmuls where the weights' vocabulary fits (GPT-2's 50257 does).
  c.model = model_section("gpt2", padded_vocab_size=50304, dtype="bfloat16")
  c.data.source = "text"
  c.data.path = ""  # tiny shakespeare, the packaged copy
  c.data.tokenizer = "gpt2"

  c.train.steps = 20
  c.train.batch_size = 32  # nanoGPT: 1 x 32 accumulation steps x 1024 tokens
  c.train.grad_accum = 4
  c.train.seed = 1337

  c.optimizer.lr = 3e-5  # constant: nanoGPT's decay_lr = False
  c.optimizer.min_lr = 3e-5
  c.optimizer.warmup_steps = 0

  c.eval.every = 5
  c.eval.batches = 2
  c.checkpoint.every = 20
  c.checkpoint.keep = 1
  c.log.every = 1
  return c
