"""configs/llama_shakespeare.py made a mixture of experts: every layer's SwiGLU MLP becomes 8
experts of half its width, and each token goes to the 2 experts of the largest router logits,
weighted by a softmax over those two (Mixtral's router). A token therefore uses the parameters
of the dense model (plus a D x 8 router per layer: 800.0K active of 2.57M for ":cpu", against
llama_shakespeare.py:cpu's 795.9K; 10.37M of 34.26M against 10.35M for the full size).

  python -m launch.train --config configs/moe_shakespeare.py:cpu --workdir runs/moe_cpu
  python -m launch.train --config configs/llama_shakespeare.py:cpu --workdir runs/llama_cpu
  python -m launch.plot runs/moe_cpu runs/llama_cpu --out moe_vs_dense.png
  python -m launch.plot runs/moe_cpu --metric moe_load --out moe_load.png

Everything else is llama_shakespeare.py's (data, batch, steps, schedule, evaluation); the
load-balancing loss at 0.01 (Switch's), no z-loss, dropless routing. ":cpu": 4 layers of width
128, 8 experts of width 192, block 64, batch 12, 2000 steps; the full size: 6 layers of width
384, 8 experts of width 576, block 256, batch 64, 5000 steps.
"""

from configs import llama_shakespeare
from model.errors import UserError

VARIANTS = llama_shakespeare.VARIANTS
EXPERTS, PER_TOKEN = 8, 2


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of moe_shakespeare.py; use "
                    f"configs/moe_shakespeare.py or configs/moe_shakespeare.py:cpu.")
  c = llama_shakespeare.get_config(variant)
  # the dense SwiGLU width split over the experts a token uses: the same active parameters
  c.model.expert_d_mlp = c.model.d_mlp // PER_TOKEN
  c.model.num_experts = EXPERTS
  c.model.num_experts_per_tok = PER_TOKEN
  c.model.router = "topk_softmax"
  c.model.router_aux_loss_coef = 0.01
  return c
