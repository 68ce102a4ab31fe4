"""Supervised fine-tuning on chats: the loss on the assistant's tokens only, the conversations
packed into rows (training/data/chat.py).

  python -m launch.train --config configs/chat_sft.py:cpu --workdir runs/chat_cpu
  python -m launch.sample --workdir runs/chat_cpu --chat '[{"role": "user", "content": "ROMEO:\\nBut soft!\\n\\nWho speaks next?"}]' --temperature 0
  python -m launch.train --config configs/chat_sft.py --workdir runs/chat_gpt2   # downloads GPT-2

The data: the chat set shipped with the package (training/data/assets/shakespeare_chat.jsonl,
made from tiny shakespeare by make_shakespeare_chat.py beside it: "who speaks next?" and
"continue the speech" conversations, some with a system message, some two turns), its last
10% held out for validation; any JSONL of {"messages": [...]} or {"prompt", "completion"}
lines with --config.data.path. The chat template: the plain default ("User:" / "Assistant:"
turns, each ended by the end-of-turn token; the run records it for launch.sample --chat).

The default fine-tunes OpenAI's GPT-2 (124M; `init_from`, downloaded once, or any GPT-2 or
Llama directory with --config.init_from and, for a Llama, --config.data.tokenizer=hf:DIR and
--config.data.chat_template='' to use its own template) on GPT-2 BPE, <|endoftext|> ending each
turn, 300 steps of 16 x 512 tokens at lr 3e-5. ":cpu" trains a small character-level model
(4 layers, width 128, block 256; the turn ends with the character U+2404) from scratch on the
same chats in a few CPU minutes.
"""

from configs.common import base_config, model_section
from model.errors import UserError

VARIANTS = ("", "cpu")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise UserError(f"Unknown variant {variant!r} of chat_sft.py; use configs/chat_sft.py or "
                    f"configs/chat_sft.py:cpu.")
  c = base_config()
  c.data.task = "chat"
  c.data.source = "jsonl"
  c.data.path = ""  # the shipped shakespeare chats
  c.data.chat_template = "default"
  c.data.packing = "best_fit"
  c.data.overlong = "drop"

  c.init_from = "gpt2"
  c.model = model_section("gpt2", padded_vocab_size=50304, dtype="bfloat16", block_size=512)
  c.data.tokenizer = "gpt2"
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.seed = 1337
  c.optimizer.lr = 3e-5
  c.optimizer.min_lr = 3e-6
  c.optimizer.warmup_steps = 20
  c.eval.every = 50
  c.eval.batches = 8
  c.checkpoint.every = 100
  c.checkpoint.keep = 1
  c.log.every = 10

  if variant == "cpu":
    c.init_from = ""
    c.model = model_section("shakespeare-char", num_layers=4, num_heads=4, d_model=128,
                            block_size=256, embd_dropout=0.0, attn_dropout=0.0,
                            resid_dropout=0.0)
    c.data.tokenizer = "char"
    c.train.steps = 1000
    c.train.batch_size = 16
    c.optimizer.lr = 1e-3
    c.optimizer.min_lr = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.1
    c.optimizer.b2 = 0.99
    c.optimizer.clip = 1.0
    c.eval.every = 250
    c.eval.batches = 10
    c.checkpoint.every = 500
    c.mesh.cpu_devices = -1  # one JAX device per core, each on its share of the batch
  return c
