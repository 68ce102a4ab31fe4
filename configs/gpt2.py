"""GPT-2 small (124M) on OpenWebText, nanoGPT's config/train_gpt2.py.

  python -m launch.prepare --tfds=<dataset> --out_dir=data/openwebtext   # once (or any bin dir)
  python -m launch.train --config configs/gpt2.py --workdir runs/gpt2 \
      --config.data.path=data/openwebtext

~0.5M tokens per step: batch 480 x 1024 tokens as 40 micro-batches of 12 (nanoGPT on one GPU:
12 x 1024 x 40). Each micro-batch is split over the data-parallel devices, so on 8 devices use
e.g. --config.train.grad_accum=5 (micro-batches of 96). Schedule: lr 6e-4 -> 6e-5, warmup 2000,
600000 steps, weight decay 0.1, beta2 0.95, clip 1.0; bf16 compute with float32 parameters and
optimizer state; the vocabulary padded to 50304 (= 393 * 128) for faster matmuls.
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("gpt2", vocab_size=50257, padded_vocab_size=50304, dtype="bfloat16")
  c.data.source = "bin"
  c.data.path = "data/openwebtext"
  c.data.tokenizer = "gpt2"

  c.train.steps = 600_000
  c.train.batch_size = 480
  c.train.grad_accum = 40
  c.train.seed = 1337

  c.optimizer.lr = 6e-4
  c.optimizer.min_lr = 6e-5
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.decay_embeddings = True  # nanoGPT decays every 2-D parameter
  c.optimizer.b2 = 0.95
  c.optimizer.clip = 1.0

  c.eval.every = 1000
  c.eval.batches = 5  # 5 x 480 sequences = nanoGPT's 200 x 12
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.log.every = 10
  return c
