"""training/perf/flops.py: FLOPs per token (6N + 12LTD), the peak table, MFU."""

import math

import pytest

from model.config import get_config
from training.perf import flops


def test_flops_per_token_gpt2_hand_computed():
  cfg = get_config("gpt2")
  # Parameters: wte 50257*768 + wpe 1024*768 + 12 blocks of 7,087,872 + ln_f 1536.
  assert flops.non_embedding_params(cfg) == 124_439_808 - 1024 * 768 == 123_653_376
  # 6 N + 12 L T D at T = 1024.
  assert flops.flops_per_token(cfg, 1024) == 6 * 123_653_376 + 12 * 12 * 1024 * 768
  assert flops.flops_per_token(cfg, 1024) == 855_166_464


def test_mfu_arithmetic_and_device_table():
  fpt = 855_166_464
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert flops.peak_flops("TPU v4") == 275e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("TPU v6 lite") == 918e12
  # 100k tokens/s on one H100: 100e3 * 855.17e6 / 989e12 = 8.65%.
  assert math.isclose(flops.mfu(100e3, fpt, "NVIDIA H100 80GB HBM3", 1), 0.0864678, rel_tol=1e-5)
  assert math.isclose(flops.mfu(800e3, fpt, "NVIDIA H100 80GB HBM3", 8), 0.0864678, rel_tol=1e-5)
  assert flops.mfu(100e3, fpt, "cpu", 1) is None


def test_mfu_hand_computed_h100():
  # GPT-2 124M at T=1024: N = 123,653,376 -> 6N + 12*12*1024*768 = 855,166,976 FLOPs/token.
  cfg = get_config("gpt2")
  assert flops.flops_per_token(cfg, 1024) == 6 * 123_653_376 + 12 * 12 * 1024 * 768
  # 500K tokens/s on one H100 (989 TFLOP/s) -> 427.58 TFLOP/s -> 43.23% MFU.
  mfu = flops.mfu(500_000, flops.flops_per_token(cfg, 1024), "NVIDIA H100 80GB HBM3", 1)
  assert mfu == pytest.approx(500_000 * 855_166_976 / 989e12)
  assert mfu == pytest.approx(0.43234, abs=1e-4)
  assert flops.peak_entry("TPU v5 lite") == "tpu v5e"
  assert flops.peak_entry("cpu") is None
