"""training/perf/aot.py and python -m launch.aot: the implied-step-time arithmetic, the report,
and (where libtpu is at hand) real ahead-of-time compiles for TPU slices: GPT-2 124M at its full
size for a v5p-8 (the one test where the size is the point), the rest at the smallest shapes
that still take each path. (Slice names: test_tpu_slices.py.)

The compile needs `jax[tpu]` (libtpu), which the CPU test environment does not have: it runs with
this interpreter if libtpu imports here, else with the python that $FLAXGPT_TPU_PYTHON names
(e.g. a second virtual environment with `pip install -e . "jax[tpu]==<jax version>"`), else it is
skipped.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import exit_status
from configs.gpt3_175b import get_config as gpt3_config
from conftest import REPO
from launch import aot as aot_cli
from model.config import ModelConfig
from model.families import count_params
from sharding import make_mesh, rules_from_config
from training.config_checks import check_values
from training.perf import aot
from training.run import model_config
from training.tpu import slices
from training.tpu.slices import GIB, parse_slice

# ---------------------------------------------------------------------------------------------
# arithmetic and the report


def test_implied_step_time():
  # 6e15 FLOPs on 32 chips of 459 TFLOP/s at 50%: 6e15 / 7.344e15 s.
  assert aot.implied_step_seconds(6e15, 32, 459e12, 0.5) == pytest.approx(0.81699, rel=1e-4)
  assert aot.implied_step_seconds(6e15, 32, 459e12, 1.0) == pytest.approx(0.40850, rel=1e-4)


def test_memory_total_counts_donated_outputs_once():
  m = aot.Memory(arguments=10, outputs=9, aliased=8, temporaries=100, generated_code=3)
  assert m.total == 10 + 1 + 100 + 3


def _report(**changes) -> aot.AotReport:
  fields = dict(
      config_name="gpt2_xl", topology="v5p-64", topology_name="v5p:2x4x4", chips=32, hosts=8,
      num_slices=1, device_kind="TPU v5", mesh={"data": 1, "fsdp": 32, "tensor": 1},
      params=1_557_611_200,
      model=dict(num_layers=48, d_model=1600, num_heads=25, block_size=1024,
                 padded_vocab_size=50304, dtype="bfloat16", scan_layers=True, remat="full"),
      batch_size=512, grad_accum=1, seq_len=1024, state_bytes=int(17.4 * GIB),
      state_bytes_per_chip=int(0.6 * GIB), unsplit=[],
      hbm_bytes_per_chip=95 * GIB, compile_seconds=12.3,
      memory=aot.Memory(int(0.6 * GIB), int(0.6 * GIB), int(0.6 * GIB), 20 * GIB, 10 ** 8),
      compiler_error=None, flops_per_token=9_000_000_000, xla_flops_per_chip=1.0e13,
      xla_counts_loops_once=True, mfu=0.5, peak_flops_per_chip=459e12)
  fields.update(changes)
  return aot.AotReport(**fields)


def test_report_step_time_and_tokens_per_second():
  r = _report()
  assert r.tokens_per_step == 512 * 1024
  assert r.formula_flops_per_step == 9e9 * 512 * 1024
  assert r.step_seconds == pytest.approx(9e9 * 512 * 1024 / (0.5 * 32 * 459e12))
  # tokens/s = MFU x slice peak / FLOPs per token, whatever the batch.
  assert r.tokens_per_sec == pytest.approx(0.5 * 32 * 459e12 / 9e9)
  assert _report(num_slices=2).step_seconds == pytest.approx(r.step_seconds / 2)


def test_report_text_and_json_when_it_fits():
  r = _report()
  assert r.fits
  text = aot.format_report(r)
  for words in ("v5p-64 = 32 chips", "8 hosts", "data=1 x fsdp=32 x tensor=1",
                "temporaries", "fits", "6N+12LTD", "XLA cost_analysis", "an undercount",
                "at 50% MFU (459 TFLOP/s", "compile: 12.3 s", "step time"):
    assert words in text, words
  assert "DOES NOT FIT" not in text
  d = json.loads(json.dumps(r.to_dict()))
  assert d["fits"] and d["memory"]["total"] == r.memory.total
  assert d["step_seconds"] == pytest.approx(r.step_seconds)
  assert d["flops_per_step"] == pytest.approx(1.0e13 * 32)
  assert d["bytes_accessed_per_step"] is None and "bytes accessed" not in text
  with_bytes = _report(xla_bytes_accessed_per_chip=2.5e9)
  assert with_bytes.to_dict()["bytes_accessed_per_step"] == pytest.approx(2.5e9 * 32)
  assert "XLA bytes accessed 2.5 GB per chip per step (loop bodies counted once)" in (
      aot.format_report(with_bytes))


def test_report_when_it_does_not_fit():
  over = _report(memory=aot.Memory(GIB, GIB, GIB, 100 * GIB, 0))
  assert not over.fits
  assert "DOES NOT FIT" in aot.format_report(over)
  oom = _report(memory=None, xla_flops_per_chip=None,
                compiler_error="RESOURCE_EXHAUSTED: Ran out of memory on HBM",
                suggestions=["recompute activations"])
  text = aot.format_report(oom)
  assert not oom.fits
  assert "DOES NOT FIT" in text and "RESOURCE_EXHAUSTED" in text
  assert "to make it fit:\n  - recompute activations" in text


def test_suggestions():
  cfg = ModelConfig(remat="none")
  r = _report(state_bytes_per_chip=60 * GIB, batch_size=4096, grad_accum=2,
              mesh={"data": 4, "fsdp": 8, "tensor": 1})
  tips = aot.suggestions(r, cfg)
  assert "60.00 GiB" in tips[0] and "--config.mesh.fsdp=-1" in tips[0]
  assert "--config.model.remat=full" in tips[1]
  assert "64 sequences per chip" in tips[2] and "--config.train.grad_accum=4" in tips[2]
  assert aot.suggestions(_report(batch_size=32), ModelConfig(remat="full")) == []
  # The state already over all chips: only a larger slice helps it.
  (tip,) = aot.suggestions(_report(state_bytes_per_chip=61 * GIB, batch_size=32),
                           ModelConfig(remat="full"))
  assert "split over all 32 chips already: use a larger slice" in tip


def test_grad_accum_suggestion_keeps_the_micro_batch_divisible():
  # 1536 sequences on 64 chips in 8 micro-batches (3 per chip): 9, 10, 11 do not divide 1536
  # into multiples of 64; 12 gives 2 per chip.
  r = _report(batch_size=1536, grad_accum=8, chips=64, mesh={"data": 1, "fsdp": 64, "tensor": 1})
  (tip,) = aot.suggestions(r, ModelConfig(remat="full"))
  assert "3 sequences per chip" in tip and "--config.train.grad_accum=12 " in tip


def test_unsplit_parameters_are_listed_and_suggested():
  # Width 60, head dim 12 and 101 tokens on fsdp=8: no dimension of the attention kernels, of
  # the width-60 biases or of the embedding is divisible by 8 (the MLP's 240 and the 64
  # positions are).
  cfg = ModelConfig(vocab_size=101, block_size=64, num_layers=2, num_heads=5, d_model=60)
  mesh = make_mesh(1, 8, 1)
  rows = aot._unsplit(cfg, mesh, rules_from_config({}))  # pylint: disable=protected-access
  assert rows == ["h_*/attn/c_attn/kernel [60, 3, 5, 12] (fsdp)",
                  "h_*/attn/c_proj/bias [60] (fsdp)",
                  "h_*/attn/c_proj/kernel [5, 12, 60] (fsdp)",
                  "h_*/mlp/c_proj/bias [60] (fsdp)",
                  "wte/embedding [101, 60] (fsdp)"], rows
  r = _report(unsplit=rows, state_bytes_per_chip=int(6.5 * GIB))
  assert "5 parameter(s) are stored whole" in aot.suggestions(r, ModelConfig(remat="full"))[0]
  assert "not split (the mesh axis does not divide" in aot.format_report(r)


def test_compiler_oom_message_is_recognised():
  e = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                   "for HLO temporaries (910.39G) exceeds available HBM (95.74G).\nmore")
  oom = aot.compiler_oom
  assert oom(e).endswith("(95.74G).")
  assert oom(ValueError("shapes do not match")) is None


# ---------------------------------------------------------------------------------------------
# the program


def _env() -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # the tests' CPU flags (fake devices, no LLVM optimisation)
  # Compiling for a topology touches no TPU, so two compiles may run at once (pytest-xdist's
  # workers): without this, a second process loading libtpu fails on /tmp/libtpu_lockfile.
  env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  return env


def _aot(python: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  return subprocess.run([python, "-m", "launch.aot", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def _aot_error(capsys, *args: str) -> list[str]:
  """launch.aot.main(args) in process, for mistakes caught before anything compiles: its
  stderr lines (the exit status must be 2)."""
  assert exit_status(aot_cli.main, list(args)) == 2
  return capsys.readouterr().err.strip().splitlines()


def test_bad_topology_is_one_error_line(capsys):
  assert _aot_error(capsys, "--config", "configs/gpt2.py", "--topology", "v5p-7") == [
      "error: --topology 'v5p-7' is not a v5p slice size: v5p-N counts TensorCores, 8, 16, 32, "
      "64 or a multiple of 128 (v5p-128, v5p-256, ...)."]


@pytest.mark.skipif(slices.libtpu_available(), reason="libtpu is installed here")
def test_without_libtpu_says_how_to_install_it(capsys):
  (line,) = _aot_error(capsys, "--config", "configs/gpt2.py", "--topology", "v5p-8")
  assert line.startswith("error: Compiling for a TPU slice needs libtpu") and "jax[tpu]==" in line


def _tpu_python() -> str:
  """A python with jax[tpu]: this one, else $FLAXGPT_TPU_PYTHON, else the test is skipped."""
  if importlib.util.find_spec("libtpu") is not None:
    return sys.executable
  python = os.environ.get("FLAXGPT_TPU_PYTHON")
  if not python:
    pytest.skip("libtpu is not installed here and FLAXGPT_TPU_PYTHON is not set")
  check = subprocess.run([python, "-c", "import libtpu, jax, flax"], capture_output=True,
                         text=True, timeout=120)
  assert check.returncode == 0, f"FLAXGPT_TPU_PYTHON={python} cannot import libtpu: {check.stderr}"
  return python


GPT2_SMALL_BATCH = ("--config", "configs/gpt2.py", "--config.train.grad_accum=1",
                    "--config.model.scan_layers=True")


@pytest.mark.slow
def test_gpt2_124m_at_full_size_compiles_for_a_v5p_8_and_fits(tmp_path):
  """The one full-size compile: GPT-2 124M's state and step must fit a v5p-8's chips."""
  out = tmp_path / "report.json"
  result = _aot(_tpu_python(), *GPT2_SMALL_BATCH, "--config.train.batch_size=4",
                "--topology", "v5p-8", "--json", str(out))
  assert result.returncode == 0, result.stdout + result.stderr
  assert "v5p-8 = 4 chips (TPU v5, v5p:2x2x1, 1 host)" in result.stdout
  tpu = parse_slice("v5p-8")  # what `launch.tpu create --accelerator_type=v5p-8` plans
  assert (tpu.chips, tpu.hosts) == (4, 1)
  assert "memory per chip (XLA memory_analysis)" in result.stdout
  assert "fits" in result.stdout and "DOES NOT FIT" not in result.stdout
  r = json.loads(out.read_text())
  assert (r["chips"], r["device_kind"], r["mesh"]) == (
      4, "TPU v5", {"data": 4, "fsdp": 1, "tensor": 1, "expert": 1})
  mem = r["memory"]
  # Parameters + 2 AdamW moments in float32, replicated over data=4: ~1.39 GiB on every chip.
  assert mem["arguments"] >= r["state_bytes_per_chip"] > 12 * 124e6
  assert mem["aliased"] >= r["state_bytes_per_chip"]  # the donated state is updated in place
  assert 0 < mem["temporaries"] and r["state_bytes_per_chip"] < mem["total"] < 95 * GIB
  assert r["fits"] and r["compile_seconds"] > 0
  # XLA counts per chip and the scanned layers once: between one layer's and all layers' share.
  formula_per_chip = r["formula_flops_per_step"] / 4
  assert 0.1 * formula_per_chip < r["xla_flops_per_chip"] < 1.1 * formula_per_chip
  assert r["step_seconds"] == pytest.approx(r["formula_flops_per_step"] / (0.5 * 4 * 459e12))


def test_a_batch_too_big_for_the_chips_does_not_fit(tmp_path):
  out = tmp_path / "report.json"
  result = _aot(_tpu_python(), *GPT2_SMALL_BATCH, "--config.train.batch_size=2048",
                "--topology", "v5p-8", "--json", str(out))
  assert result.returncode == 3, result.stdout + result.stderr
  assert "DOES NOT FIT" in result.stdout and "to make it fit:" in result.stdout
  assert "--config.model.remat=full" in result.stdout
  assert "--config.train.grad_accum=2" in result.stdout
  r = json.loads(out.read_text())
  assert not r["fits"] and r["memory"] is None and "HBM" in r["compiler_error"]


def test_the_gpt3_175b_config_is_gpt3():
  c = gpt3_config()
  check_values(c)
  cfg = model_config(c, 50257)
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.block_size) == (
      96, 12288, 96, 128, 2048)
  assert 174e9 < count_params(cfg) < 176e9
  assert c.train.batch_size * cfg.block_size == 3_145_728 and c.optimizer.lr == 6e-5
  assert dataclasses.asdict(cfg)["remat"] == "full" and cfg.scan_layers


# GPT-2's head dim (64) in 2 heads, 1 layer, T = 256 in loss chunks of 128 positions, a 512-token
# vocabulary: the splash kernel and the chunked loss at a size that compiles in seconds.
SPLASH_SMALL = ("--config", "configs/tiny.py", "--config.model.vocab_size=512",
                "--config.model.d_model=128", "--config.model.num_heads=2",
                "--config.model.num_layers=1", "--config.model.block_size=256",
                "--config.train.batch_size=8", "--config.train.loss_chunk=128")


@pytest.mark.parametrize("topology,attention", [("v5litepod-4", "splash"), ("v5p-8", "auto")])
def test_splash_attention_and_chunked_loss_compile_for_tpu(tmp_path, topology, attention):
  """The Pallas splash kernel (under shard_map over the 4 chips' batch split) and the chunked
  loss compile for a v5e and a v5p slice; `auto` picks splash on TPU."""
  out = tmp_path / "report.json"
  result = _aot(_tpu_python(), *SPLASH_SMALL, f"--config.model.attention={attention}",
                "--topology", topology, "--json", str(out))
  assert result.returncode == 0, result.stdout + result.stderr
  assert "attention splash, loss in chunks of 128" in result.stdout
  r = json.loads(out.read_text())
  assert r["model"]["attention"] == "splash" and r["model"]["loss_chunk"] == 128
  assert "vocab 512 from config.model.vocab_size" in result.stdout
  assert r["mesh"]["data"] == 4 and r["fits"]
  assert r["bytes_accessed_per_step"] > 0 and r["xla_counts_loops_once"]


# The train step of a 1-layer model of width 256 (4 heads of GPT-2's 64) on one v5e chip, T = 256,
# compiled for windows as they are, for
# windows whose documents are kept apart (data.document_mask: segment ids from <|endoftext|>,
# derived on the device) and for packed examples ([B, 3 (T + 1)]: tokens | segments | loss
# mask); prints {variant: [bytes accessed, memory total, the kernel line]}.
_PACKED_AOT = """
import json, sys
from configs.tiny import get_config
from model import attention
from training.perf.aot import Memory, xla_bytes_accessed_per_chip
from training.run import build_run
from training.step import compile_train_step
from training.tpu.slices import parse_slice, topology_devices
out = {}
for name in ("plain", "document_mask", "packed"):
  c = get_config()
  c.model.vocab_size, c.model.d_model, c.model.num_heads = 512, 256, 4
  c.model.num_layers, c.model.block_size, c.model.attention = 1, 256, "splash"
  c.train.batch_size, c.data.tokenizer = 8, "gpt2"
  c.data.document_mask = name == "document_mask"
  run = build_run(c, devices=topology_devices(parse_slice("v5litepod-1")), read_data=False)
  B, W = run.batch_shape
  layout = "packed" if name == "packed" else run.layout
  shape = (B, 3 * W) if name == "packed" else (B, W)
  compiled = compile_train_step(run.model, run.tx, run.schedule, run.mesh, run.abstract_state,
                                shape, 1, run.rules, 0, 0.0, layout, run.eot_id)
  kernel = attention.describe(run.model, 256, False, "tpu", segments=name != "plain")
  out[name] = [xla_bytes_accessed_per_chip(compiled), Memory.from_compiled(compiled).total,
               kernel]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_packed_step_with_splash_costs_what_the_plain_step_does():
  """Segments through splash (its SegmentIds) compile for a v5e, and the step of packed rows or
  of document masks accesses within 5% of the plain step's bytes and needs within 5% of its
  memory. (Splash takes the segment ids broadcast over the TPU's 128 lanes, B x T x 128 int32
  for the queries and again for the keys: a fixed cost that is 5% of the step at width 128
  and 0.2% at GPT-2 124M's size, 4.87 GB against 4.86.)"""
  result = subprocess.run([_tpu_python(), "-c", _PACKED_AOT], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  r = json.loads(result.stdout.strip().splitlines()[-1])
  assert r["plain"][2] == "splash"
  for name in ("document_mask", "packed"):
    assert r[name][2] == "splash, with segment ids"
    assert abs(r[name][0] / r["plain"][0] - 1) < 0.05, (name, r)
    assert abs(r[name][1] / r["plain"][1] - 1) < 0.05, (name, r)


def test_forced_splash_with_a_bad_length_is_one_error_line():
  result = _aot(_tpu_python(), "--config", "configs/tiny.py", "--config.model.vocab_size=65",
                "--config.model.attention=splash", "--topology", "v5litepod-1")
  assert result.returncode == 2, result.stdout + result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config.model.attention='splash' needs block_size to be a multiple of 128, got 64; "
      "use attention='auto' or 'xla'.")

# ---------------------------------------------------------------------------------------------
# --step decode (training/perf/aot_decode.py)

# (No vocab_size: it comes from the data, tiny shakespeare's 65 characters, as in training.)
TINY_DECODE = ("--step", "decode", "--config", "configs/tiny.py", "--topology", "v5litepod-1",
               "--config.model.block_size=512", "--batch", "8", "--cache_len", "512")


@pytest.mark.parametrize("args,message", [
    (("--batch", "8", "--cache_len", "16"),
     "error: --step train does not take --batch, --cache_len, which are for --step decode"),
    (("--step", "decode", "--batch", "8"), "error: --step decode needs --cache_len"),
    (("--step", "decode", "--batch", "8", "--cache_len", "16", "--mfu", "0.4"),
     "error: --mfu and --num_slices only apply to --step train."),
])
def test_decode_flags_are_checked_before_anything_compiles(args, message, capsys):
  (line,) = _aot_error(capsys, "--config", "configs/tiny.py", "--topology", "v5litepod-1",
                       *args)
  assert line.startswith(message), line


def test_decode_position_outside_the_cache_is_one_error_line():
  result = _aot(_tpu_python(), *TINY_DECODE, "--position", "513")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --position must be an integer in [1, --cache_len=512] (the filled length at which "
      "one step is measured), got 513.")


def test_decode_step_bytes_grow_with_the_position(tmp_path):
  """Position 64 with scan_layers (the counts come from a second compile with the layers
  unrolled), the full cache without: both count every layer and chunk."""
  reports = {}
  for position, scan in ((64, True), (512, False)):
    out = tmp_path / f"decode{position}.json"
    result = _aot(_tpu_python(), *TINY_DECODE, f"--config.model.scan_layers={scan}",
                  "--position", str(position), "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "per decode step per chip" in result.stdout and "fits" in result.stdout
    reports[position] = json.loads(out.read_text())
  small, full = reports[64], reports[512]
  assert (small["cache_chunks"], full["cache_chunks"]) == (1, 4)
  assert small["step"] == "decode" and small["fits"] and small["model"]["scan_layers"]
  assert small["model"]["padded_vocab_size"] == 65
  assert small["model"]["vocab_from"].startswith("the 65 characters of ")
  assert "vocab 65 from the 65 characters of " in result.stdout
  assert "layers unrolled (a second compile" in small["counted"]
  # The cache is donated and updated in place: it comes back in the argument buffers.
  assert small["memory"]["aliased"] >= small["cache_bytes_per_chip"] > 0
  # Every chunk is counted: reading 4 chunks moves and computes more than reading 1.
  assert full["bytes_accessed_per_step"] > small["bytes_accessed_per_step"] > 0
  assert full["flops_per_step"] > small["flops_per_step"] > 0


def test_grouped_query_attention_divides_the_decode_steps_cache(tmp_path):
  """configs/smollm2_135m.py (2 of its 30 layers) with its 3 key/value heads and with full heads
  (9): the KV cache and the cache bytes a step must read are 3 times smaller, the weights a
  little (the K/V projections), and so is the step's memory."""
  reports, stdout = {}, {}
  for kv in (3, 9):
    out = tmp_path / f"kv{kv}.json"
    result = _aot(_tpu_python(), "--step", "decode", "--config", "configs/smollm2_135m.py",
                  "--topology", "v5litepod-1", "--config.model.num_layers=2", "--batch", "16",
                  "--cache_len", "1024", f"--config.model.num_kv_heads={kv}", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    reports[kv], stdout[kv] = json.loads(out.read_text()), result.stdout
  gqa, full = reports[3], reports[9]
  assert "9 heads sharing 3 key/value heads" in stdout[3] and "sharing" not in stdout[9]
  assert "must read per decode step per chip" in stdout[3]
  assert (gqa["model"]["kv_heads"], full["model"]["kv_heads"]) == (3, 9)
  assert full["cache_bytes_per_chip"] == 3 * gqa["cache_bytes_per_chip"] == 3 * (
      2 * 2 * 16 * 1024 * 3 * 64 * 2)  # k and v, 2 layers, batch, slots, 3 heads of 64, bf16
  assert full["cache_read_bytes_per_chip"] == 3 * gqa["cache_read_bytes_per_chip"]
  assert 0 < full["weight_bytes_per_chip"] - gqa["weight_bytes_per_chip"] == (
      2 * 576 * 2 * 6 * 64 * 2)  # the K/V projections of 6 more heads, 2 layers, bf16
  assert gqa["memory"]["total"] < full["memory"]["total"]


def test_llama_compiles_for_tpu_with_splash_and_its_flops_formula(tmp_path):
  """configs/llama3_8b.py at 2 layers of width 256 (8 query heads sharing 2 key/value heads of
  32, SwiGLU 512, T 128), unscanned: splash with grouped heads on the TPU, and XLA's FLOPs per
  chip agree with 6N + 12LTD whose N counts SwiGLU's three matrices and the 2-head K/V
  projections (the 128,256-row head keeps non-matmul FLOPs a small part)."""
  out = tmp_path / "report.json"
  result = _aot(_tpu_python(), "--config", "configs/llama3_8b.py", "--config.model.num_layers=2",
                "--config.model.d_model=256", "--config.model.num_heads=8",
                "--config.model.num_kv_heads=2", "--config.model.d_mlp=512",
                "--config.model.block_size=128", "--config.model.scan_layers=False",
                "--config.model.remat=none", "--config.train.batch_size=16",
                "--config.train.grad_accum=1", "--topology", "v5litepod-8", "--json", str(out))
  assert result.returncode == 0, result.stdout + result.stderr
  r = json.loads(out.read_text())
  assert r["fits"] and r["model"]["attention"] == "splash" and r["model"]["kv_heads"] == 2
  assert "8 heads sharing 2 key/value heads, SwiGLU" in result.stdout
  assert "SwiGLU's three D x F matrices per layer; K/V projections of 2 key/value heads" in (
      result.stdout)
  ratio = r["xla_flops_per_chip"] / (r["formula_flops_per_step"] / 8)
  assert 0.9 < ratio < 1.25, ratio


# The encoder and encoder-decoder base configs' layouts and GPT-2 vocabulary at the smallest
# shapes that keep their paths and FLOPs formulas (width 128 in 2 heads of 64, MLP 512, T 128 for
# the splash kernel, two layers / one of each; at their full widths the same checks took
# minutes). Unscanned, so XLA's per-chip count covers every layer and checks the family's
# FLOPs formula (the 50,304-row vocabulary keeps non-matmul FLOPs a small part).
SMALL_BASE = ("--config.model.d_model=128", "--config.model.num_heads=2",
              "--config.model.d_mlp=512", "--config.model.block_size=128")


@pytest.mark.slow
@pytest.mark.parametrize("config,layers", [
    ("configs/bert_base.py", ("--config.model.num_layers=2",)),
    # and a decoder with its own heads and MLP width (BART's may differ from the encoder's)
    ("configs/transformer_base.py", ("--config.model.num_layers=1",
                                     "--config.model.num_decoder_layers=1",
                                     "--config.model.num_decoder_heads=4",
                                     "--config.model.decoder_d_mlp=256")),
], ids=["bert_base", "transformer_base"])
def test_encoder_and_encoder_decoder_compile_for_tpu(tmp_path, config, layers):
  out = tmp_path / "report.json"
  result = _aot(_tpu_python(), "--config", config, *layers, *SMALL_BASE,
                "--config.model.scan_layers=False", "--config.train.batch_size=16",
                "--config.train.grad_accum=1", "--topology", "v5litepod-8", "--json", str(out))
  assert result.returncode == 0, result.stdout + result.stderr
  r = json.loads(out.read_text())
  assert r["fits"] and r["chips"] == 8
  if "transformer" in config:
    assert "6N+12(Le+2Ld)TD formula" in result.stdout and "xla for the encoder" in result.stdout
    assert "2 heads, decoder 1 layer of 4 heads, MLP 256" in result.stdout
    assert (r["model"]["num_decoder_heads"], r["model"]["decoder_d_mlp"]) == (4, 256)
  else:
    assert "6N+12LTD formula" in result.stdout and r["model"]["attention"] == "xla"
  ratio = r["xla_flops_per_chip"] / (r["formula_flops_per_step"] / 8)
  assert 0.9 < ratio < 1.25, ratio


@pytest.mark.slow
@pytest.mark.parametrize("mesh, moe", [
    (("--config.mesh.expert=1",), ()),  # dropless, megablox (auto on TPU), FSDP over 8 chips
    (("--config.mesh.expert=8",), ("--config.model.capacity_factor=1.25",))])
def test_a_mixture_of_experts_compiles_for_tpu_and_its_flops_formula(tmp_path, mesh, moe):
  """configs/mixtral_8x7b.py at 2 unscanned layers of width 256 (8 experts of 512, the top 2;
  T 128) on a v5p-16: dropless without expert parallelism, and with the experts split over all
  8 chips at a capacity factor of 1.25 (dropless with expert parallelism sizes each chip's
  buffers for the worst case, which XLA counts: README). XLA's FLOPs per chip agree with
  6N + 12LTD from the active parameters."""
  out = tmp_path / "report.json"
  result = _aot(_tpu_python(), "--config", "configs/mixtral_8x7b.py",
                "--config.model.num_layers=2", "--config.model.d_model=256",
                "--config.model.num_heads=8", "--config.model.num_kv_heads=2",
                "--config.model.d_mlp=512", "--config.model.block_size=128",
                "--config.model.scan_layers=False", "--config.model.remat=none",
                "--config.train.batch_size=16", "--config.train.grad_accum=1", *mesh, *moe,
                "--topology", "v5p-16", "--json", str(out))
  assert result.returncode == 0, result.stdout + result.stderr
  r = json.loads(out.read_text())
  assert r["fits"] and r["mesh"]["expert"] == int(mesh[0].split("=")[1])
  assert "2 of 8 experts per token" in result.stdout and "the 2 of 8 experts a token is " \
      "routed to" in result.stdout
  ratio = r["xla_flops_per_chip"] / (r["formula_flops_per_step"] / 8)
  assert 0.9 < ratio < 1.25, ratio
