"""GPT-2 XL (1.5B) for TPU pods / multi-GPU hosts: FSDP over all devices, scanned layers with
full rematerialisation, bf16 compute with float32 parameters and optimizer state.

  python -m launch.train --config configs/gpt2_xl.py --workdir gs://bucket/runs/gpt2_xl \
      --config.data.path=data/openwebtext

Batch 512 x 1024 tokens (~0.5M) in one micro-batch; lower train.batch_size / raise
train.grad_accum if it does not fit. Schedule after GPT-3 XL (1.3B): lr 2e-4 -> 2e-5.
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("gpt2-xl", vocab_size=50257, padded_vocab_size=50304,
                          dtype="bfloat16", scan_layers=True, remat="full")
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.data.source = "bin"
  c.data.path = "data/openwebtext"
  c.data.tokenizer = "gpt2"

  c.train.steps = 600_000
  c.train.batch_size = 512
  c.train.grad_accum = 1
  c.train.seed = 1337

  c.optimizer.lr = 2e-4
  c.optimizer.min_lr = 2e-5
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.95
  c.optimizer.clip = 1.0

  c.eval.every = 1000
  c.eval.batches = 10
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.log.every = 10
  return c
