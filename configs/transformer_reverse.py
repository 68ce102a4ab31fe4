"""An encoder-decoder Transformer learning to reverse lines of tiny shakespeare, characters.

  python -m launch.train --config configs/transformer_reverse.py --workdir runs/reverse
  python -m launch.sample --workdir runs/reverse --prompt "To be, or not to be"

Every non-empty line of the text is a source; its target is the same line reversed character
by character (data.task = "reverse"; training/data/tasks.py), so the answer is exactly
checkable: eval reports val_exact_match, the share of the validation lines (all of them)
whose greedy output is exactly the reversed line. 2 + 2 pre-LN blocks of width 128 (4 heads,
MLP 512), learned positions, 64 positions (tiny shakespeare's longest line has 63
characters); the vocabulary is the 65 characters plus pad / bos / eos / mask. Minutes on a
laptop CPU (README, "Encoder-decoder").
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("tiny", family="encdec", block_size=64, num_layers=2,
                          num_decoder_layers=2, num_heads=4, d_model=128, d_mlp=512,
                          activation="gelu")
  c.data.source = "text"
  c.data.path = ""  # tiny shakespeare
  c.data.tokenizer = "char"
  c.data.task = "reverse"

  c.train.steps = 2200
  c.train.batch_size = 32
  c.train.seed = 0
  c.optimizer.lr = 2e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.98

  c.eval.every = 550
  c.eval.batches = 10
  c.eval.exact_match = -1  # every validation line
  c.checkpoint.every = 1100
  c.checkpoint.keep = 2
  c.log.every = 50
  c.mesh.cpu_devices = -1  # one JAX device per core
  return c
