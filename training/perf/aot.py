"""Ahead-of-time compilation of the training step for a TPU slice, on a machine without TPUs.

    tpu = parse_slice("v5p-64")                  # training/tpu/slices.py: 32 chips, v5p:2x4x4
    report = compile_for_topology(config, tpu)   # minutes for big models
    print(format_report(report)); sys.exit(0 if report.fits else 3)

The config is built into a Run (training/run.py, the same checks as `launch.train`) whose mesh
is laid over the slice's compile-only devices (from libtpu; see training/tpu/slices.py), and the
same sharded train step that `launch.train` runs (Run.compile_train_step) is lowered from
abstract shapes and compiled by the TPU compiler here. That gives the memory each chip needs
(compiled.memory_analysis()) and XLA's FLOP count before renting the slice.

Numbers to read with care:
- Memory "total" is arguments + outputs - outputs aliased to the donated arguments +
  temporaries + generated code, per chip; the verdict compares it with the chip's nominal HBM
  (v4 32 GiB, v5e 16, v5p 95, v6e 32). XLA's own peak estimate is shown too (it is lower).
  A compile whose temporaries alone exceed the HBM fails in the compiler; that is reported as
  "does not fit" with the compiler's numbers.
- XLA's cost analysis counts FLOPs per chip (an unscanned GPT-2 gives the formula's per-chip
  value within 1%), but counts the body of a loop once: with scan_layers or grad_accum > 1 it
  misses the repeated layers / micro-batches / loss chunks (train.loss_chunk). The step time at
  a given MFU comes from the 6N + 12LTD formula (training/perf/flops.py) and the chips' dense
  bf16 peak.
- XLA's "bytes accessed" (bytes_accessed_per_step) counts loop bodies once too, and overcounts
  in-place updates: compare programs with each other, never with HBM bandwidth.
- A Pallas kernel (splash attention, model/attention.py) is a custom call: XLA's cost analysis
  counts 0 FLOPs for it (splash passes no cost estimate to pallas_call) and only its operands'
  and results' bytes, not its re-reads of key/value blocks; with it, XLA's FLOPs leave the
  attention's own work out (docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import ml_collections

from model import attention, grouped_matmul
from model.config import ModelConfig
from model.errors import UserError
from model.families import count_params, num_params
from sharding import BATCH_AXES, abstract_model_params, describe, placements
from training.perf import flops
from training.adapters import REFERENCE, split_trainable
from training.run import build_run
from training.tpu.slices import GIB, TpuSlice, check_libtpu, topology_devices


# --- what a compile tells ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per chip from compiled.memory_analysis(). Outputs aliased to donated arguments (the
  new training state) take no extra space."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  generated_code: int
  peak: int | None = None  # XLA's own peak estimate, where the runtime reports one

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @classmethod
  def from_compiled(cls, compiled) -> "Memory":
    m = compiled.memory_analysis()
    return cls(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
               generated_code=m.generated_code_size_in_bytes,
               peak=getattr(m, "peak_memory_in_bytes", None))


def implied_step_seconds(flops_per_step: float, chips: int, peak_per_chip: float,
                         mfu: float) -> float:
  """Seconds per step if the slice reaches `mfu` of its dense bf16 peak."""
  return flops_per_step / (mfu * chips * peak_per_chip)


def _xla_cost(compiled, key: str) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  value = (cost or {}).get(key)
  return float(value) if value is not None and value >= 0 else None


def xla_flops_per_chip(compiled) -> float | None:
  return _xla_cost(compiled, "flops")


def xla_bytes_accessed_per_chip(compiled) -> float | None:
  """XLA's "bytes accessed" (it overcounts in-place updates: compare programs, not HBM)."""
  return _xla_cost(compiled, "bytes accessed")


@dataclasses.dataclass
class AotReport:
  """Everything `launch.aot` prints (and writes with --json)."""
  config_name: str
  topology: str
  topology_name: str
  chips: int
  hosts: int
  num_slices: int
  device_kind: str
  mesh: dict[str, int]
  params: int
  model: dict[str, Any]
  batch_size: int
  grad_accum: int
  seq_len: int
  state_bytes: int  # parameters + optimizer state, all chips together
  state_bytes_per_chip: int  # the largest shard of it, from shapes
  unsplit: list[str]  # parameters a mesh axis could not split ("path [shape] (axes)")
  hbm_bytes_per_chip: int
  compile_seconds: float
  memory: Memory | None  # None when the compiler ran out of memory
  compiler_error: str | None
  flops_per_token: int  # 6N + 12LTD
  xla_flops_per_chip: float | None
  xla_counts_loops_once: bool
  mfu: float
  peak_flops_per_chip: float
  xla_bytes_accessed_per_chip: float | None = None
  suggestions: list[str] = dataclasses.field(default_factory=list)
  # The training state per chip in parts: "parameters" (the model's; a LoRA run's base and
  # adapters), "frozen" (of them: a LoRA base, a DPO reference copy), "optimizer state"
  trained_params: int | None = None  # what the optimizer trains (LoRA: the adapters)
  state_parts_per_chip: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def total_chips(self) -> int:
    return self.chips * self.num_slices

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  @property
  def formula_flops_per_step(self) -> float:
    """6N + 12LTD FLOPs per token times the step's tokens (what MFU is computed from)."""
    return float(self.flops_per_token) * self.tokens_per_step

  @property
  def flops_per_step(self) -> float | None:
    """XLA's FLOPs, all chips together (loop bodies counted once; see xla_counts_loops_once)."""
    return None if self.xla_flops_per_chip is None else self.xla_flops_per_chip * self.total_chips

  @property
  def bytes_accessed_per_step(self) -> float | None:
    """XLA's bytes accessed, all chips together (loop bodies counted once, as for FLOPs)."""
    per_chip = self.xla_bytes_accessed_per_chip
    return None if per_chip is None else per_chip * self.total_chips

  @property
  def step_seconds(self) -> float:
    return implied_step_seconds(self.formula_flops_per_step, self.total_chips,
                                self.peak_flops_per_chip, self.mfu)

  @property
  def tokens_per_sec(self) -> float:
    return self.tokens_per_step / self.step_seconds

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.memory.total <= self.hbm_bytes_per_chip

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    if self.memory is not None:
      out["memory"]["total"] = self.memory.total
    for name in ("total_chips", "tokens_per_step", "formula_flops_per_step", "flops_per_step",
                 "bytes_accessed_per_step", "step_seconds",
                 "tokens_per_sec", "fits"):
      out[name] = getattr(self, name)
    return out


def _state_bytes(abstract_state) -> tuple[int, int]:
  """(bytes in all, bytes per chip) of a pytree of ShapeDtypeStructs with shardings."""
  leaves = jax.tree_util.tree_leaves(abstract_state)
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
  return total, sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                    for x in leaves)


def _unsplit(cfg: ModelConfig, mesh, rules) -> list[str]:
  """Parameters (and so their AdamW moments) that a mesh axis of their rule does not divide:
  they are stored whole on that axis, e.g. GPT-2 XL's attention kernels on fsdp=256."""
  rows = {}
  for r in placements(abstract_model_params(cfg), mesh, rules):
    if r.unused_axes:
      path = re.sub(r"h_\d+", "h_*", r.path)
      rows.setdefault(f"{path} [{', '.join(map(str, r.shape))}] ({', '.join(r.unused_axes)})")
  return list(rows)


def compiler_oom(error: Exception) -> str | None:
  """The compiler's one-line message if `error` says the program needs more HBM than a chip
  has, else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" in text or re.search(r"(?i)out of memory", text):
    return text.strip().splitlines()[0]
  return None


def suggestions(report: AotReport, cfg: ModelConfig) -> list[str]:
  """What to change when a config does not fit, most effective first."""
  out = []
  data, tensor = report.mesh["data"], report.mesh["tensor"]
  chips = report.total_chips
  if report.unsplit and report.state_bytes_per_chip > 2 * report.state_bytes / chips:
    out.append(f"{len(report.unsplit)} parameter(s) are stored whole on some chips (see \"not "
               f"split\"): choose mesh sizes that divide their dimensions (e.g. fewer fsdp and "
               f"more data devices) or pad them (model.padded_vocab_size)")
  if report.state_bytes_per_chip > 0.5 * report.hbm_bytes_per_chip:
    where = ("shard it over all chips: --config.mesh.data=1 --config.mesh.fsdp=-1"
             if data > 1 else f"it is split over all {chips} chips already: use a "
             f"larger slice (or --num_slices)")
    out.append(f"the parameters and AdamW state alone take {gib(report.state_bytes_per_chip)} "
               f"per chip; {where}")
  if cfg.remat == "none":
    out.append("recompute activations in the backward pass: --config.model.remat=full")
  B, k = report.batch_size, report.grad_accum
  dp = math.prod(report.mesh.get(name, 1) for name in BATCH_AXES)
  if B // k // dp > 1:
    more = [n for n in range(k + 1, B // dp + 1) if B % n == 0 and (B // n) % dp == 0]
    accum = f"--config.train.grad_accum={more[0]} (same batch) or " if more else ""
    shard = "chip" if tensor == 1 else f"{tensor} tensor-parallel chips"
    out.append(f"a smaller micro-batch ({B // k // dp} sequences per {shard} now): {accum}a "
               f"smaller --config.train.batch_size")
  elif data > 1 and len(out) == 0:
    out.append("more FSDP: --config.mesh.data=1 --config.mesh.fsdp=-1")
  return out


def compile_for_topology(config: ml_collections.ConfigDict, tpu: TpuSlice, *,
                         mfu: float = 0.5, num_slices: int = 1, config_name: str = "",
                         log=print) -> AotReport:
  """Validate `config` for `tpu`, compile its train step for it, and report. Raises UserError
  for bad inputs (before compiling); a compile that runs out of HBM is a report that does not
  fit, not an error."""
  if not 0 < mfu <= 1:
    raise UserError(f"--mfu must be in (0, 1], got {mfu}.")
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
    raise UserError(f"--num_slices must be a positive integer, got {num_slices!r}.")
  check_libtpu()
  # The data is not read (it may only exist on the pod); the vocabulary must be known.
  run = build_run(config, devices=topology_devices(tpu, num_slices), read_data=False)
  cfg, mesh = run.model, run.mesh
  abstract = run.abstract_state  # shapes only: the topology's devices cannot run anything
  state_bytes, state_per_chip = _state_bytes(abstract)
  trained, frozen = split_trainable(cfg, abstract.params)
  parts = {"parameters": _state_bytes(abstract.params)[1], "frozen": _state_bytes(frozen)[1],
           "optimizer state": _state_bytes(abstract.opt_state)[1]}
  grad_accum = run.config.train.grad_accum
  loss_chunk = run.loss_chunk if 0 < run.loss_chunk < run.seq_len else 0

  log(f"compiling the train step for {tpu.name} ({describe(mesh)}); this can take minutes")
  t = time.perf_counter()
  memory, error, xla_flops, xla_bytes = None, None, None, None
  try:
    compiled = run.compile_train_step()
    memory, xla_flops = Memory.from_compiled(compiled), xla_flops_per_chip(compiled)
    xla_bytes = xla_bytes_accessed_per_chip(compiled)
  except Exception as e:  # pylint: disable=broad-except  (only HBM exhaustion is a result)
    error = compiler_oom(e)
    if error is None:
      raise
  seconds = time.perf_counter() - t

  report = AotReport(
      config_name=config_name, topology=tpu.name, topology_name=tpu.topology_name,
      chips=tpu.chips, hosts=tpu.hosts, num_slices=num_slices,
      device_kind=mesh.devices.flat[0].device_kind, mesh=dict(mesh.shape),
      params=num_params(trained) + (0 if REFERENCE in frozen else num_params(frozen)),
      trained_params=num_params(trained), state_parts_per_chip=parts,
      model={**{k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads",
                                             "block_size", "padded_vocab_size", "dtype",
                                             "scan_layers", "remat")},
             "family": cfg.family, "vocab_from": run.vocab_from, "kv_heads": cfg.kv_heads,
             "activation": cfg.activation, "formula": flops.formula(cfg),
             **({"num_experts": cfg.num_experts, "experts_per_token": cfg.num_experts_per_tok,
                 "active_params": count_params(cfg, active=True),
                 "moe": moe_words(cfg, mesh)} if cfg.num_experts else {}),
             **({"num_decoder_layers": cfg.decoder_layers, "num_decoder_heads": cfg.decoder_heads,
                 "decoder_d_mlp": cfg.decoder_mlp} if cfg.family == "encdec" else {}),
             # the kernel the no-cache causal attention runs on this slice (model/attention.py;
             # with segments, the prefix-LM mask); bidirectional and cross-attention (bert, the
             # encdec encoder) always run XLA's
             "attention": ("xla" if cfg.family == "bert" else attention.describe(
                 cfg, run.seq_len, cfg.attn_dropout > 0, "tpu", segments=run.segments,
                 prefix=cfg.prefix_lm)),
             "loss_chunk": loss_chunk},
      batch_size=run.config.train.batch_size, grad_accum=grad_accum, seq_len=run.seq_len,
      state_bytes=state_bytes, state_bytes_per_chip=state_per_chip,
      unsplit=_unsplit(cfg, mesh, run.rules), hbm_bytes_per_chip=tpu.hbm_bytes,
      compile_seconds=seconds, memory=memory, compiler_error=error,
      flops_per_token=flops.flops_per_token(cfg, run.seq_len), xla_flops_per_chip=xla_flops,
      xla_counts_loops_once=cfg.scan_layers or grad_accum > 1 or loss_chunk > 0, mfu=mfu,
      peak_flops_per_chip=tpu.peak_flops_per_chip, xla_bytes_accessed_per_chip=xla_bytes)
  if not report.fits:
    report.suggestions = suggestions(report, cfg)
  return report


# --- text --------------------------------------------------------------------------------------

def gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB"


def _flop(n: float) -> str:
  for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.3g} FLOP"


def _count(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.1f}{unit}"
  return f"{n:.0f}"


def _plural(n: int, word: str) -> str:
  return f"{n} {word}" + ("" if n == 1 else "s")


def _duration(seconds: float) -> str:
  if seconds < 1:
    return f"{seconds * 1e3:.1f} ms"
  return f"{seconds:.2f} s"


def verdict(total: int, hbm: int) -> str:
  if total > hbm:
    return "DOES NOT FIT"
  return "fits, with less than 10% to spare" if total > 0.9 * hbm else "fits"


def _kv_words(model: dict) -> str:
  """" sharing G key/value heads" (grouped-query attention), " with SwiGLU" where they apply,
  a mixture of experts' experts."""
  kv = model.get("kv_heads", model["num_heads"])
  return ((f" sharing {kv} key/value heads" if kv != model["num_heads"] else "")
          + (", SwiGLU" if model.get("activation") == "swiglu" else "")
          + (f", {model['experts_per_token']} of {model['num_experts']} experts per token "
             f"({_count(model['active_params'])} active)" if model.get("num_experts") else ""))


def moe_words(cfg: ModelConfig, mesh) -> str:
  """How a mixture of experts is dispatched, and what that does to XLA's FLOP count."""
  ep = mesh.shape.get("expert", 1)
  if cfg.capacity_factor:
    return (f"capacity factor {cfg.capacity_factor:g}: the experts compute "
            f"{cfg.capacity_factor:g}x their share, empty slots included")
  words = f"dropless, the grouped matmuls on {grouped_matmul.kernel(cfg, 'tpu')}"
  if ep > 1:
    words += (f"; with expert parallelism each chip's buffers hold the worst case (every token "
              f"of its expert group routed to its experts: {ep}x its share), which XLA counts")
  if grouped_matmul.kernel(cfg, "tpu") == "ragged_dot":
    words += ("; XLA counts ragged_dot's weight gradient (a ragged contraction) as a dense one "
              "per expert")
  return words


def _formula_name(r: "AotReport") -> str:
  return "6N+12(Le+2Ld)TD" if r.model.get("family") == "encdec" else "6N+12LTD"


def vocab_from_words(model: dict) -> str:
  """" from <where model.vocab_size came from>" where the report knows it."""
  return f" from {model['vocab_from']}" if model.get("vocab_from") else ""


def format_report(r: AotReport) -> str:
  m = r.model
  slices = f" x {r.num_slices} slices" if r.num_slices > 1 else ""
  mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items() if k != "expert" or v > 1)
  accum = f" in {r.grad_accum} micro-batches" if r.grad_accum > 1 else ""
  lines = [
      f"model: {r.config_name + ' ' if r.config_name else ''}{_count(r.params)} parameters "
      f"({_plural(m['num_layers'], 'layer')}, width {m['d_model']}, {m['num_heads']} heads"
      f"{_kv_words(m)}, "
      + (f"decoder {_plural(m['num_decoder_layers'], 'layer')} of {m['num_decoder_heads']} "
         f"heads, MLP {m['decoder_d_mlp']}, " if "num_decoder_heads" in m else "") +
      f"context {m['block_size']}, vocab {m['padded_vocab_size']}{vocab_from_words(m)}), "
      f"{m['dtype']} compute, "
      f"scan_layers={m['scan_layers']}, remat={m['remat']}"
      + (f", attention {m['attention']}" if "attention" in m else "")
      + (" (decoder self-attention; xla for the encoder and cross-attention)"
         if m.get("family") == "encdec" else "")
      + (f", loss in chunks of {m['loss_chunk']}" if m.get("loss_chunk") else ""),
      f"slice: {r.topology}{slices} = {r.total_chips} chips ({r.device_kind}, "
      f"{r.topology_name}, {_plural(r.hosts * r.num_slices, 'host')}), mesh {mesh}",
      f"batch: {r.batch_size} x {r.seq_len} = {r.tokens_per_step:,} tokens per step{accum}",
      f"compile: {r.compile_seconds:.1f} s",
      "",
      "memory per chip (XLA memory_analysis):",
  ]
  hbm = r.hbm_bytes_per_chip
  if r.memory is not None:
    mem = r.memory
    lines += [
        f"  arguments        {gib(mem.arguments):>12}  (training state + batch)",
        f"  outputs          {gib(mem.outputs):>12}  ({gib(mem.aliased)} of it in the donated "
        f"arguments' buffers)",
        f"  temporaries      {gib(mem.temporaries):>12}",
        f"  generated code   {gib(mem.generated_code):>12}",
        f"  total            {gib(mem.total):>12}  of {gib(hbm)} HBM "
        f"({100 * mem.total / hbm:.0f}%): {verdict(mem.total, hbm)}",
    ]
    if mem.peak:
      lines.append(f"  XLA peak estimate {gib(mem.peak):>11}")
  else:
    lines.append(f"  DOES NOT FIT in {gib(hbm)} HBM; the compiler says: {r.compiler_error}")
  lines.append(f"  training state   {gib(r.state_bytes_per_chip):>12}  per chip, from shapes "
               f"({gib(r.state_bytes)} in all; {gib(r.state_bytes / r.total_chips)} if split "
               f"evenly)")
  parts = r.state_parts_per_chip
  if parts:
    frozen = f", {gib(parts['frozen'])} of it frozen" if parts.get("frozen") else ""
    trained = (f" for the {_count(r.trained_params)} trained parameters"
               if r.trained_params is not None and r.trained_params != r.params else "")
    lines.append(f"    parameters     {gib(parts['parameters']):>12}{frozen}; optimizer state "
                 f"{gib(parts['optimizer state'])}{trained}")
  if r.unsplit:
    more = f", and {len(r.unsplit) - 3} more" if len(r.unsplit) > 3 else ""
    lines.append(f"  not split (the mesh axis does not divide any of their dimensions): "
                 f"{'; '.join(r.unsplit[:3])}{more}")
  per_chip = r.formula_flops_per_step / r.total_chips
  lines += [
      "",
      "FLOPs per step:",
      f"  {_formula_name(r)} formula  {_flop(r.formula_flops_per_step)} in all "
      f"({_count(r.flops_per_token)} FLOPs "
      f"per token x {r.tokens_per_step:,} tokens) = {_flop(per_chip)} per chip",
  ]
  if m.get("formula"):
    lines.append(f"    ({m['formula']})")
  if m.get("moe"):
    lines.append(f"    (experts: {m['moe']})")
  if r.xla_flops_per_chip is not None:
    note = (" (counts the scanned layers / micro-batch / loss-chunk loop body once: an "
            "undercount)"
            if r.xla_counts_loops_once else "")
    ratio = r.xla_flops_per_chip / per_chip
    ratio_text = f"{ratio:.2f}" if ratio >= 0.01 else f"{ratio:.1e}"
    lines.append(f"  XLA cost_analysis {_flop(r.xla_flops_per_chip)} per chip "
                 f"({ratio_text}x the formula){note}")
  if r.xla_bytes_accessed_per_chip is not None:
    once = " (loop bodies counted once)" if r.xla_counts_loops_once else ""
    lines.append(f"  XLA bytes accessed {r.xla_bytes_accessed_per_chip / 1e9:.1f} GB per chip per "
                 f"step{once}; overcounts in-place updates, compare programs, not HBM bandwidth")
  peak = r.peak_flops_per_chip
  lines += [
      "",
      f"at {100 * r.mfu:.0f}% MFU ({peak / 1e12:.0f} TFLOP/s bf16 peak per chip x "
      f"{r.total_chips} chips = {_flop(peak * r.total_chips)}/s):",
      f"  step time {_duration(r.step_seconds)}, {_count(r.tokens_per_sec)} tokens/s "
      f"({_count(r.tokens_per_sec / r.total_chips)} per chip)",
  ]
  if not r.fits:
    lines += ["", "to make it fit:"] + [f"  - {s}" for s in r.suggestions]
  return "\n".join(lines)
