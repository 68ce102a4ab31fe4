"""FLOPs per token, device peak throughput and model FLOPs utilisation (MFU).

FLOPs/token (forward + backward) = 6 N + 12 L T D (Kaplan et al. 2020; PaLM appendix B), where
N = the parameters that take part in matmuls: all parameters except the position embedding and,
when the LM head is untied, the token embedding (a lookup) -- i.e. the non-embedding parameters
plus the LM head, with the padded vocabulary. For GPT-2 124M (V = 50257, tied) N = 123,653,376.
The 12 L T D term is attention's score and value matmuls (forward 2 * 2 * T * D per layer).
Llama-style decoders need nothing else: N counts what their layers hold, SwiGLU's three D x F
matrices and, with grouped-query attention, K/V projections of D x G*K (G key/value heads), and
the attention term is the same (every query head still reads T keys of K dimensions; with a
head size K other than D / H, as Qwen3's, the term is 12 L T H K).
A mixture of experts (model/moe.py) counts its active parameters: the router, and of each
sparse layer's E experts only the J a token is routed to (count_params(active=True)); so 6N is
the work of the dropless dispatch (XLA:CPU and XLA:GPU expand its grouped matmuls into a dense
matmul per expert, E times that work, which this formula leaves out; with a capacity factor c
the experts compute c times their share, empty slots included).

The same count for the other families, per position of a training row:
  bert    6 N + 12 L T D: bidirectional attention reads all T keys, as the causal formula
          already counts; N includes the masked-LM head (dense D x D, the tied V x D decoder),
          which runs at every position; the token-type table is a lookup, not in N.
  encdec  6 N + 12 (L_enc + 2 L_dec) T D, per target position with source length S = T (our
          seq2seq batches): N = encoder + decoder blocks (cross-attention's q, kv and output
          projections too) + the head; each encoder layer's self-attention, each decoder layer's
          self-attention and its cross-attention to the S source positions add 12 T D each.
          (The encoder's 6 N_enc is per source token; with S = T it is per target token too.)

MFU = achieved model FLOP/s / (number of devices * the device's dense bf16 peak), whatever the
compute dtype; devices not in the table (CPUs, unknown accelerators) have no MFU (None).
"""

from __future__ import annotations

from model.config import ModelConfig
from model.families import count_params
from training.tpu.slices import GENERATIONS

# Dense (no sparsity) bf16 peak, TFLOP/s per device, from vendor datasheets; TPUs (per chip)
# from the slice table of training/tpu/slices.py.
PEAK_BF16_TFLOPS = {
    "h100 sxm": 989.0,
    "h100 pcie": 756.0,
    "h200": 989.0,
    "a100": 312.0,
    **{f"tpu {g.name}": g.peak_bf16_tflops for g in GENERATIONS.values()},
}

# HBM bandwidth, GB/s per device, from the same datasheets (what a memory-bound step, e.g. one
# token of batch-1 decoding, cannot beat: the bytes it must read over this).
PEAK_HBM_GBPS = {
    "h100 sxm": 3350.0,
    "h100 pcie": 2000.0,
    "h200": 4800.0,
    "a100": 2039.0,
    "tpu v4": 1228.0,
    "tpu v5e": 819.0,
    "tpu v5p": 2765.0,
    "tpu v6e": 1640.0,
}

# jax's device_kind strings -> table keys.
_KIND_ALIASES = (
    ("h100 pcie", "h100 pcie"),
    ("h100", "h100 sxm"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("h200", "h200"),
    ("a100", "a100"),
    ("tpu v5 lite", "tpu v5e"),
    ("tpu v5e", "tpu v5e"),
    ("tpu v5p", "tpu v5p"),
    ("tpu v5", "tpu v5p"),
    ("tpu v6 lite", "tpu v6e"),
    ("tpu v6e", "tpu v6e"),
    ("tpu v4", "tpu v4"),
)


def non_embedding_params(cfg: ModelConfig) -> int:
  """N of the FLOPs formula: non-embedding parameters plus the LM head (see module doc)."""
  return count_params(cfg, non_embedding=True, active=True)


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
  """Training FLOPs per token: 6 N + 12 L T D, T = seq_len (default block_size); D is H K."""
  T = cfg.block_size if seq_len is None else seq_len
  layers = cfg.num_layers + (2 * cfg.decoder_layers if cfg.family == "encdec" else 0)
  return 6 * non_embedding_params(cfg) + 12 * layers * T * cfg.num_heads * cfg.head_dim


def formula(cfg: ModelConfig) -> str:
  """The FLOPs-per-token formula of cfg's family, in words (module docstring)."""
  parts = ["non-embedding parameters + LM head"]
  if cfg.activation == "swiglu":
    parts.append("SwiGLU's three D x F matrices per layer")
  if cfg.kv_heads != cfg.num_heads:
    parts.append(f"K/V projections of {cfg.kv_heads} key/value heads")
  if cfg.num_experts:
    parts.append(f"the {cfg.num_experts_per_tok} of {cfg.num_experts} experts a token is "
                 f"routed to, and the router")
  n = f"N = {non_embedding_params(cfg):,} ({'; '.join(parts)})"
  if cfg.family == "encdec":
    return (f"6N + 12*(L_enc + 2*L_dec)*T*D per target token, L_enc = {cfg.num_layers}, "
            f"L_dec = {cfg.decoder_layers}, {n}")
  return f"6N + 12*L*T*D, {n}"


def peak_entry(device_kind: str) -> str | None:
  """The key of PEAK_BF16_TFLOPS used for this jax device_kind, or None if unknown."""
  kind = device_kind.lower()
  for pattern, key in _KIND_ALIASES:
    if pattern in kind:
      return key
  return None


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this jax device_kind, or None if unknown."""
  key = peak_entry(device_kind)
  return None if key is None else PEAK_BF16_TFLOPS[key] * 1e12


def peak_bandwidth(device_kind: str) -> float | None:
  """HBM bytes/s of one device of this jax device_kind, or None if unknown (CPUs)."""
  key = peak_entry(device_kind)
  gbps = None if key is None else PEAK_HBM_GBPS.get(key)
  return None if gbps is None else gbps * 1e9


def mfu(tokens_per_sec: float, flops_per_tok: float, device_kind: str,
        num_devices: int) -> float | None:
  """Model FLOPs utilisation in [0, 1], or None for a device kind without a known peak."""
  peak = peak_flops(device_kind)
  if peak is None or num_devices <= 0:
    return None
  return tokens_per_sec * flops_per_tok / (peak * num_devices)
