"""training/perf/benchmark.py and launch.benchmark on the tiny config (CPU, launch.benchmark.main
in process): both modes run, the JSON has every field, and the config is checked as training
checks it."""

import contextlib
import io
import json
import os

import numpy as np
import pytest

from conftest import exit_status
from launch import benchmark as benchmark_cli
from model.config import get_config
from training.perf import benchmark, flops


def _benchmark(*args):
  """launch.benchmark.main(args) in process: (exit status, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = exit_status(benchmark_cli.main, [str(a) for a in args])
  return status, out.getvalue(), err.getvalue()


# One worker for the whole file, so that the module's benchmark run (the `report` fixture) is
# made once, not once on each xdist worker.
pytestmark = pytest.mark.xdist_group("benchmark")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  status, stdout, stderr = _benchmark(
      "--config", "configs/tiny.py", "--mode", "all", "--json", out, "--steps", "3", "--warmup",
      "1", "--batch_sizes", "1,2", "--new_tokens", "8", "--repeats", "1")
  assert status == 0, stderr[-3000:]
  return json.loads(out.read_text()), stdout


def test_train_fields(report):
  data, stdout = report
  train = data["train"]
  for key in ("compile_s", "step_ms_median", "step_ms_p90", "tokens_per_sec", "tflops_per_sec",
              "mfu", "flops_per_token", "flops_formula", "peak_memory_bytes", "timed_steps"):
    assert key in train
  assert train["timed_steps"] == 3
  assert train["step_ms_p90"] >= train["step_ms_median"] > 0
  assert train["tokens_per_sec"] == pytest.approx(
      train["batch_size"] * train["seq_len"] / (train["step_ms_median"] / 1e3))
  assert train["tflops_per_sec"] == pytest.approx(
      train["tokens_per_sec"] * train["flops_per_token"] / 1e12)
  assert data["device"]["peak_entry"] == "unknown" and train["mfu"] is None  # CPU: no peak
  assert "tokens/s" in stdout and "MFU n/a" in stdout
  # what XLA ran with, and the attention kernel the step used (tiny: no dropout, the CPU)
  from training.step import CPU_COMPILER_OPTIONS  # pylint: disable=import-outside-toplevel
  assert data["device"]["compiler_options"] == CPU_COMPILER_OPTIONS
  assert data["device"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  assert "XLA_FLAGS: " in stdout and "xla_cpu_experimental_ynn_fusion_type" in stdout
  assert train["attention_kernel"] == "dot_product"
  assert "attention kernel: dot_product (model.attention=auto)" in stdout


def test_sample_fields(report):
  data, stdout = report
  rows = data["sample"]
  assert {(r["batch_size"], r["mode"]) for r in rows} == {
      (b, m) for b in (1, 2) for m in ("greedy", "top_k40_top_p0.9")}
  for r in rows:
    assert r["new_tokens"] == 8 and r["prompt_len"] == 16
    assert r["tokens_per_sec"] == pytest.approx(r["batch_size"] * 8 / r["seconds"])
    assert r["achieved_gb_per_sec"] > 0 and r["bytes_per_decode_step"] > 0
    assert r["floor_ms_per_step"] is None  # a CPU: no datasheet bandwidth
  assert "greedy" in stdout and "ms/token" in stdout and "floor ms" in stdout


def test_decode_bytes_counts_params_and_the_cache_chunks_read():
  cfg = get_config("tiny")
  params = {"w": np.zeros((10, 10), np.float32)}
  per_slot = 2 * cfg.num_layers * 4 * cfg.d_model * 4  # k and v, batch 4, float32
  # A 32-slot cache is one chunk: read whole at every step.
  assert benchmark._decode_bytes_per_step(cfg, params, 4, 32, 8, 8) == 400 + 32 * per_slot
  # 256 slots in chunks of 128; 129 decode steps attend to 17 .. 145 slots: 112 steps read one
  # chunk, 17 read two.
  expected = 400 + (112 * 128 + 17 * 256) / 129 * per_slot
  assert benchmark._decode_bytes_per_step(cfg, params, 4, 256, 16, 130) == int(expected)


def test_compare_with_transformers_on_the_same_weights(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = tmp_path / "compare.json"
  status, stdout, stderr = _benchmark(
      "--config", "configs/tiny.py", "--mode", "sample", "--compare", "transformers",
      "--batch_sizes", "1,2", "--new_tokens", "8", "--repeats", "1", "--json", out)
  assert status == 0, stderr[-3000:]
  rows = json.loads(out.read_text())["compare"]
  assert [r["batch_size"] for r in rows] == [1, 2]
  for r in rows:
    assert r["speedup"] == pytest.approx(r["transformers_seconds"] / r["ours_seconds"])
    # Greedy from the same float32 weights: the same tokens.
    assert r["token_agreement"] == 1.0
  assert "speedup" in stdout


def test_compare_needs_the_sample_mode():
  status, _, stderr = _benchmark("--config", "configs/tiny.py", "--compare", "transformers")
  assert status == 2, stderr
  assert stderr.strip().splitlines() == [
      "error: --compare transformers needs --mode sample, got --mode all."]


def test_a_config_training_rejects_is_rejected_in_one_sentence():
  """The benchmark builds its run as training does (training/run.py), so it fails the same way:
  one `error:` line before anything is compiled."""
  status, _, stderr = _benchmark("--config", "configs/tiny.py",
                                 "--config.train.batch_size=12")  # 8 devices
  assert status == 2, stderr
  assert stderr.strip().splitlines() == [
      "error: The micro-batch config.train.batch_size / grad_accum = 12 must be divisible by "
      "the data-parallel size mesh.data x mesh.fsdp = 8."]


@pytest.mark.parametrize("config,formula", [
    ("configs/bert_shakespeare.py", "6N + 12*L*T*D"),
    ("configs/transformer_reverse.py", "6N + 12*(L_enc + 2*L_dec)*T*D per target token"),
], ids=["bert", "encdec"])
def test_encoder_and_encoder_decoder_configs_benchmark_training(tmp_path, config, formula):
  """--mode all is training for them (no GPT decode loop): their batch rows (2T; 2T + 1) and
  their family's FLOPs formula."""
  out = tmp_path / "bench.json"
  status, _, stderr = _benchmark("--config", config, "--json", out, "--steps", "2", "--warmup",
                                 "1", "--config.model.num_layers=1", "--config.model.d_model=32",
                                 "--config.model.num_heads=2", "--config.model.d_mlp=64",
                                 "--config.train.batch_size=8", "--config.mesh.cpu_devices=0")
  assert status == 0, stderr[-3000:]
  data = json.loads(out.read_text())
  assert "sample" not in data and data["train"]["flops_formula"].startswith(formula)
  assert data["train"]["tokens_per_sec"] > 0 and np.isfinite(data["train"]["final_loss"])
  status, _, stderr = _benchmark("--config", config, "--mode", "sample")
  assert status == 2 and "times GPT's KV-cache decode loop" in stderr


def test_a_config_whose_vocabulary_comes_from_its_data_is_timed_with_that_vocabulary(tmp_path):
  """configs/shakespeare_char.py:cpu trains a 65-character model (the vocabulary is the text's
  character table): the benchmark times that model, not one with GPT-2's 50,304 rows, and says
  where its vocabulary came from. (A batch of 8 for the tests' 8 devices; the size of the
  model, its parameters and FLOPs do not depend on it.)"""
  out = tmp_path / "bench.json"
  status, stdout, stderr = _benchmark("--config", "configs/shakespeare_char.py:cpu", "--mode",
                                      "train", "--steps", "1", "--warmup", "1", "--json", out,
                                      "--config.train.batch_size=8")
  assert status == 0, stderr[-3000:]
  data = json.loads(out.read_text())
  vocab = data["vocabulary"]
  assert vocab["size"] == vocab["padded"] == 65
  assert vocab["from"].startswith("the 65 characters of ")
  assert vocab["from"].endswith("tinyshakespeare.txt")
  cfg = get_config("shakespeare-char", num_layers=4, num_heads=4, d_model=128, block_size=64,
                   embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
  assert data["train"]["flops_per_token"] == flops.flops_per_token(cfg, 64)
  assert f"N = {flops.non_embedding_params(cfg):,}" in data["train"]["flops_formula"]
  assert "vocabulary: 65 tokens (the 65 characters of " in stdout


def test_the_report_names_the_host_cpu_and_its_extensions(report):
  """CPU numbers hold for the CPU they were measured on: the report names it."""
  data, stdout = report
  cpu = data["device"]["host_cpu"]
  assert cpu["cores"] >= 1 and isinstance(cpu["extensions"], list)
  assert f"host CPU: {benchmark.describe_host_cpu(cpu)}" in stdout
  xeon = benchmark.host_cpu("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
                            "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
                            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n")
  assert xeon["model"] == "Intel(R) Xeon(R) Platinum 8481C" and xeon["amx"]
  assert xeon["extensions"] == ["AVX-512", "AVX512-BF16", "AMX"]
  xeon["cores"] = 2
  assert benchmark.describe_host_cpu(xeon) == ("Intel(R) Xeon(R) Platinum 8481C, 2 cores, "
                                               "AVX-512, AVX512-BF16, AMX")
  zen = benchmark.host_cpu("model name\t: AMD EPYC\nflags\t\t: avx2 avx512f\n")
  zen["cores"] = 2
  assert benchmark.describe_host_cpu(zen) == "AMD EPYC, 2 cores, AVX-512, no AMX"


def test_decode_floor_and_grouped_heads_bytes():
  """The floor's bandwidth comes from the datasheet table; the cache of a GQA model holds
  its G key/value heads per slot (not d_model values); reading every chunk (a GPU's
  cache_reads) counts the whole cache at every step."""
  from training.perf import flops  # pylint: disable=import-outside-toplevel
  assert flops.peak_bandwidth("NVIDIA H200") == 4.8e12
  assert flops.peak_bandwidth("TPU v5 lite") == 819e9 and flops.peak_bandwidth("cpu") is None
  cfg = get_config("llama-tiny", num_layers=2)  # 8 heads of 32 sharing 2
  params = {"w": np.zeros((10,), np.float32)}
  per_slot = 2 * 2 * 1 * 2 * 32 * 4  # k and v, 2 layers, batch 1, 2 heads of 32, float32
  assert benchmark._decode_bytes_per_step(cfg, params, 1, 256, 8, 8) == 40 + 128 * per_slot
  assert benchmark._decode_bytes_per_step(cfg, params, 1, 256, 8, 8, every_chunk=True) == (
      40 + 256 * per_slot)
