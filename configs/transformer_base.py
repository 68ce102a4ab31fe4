"""The base Transformer of "Attention Is All You Need" (Vaswani et al. 2017), section 5.

  python -m launch.aot --config configs/transformer_base.py --topology v5e-8
  python -m launch.train --config configs/transformer_base.py --workdir runs/base \
      --config.data.path=train.tsv --config.data.val_path=newstest.tsv

6 + 6 post-LN layers, width 512, 8 heads, MLP 2048, ReLU, sinusoidal positions, one
embedding shared by source, target and output, scaled by sqrt(512); dropout 0.1 (residual and
embedding), label smoothing 0.1; Adam b1 0.9, b2 0.98, eps 1e-9, no weight decay, lr =
512^-0.5 min(n^-0.5, n 4000^-1.5) (optimizer.schedule = "rsqrt"). Batches: the paper's
~25k source + 25k target tokens per step are 256 pairs of 100 tokens here (block_size 128).
Data: a TSV file of source<TAB>target pairs with GPT-2 BPE (data.task = "tsv"; the paper's
37k shared BPE vocabulary is not shipped: vocab_size follows the tokenizer, 50,257 + 4
specials, padded to 50,304).
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("transformer-base", block_size=128,
                          padded_vocab_size=50304, pad_id=-1, bos_id=-1, eos_id=-1)
  c.data.source = "text"
  c.data.task = "tsv"
  c.data.tokenizer = "gpt2"
  c.data.path = ""  # a TSV file of source<TAB>target lines
  c.train.steps = 100_000
  c.train.batch_size = 256
  c.train.label_smoothing = 0.1
  c.optimizer.schedule = "rsqrt"
  c.optimizer.lr = 512 ** -0.5 * 4000 ** -0.5  # the schedule's peak, at step 4000
  c.optimizer.warmup_steps = 4000
  c.optimizer.min_lr = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-9
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip = 0.0
  c.eval.every = 1000
  c.eval.batches = 20
  c.eval.exact_match = 256
  c.checkpoint.every = 5000
  return c
