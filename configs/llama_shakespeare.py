"""nanoGPT's baby GPT on tiny shakespeare characters, made a Llama: rotary positions, RMSNorm,
SwiGLU and grouped-query attention (configs/shakespeare_char.py with the four changes).

  python -m launch.train --config configs/llama_shakespeare.py --workdir runs/llama_shakespeare
  python -m launch.train --config configs/llama_shakespeare.py:cpu --workdir runs/llama_cpu

Everything but the blocks is shakespeare_char.py's (data, batch, steps, schedule, evaluation):
6 layers, 6 query heads sharing 2 key/value heads, width 384, SwiGLU width 1152 (about the
parameters of GPT's 4 * 384 MLP and full heads), rope theta 10000, block 256, dropout 0.2, no
biases, the head tied to the embedding. ":cpu" is the CPU quick start's size (4 layers, 4
heads sharing 2, width 128, SwiGLU width 384: the same parameter count as GPT's, block 64,
batch 12, 2000 steps, no dropout).
"""

from configs import shakespeare_char
from configs.common import model_section
from model.errors import UserError

VARIANTS = shakespeare_char.VARIANTS
# What makes the baby GPT a Llama (model/config.py).
LLAMA = dict(position_embedding="rotary", norm="rmsnorm", activation="swiglu", rope_theta=10000.0)


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of llama_shakespeare.py; use "
                    f"configs/llama_shakespeare.py or configs/llama_shakespeare.py:cpu.")
  c = shakespeare_char.get_config(variant)
  if variant == "cpu":
    c.model = model_section("shakespeare-char", num_layers=4, num_heads=4, num_kv_heads=2,
                            d_model=128, d_mlp=384, block_size=64, embd_dropout=0.0,
                            attn_dropout=0.0, resid_dropout=0.0, **LLAMA)
  else:
    c.model = model_section("shakespeare-char", num_kv_heads=2, d_mlp=1152, **LLAMA)
  return c
