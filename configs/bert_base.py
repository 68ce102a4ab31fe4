"""BERT base (Devlin et al. 2018): 12 post-LN layers, width 768, 12 heads, MLP 3072, GELU,
learned positions (512) and two token types, embedding LayerNorm, dropout 0.1, 110M
parameters; masked-LM pretraining (data.task = "mlm": 15% of tokens chosen, 80% / 10% / 10%).

  python -m launch.aot --config configs/bert_base.py --topology v5e-8
  python -m launch.train --config configs/bert_base.py --workdir runs/bert_base \
      --config.data.source=bin --config.data.path=data/openwebtext

The paper's 30,522-token WordPiece vocabulary gives 110M parameters; training here reads GPT-2
BPE data (launch.prepare), so the vocabulary is 50,257 + 4 specials (padded to 50,304) and
the model has 125M. Batch 256 x 512 tokens, Adam lr 1e-4 (10k warmup steps, then decay),
weight decay 0.01, as the paper (1M steps there; 100k here).
"""

from configs.common import base_config, model_section


def get_config():
  c = base_config()
  c.model = model_section("bert-base", padded_vocab_size=50304, pad_id=-1,
                          mask_id=-1)
  c.data.source = "tfds"
  c.data.tfds_name = "wikipedia/20230601.en"
  c.data.tfds_train_split = "train[:99%]"
  c.data.tfds_val_split = "train[99%:]"
  c.data.tokenizer = "gpt2"
  c.data.task = "mlm"
  c.train.steps = 100_000
  c.train.batch_size = 256
  c.optimizer.lr = 1e-4
  c.optimizer.min_lr = 1e-5
  c.optimizer.warmup_steps = 10_000
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.eval.every = 2000
  c.checkpoint.every = 5000
  return c
