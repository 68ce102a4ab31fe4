"""A few-thousand-parameter model on tiny shakespeare characters: trains in seconds (tests).

  python -m launch.train --config configs/tiny.py --workdir /tmp/tiny
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("tiny")  # 2 layers, 4 heads, width 64, block 64; vocab from the data
  c.train.steps = 50
  c.train.batch_size = 8
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 5
  c.eval.every = 25
  c.eval.batches = 2
  c.checkpoint.every = 25
  c.checkpoint.keep = 2
  c.log.every = 5
  return c
