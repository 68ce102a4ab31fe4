"""Test setup: 8 fake CPU devices (so every sharding path runs) and the offline data files."""

import os
import pathlib

# 8 fake CPU devices; LLVM optimisation off makes XLA:CPU compiles ~3x faster (tiny models run
# fast either way, and results do not depend on it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("FLAXGPT_DATA_DIR", REPO.parent / "shared" / "data"))
# Offline GPT-2 BPE for model/tokenizer.py (see README, "Offline use").
if (SHARED_DATA / "gpt2.tiktoken").exists():
  os.environ.setdefault("FLAXGPT_GPT2_BPE", str(SHARED_DATA / "gpt2.tiktoken"))

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare_path(shared_data) -> pathlib.Path:
  path = shared_data / "tinyshakespeare.txt"
  if not path.exists():
    pytest.skip(f"{path} not found (set FLAXGPT_DATA_DIR)")
  return path
