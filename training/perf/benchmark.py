"""Throughput measurements behind `python -m launch.benchmark`: a training step and generation.

    run = build_run(config)   # training/run.py: checked like a training run (synthetic data)
    report = {"device": device_info(), "train": benchmark_train(run),
              "sample": benchmark_sample(run)}

Train: the real sharded train step (training/step.py) of the run on random tokens, compiled
once (timed), a few warm-up steps, then `steps` timed steps each synchronised with
block_until_ready; step time median and p90, tokens/s, model TFLOP/s with FLOPs/token =
6N + 12 L T D (training/perf/flops.py states N), MFU against the device's dense bf16 peak, and
peak device memory where the backend reports it. Runs of packed examples time their real batches
and add the padding share and useful tokens/s (the tokens that are not padding, per second).

Sample: `model.decode.sampling.generate` (prefill + one jitted decode loop) with random
parameters cast to the compute dtype, no end-of-text stop, for several batch sizes, greedy and
with top-k/top-p;
the first call of each shape compiles and is not timed. Achieved memory bandwidth counts, per
decode step, the parameter bytes plus the KV-cache bytes the attention reads (the cache chunks
up to the filled length, model/kv_cache.py, averaged over the steps), over the mean decode-step
time.

Compare (`compare_transformers`): greedy generation against transformers' `generate` on the
same weights, alternating in one run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import attention
from model.config import ModelConfig
from model.errors import UserError
from model.kv_cache import cache_chunk_size
from model.decode.sampling import cache_chunks_for, choose_buckets, generate
from model.families import init_params
from sharding import shard_batch
from training.perf import flops
from training.data.tasks import batch_layout, data_vocabulary, resolve_task
from training.run import Run, build_run
from training.step import CPU_COMPILER_OPTIONS


def random_token_run(config) -> tuple[Run, str]:
  """(run, where its vocabulary comes from): the config built as launch.train builds it, on
  random tokens over the vocabulary the model trains with: config.model.vocab_size, or what
  the configured data gives (its tokenizer or metadata; no tokens are read). An
  encoder-decoder trains on random denoising pairs. What launch.benchmark and launch.breakdown
  time (speed does not depend on the tokens). A task of packed examples (chat, prefix_lm)
  reads its real data instead: how much of each row is padding is the data's."""
  family = config.model.get("family", "gpt")
  task = resolve_task(family, config.data)
  if config.model.get("vocab_size") is not None:
    vocab, where = config.model.vocab_size, "config.model.vocab_size"
  else:
    vocab, where = data_vocabulary(config.data, task)
  if batch_layout(task) == "packed":  # its padding is the data's: time its real batches
    return build_run(config), where
  config.data.source, config.data.vocab_size = "synthetic", vocab
  if family == "encdec":  # synthetic tokens make denoising pairs
    config.data.task = "denoise"
  return build_run(config), where  # applies mesh.cpu_devices before JAX's backends start


def device_info() -> dict[str, Any]:
  dev = jax.devices()[0]
  peak = flops.peak_flops(dev.device_kind)
  return {
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "num_devices": jax.device_count(),
      "peak_entry": _peak_entry(dev.device_kind),
      "peak_tflops_per_device": None if peak is None else peak / 1e12,
      "jax_version": jax.__version__,
      "host_cpu": host_cpu(),
      # what XLA runs with: the user's XLA_FLAGS (never changed here) and the compile options
      # the project adds (training/step.py, the one place)
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "compiler_options": dict(CPU_COMPILER_OPTIONS) if dev.platform == "cpu" else {},
  }


# What decides XLA:CPU's and PyTorch's speed on a CPU, beside the model name: its widest vector
# instructions and matrix units (the names /proc/cpuinfo and lscpu give them).
_CPU_FEATURES = (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"),
                 ("avx2", "AVX2"), ("asimd", "NEON"), ("sve", "SVE"))


def host_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
  """The host's CPU: model name, cores this process may use, and the vector / matrix
  extensions that matter (AVX-512, AVX512-BF16, AMX, ...), read from /proc/cpuinfo (Linux; an
  empty description elsewhere). CPU numbers hold for the CPU they were measured on."""
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() not in fields:
      fields[key.strip()] = value.strip()
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  extensions = [name for flag, name in _CPU_FEATURES if flag in flags]
  if "AVX-512" in extensions and "AVX2" in extensions:
    extensions.remove("AVX2")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {"model": fields.get("model name") or fields.get("Model") or platform.processor(),
          "cores": cores, "extensions": extensions, "amx": "AMX" in extensions}


def describe_host_cpu(cpu: dict[str, Any]) -> str:
  """"AMD EPYC, 2 cores, AVX-512, AVX512-BF16, no AMX"."""
  parts = [cpu["model"] or "unknown CPU", f"{cpu['cores']} cores", *cpu["extensions"]]
  if not cpu["amx"] and any(e.startswith("AVX") for e in cpu["extensions"]):
    parts.append("no AMX")
  return ", ".join(parts)


def _peak_entry(device_kind: str) -> str:
  """The row of training/perf/flops.py's peak table used for this device, or "unknown"."""
  key = flops.peak_entry(device_kind)
  return "unknown" if key is None else f"{key} ({flops.PEAK_BF16_TFLOPS[key]:g} TFLOP/s)"


def peak_memory_bytes() -> int | None:
  """Largest peak_bytes_in_use over local devices (None where the backend has no stats)."""
  peaks = []
  for dev in jax.local_devices():
    try:
      stats = dev.memory_stats()
    except Exception:  # pylint: disable=broad-except  (CPU and some backends)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _percentile(values: list[float], q: float) -> float:
  ordered = sorted(values)
  return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def benchmark_train(run: Run, *, steps: int = 20, warmup: int = 3,
                    profile_dir: str | None = None) -> dict[str, Any]:
  cfg, mesh = run.model, run.mesh
  B, T, k = run.config.train.batch_size, cfg.block_size, run.config.train.grad_accum
  width = run.batch_shape[1]  # T + 1 (gpt), 2T (bert: inputs, targets), 2T + 1 (encdec)

  start = time.perf_counter()
  step_fn = run.compile_train_step()
  compile_s = time.perf_counter() - start
  state = run.create_state()

  rng = np.random.default_rng(0)
  if run.layout == "packed":  # the data's own rows (random_token_run)
    batches = [shard_batch(run.source.get_batch("train", i), mesh) for i in range(2)]
  else:
    batches = [shard_batch(rng.integers(0, cfg.vocab_size, (B, width), dtype=np.int32), mesh)
               for _ in range(2)]
  for i in range(warmup):
    state, metrics = step_fn(state, batches[i % 2])
  jax.block_until_ready(metrics)

  times, padding = [], []
  for i in range(steps):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    padding.append(float(metrics.get("padding_share", 0.0)))
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
    for i in range(3):
      state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()

  median = statistics.median(times)
  tokens_per_sec = B * T / median
  fpt = flops.flops_per_token(cfg, T)
  info = device_info()
  mfu = flops.mfu(tokens_per_sec, fpt, info["device_kind"], jax.device_count())
  return {
      "model": {"layers": cfg.num_layers, "d_model": cfg.d_model, "heads": cfg.num_heads,
                "vocab": cfg.padded_vocab_size, "dtype": cfg.dtype,
                "attention": cfg.attention, "scan_layers": cfg.scan_layers, "remat": cfg.remat},
      # the kernel the training step's causal attention ran (model/attention.py's choice for
      # this platform, length, dropout, segments and prefix, and why auto left the platform's
      # usual one; bidirectional attention is always XLA's einsums)
      "attention_kernel": ("xla" if cfg.family == "bert" else attention.describe(
          cfg, T, cfg.attn_dropout > 0, info["platform"], segments=run.segments,
          prefix=cfg.prefix_lm)),
      "batch_size": B, "seq_len": T, "grad_accum": k,
      "mesh": dict(mesh.shape),
      "compile_s": compile_s,
      "timed_steps": steps,
      "step_ms_median": median * 1e3,
      "step_ms_p90": _percentile(times, 0.9) * 1e3,
      "tokens_per_sec": tokens_per_sec,
      # packed rows: the share of the step's input tokens that is padding, and the others / s
      "padding_share": statistics.mean(padding),
      "useful_tokens_per_sec": tokens_per_sec * (1 - statistics.mean(padding)),
      "flops_per_token": fpt,
      "family": cfg.family,
      "flops_formula": flops.formula(cfg),
      "tflops_per_sec": tokens_per_sec * fpt / 1e12,
      "mfu": mfu,
      "peak_memory_bytes": peak_memory_bytes(),
      "final_loss": float(metrics["loss"]),
  }


def _decode_bytes_per_step(cfg: ModelConfig, params: Any, batch: int, cache_len: int,
                           prompt_len: int, new_tokens: int, every_chunk: bool = False) -> int:
  """Parameters + the cache chunks attention reads, averaged over the decode steps (step i
  attends to prompt_len + i + 1 slots, rounded up to whole chunks; all cache_len slots when
  the steps read `every_chunk`, model.decode.sampling's cache_reads="all"); the cache holds
  the key/value heads' G * K values per slot, layer, keys and values."""
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  chunk = cache_chunk_size(cache_len)
  slots = [cache_len if every_chunk else min(cache_len, -(-(prompt_len + i + 1) // chunk) * chunk)
           for i in range(max(1, new_tokens - 1))]
  kv_bytes = (2 * cfg.num_layers * batch * (sum(slots) / len(slots)) * cfg.kv_heads
              * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize)
  return int(param_bytes + kv_bytes)


@dataclasses.dataclass(frozen=True)
class SampleCase:
  name: str
  temperature: float
  top_k: int
  top_p: float


SAMPLE_CASES = (SampleCase("greedy", 0.0, 0, 1.0), SampleCase("top_k40_top_p0.9", 1.0, 40, 0.9))


def benchmark_sample(run: Run, *, batch_sizes=(1, 8, 64), prompt_len: int = 16,
                     new_tokens: int = 256, repeats: int = 3,
                     cache_reads: str = "auto") -> list[dict[str, Any]]:
  cfg = run.model
  if cfg.family != "gpt":
    raise UserError(f"--mode sample times GPT's KV-cache decode loop; this is a "
                    f"model.family={cfg.family!r} config: use --mode train.")
  new_tokens = min(new_tokens, cfg.block_size - prompt_len)
  if new_tokens < 1:
    raise UserError(f"--prompt_len {prompt_len} leaves no room to generate within block_size "
                    f"{cfg.block_size}.")
  params = init_params(cfg, jax.random.key(run.config.train.seed))
  params = jax.tree_util.tree_map(lambda x: x.astype(cfg.compute_dtype), params)
  rng = np.random.default_rng(0)
  rows = []
  for batch in batch_sizes:
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    buckets = choose_buckets(batch, prompt_len, new_tokens, cfg.block_size)
    for case in SAMPLE_CASES:
      kwargs = dict(max_new_tokens=new_tokens, temperature=case.temperature, top_k=case.top_k,
                    top_p=case.top_p, eot_id=None, cache_reads=cache_reads)
      generate(params, cfg, prompts, seed=0, **kwargs)  # compiles
      seconds = []
      for r in range(repeats):
        result = generate(params, cfg, prompts, seed=r + 1, **kwargs)
        seconds.append(result.seconds)
      best = min(seconds)
      step_s = best / new_tokens
      every_chunk = cache_chunks_for(cache_reads, buckets.cache_len) is not None
      bytes_per_step = _decode_bytes_per_step(cfg, params, buckets.batch, buckets.cache_len,
                                              prompt_len, new_tokens, every_chunk)
      bandwidth = flops.peak_bandwidth(jax.devices()[0].device_kind)
      rows.append({
          "batch_size": batch, "mode": case.name, "prompt_len": prompt_len,
          "new_tokens": new_tokens, "seconds": best, "tokens_per_sec": batch * new_tokens / best,
          "ms_per_token_step": step_s * 1e3, "cache_reads": cache_reads,
          "bytes_per_decode_step": bytes_per_step,
          "achieved_gb_per_sec": bytes_per_step / step_s / 1e9,
          # the step's bytes at the device's datasheet bandwidth: the floor of ms_per_token_step
          "floor_ms_per_step": None if bandwidth is None else bytes_per_step / bandwidth * 1e3,
          "buckets": dict(buckets._asdict()),
      })
  return rows


def format_table(report: dict[str, Any]) -> str:
  dev = report["device"]
  lines = [f"device: {dev['device_kind']} x{dev['num_devices']} ({dev['platform']}), "
           f"peak entry: {dev['peak_entry']}, jax {dev['jax_version']}"]
  if dev.get("host_cpu"):
    lines.append(f"host CPU: {describe_host_cpu(dev['host_cpu'])}")
  if "xla_flags" in dev:
    options = " ".join(f"{k}={v}" for k, v in dev["compiler_options"].items()) or "none"
    lines.append(f"XLA_FLAGS: {dev['xla_flags'] or '(not set)'}; the project's compile options: "
                 f"{options}")
  vocab = report.get("vocabulary")
  if vocab:
    padded = f", padded to {vocab['padded']:,}" if vocab["padded"] != vocab["size"] else ""
    lines.append(f"vocabulary: {vocab['size']:,} tokens{padded} ({vocab['from']})")
  train = report.get("train")
  if train:
    mem = train["peak_memory_bytes"]
    mfu = "n/a" if train["mfu"] is None else f"{100 * train['mfu']:.1f}%"
    lines += [
        "",
        f"train  B={train['batch_size']} T={train['seq_len']} accum={train['grad_accum']} "
        f"mesh={train['mesh']} dtype={train['model']['dtype']}",
        f"  compile {train['compile_s']:.1f} s | step median {train['step_ms_median']:.2f} ms, "
        f"p90 {train['step_ms_p90']:.2f} ms over {train['timed_steps']} steps",
        f"  {train['tokens_per_sec']:,.0f} tokens/s ({train['useful_tokens_per_sec']:,.0f} "
        f"useful: {100 * train['padding_share']:.1f}% padding) | "
        f"{train['tflops_per_sec']:.2f} TFLOP/s | "
        f"MFU {mfu} | peak memory "
        f"{'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'}",
        f"  FLOPs/token {train['flops_per_token']:,} = {train['flops_formula']}",
        f"  attention kernel: {train['attention_kernel']} (model.attention="
        f"{train['model']['attention']})",
    ]
  compare = report.get("compare")
  if compare:
    lines += ["", f"{'greedy':<8}{'batch':>6}{'ours tok/s':>13}{'transformers':>14}{'speedup':>9}"
              f"{'agree':>7}"]
    for row in compare:
      lines.append(f"{'':<8}{row['batch_size']:>6}{row['ours_tokens_per_sec']:>13,.1f}"
                   f"{row['transformers_tokens_per_sec']:>14,.1f}{row['speedup']:>8.2f}x"
                   f"{row['token_agreement']:>7.2f}")
    lines.append(f"  (prompt {compare[0]['prompt_len']}, {compare[0]['new_tokens']} new tokens, "
                 "same weights, alternating in one run; best of repeats, prefill included)")
  sample = report.get("sample")
  if sample:
    lines += ["", f"{'sample':<8}{'batch':>6}  {'mode':<18}{'tokens/s':>12}{'ms/token':>10}"
              f"{'floor ms':>10}{'GB/s':>9}"]
    for row in sample:
      floor = row.get("floor_ms_per_step")
      lines.append(f"{'':<8}{row['batch_size']:>6}  {row['mode']:<18}"
                   f"{row['tokens_per_sec']:>12,.0f}{row['ms_per_token_step']:>10.3f}"
                   f"{'n/a' if floor is None else f'{floor:.3f}':>10}"
                   f"{row['achieved_gb_per_sec']:>9.1f}")
    lines.append(f"  (prompt {sample[0]['prompt_len']}, {sample[0]['new_tokens']} new tokens, "
                 "timing includes the prefill; best of repeats; ms/token is one decode step of "
                 "every row; floor: the weights and the KV cache a step reads at the device's "
                 "datasheet bandwidth, flops.PEAK_HBM_GBPS, n/a where unknown)")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Against transformers' generate (same weights, same run)


def _hf_model(params: Any, cfg: ModelConfig, directory: str):
  """transformers' class of our model's export (GPT2LMHeadModel, LlamaForCausalLM, a mixture
  of experts' ...: model/hf's HF_CLASSES) with our weights (no hub)."""
  # pylint: disable=import-outside-toplevel  (optional dependencies: the "hf" extra)
  import torch
  import transformers
  from model.hf import save_hf
  kind = save_hf(params, cfg, directory)
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
  if dtype is None:
    raise UserError(f"--compare transformers needs model.dtype float32 or bfloat16, got "
                    f"{cfg.dtype!r}.")
  from model.hf import HF_CLASSES
  cls = getattr(transformers, HF_CLASSES[kind])
  return cls.from_pretrained(directory, dtype=dtype).eval()


def _hf_generate(hf_model, prompts_BP: np.ndarray, new_tokens: int) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  input_ids = torch.as_tensor(prompts_BP, dtype=torch.long)
  with torch.inference_mode():
    out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                            do_sample=False, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
  return out[:, prompts_BP.shape[1]:].numpy()


def compare_transformers(run: Run, *, batch_sizes=(1, 8), prompt_len: int = 16,
                         new_tokens: int = 128, repeats: int = 3) -> list[dict[str, Any]]:
  """Greedy generation by `model.decode.sampling.generate` and by transformers' `generate` (dynamic
  KV cache, torch on the CPU) from the same random weights (the run's model in its compute
  dtype, exported with model/hf/gpt2.py), no end-of-text stop, prompt_len random prompt
  tokens and exactly new_tokens new ones per row. Each side compiles / warms up once, then the
  two alternate `repeats` times; the best time of each is reported, with the fraction of new
  tokens on which the two agree (greedy on the same weights: ~1, up to float rounding)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  cfg = run.model
  if new_tokens < 1 or prompt_len + new_tokens > cfg.block_size:
    raise UserError(f"--prompt_len {prompt_len} + --new_tokens {new_tokens} must fit in "
                    f"block_size {cfg.block_size}.")
  params = init_params(cfg, jax.random.key(run.config.train.seed))
  params = jax.tree_util.tree_map(lambda x: x.astype(cfg.compute_dtype), params)
  with tempfile.TemporaryDirectory() as directory:
    hf_model = _hf_model(params, cfg, directory)
  rng = np.random.default_rng(0)
  rows = []
  for batch in batch_sizes:
    prompts_BP = rng.integers(0, cfg.vocab_size, (batch, prompt_len), dtype=np.int64)
    ours = lambda: generate(params, cfg, prompts_BP.tolist(), max_new_tokens=new_tokens,
                            temperature=0.0, eot_id=None)
    theirs = lambda: _hf_generate(hf_model, prompts_BP, new_tokens)
    ours()  # compiles
    theirs()  # warms up
    ours_s, theirs_s = [], []
    for _ in range(repeats):
      t0 = time.perf_counter()
      ours_tokens = np.asarray(ours().tokens)
      ours_s.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      theirs_tokens = theirs()
      theirs_s.append(time.perf_counter() - t0)
    rows.append({
        "batch_size": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "ours_seconds": min(ours_s), "transformers_seconds": min(theirs_s),
        "ours_tokens_per_sec": batch * new_tokens / min(ours_s),
        "transformers_tokens_per_sec": batch * new_tokens / min(theirs_s),
        "speedup": min(theirs_s) / min(ours_s),
        "token_agreement": float(np.mean(ours_tokens == theirs_tokens)),
    })
  return rows
