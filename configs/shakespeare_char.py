"""nanoGPT's baby GPT on tiny shakespeare characters (config/train_shakespeare_char.py).

  python -m launch.train --config configs/shakespeare_char.py --workdir runs/shakespeare_char
  python -m launch.train --config configs/shakespeare_char.py:cpu --workdir runs/sc_cpu

The default reproduces nanoGPT's GPU run (6 layers, 6 heads, width 384, block 256, dropout 0.2,
batch 64, 5000 steps, lr 1e-3 -> 1e-4, val loss ~1.47). ":cpu" is nanoGPT's CPU quick start
(--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0 --eval_iters=20; val loss ~1.89 after a few minutes).
Data: tiny shakespeare, the copy in the package (or $FLAXGPT_DATA_DIR/tinyshakespeare.txt).
"""

from configs.common import base_config, model_section
from model.errors import UserError

VARIANTS = ("", "cpu")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of shakespeare_char.py; use "
                    f"configs/shakespeare_char.py or configs/shakespeare_char.py:cpu.")
  c = base_config()
  # 6/6/384, block 256, dropout 0.2, no biases; vocab_size from the data (65 characters).
  c.model = model_section("shakespeare-char")
  c.data.source = "text"
  c.data.path = ""  # tiny shakespeare
  c.data.tokenizer = "char"

  c.train.steps = 5000
  c.train.batch_size = 64
  c.train.grad_accum = 1
  c.train.seed = 1337

  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.1
  c.optimizer.decay_embeddings = True  # nanoGPT decays every 2-D parameter
  c.optimizer.b2 = 0.99
  c.optimizer.clip = 1.0

  c.eval.every = 250
  c.eval.batches = 200
  c.checkpoint.every = 1000
  c.checkpoint.keep = 2
  c.log.every = 10

  if variant == "cpu":
    c.model = model_section("shakespeare-char", num_layers=4, num_heads=4, d_model=128,
                            block_size=64, embd_dropout=0.0, attn_dropout=0.0,
                            resid_dropout=0.0)
    c.train.steps = 2000
    c.train.batch_size = 12
    c.eval.batches = 20
    c.checkpoint.every = 500
    c.mesh.cpu_devices = -1  # one JAX device per core, each on its share of the batch
  return c
