"""ModelConfig: every architecture choice of a model of the Transformer family, frozen and hashable.

`family` picks the architecture (model/__init__.py: build):
  gpt     decoder-only, causal (GPT-2; model/gpt.py)
  bert    encoder-only, bidirectional, masked-LM head (BERT; model/encoder.py)
  encdec  encoder-decoder with cross-attention (Vaswani et al. 2017, BART; model/encdec.py)
The other fields mean the same in every family (for encdec, num_layers, num_heads and d_mlp
describe the encoder; num_decoder_layers, num_decoder_heads and decoder_d_mlp the decoder, 0
meaning the same as the encoder).

The decoder switches of today's models, each independent and each defaulting to GPT-2's
behaviour: position_embedding learned | sinusoidal | rotary (rope_theta, rope_scaling); norm
layernorm | rmsnorm (norm_eps); activation gelu_tanh | gelu | relu | swiglu; num_kv_heads
(grouped-query attention; 1 is multi-query); use_bias and per-projection qkv_bias, proj_bias,
mlp_bias; tie_embeddings; head_size (a head dimension other than d_model / num_heads) and
qk_norm (Qwen3's and OLMoE's query/key RMSNorm). The presets llama-tiny, smollm2-135m,
llama3.2-1b and llama3-8b set all four of Llama's (rotary, RMSNorm, SwiGLU, GQA) with no
biases; qwen3-0.6b adds the query/key norm.

A mixture of experts (model/moe.py) is num_experts > 0: the layers moe_layers names get
num_experts experts of width expert_d_mlp (and num_shared_experts shared ones), each token
routed to num_experts_per_tok of them by `router`; router_aux_loss_coef and router_z_loss_coef
weigh its losses, capacity_factor 0 is dropless routing, moe_kernel the grouped matmul. Presets:
mixtral-8x7b, qwen3-30b-a3b and olmoe-1b-7b, with their published total and active parameter
counts (model.families.count_params(cfg, active=True)).

A config is a static argument of jitted functions, so it must be hashable: all fields are
plain Python scalars or strings (dtypes are names like "bfloat16", not numpy objects).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from model.errors import UserError
from model.presets import PRESETS

# rotary: RoPE (Su et al. 2021) on each head's queries and keys, in the rotate-half pairing of
# Hugging Face's Llama (dimension i of a head pairs with i + K/2), at rope_theta.
POSITION_EMBEDDINGS = ("learned", "sinusoidal", "rotary")
# rope_scaling "llama3": Llama 3.1's stretch of the low rotary frequencies (rope_factor,
# rope_low_freq_factor, rope_high_freq_factor, rope_original_positions).
ROPE_SCALINGS = ("none", "llama3")
NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
# swiglu: silu(x W_gate) * (x W_up), then W_down (Shazeer 2020; Llama): three matrices of D x F.
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "swiglu")
FAMILIES = ("gpt", "bert", "encdec")
# Token ids a family may need (-1: none). A character or BPE run of bert / encdec appends them
# after the data's vocabulary (training/data/tasks.py); imported checkpoints bring their own.
SPECIAL_TOKENS = ("pad_id", "bos_id", "eos_id", "mask_id")
# "xla": the reference einsum attention written out in model/blocks.py.
# "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), the cuDNN flash kernel (GPU only).
# "splash": the Pallas splash-attention kernel (TPU; Pallas interpret mode on the CPU), for
#   sequence lengths that are multiples of 128.
# "auto": splash on TPU, cuDNN on GPU in bf16/fp16, else jax.nn.dot_product_attention (XLA).
# The choice is made in model/attention.py; cached decoding always uses the einsum attention.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")
DTYPES = ("float32", "bfloat16", "float16")
# The generator of dropout masks: threefry (JAX's default; the same masks on any mesh) or rbg
# (XLA's RngBitGenerator, much cheaper on GPUs; its bits may depend on how an array is
# sharded, so a resume on another mesh may draw other masks). training/step.py: dropout_key.
DROPOUT_RNGS = ("threefry", "rbg")
# Rematerialisation of each block in the backward pass (see jax.checkpoint_policies).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# RMSNorm of the queries and keys before rotary positions: per head over K (Qwen3), or over
# the whole projection H*K / G*K (OLMoE).
QK_NORMS = ("none", "head", "full")
# Mixture-of-experts routers (model/moe.py): "topk_softmax" a softmax over the top-k logits
# (Mixtral); "softmax_topk" a softmax over all experts, then the top-k probabilities,
# renormalised to sum to 1 when norm_topk_prob (Qwen3-MoE) or not (OLMoE).
ROUTERS = ("topk_softmax", "softmax_topk")
# The experts' grouped matmul of dropless routing (model/grouped_matmul.py): jax.lax.ragged_dot,
# the Pallas megablox kernel that ships with JAX (TPU; Pallas interpret mode on the CPU, for
# checking numerics), or megablox's tiling in XLA ("tiled"); "auto": megablox on TPU, tiled on
# the CPU, ragged_dot on GPUs.
MOE_KERNELS = ("auto", "ragged_dot", "megablox", "tiled")
# The fields that take one of a few names, and those names (validate checks them;
# docs/configuration.md lists them).
CHOICES = {"position_embedding": POSITION_EMBEDDINGS, "norm_placement": NORM_PLACEMENTS,
           "norm": NORMS, "rope_scaling": ROPE_SCALINGS, "activation": ACTIVATIONS,
           "attention": ATTENTION_IMPLEMENTATIONS, "dropout_rng": DROPOUT_RNGS, "dtype": DTYPES,
           "param_dtype": DTYPES, "remat": REMAT_POLICIES, "family": FAMILIES,
           "qk_norm": QK_NORMS, "router": ROUTERS, "moe_kernel": MOE_KERNELS}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a Transformer (family: gpt, bert or encdec). Defaults are GPT-2 small (124M)."""

  vocab_size: int = 50257  # tokens the model reads and predicts (ids 0 .. vocab_size - 1)
  # Rows of the embedding / columns of the logits. None means vocab_size. A larger value
  # (50304 = 393 * 128 for GPT-2) makes the matmuls faster; the extra logits are masked out.
  padded_vocab_size: int | None = None
  block_size: int = 1024  # maximum number of positions
  num_layers: int = 12  # blocks (encdec: the encoder's)
  num_heads: int = 12  # attention (query) heads (encdec: the encoder's); divides d_model
  d_model: int = 768  # width of the residual stream
  d_mlp: int | None = None  # the MLP's hidden width; None means 4 * d_model
  # Dimension K of each attention head; 0 means d_model / num_heads (Qwen3's head_dim may
  # differ: then H * K need not be D, nor num_heads divide d_model).
  head_size: int = 0
  embd_dropout: float = 0.0  # dropout on the embeddings, in [0, 1)
  attn_dropout: float = 0.0  # dropout on the attention probabilities, in [0, 1)
  resid_dropout: float = 0.0  # dropout on each sublayer's output, in [0, 1)
  # Key/value heads of self-attention (grouped-query attention: query head h reads key/value
  # head h // (num_heads / num_kv_heads), as Hugging Face's repeat_kv); 1 is multi-query
  # attention, 0 means num_heads (multi-head attention, GPT-2).
  num_kv_heads: int = 0
  # Biases: use_bias turns all of them off (nanoGPT's bias=False, Llama); with it on, each
  # projection's may be turned off alone (Qwen2: q/k/v biases only).
  use_bias: bool = True
  qkv_bias: bool = True  # the q, k, v projections
  proj_bias: bool = True  # attention's output projection
  mlp_bias: bool = True  # the MLP's matrices
  position_embedding: str = "learned"  # a learned table, the 2017 sines, or rotary (gpt only)
  rope_theta: float = 10000.0  # rotary: the base of the rotation frequencies
  rope_scaling: str = "none"  # rotary: llama3 stretches the low frequencies (Llama 3.1)
  rope_factor: float = 8.0  # llama3 scaling: low frequencies are divided by this
  # llama3 scaling: wavelengths above rope_original_positions / rope_low_freq_factor are
  # scaled, those below rope_original_positions / rope_high_freq_factor kept, those between
  # interpolated.
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0  # llama3 scaling: see rope_low_freq_factor
  rope_original_positions: int = 8192  # llama3 scaling: the context trained before scaling
  norm: str = "layernorm"  # layernorm | rmsnorm (x / rms(x) * scale, no mean, no bias)
  norm_placement: str = "pre"  # pre: before each sublayer, a final norm (GPT-2); post: after
  activation: str = "gelu_tanh"  # the MLP's nonlinearity (swiglu: gate, up, down matrices)
  norm_eps: float = 1e-5  # epsilon of every norm, > 0
  # RMSNorm of the queries and keys before rotary positions: per head (Qwen3) or over the
  # whole projection (OLMoE)
  qk_norm: str = "none"
  tie_embeddings: bool = True  # the output head is the token embedding (False: its own)
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # dtype parameters (and AdamW's moments) are stored in
  attention: str = "auto"  # kernel: auto = splash on TPU, cuDNN on GPU in bf16, else XLA
  # The generator of dropout masks: threefry (the same masks on any mesh) or rbg (cheaper on
  # GPUs; a resume on another mesh may draw other masks).
  dropout_rng: str = "threefry"
  scan_layers: bool = False  # the blocks as one nn.scan (fast compiles) or a Python loop
  remat: str = "none"  # what each block recomputes in the backward pass (jax.checkpoint_policies)
  # The prefix-LM objective (data.task=prefix_lm sets it; model/segments.py): each example's
  # prefix attends to itself both ways in training, and sampling prefills the prompt so.
  prefix_lm: bool = False
  # --- mixture of experts (model/moe.py; family gpt) ---
  num_experts: int = 0  # routed experts of each sparse layer's MLP (0: a dense model)
  num_experts_per_tok: int = 2  # experts each token is routed to (the K of top-K), <= num_experts
  expert_d_mlp: int = 0  # each routed expert's hidden width (0: d_mlp)
  # Experts every token also goes through (DeepSeek's shared experts): one dense MLP of width
  # num_shared_experts * the expert width beside the routed ones.
  num_shared_experts: int = 0
  # Which layers are sparse (the rest keep the dense MLP of width d_mlp): "all", "every:K"
  # (layers K-1, 2K-1, ...: Qwen's decoder_sparse_step) or a list of layer indices "1,3,4".
  moe_layers: str = "all"
  # topk_softmax: a softmax over the top-K logits (Mixtral); softmax_topk: the top K of a
  # softmax over all experts (Qwen3-MoE, OLMoE)
  router: str = "topk_softmax"
  norm_topk_prob: bool = True  # softmax_topk: renormalise the kept probabilities to sum to 1
  # Weight of the load-balancing loss (Switch; Mixtral's router_aux_loss_coef) in the training
  # objective; logged as moe_aux_loss whatever its weight.
  router_aux_loss_coef: float = 0.01
  # Weight of the router z-loss (ST-MoE: the mean squared log-sum-exp of the router logits);
  # logged as moe_z_loss whatever its weight.
  router_z_loss_coef: float = 0.0
  # 0: dropless (tokens sorted by expert, one grouped matmul per projection). c > 0: each expert
  # takes at most ceil(c * tokens * K / num_experts) assignments of a routing group (the tokens
  # routed together); the rest are dropped (logged as moe_dropped).
  capacity_factor: float = 0.0
  # The grouped matmul of dropless routing: jax.lax.ragged_dot, the megablox Pallas kernel
  # (TPU), tiled (megablox's tiling in XLA), or auto (megablox on TPU, tiled on the CPU,
  # ragged_dot on GPUs)
  moe_kernel: str = "auto"
  # --- the encoder (bert) and encoder-decoder (encdec) families; defaults are GPT's ---
  family: str = "gpt"  # gpt: decoder-only; bert: encoder-only; encdec: encoder-decoder
  num_decoder_layers: int = 0  # encdec: decoder blocks (0: num_layers)
  # encdec: the decoder's heads (its self- and cross-attention) and MLP width; 0: the encoder's
  # num_heads / d_mlp (BART's decoder_attention_heads and decoder_ffn_dim may differ)
  num_decoder_heads: int = 0
  decoder_d_mlp: int = 0  # encdec: the decoder's MLP width (see num_decoder_heads)
  type_vocab_size: int = 0  # token-type (segment) embeddings, BERT's 2; 0: none
  embed_norm: bool = False  # LayerNorm after the embeddings (BERT, BART)
  embed_scale: bool = False  # token embeddings times sqrt(d_model) (Vaswani et al. 2017)
  # Row of the learned position table that position 0 reads (BART's tables start at 2).
  position_offset: int = 0
  mlm_head: bool = True  # bert: the masked-LM head (False: a BertModel, hidden states only)
  head_bias: bool = False  # a [V] bias on the logits (BERT's MLM head, BART's final_logits_bias)
  pad_id: int = -1  # the padding token (-1: none)
  bos_id: int = -1  # encdec: the decoder's first input (BART's decoder_start_token_id)
  eos_id: int = -1  # the end-of-sequence token (-1: none)
  mask_id: int = -1  # bert: the [MASK] token (-1: none)
  # --- LoRA adapters (model/lora.py; set from config.train.lora): rank r (0: none), scale
  # alpha / r, dropout on the adapters' input, the projections they adapt (comma-separated) ---
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = ""

  def __post_init__(self):
    if self.d_mlp is None:
      object.__setattr__(self, "d_mlp", 4 * self.d_model)
    if self.padded_vocab_size is None:
      object.__setattr__(self, "padded_vocab_size", self.vocab_size)
    self.validate()

  def validate(self) -> None:
    for name in ("vocab_size", "padded_vocab_size", "block_size", "num_layers", "num_heads",
                 "d_model", "d_mlp"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
    if self.padded_vocab_size < self.vocab_size:
      raise UserError(
          f"ModelConfig.padded_vocab_size ({self.padded_vocab_size}) must be at least "
          f"vocab_size ({self.vocab_size}).")
    if self.d_model % self.num_heads and not self.head_size:
      raise UserError(
          f"ModelConfig.d_model ({self.d_model}) must be divisible by num_heads "
          f"({self.num_heads}), or head_size set.")
    if self.position_embedding == "sinusoidal" and self.d_model % 2:
      raise UserError(
          f"ModelConfig.d_model ({self.d_model}) must be even for sinusoidal positions.")
    for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"ModelConfig.{name} must be a number in [0, 1), got {value!r}.")
    for name in ("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor",
                 "rope_high_freq_factor"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          0 < value < math.inf):
        raise UserError(f"ModelConfig.{name} must be a positive (finite) number, got "
                        f"{value!r}.")
    for name, allowed in CHOICES.items():
      value = getattr(self, name)
      if value not in allowed:
        raise UserError(
            f"ModelConfig.{name} must be one of {', '.join(allowed)}; got {value!r}.")
    if self.attention == "splash" and self.block_size % 128:
      raise UserError(f"ModelConfig.attention='splash' needs block_size to be a multiple of 128, "
                      f"got {self.block_size}; use attention='auto' or 'xla'.")
    for name in ("num_decoder_layers", "num_decoder_heads", "decoder_d_mlp", "type_vocab_size",
                 "position_offset", "num_kv_heads", "head_size", "num_experts",
                 "num_experts_per_tok", "expert_d_mlp", "num_shared_experts"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"ModelConfig.{name} must be a whole number >= 0, got {value!r}.")
    for name in ("num_decoder_heads", "decoder_d_mlp"):
      if getattr(self, name) and self.family != "encdec":
        raise UserError(f"ModelConfig.{name} applies to family='encdec' (its decoder); "
                        f"family={self.family!r} needs 0, got {getattr(self, name)}.")
    if self.d_model % self.decoder_heads:
      raise UserError(f"ModelConfig.d_model ({self.d_model}) must be divisible by "
                      f"num_decoder_heads ({self.num_decoder_heads}).")
    if self.num_heads % self.kv_heads:
      raise UserError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                      f"num_kv_heads ({self.num_kv_heads}): each key/value head serves a whole "
                      f"group of query heads.")
    if self.position_embedding == "rotary" and self.head_dim % 2:
      got = (f"head_size {self.head_size}" if self.head_size else
             f"d_model / num_heads = {self.d_model} / {self.num_heads} = {self.head_dim}")
      raise UserError(f"ModelConfig.position_embedding='rotary' needs an even head dimension, "
                      f"got {got}.")
    self._validate_moe()
    if self.family != "gpt":
      for name, gpt_only in (("num_kv_heads", self.num_kv_heads not in (0, self.num_heads)),
                             ("position_embedding", self.position_embedding == "rotary")):
        if gpt_only:
          raise UserError(f"ModelConfig.{name}={getattr(self, name)!r} is for family='gpt' "
                          f"(the decoder-only model); family={self.family!r} has "
                          f"multi-head attention with learned or sinusoidal positions.")
    if self.rope_original_positions <= 0 or isinstance(self.rope_original_positions, bool):
      raise UserError(f"ModelConfig.rope_original_positions must be a positive integer, got "
                      f"{self.rope_original_positions!r}.")
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise UserError(f"ModelConfig.rope_high_freq_factor ({self.rope_high_freq_factor}) must be "
                      f"above rope_low_freq_factor ({self.rope_low_freq_factor}).")
    for name in SPECIAL_TOKENS:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or not (
          value == -1 or 0 <= value < self.vocab_size):
        raise UserError(f"ModelConfig.{name} must be -1 (none) or a token id in [0, "
                        f"{self.vocab_size}), got {value!r}.")
    if self.prefix_lm is True and self.family != "gpt":
      raise UserError(f"ModelConfig.prefix_lm is a decoder-only objective (family='gpt'); "
                      f"family={self.family!r} needs prefix_lm=False.")
    if self.family != "gpt" and self.attention == "splash":
      raise UserError(f"ModelConfig.attention='splash' is causal self-attention only; "
                      f"family={self.family!r} needs attention='auto' or 'xla'.")
    self._validate_lora()
    for name in ("use_bias", "qkv_bias", "proj_bias", "mlp_bias", "tie_embeddings",
                 "scan_layers", "embed_norm", "embed_scale",
                 "mlm_head", "head_bias", "prefix_lm", "norm_topk_prob"):
      if not isinstance(getattr(self, name), bool):
        raise UserError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}.")

  def _validate_lora(self) -> None:
    rank = self.lora_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
      raise UserError(f"ModelConfig.lora_rank must be a whole number >= 0 (0: no adapters), got "
                      f"{rank!r}.")
    if not rank:
      return
    if self.family != "gpt":
      raise UserError(f"LoRA adapters are for family='gpt' (GPT-2 and Llama-style decoders); "
                      f"family={self.family!r} has none.")
    alpha, dropout = self.lora_alpha, self.lora_dropout
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
      raise UserError(f"ModelConfig.lora_alpha must be a positive number, got {alpha!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
        0 <= dropout < 1):
      raise UserError(f"ModelConfig.lora_dropout must be a number in [0, 1), got {dropout!r}.")
    if not isinstance(self.lora_targets, str):
      raise UserError(f"ModelConfig.lora_targets must be a comma-separated string, got "
                      f"{self.lora_targets!r}.")

  def _validate_moe(self) -> None:
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "capacity_factor"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
          0 <= value < float("inf")):
        raise UserError(f"ModelConfig.{name} must be a number >= 0, got {value!r}.")
    if not self.num_experts:
      return
    if self.family != "gpt":
      raise UserError(f"ModelConfig.num_experts={self.num_experts} is for family='gpt' (the "
                      f"decoder-only model); family={self.family!r} needs 0.")
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise UserError(f"ModelConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be "
                      f"between 1 and num_experts ({self.num_experts}): each token goes to "
                      f"that many different experts.")
    self.sparse_layers  # pylint: disable=pointless-statement  (parses moe_layers)

  @property
  def expert_mlp(self) -> int:
    """Each routed expert's hidden width (expert_d_mlp, 0 meaning d_mlp)."""
    return self.expert_d_mlp or self.d_mlp

  @property
  def sparse_layers(self) -> tuple[bool, ...]:
    """Per layer, whether its MLP is the mixture of experts (moe_layers); all False for a
    dense model."""
    L, spec = self.num_layers, self.moe_layers
    if not self.num_experts:
      return (False,) * L
    text = spec.strip() if isinstance(spec, str) else ""
    if text == "all":
      return (True,) * L
    if text.startswith("every:") and text[6:].strip().isdigit() and int(text[6:]) > 0:
      k = int(text[6:])
      return tuple((i + 1) % k == 0 for i in range(L))
    parts = [p.strip() for p in text.split(",")]
    if text and all(p.isdigit() for p in parts):
      layers = {int(p) for p in parts}
      if max(layers) < L:
        return tuple(i in layers for i in range(L))
    raise UserError(f"ModelConfig.moe_layers must be 'all', 'every:K' (K >= 1) or a comma-"
                    f"separated list of layer indices below num_layers ({L}), got {spec!r}.")

  @property
  def layer_period(self) -> int:
    """The smallest p dividing num_layers such that layer i is sparse exactly when layer i % p
    is: the scan layout scans num_layers / p groups of p blocks (1 for a dense model or an
    all-sparse one)."""
    sparse, L = self.sparse_layers, self.num_layers
    return next(p for p in range(1, L + 1)
                if L % p == 0 and all(sparse[i] == sparse[i % p] for i in range(L)))

  @property
  def decoder_layers(self) -> int:
    """Decoder blocks of an encdec model (num_decoder_layers, 0 meaning num_layers)."""
    return self.num_decoder_layers or self.num_layers

  @property
  def decoder_heads(self) -> int:
    """Heads of an encdec model's decoder (num_decoder_heads, 0 meaning num_heads)."""
    return self.num_decoder_heads or self.num_heads

  @property
  def decoder_mlp(self) -> int:
    """MLP width of an encdec model's decoder (decoder_d_mlp, 0 meaning d_mlp)."""
    return self.decoder_d_mlp or self.d_mlp

  def decoder(self) -> "ModelConfig":
    """The config the decoder's blocks read: the decoder's heads and MLP width as num_heads and
    d_mlp (the config itself when the two halves are alike)."""
    if (self.decoder_heads, self.decoder_mlp) == (self.num_heads, self.d_mlp):
      return self
    return dataclasses.replace(self, num_heads=self.decoder_heads, d_mlp=self.decoder_mlp,
                               num_decoder_heads=0, decoder_d_mlp=0)

  @property
  def cache_layers(self) -> int:
    """Layers with a self-attention KV cache: the decoder's (GPT: all of them)."""
    return self.decoder_layers if self.family == "encdec" else self.num_layers

  @property
  def kv_heads(self) -> int:
    """Key/value heads of self-attention (num_kv_heads, 0 meaning num_heads)."""
    return self.num_kv_heads or self.num_heads

  @property
  def qkv_bias_on(self) -> bool:
    return self.use_bias and self.qkv_bias

  @property
  def proj_bias_on(self) -> bool:
    return self.use_bias and self.proj_bias

  @property
  def mlp_bias_on(self) -> bool:
    return self.use_bias and self.mlp_bias

  @property
  def head_dim(self) -> int:
    """K: head_size, or d_model / num_heads when it is 0."""
    return self.head_size or self.d_model // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> "ModelConfig":
    """A copy with some fields changed (re-validated). d_mlp / padded_vocab_size follow the
    new width / vocabulary unless given explicitly."""
    data = dataclasses.asdict(self)
    if "d_model" in changes and "d_mlp" not in changes and self.d_mlp == 4 * self.d_model:
      data["d_mlp"] = None
    if ("vocab_size" in changes and "padded_vocab_size" not in changes
        and self.padded_vocab_size == self.vocab_size):
      data["padded_vocab_size"] = None
    unknown = sorted(set(changes) - set(data))
    if unknown:
      raise UserError(
          f"Unknown ModelConfig field {unknown[0]!r}; known fields: {', '.join(sorted(data))}.")
    data.update(changes)
    return ModelConfig(**data)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


# Fields renamed since: a config.json saved before reads the same (training/checkpoint.py).
RENAMED_FIELDS = {"layer_norm_epsilon": "norm_eps"}


def upgrade_fields(data: dict[str, Any]) -> dict[str, Any]:
  """The fields of a model saved by an earlier version as this version names them: renamed
  fields (RENAMED_FIELDS) under their new names, fields added since at their defaults (every
  switch added defaults to the behaviour before it)."""
  data = {RENAMED_FIELDS.get(k, k): v for k, v in data.items()}
  for f in dataclasses.fields(ModelConfig):
    if f.name not in data:
      data[f.name] = f.default
  return data


def from_dict(data: dict[str, Any]) -> ModelConfig:
  """ModelConfig of a saved config's model section (upgrade_fields first)."""
  return ModelConfig(**upgrade_fields(data))


def field_names() -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(ModelConfig))


def preset_names() -> tuple[str, ...]:
  return tuple(PRESETS)


def get_config(name: str, **overrides) -> ModelConfig:
  """A named preset (see preset_names())."""
  if name not in PRESETS:
    raise UserError(f"Unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
  fields = set(field_names())
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise UserError(
        f"Unknown ModelConfig field {unknown[0]!r}; known fields: {', '.join(sorted(fields))}.")
  return ModelConfig(**{**PRESETS[name], **overrides})
