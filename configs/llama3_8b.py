"""Llama 3 8B's shapes (meta-llama/Meta-Llama-3-8B: 32 layers, width 4096, 32 query heads
sharing 8 key/value heads, SwiGLU 14336, rope theta 500000, 128,256-token vocabulary, untied
head; 8.03B parameters) for launch.aot and launch.tpu.

  JAX_PLATFORMS=cpu python -m launch.aot --config configs/llama3_8b.py --topology v5p-8
  python -m launch.tpu --config configs/llama3_8b.py ...

Training: 8192-token sequences, bf16 compute with float32 parameters and AdamW state, the layers
scanned and rematerialised (every block recomputed in the backward pass), FSDP over every chip
(mesh fsdp=-1); the global batch of 32 sequences (~262K tokens per step) as micro-batches of 8.
Fine-tune Meta's weights with --config.init_from=DIR (a Hugging Face Llama directory, whose
tokenizer.json the data must share) or pre-train on token files of a 128,256-token tokenizer
(data.source=bin).
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("llama3-8b", vocab_size=128256, dtype="bfloat16", scan_layers=True,
                          remat="full")
  c.data.source = "bin"
  c.data.path = "data/llama3"
  c.data.tokenizer = "gpt2"  # the ids of the bin files; vocab_size is the model's
  c.train.steps = 100_000
  c.train.batch_size = 32
  c.train.grad_accum = 4
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.95
  c.optimizer.clip = 1.0
  c.mesh.fsdp = -1
  c.mesh.data = 1
  c.eval.every = 1000
  c.eval.batches = 4
  c.checkpoint.every = 1000
  c.checkpoint.keep = 2
  c.log.every = 10
  return c
