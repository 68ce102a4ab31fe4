"""Mixtral 8x7B's shapes (mistralai/Mixtral-8x7B-v0.1: 32 layers, width 4096, 32 query heads
sharing 8 key/value heads, 8 SwiGLU experts of width 14336 per layer, each token routed to 2 by
a softmax over the top-2 router logits; rope theta 1e6, 32,000-token vocabulary, untied head;
46.70B parameters, 12.88B active per token) for launch.aot and launch.tpu.

  JAX_PLATFORMS=cpu python -m launch.aot --config configs/mixtral_8x7b.py --topology v5p-64
  python -m launch.tpu --config configs/mixtral_8x7b.py ...

Training: 4096-token sequences (Mixtral's context is 32K: --config.model.block_size=32768), bf16
compute with float32 parameters and AdamW state, the layers scanned and rematerialised, dropless
routing (tokens sorted by expert, one grouped matmul per projection: megablox on TPU) with the
load-balancing loss at Mixtral's 0.02; expert parallelism over mesh.expert = 8 chips (one expert
each; the batch and the other weights are split over them too) and FSDP over the rest (mesh.fsdp
= -1); the global batch of 128 sequences (~524K tokens per step) as 4 micro-batches of 32: one
sequence per chip of a v5p-64 (on a v5p-32, grad_accum=8). Fine-tune Mistral's weights with
--config.init_from=DIR (a Hugging Face Mixtral directory, whose tokenizer.json the data must
share: --config.data.tokenizer=hf:DIR) or pre-train on token files (data.source=bin).
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("mixtral-8x7b", vocab_size=32000, block_size=4096, dtype="bfloat16",
                          scan_layers=True, remat="full")
  c.data.source = "bin"
  c.data.path = "data/mixtral"
  c.data.tokenizer = "gpt2"  # the ids of the bin files; vocab_size is the model's
  c.train.steps = 100_000
  c.train.batch_size = 128
  c.train.grad_accum = 4
  c.optimizer.lr = 3e-4
  c.optimizer.min_lr = 3e-5
  c.optimizer.warmup_steps = 2000
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip = 1.0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.expert = 8
  c.eval.every = 1000
  c.eval.batches = 4
  c.checkpoint.every = 1000
  c.checkpoint.keep = 2
  return c
