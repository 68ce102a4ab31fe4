"""Ahead-of-time compilation of one sampling (decode) step for a TPU slice, on a machine
without TPUs: the serving question (does a batch of B rows with an S-slot KV cache fit in the
chips' HBM?) and XLA's FLOPs and bytes accessed per decode step.

    tpu = parse_slice("v5litepod-1")
    report = compile_decode(config, tpu, batch=64, cache_len=512, position=64)
    print(format_decode_report(report)); sys.exit(0 if report.fits else 3)

The step is model/decode/sampling.py's `decode_step` (what each iteration of generate's while_loop
runs): one token per row through the model, its keys and values written into the carried cache
in place, attention over the cache chunks up to `position`, one sampled token per row. The
parameters are in the compute dtype (as served), laid out on the config's mesh with its
logical rules; the decode state (cache, tokens, positions, ...) is split over the batch axes
and donated. Every row sits at the same position: the step writes slot position - 1 and attends
to slots 0 .. position - 1.

Per-step counts: XLA's cost analysis counts a loop body once, so the measured program contains
no loop over cache chunks (the chunks up to `position` are unrolled: GPT's `cache_chunks`, the
same chunk computation as generate's loop) and, with scan_layers, no loop over layers (a second
compile with the layers unrolled gives the counts; memory comes from the config's own program).
"Bytes accessed" overcounts in-place updates: compare programs with each other.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.errors import UserError
from model.kv_cache import cache_chunk_size, init_cache
from model.decode.logits import static_mode
from model.decode.sampling import DecodeState, SamplingSettings, decode_step
from model.families import abstract_params, num_params
from sharding import activate, batch_axes, batch_size_multiple, describe, param_shardings
from training.perf.aot import Memory, compiler_oom, gib, verdict, vocab_from_words
from training.run import build_run
from training.tpu.slices import TpuSlice, check_libtpu, topology_devices

# --sampling: (temperature, top_k, top_p) compiled into the step.
SAMPLING = {"greedy": (0.0, 0, 1.0), "temperature": (1.0, 0, 1.0),
            "top_k_top_p": (1.0, 40, 0.9)}
OUT_LEN = 256  # sampled-token buffer of the state (small; any length gives the same step)


@dataclasses.dataclass
class DecodeReport:
  config_name: str
  topology: str
  chips: int
  device_kind: str
  mesh: dict[str, int]
  params: int
  model: dict[str, Any]
  batch: int
  cache_len: int
  position: int
  sampling: str
  cache_chunks: int  # chunks of chunk_size slots the step reads
  chunk_size: int
  cache_bytes_per_chip: int
  # What one step must read from HBM at least, per chip: every weight once (in the compute
  # dtype) and the KV cache's slots up to the chunks read (all layers, keys and values).
  weight_bytes_per_chip: int
  cache_read_bytes_per_chip: int
  hbm_bytes_per_chip: int
  compile_seconds: float
  memory: Memory | None
  compiler_error: str | None
  flops_per_chip: float | None  # XLA's, every chunk and layer counted
  bytes_accessed_per_chip: float | None
  counted: str  # how loops were made to count

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.memory.total <= self.hbm_bytes_per_chip

  @property
  def flops_per_step(self) -> float | None:
    """XLA's FLOPs of one decode step, all chips together (as in the train report)."""
    return None if self.flops_per_chip is None else self.flops_per_chip * self.chips

  @property
  def bytes_accessed_per_step(self) -> float | None:
    """XLA's bytes accessed by one decode step, all chips together."""
    per_chip = self.bytes_accessed_per_chip
    return None if per_chip is None else per_chip * self.chips

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    if self.memory is not None:
      out["memory"]["total"] = self.memory.total
    out["fits"] = self.fits
    out["flops_per_step"] = self.flops_per_step
    out["bytes_accessed_per_step"] = self.bytes_accessed_per_step
    out["step"] = "decode"
    return out


def check_decode_args(batch: Any, cache_len: Any, position: Any, block_size: int,
                      sampling: str) -> int:
  """The position to measure (cache_len when None); UserError naming a bad flag."""
  for name, value in (("--batch", batch), ("--cache_len", cache_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"{name} must be a positive integer, got {value!r}.")
  if cache_len > block_size:
    raise UserError(f"--cache_len {cache_len} exceeds the model's block_size {block_size}.")
  if position is None:
    position = cache_len
  if isinstance(position, bool) or not isinstance(position, int) or not 1 <= position <= cache_len:
    raise UserError(f"--position must be an integer in [1, --cache_len={cache_len}] (the filled "
                    f"length at which one step is measured), got {position!r}.")
  if sampling not in SAMPLING:
    raise UserError(f"--sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}.")
  return position


def _abstract_state(cfg: ModelConfig, mesh, rules, batch: int, cache_len: int) -> DecodeState:
  rows = NamedSharding(mesh, PartitionSpec(batch_axes(rules) or None))
  cache_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes(rules) or None))
  replicated = NamedSharding(mesh, PartitionSpec())

  def sds(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32)))
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, cache_len))
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  return DecodeState(
      cache=jax.tree_util.tree_map(lambda x: sds(x, cache_sharding), cache),
      token_B=sds(i32(batch), rows), position_B=sds(i32(batch), rows),
      done_B=sds(jax.ShapeDtypeStruct((batch,), bool), rows),
      out_BM=sds(i32(batch, OUT_LEN), rows), step=sds(i32(), replicated),
      row_keys_B=sds(keys, rows))


def _compile(cfg, mesh, rules, params, state, settings, mode, chunks):
  def step(params, state, settings):
    return decode_step(params, state, settings, cfg=cfg, mode=mode, cache_chunks=chunks)

  state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
  with activate(mesh, rules):
    return jax.jit(step, donate_argnums=(1,), out_shardings=state_shardings).lower(
        params, state, settings).compile()


def _cost(compiled) -> tuple[float | None, float | None]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  cost = cost or {}
  return cost.get("flops"), cost.get("bytes accessed")


def compile_decode(config: ml_collections.ConfigDict, tpu: TpuSlice, *, batch: int,
                   cache_len: int, position: int | None = None, sampling: str = "greedy",
                   config_name: str = "", log=print) -> DecodeReport:
  """Validate, compile one decode step for `tpu`, and report. Raises UserError for bad inputs
  (before compiling); a compile that runs out of HBM is a report that does not fit."""
  check_libtpu()
  run = build_run(config, devices=topology_devices(tpu), read_data=False)
  cfg, mesh, rules = run.model, run.mesh, run.rules
  position = check_decode_args(batch, cache_len, position, cfg.block_size, sampling)
  multiple = batch_size_multiple(mesh, rules)
  if batch % multiple:
    raise UserError(f"--batch {batch} must be a multiple of {multiple}, the devices the batch "
                    f"is split over ({describe(mesh)}).")
  chunk = cache_chunk_size(cache_len)
  chunks = -(-position // chunk)
  params = _abstract_params(cfg, mesh, rules)
  state = _abstract_state(cfg, mesh, rules, batch, cache_len)
  temperature, top_k, top_p = SAMPLING[sampling]
  replicated = NamedSharding(mesh, PartitionSpec())
  settings = SamplingSettings(*(jax.ShapeDtypeStruct((), dt, sharding=replicated)
                                for dt in (jnp.float32, jnp.int32, jnp.float32, jnp.int32)))
  mode = static_mode(temperature, top_k, top_p)

  log(f"compiling one decode step for {tpu.name} ({describe(mesh)}): batch {batch}, cache "
      f"{cache_len}, position {position}")
  t = time.perf_counter()
  memory, error, flops, accessed = None, None, None, None
  try:
    compiled = _compile(cfg, mesh, rules, params, state, settings, mode, chunks)
    memory = Memory.from_compiled(compiled)
    if cfg.scan_layers:  # the counts from the same step with the layers unrolled
      loop_cfg = cfg.replace(scan_layers=False)
      compiled = _compile(loop_cfg, mesh, rules, _abstract_params(loop_cfg, mesh, rules), state,
                          settings, mode, chunks)
    flops, accessed = _cost(compiled)
  except Exception as e:  # pylint: disable=broad-except  (only HBM exhaustion is a result)
    error = compiler_oom(e)
    if error is None:
      raise
  seconds = time.perf_counter() - t
  counted = (f"{chunks} cache chunk(s) of {chunk} slots unrolled"
             + ("; layers unrolled (a second compile; scan_layers counts one layer)"
                if cfg.scan_layers else "; layers unrolled (scan_layers=False)"))
  shard_bytes = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                 for x in jax.tree_util.tree_leaves(tree))
  cache_bytes = shard_bytes(state.cache)
  cache_read = cache_bytes * min(chunks * chunk, cache_len) // cache_len
  return DecodeReport(
      config_name=config_name, topology=tpu.name, chips=tpu.chips,
      device_kind=mesh.devices.flat[0].device_kind, mesh=dict(mesh.shape),
      params=num_params(params),
      model={**{k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads", "block_size",
                                             "padded_vocab_size", "dtype", "scan_layers")},
             "kv_heads": cfg.kv_heads,
             "vocab_from": run.vocab_from},
      batch=batch, cache_len=cache_len, position=position, sampling=sampling,
      cache_chunks=chunks, chunk_size=chunk, cache_bytes_per_chip=cache_bytes,
      weight_bytes_per_chip=shard_bytes(params), cache_read_bytes_per_chip=cache_read,
      hbm_bytes_per_chip=tpu.hbm_bytes, compile_seconds=seconds, memory=memory,
      compiler_error=error, flops_per_chip=flops, bytes_accessed_per_chip=accessed,
      counted=counted)


def _abstract_params(cfg: ModelConfig, mesh, rules):
  """Parameter shapes in the compute dtype (as served) with the model's logical shardings."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, cfg.compute_dtype, sharding=s),
      abstract_params(cfg), param_shardings(cfg, mesh, rules))


def _kv_words(model: dict[str, Any]) -> str:
  kv = model.get("kv_heads", model["num_heads"])
  return "" if kv == model["num_heads"] else f" sharing {kv} key/value heads"


def format_decode_report(r: DecodeReport) -> str:
  m = r.model
  mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items() if k != "expert" or v > 1)
  lines = [
      f"model: {r.config_name + ' ' if r.config_name else ''}{r.params / 1e6:.1f}M parameters "
      f"({m['num_layers']} layers, width {m['d_model']}, {m['num_heads']} heads"
      f"{_kv_words(m)}, vocab {m['padded_vocab_size']}"
      f"{vocab_from_words(m)}), "
      f"{m['dtype']} compute and parameters, scan_layers={m['scan_layers']}",
      f"slice: {r.topology} = {r.chips} chips ({r.device_kind}), mesh {mesh}",
      f"decode step: batch {r.batch}, cache {r.cache_len} slots, at position {r.position} "
      f"({r.cache_chunks} chunk(s) of {r.chunk_size} read), sampling {r.sampling}",
      f"compile: {r.compile_seconds:.1f} s",
      "",
      "memory per chip (XLA memory_analysis):",
  ]
  hbm = r.hbm_bytes_per_chip
  if r.memory is not None:
    mem = r.memory
    lines += [
        f"  arguments        {gib(mem.arguments):>12}  (parameters + decode state; KV cache "
        f"{gib(r.cache_bytes_per_chip)})",
        f"  outputs          {gib(mem.outputs):>12}  ({gib(mem.aliased)} of it in the donated "
        f"state's buffers)",
        f"  temporaries      {gib(mem.temporaries):>12}",
        f"  generated code   {gib(mem.generated_code):>12}",
        f"  total            {gib(mem.total):>12}  of {gib(hbm)} HBM "
        f"({100 * mem.total / hbm:.0f}%): {verdict(mem.total, hbm)}",
    ]
  else:
    lines.append(f"  DOES NOT FIT in {gib(hbm)} HBM; the compiler says: {r.compiler_error}")
  lines += [
      "",
      f"must read per decode step per chip: {r.weight_bytes_per_chip / 1e9:.3f} GB of weights + "
      f"{r.cache_read_bytes_per_chip / 1e9:.3f} GB of KV cache (slots up to "
      f"{min(r.cache_chunks * r.chunk_size, r.cache_len)}, every layer) = "
      f"{(r.weight_bytes_per_chip + r.cache_read_bytes_per_chip) / 1e9:.3f} GB: the floor of a "
      f"step's HBM traffic",
  ]
  if r.flops_per_chip is not None:
    lines += [
        "",
        f"per decode step per chip (XLA cost_analysis; {r.counted}):",
        f"  FLOPs            {r.flops_per_chip / 1e9:>10.2f} G",
        f"  bytes accessed   {r.bytes_accessed_per_chip / 1e9:>10.2f} GB  (counts in-place "
        f"updates as full reads and writes: compare programs, not bandwidth)",
    ]
  return "\n".join(lines)
