"""A small BERT learning tiny shakespeare's characters by masked-LM (data.task = "mlm").

  python -m launch.train --config configs/bert_shakespeare.py --workdir runs/bert_sh
  python -m launch.sample --workdir runs/bert_sh --prompt "To be, or not to [MASK]e"

Windows of 64 characters; 15% of them chosen per window (80% become the mask token, 10% a
random character, 10% stay), the loss and val_accuracy count only those. 4 post-LN layers of
width 128 (4 heads, MLP 512), GELU, learned positions, embedding LayerNorm, as BERT; the
vocabulary is the 65 characters plus pad / bos / eos / mask ([MASK] in prompts). Minutes on
a laptop CPU (README, "Encoder").
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("tiny", family="bert", block_size=64, num_layers=4, num_heads=4,
                          d_model=128, d_mlp=512, norm_placement="post", activation="gelu",
                          embed_norm=True, head_bias=True, norm_eps=1e-12)
  c.data.source = "text"
  c.data.path = ""  # tiny shakespeare
  c.data.tokenizer = "char"
  c.data.task = "mlm"
  c.train.steps = 2000
  c.train.batch_size = 32
  c.train.seed = 0
  c.optimizer.lr = 1e-3
  c.optimizer.min_lr = 1e-4
  c.optimizer.warmup_steps = 200
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.98
  c.eval.every = 500
  c.eval.batches = 20
  c.checkpoint.every = 1000
  c.checkpoint.keep = 2
  c.log.every = 50
  c.mesh.cpu_devices = -1
  return c
