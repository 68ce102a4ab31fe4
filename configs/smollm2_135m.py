"""SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M: 30 layers, width 576, 9 query heads
sharing 3 key/value heads, SwiGLU 1536, rope theta 100000, a 49,152-token vocabulary, the head
tied; 134.5M parameters): for launch.aot (training and decode steps) and launch.benchmark,
and for fine-tuning the released weights with --config.init_from=DIR.

  JAX_PLATFORMS=cpu python -m launch.aot --config configs/smollm2_135m.py --topology v5litepod-8
  JAX_PLATFORMS=cpu python -m launch.aot --step decode --config configs/smollm2_135m.py \
      --topology v5litepod-1 --batch 64 --cache_len 2048
  ... --config.model.num_kv_heads=9    # the same model with full heads (3x the KV cache)

Training: 2048-token sequences, bf16 compute with float32 parameters, batch 64.
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("smollm2-135m", vocab_size=49152, block_size=2048, dtype="bfloat16")
  c.data.source = "bin"
  c.data.path = "data/smollm2"
  c.data.tokenizer = "gpt2"  # the ids of the bin files; vocab_size is the model's
  c.train.steps = 10_000
  c.train.batch_size = 64
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.95
  c.optimizer.clip = 1.0
  c.eval.every = 500
  c.eval.batches = 4
  c.checkpoint.every = 1000
  c.log.every = 10
  return c
