"""GPT-3 175B (Brown et al. 2020, table 2.1) for TPU pods: FSDP over every chip, scanned layers
with full rematerialisation, bf16 compute with float32 parameters and AdamW state.

  python -m launch.aot --config configs/gpt3_175b.py --topology v5p-512   # does it fit?
  python -m launch.train --config configs/gpt3_175b.py --workdir gs://bucket/runs/gpt3 \
      --config.data.path=data/openwebtext

96 layers, width 12288, 96 heads of 128, context 2048, GPT-2's vocabulary padded to 50304
(= 393 * 128). Batch 1536 x 2048 = 3.1M tokens per step (GPT-3's 3.2M) in one micro-batch, so
the data-parallel size (mesh.data x mesh.fsdp) must divide 1536: v5p-128/256/512 (64/128/256
chips) do; on larger slices raise train.batch_size or use mesh.tensor. Schedule as in the paper:
Adam b1 0.9, b2 0.95, eps 1e-8, clip 1.0, weight decay 0.1, lr 6e-5 with a linear warmup over
the first 375M tokens (119 steps), cosine decay to 10% (6e-6) over 260B tokens (82,652 steps),
300B tokens in all (95,367 steps). Not reproduced: GPT-3's batch-size ramp over the first
4-12B tokens and its alternating locally banded sparse attention (every layer is dense here).

Memory: float32 parameters plus two AdamW moments are 12 bytes per parameter, 2.1 TB in all,
before gradients and activations; `python -m launch.aot` reports the per-chip total for a slice.
"""

from configs.common import base_config, model_section

TOKENS_PER_STEP = 1536 * 2048


def _steps(tokens: float) -> int:
  return round(tokens / TOKENS_PER_STEP)


def get_config():
  c = base_config()
  c.model = model_section("gpt2", num_layers=96, num_heads=96, d_model=12288, block_size=2048,
                          vocab_size=50257, padded_vocab_size=50304, dtype="bfloat16",
                          scan_layers=True, remat="full")
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.data.source = "bin"
  c.data.path = "data/openwebtext"
  c.data.tokenizer = "gpt2"

  c.train.steps = _steps(300e9)
  c.train.batch_size = 1536
  c.train.grad_accum = 1
  c.train.seed = 1337

  c.optimizer.lr = 6e-5
  c.optimizer.min_lr = 6e-6
  c.optimizer.warmup_steps = _steps(375e6)
  c.optimizer.decay_steps = _steps(260e9)
  c.optimizer.weight_decay = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.clip = 1.0

  c.eval.every = 1000
  c.eval.batches = 4
  c.checkpoint.every = 500
  c.checkpoint.keep = 2
  c.log.every = 10
  return c
