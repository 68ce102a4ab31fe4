"""The named model shapes of model.config.get_config: GPT-2's sizes, nanoGPT's baby GPT, Llama-
style decoders, Qwen3, mixtures of experts (Mixtral, Qwen3-MoE, OLMoE), BERT base and the base
Transformer, each as the ModelConfig fields that differ from the defaults (GPT-2 small)."""

from __future__ import annotations

from typing import Any

# What makes a decoder Llama-style (the presets below add their shapes).
LLAMA = dict(position_embedding="rotary", norm="rmsnorm", activation="swiglu", use_bias=False)

PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI GPT-2 family (Radford et al. 2019), as in Hugging Face's checkpoints.
    "gpt2": dict(num_layers=12, num_heads=12, d_model=768),
    "gpt2-medium": dict(num_layers=24, num_heads=16, d_model=1024),
    "gpt2-large": dict(num_layers=36, num_heads=20, d_model=1280),
    "gpt2-xl": dict(num_layers=48, num_heads=25, d_model=1600),
    # nanoGPT's baby GPT on tiny shakespeare characters (config/train_shakespeare_char.py).
    "shakespeare-char": dict(vocab_size=65, block_size=256, num_layers=6, num_heads=6,
                             d_model=384, embd_dropout=0.2, attn_dropout=0.2,
                             resid_dropout=0.2, use_bias=False),
    # A few-thousand-parameter model for tests.
    "tiny": dict(vocab_size=128, block_size=64, num_layers=2, num_heads=4, d_model=64),
    # Llama-style decoders (Touvron et al. 2023; Llama 3): rotary positions, RMSNorm, SwiGLU,
    # grouped-query attention, no biases. A few-million-parameter one for tests and the CPU:
    "llama-tiny": dict(vocab_size=4096, block_size=512, num_layers=4, num_heads=8,
                       num_kv_heads=2, d_model=256, d_mlp=704, **LLAMA),
    # HuggingFaceTB/SmolLM2-135M's shapes (134.5M; tied head, 9 query / 3 key-value heads):
    "smollm2-135m": dict(vocab_size=49152, block_size=8192, num_layers=30, num_heads=9,
                         num_kv_heads=3, d_model=576, d_mlp=1536,
                         **dict(LLAMA, rope_theta=100000.0)),
    # meta-llama/Llama-3.2-1B's (1.24B; tied head, Llama 3 rope scaling 32x from 8192):
    "llama3.2-1b": dict(vocab_size=128256, block_size=131072, num_layers=16, num_heads=32,
                        num_kv_heads=8, d_model=2048, d_mlp=8192,
                        **dict(LLAMA, rope_theta=500000.0, rope_scaling="llama3",
                               rope_factor=32.0)),
    # meta-llama/Meta-Llama-3-8B's (8.03B; untied head):
    "llama3-8b": dict(vocab_size=128256, block_size=8192, num_layers=32, num_heads=32,
                      num_kv_heads=8, d_model=4096, d_mlp=14336,
                      **dict(LLAMA, rope_theta=500000.0, tie_embeddings=False)),
    # Qwen/Qwen3-0.6B's (0.60B; tied head, 16 query / 8 key-value heads of 128 dimensions,
    # per-head query/key RMSNorm):
    "qwen3-0.6b": dict(vocab_size=151936, block_size=40960, num_layers=28, num_heads=16,
                       num_kv_heads=8, d_model=1024, head_size=128, d_mlp=3072,
                       **dict(LLAMA, rope_theta=1000000.0, norm_eps=1e-6, qk_norm="head")),
    # Mixtures of experts (model/moe.py): every layer's MLP is num_experts SwiGLU experts, each
    # token routed to num_experts_per_tok of them; "total / active" parameters.
    # mistralai/Mixtral-8x7B-v0.1's (46.70B / 12.88B; softmax over the top-2 logits):
    "mixtral-8x7b": dict(vocab_size=32000, block_size=32768, num_layers=32, num_heads=32,
                         num_kv_heads=8, d_model=4096, d_mlp=14336, num_experts=8,
                         num_experts_per_tok=2, router="topk_softmax",
                         router_aux_loss_coef=0.02,
                         **dict(LLAMA, rope_theta=1000000.0, tie_embeddings=False)),
    # Qwen/Qwen3-30B-A3B's (30.53B / 3.35B; 128 experts of width 768, top-8 of a softmax,
    # renormalised; heads of 128 dimensions with query/key RMSNorm):
    "qwen3-30b-a3b": dict(vocab_size=151936, block_size=40960, num_layers=48, num_heads=32,
                          num_kv_heads=4, d_model=2048, head_size=128, d_mlp=6144,
                          expert_d_mlp=768, num_experts=128, num_experts_per_tok=8,
                          router="softmax_topk", norm_topk_prob=True,
                          router_aux_loss_coef=0.001,
                          **dict(LLAMA, rope_theta=1000000.0, norm_eps=1e-6, qk_norm="head",
                                 tie_embeddings=False)),
    # allenai/OLMoE-1B-7B-0924's (6.92B / 1.28B; 64 experts of width 1024, top-8 of a softmax
    # not renormalised; query/key RMSNorm over the whole projection; trained with a z-loss):
    "olmoe-1b-7b": dict(vocab_size=50304, block_size=4096, num_layers=16, num_heads=16,
                        d_model=2048, d_mlp=1024, num_experts=64, num_experts_per_tok=8,
                        router="softmax_topk", norm_topk_prob=False,
                        router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
                        **dict(LLAMA, qk_norm="full", tie_embeddings=False)),
    # BERT base (Devlin et al. 2018; bert-base-uncased's shapes): 110M parameters.
    "bert-base": dict(family="bert", vocab_size=30522, block_size=512, num_layers=12,
                      num_heads=12, d_model=768, type_vocab_size=2, embed_norm=True,
                      norm_placement="post", activation="gelu", norm_eps=1e-12,
                      head_bias=True, embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1,
                      pad_id=0, mask_id=103),
    # The base Transformer of "Attention Is All You Need" (Vaswani et al. 2017): 6 + 6 layers,
    # width 512, 8 heads, MLP 2048, sinusoidal positions, post-LN, ReLU, shared embeddings
    # scaled by sqrt(512), dropout 0.1; a 37,000-token shared BPE vocabulary.
    "transformer-base": dict(family="encdec", vocab_size=37000, block_size=256, num_layers=6,
                             num_heads=8, d_model=512, d_mlp=2048, position_embedding="sinusoidal",
                             norm_placement="post", activation="relu", embed_scale=True,
                             embd_dropout=0.1, attn_dropout=0.0, resid_dropout=0.1,
                             pad_id=0, bos_id=1, eos_id=2),
}
