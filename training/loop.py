"""The training loop: python -m launch.train calls `train(config, workdir)`.

Everything that can be wrong with the inputs is checked first (training/run.py: build_run);
then the train and eval steps are compiled once, the state is restored from the workdir's latest
checkpoint or created sharded, and the loop runs. The host never waits for the step it just
dispatched: metrics are read in groups at logged steps, after the next step is dispatched (and
all of them before an evaluation or a checkpoint). Every step's loss and gradient norm are
checked, so a NaN/Inf stops the run before anything diverged is saved. SIGTERM (preemption)
and SIGINT (Ctrl-C) finish the current step, save a checkpoint and return normally (a second
Ctrl-C raises KeyboardInterrupt at once, without saving); on several processes, a notice reaching any of them
makes all save the same step (jax's preemption sync point). A checkpoint save that fails in the
background stops the run at the next step (CheckpointWriteFailed). A damaged newest checkpoint
is moved aside with a warning and the run resumes from the newest one that restores. Process 0
holds the workdir's lock (training/lock.py) for the whole run and alone writes metrics, events
and config.json; every process saves and restores.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from typing import Any, Collection

import jax
import ml_collections
import numpy as np

from model.errors import UserError
from model.families import num_params
from sharding import describe, is_cpu, process_batch_indices, shard_batch
from training import distributed
from training.adapters import base_meta, check_base, join, split_trainable, trainable_params
from training.checkpoint import Checkpointer, CheckpointWriteFailed
from training.data import prefetch
from training.metrics import Console, MetricsWriter, format_count, format_duration
from training.perf import flops
from training.lock import workdir_lock
from training.run import (CONFIG_NAME, Run, build_run, check_same_model,
                          check_same_tokenizer, config_json)
from training.workdir import missing_folders, remove_empty

__all__ = ["CheckpointWriteFailed", "TrainingDiverged", "train"]


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm became NaN or Inf; the last good checkpoint is kept."""


class StopRequest:
  """Set by SIGTERM or SIGINT (installed only in the main thread); the loop polls it after each
  step. A second SIGINT raises KeyboardInterrupt, which leaves `train` at once, without
  saving or waiting for a save (launch.train then exits with status 130).

  On several processes jax's preemption service takes SIGTERM instead (a Python handler would
  replace its own) and `poll` answers True on every process at the same step."""

  def __init__(self):
    self.requested = False
    self.signal_name = ""

  @contextlib.contextmanager
  def installed(self):
    if (threading.current_thread() is not threading.main_thread()
        or distributed.multi_process()):
      yield self
      return
    def handler(signum, frame):  # pylint: disable=unused-argument
      if signum == signal.SIGINT and self.requested:
        raise KeyboardInterrupt  # `train` returns at once, without waiting for saves
      self.requested, self.signal_name = True, signal.Signals(signum).name
      if signum == signal.SIGINT:
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to exit at once)",
              file=sys.stderr, flush=True)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for sig, old in previous.items():
        signal.signal(sig, old)

  def poll(self, step: int) -> bool:
    """Whether to save and stop after `step` (call once per step, on every process)."""
    if not self.requested and distributed.preemption_sync_point(step):
      self.requested, self.signal_name = True, "a preemption notice"
    return self.requested


def _every(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


# Steps the host may run ahead of the metrics it has read (bounds queued batches in memory).
_MAX_PENDING = 16


class _MetricsReader:
  """Reads finished steps' metrics in groups (one device-to-host transfer per group), stops on
  a NaN/Inf loss or gradient norm, and writes rows for the logged steps."""

  def __init__(self, trainer: "_Trainer", writer, summary: dict, start: int):
    self.t, self.writer, self.summary = trainer, writer, summary
    self.log_every = trainer.run_.config.log.every
    self.row = None  # the last row written
    self.restart_clock(start)
    self.train_seconds = 0.0

  def restart_clock(self, step: int) -> None:
    self.clock_t, self.clock_step = time.perf_counter(), step

  def is_log_step(self, step: int) -> bool:
    return _every(step, self.log_every) or step == self.t.steps

  def read(self, pending: list, hold_last: bool = False) -> None:
    """Read and check `pending` steps; write the rows of logged steps (the last step's row is
    held for log_eval when hold_last)."""
    host = jax.device_get([m for _, m in pending])
    now = time.perf_counter()
    for (step, _), m in zip(pending, host):
      loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        last = self.t.ckpt.latest_step()
        raise TrainingDiverged(
            f"The loss became {loss} (gradient norm {grad_norm}) at step {step}; stopped "
            f"without saving; the last good checkpoint ("
            f"{'step ' + str(last) if last is not None else 'none'}) in "
            f"{self.t.ckpt.directory} is kept.")
    elapsed = now - self.clock_t
    last_step = pending[-1][0]
    tps = (last_step - self.clock_step) * self.t.run_.tokens_per_step / max(elapsed, 1e-9)
    useful = None  # packed rows: the tokens that are not padding, per second
    if "padding_share" in host[-1]:
      useful = sum(1 - float(m["padding_share"]) for m in host) * (
          self.t.run_.tokens_per_step / max(elapsed, 1e-9))
    self.train_seconds += elapsed
    self.summary["train_seconds"] = self.train_seconds
    self.clock_t, self.clock_step = now, last_step
    self.summary["step"], self.summary["loss"] = last_step, float(host[-1]["loss"])
    for (step, _), m in zip(pending, host):
      if self.is_log_step(step) or step == last_step:
        self.row = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                    "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tps,
                    "mfu": flops.mfu(tps, self.t.flops_per_token, self.t.device_kind,
                                     self.t.mesh.devices.size)}
        # the family's metrics (accuracy: masked-token or target-token; packed rows'
        # scored_tokens and padding_share, and their useful_tokens_per_sec; a mixture of
        # experts' losses, and each expert's load as a list)
        self.row.update({k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
                         for k, v in m.items() if k not in ("loss", "lr", "grad_norm")})
        if useful is not None:
          self.row["useful_tokens_per_sec"] = useful
        if self.is_log_step(step) and not (hold_last and step == last_step):
          self._emit(self.row)

  def log_eval(self, step: int, metrics: dict[str, float]) -> None:
    """Add the eval metrics (val_loss, ...) to the row of `step` (the last one read)."""
    self.summary.update(metrics)
    self._emit(dict(self.row, **metrics))

  def log_start(self, metrics: dict[str, float]) -> None:
    """The row of step 0: the eval metrics before the first update (eval.at_start)."""
    self.summary.update(metrics)
    self._emit({"step": 0, **metrics})

  def _emit(self, row: dict) -> None:
    if self.writer is not None:
      self.writer.write(row)
    self.t.console.row(row, self.train_seconds)


def exact_match(params, cfg, pairs, batch_size: int = 256) -> float:
  """The share of (source, target) pairs whose greedy output (model/decode/seq2seq.py) is exactly the
  target."""
  from model.decode import seq2seq  # pylint: disable=import-outside-toplevel
  outs = seq2seq.generate(params, cfg, [s for s, _ in pairs], max_new_tokens=cfg.block_size,
                          batch_size=batch_size)
  return float(np.mean([list(out) == list(tgt) for (out, _), (_, tgt) in zip(outs, pairs)]))


def train(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False,
          force: bool = False, explicit: Collection[str] = ()) -> dict[str, Any]:
  """Train (or resume) the run of `config` in `workdir`. Returns a summary: step, loss,
  val_loss, train_seconds, wall_seconds, preempted. Raises UserError for bad inputs (and when
  another run holds the workdir's lock, unless `force`), TrainingDiverged when the loss becomes
  NaN/Inf and CheckpointWriteFailed when a checkpoint cannot be written. `explicit`: the config
  keys the command line set (build_run: with init_from, the weights give the model's shape)."""
  t_start = time.perf_counter()
  new_folders = missing_folders(workdir)  # a run that fails before saving leaves none of them
  try:
    run = build_run(config, workdir=workdir, explicit=explicit)
    console = Console(run.config.train.steps, 0, quiet=quiet or jax.process_index() != 0)
    # The lock comes first: opening the Checkpointer removes unfinished saves' directories.
    with workdir_lock(run.workdir, force=force):
      ckpt = Checkpointer(run.workdir, keep=run.config.checkpoint.keep)
      failed = False
      try:
        with StopRequest().installed() as stop:
          return _Trainer(run, ckpt, console, t_start).run(stop)
      except (CheckpointWriteFailed, KeyboardInterrupt):
        failed = True
        raise
      finally:
        if not failed:
          ckpt.wait()
          ckpt.close()
  except BaseException:
    remove_empty(new_folders)
    raise


def _write_atomically(path, text: str) -> None:
  """Other processes may read the file meanwhile (build_run's check of a resumed workdir). An
  object store's upload is atomic already (and has no rename)."""
  if "://" in str(path):
    path.write_text(text)
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


class _Trainer:
  """The state of one call of `train` (not saved; everything saved is in the checkpoint)."""

  def __init__(self, run: Run, ckpt: Checkpointer, console: Console, t_start: float):
    self.run_, self.ckpt, self.console, self.t_start = run, ckpt, console, t_start
    c = run.config
    self.steps = c.train.steps
    self.mesh = run.mesh
    self.flops_per_token = flops.flops_per_token(run.model, run.seq_len)
    self.device_kind = jax.devices()[0].device_kind
    self.val_batches = [run.source.get_batch("val", i) for i in range(c.eval.batches)]
    # encdec: the fixed val pairs whose greedy outputs give val_exact_match
    self.match_pairs = (run.source.eval_pairs(c.eval.get("exact_match", 256))
                        if run.model.family == "encdec" and c.eval.batches
                        and c.eval.get("exact_match", 256) != 0 else [])
    self.is_main = jax.process_index() == 0
    # Several CPU devices in one process: let each step finish before the next is dispatched
    # (the next batch is prepared meanwhile). XLA:CPU can deadlock when two queued steps'
    # collectives meet out of order (seen with 2 devices on 2 cores within a few hundred steps).
    self.one_step_at_a_time = is_cpu(self.mesh) and self.mesh.devices.size > 1
    self._check_process_rows()

  def _check_process_rows(self) -> None:
    """The data source gives each process a contiguous block of every global batch; the mesh
    must put exactly those rows on the process's devices."""
    src, c = self.run_.source, self.run_.config
    rows = process_batch_indices(c.train.batch_size, self.mesh, self.run_.rules)
    lo = src.process_index * src.local_batch_size
    if not np.array_equal(rows, np.arange(lo, lo + src.local_batch_size)):
      raise UserError(
          f"config.mesh {describe(self.mesh)} puts {len(rows)} rows of each batch on "
          f"process {src.process_index}'s devices, not its {src.local_batch_size} rows "
          f"{lo}..{lo + src.local_batch_size - 1}; split the processes over mesh.data or "
          f"mesh.fsdp, not mesh.tensor.")

  # --- set-up -----------------------------------------------------------------------------

  def _describe(self) -> None:
    run, info = self.run_, self.console.info
    n_params = num_params(run.saved_abstract_state.params if run.reference else
                          run.abstract_state.params)  # the model's (a DPO reference: a copy)
    m = run.model
    layers = (f"encoder {m.num_layers} layers, {m.num_heads} heads, MLP {m.d_mlp}; decoder "
              f"{m.decoder_layers} layers, {m.decoder_heads} heads, MLP {m.decoder_mlp}"
              if m.family == "encdec" else f"{m.num_layers} layers, {m.num_heads} heads")
    info(f"model: {format_count(n_params)} parameters ({layers}, width {m.d_model}, block "
         f"{m.block_size}, vocab {m.vocab_size}), {m.dtype} compute, "
         f"{format_count(self.flops_per_token)} FLOPs/token")
    if m.lora_rank:
      n_train = num_params(run.saved_abstract_state.params)
      info(f"LoRA: rank {m.lora_rank}, alpha {m.lora_alpha:g} on {m.lora_targets}: "
           f"{format_count(n_train)} trainable parameters, the base of {run.init_from} frozen")
    if run.layout == "preference":
      info(f"DPO: {run.dpo.loss} loss, beta {run.dpo.beta:g}; the reference: "
           + ("the base (the adapters off)" if m.lora_rank else
              f"a frozen copy of {run.init_from or 'the initial weights'}"))
    info(f"mesh: {describe(self.mesh)} ({self.device_kind})")
    info(run.source.describe())
    c = run.config.train
    accum = f" in {c.grad_accum} micro-batches" if c.grad_accum > 1 else ""
    info(f"train: {self.steps} steps of {c.batch_size} x {run.seq_len} tokens{accum}")

  def _restore(self, step: int):
    """(state, meta) of `step`: the model checked first (a different model is a UserError,
    not damage), then the arrays restored and checked against their fingerprints."""
    meta = self.ckpt.read_meta(step)
    where = f"The checkpoint of step {step} in {self.ckpt.directory}"
    check_same_model(meta["model"], self.run_.model, where)
    check_same_tokenizer(meta.get("tokenizer"), self.run_.source.tokenizer, where)
    key = self.run_.frozen_meta_key
    if key is None:
      return self.ckpt.restore(self.run_.abstract_state, step, meta)
    # A LoRA checkpoint holds the adapters, a DPO run's the model without its reference: the
    # frozen part is init_from's, checked to be theirs.
    if self._base is None:
      self._base = self.run_.base_params()
    check_base(meta.get(key), self._base, self.run_.init_from, where)
    state, meta = self.ckpt.restore(self.run_.saved_abstract_state, step, meta)
    self.base_meta = meta.get(key)
    return state.replace(params=join(state.params, self._base)), meta

  def _initial_state(self):
    """(state, start step): restored from the newest checkpoint that restores, else new."""
    self._base = None
    found = self.ckpt.restore_newest(self._restore, move_aside=True)
    self._base = None  # the state holds it now (and donates it to the first step)
    if found is None:
      init = self.run_.init_from
      self.console.info(f"new run in {self.run_.workdir}"
                        + (f", starting from the weights of {init}" if init else ""))
      state = self.run_.create_state()
      if self.run_.frozen_meta_key:
        self.base_meta = base_meta(init, split_trainable(self.run_.model, state.params)[1])
      return state, 0
    step, (state, meta) = found
    self.console.info(f"resumed from the checkpoint of step {step} in {self.ckpt.directory}")
    return state, int(meta["data_position"])

  # --- the loop -----------------------------------------------------------------------------

  def run(self, stop: StopRequest) -> dict[str, Any]:
    self._describe()
    state, start = self._initial_state()
    if start >= self.steps:
      self.console.info(f"nothing to do: the run is at step {start} of {self.steps}")
      return {"step": start, "loss": None, "val_loss": None, "train_seconds": 0.0,
              "preempted": False, "wall_seconds": time.perf_counter() - self.t_start}
    if self.is_main:
      _write_atomically(self.run_.workdir / CONFIG_NAME, config_json(self.run_.config))
    t = time.perf_counter()
    self.train_step = self.run_.compile_train_step()
    self.eval_step = self.run_.compile_eval_step() if self.val_batches else None
    self.console.info(f"compiled the train and eval steps in {time.perf_counter() - t:.1f}s")
    summary = {"step": start, "loss": None, "val_loss": None, "train_seconds": 0.0,
               "preempted": False}
    self.console.start = start
    writer = MetricsWriter(self.run_.workdir, start) if self.is_main else None
    try:
      self._loop(state, start, writer, stop, summary)
    finally:
      if writer is not None:
        writer.close()
    summary["preempted"] = stop.requested
    summary["wall_seconds"] = time.perf_counter() - self.t_start
    tps = (summary["step"] - start) * self.run_.tokens_per_step / max(
        summary["train_seconds"], 1e-9)
    val = summary["val_loss"]
    self.console.info(
        f"{'stopped by ' + stop.signal_name if stop.requested else 'done'}: step "
        f"{summary['step']}, loss {summary['loss']:.4f}"
        + (f", val_loss {val:.4f}" if val is not None else "")
        + f" | {format_duration(summary['wall_seconds'])} in all, "
        f"{format_duration(summary['train_seconds'])} training at {format_count(tps)} tok/s")
    return summary

  def _loop(self, state, start: int, writer, stop: StopRequest, summary: dict):
    c = self.run_.config
    eval_every, ckpt_every = c.eval.every, c.checkpoint.every
    batches = prefetch(self.run_.source, "train", start, count=self.steps - start,
                       depth=c.data.prefetch)
    reader = _MetricsReader(self, writer, summary, start)
    if start == 0 and self.eval_step is not None and c.eval.get("at_start", False):
      reader.log_start(self._evaluate(state.params))  # the starting point's val metrics
    pending = []  # (step, metrics still on the device), not yet read
    try:
      for s in range(start, self.steps):
        batch = shard_batch(next(batches), self.mesh)  # while the previous step runs
        if self.one_step_at_a_time:
          jax.block_until_ready(state)
        state, metrics = self.train_step(state, batch)
        step = s + 1
        self.ckpt.check_save(step)  # a failed background save stops the run here
        pending.append((step, metrics))
        do_eval = self.eval_step is not None and eval_every > 0 and (
            step % eval_every == 0 or step == self.steps)
        stopping = stop.poll(step)
        do_ckpt = _every(step, ckpt_every) or step == self.steps or stopping
        if do_eval or do_ckpt:
          # A boundary: every step up to here is read and checked before it is evaluated or
          # saved, so a checkpoint never holds a diverged state.
          if self.one_step_at_a_time:
            jax.block_until_ready(state)
          reader.read(pending, hold_last=do_eval)
          pending = []
          if do_eval:
            reader.log_eval(step, self._evaluate(state.params))
          if do_ckpt:
            self._save(state, step)
            if writer is not None:
              writer.flush()
          reader.restart_clock(step)
          if stopping:
            break
        elif len(pending) > 1 and (reader.is_log_step(pending[-2][0])
                                   or len(pending) > _MAX_PENDING):
          # Read up to the previous step while the newest one runs.
          reader.read(pending[:-1])
          pending = pending[-1:]
    finally:
      batches.close()

  def _evaluate(self, params) -> dict[str, float]:
    """val_loss (and val_accuracy for bert / encdec; val_exact_match for encdec: the share of
    the fixed val pairs whose greedy output is exactly the target) over the fixed val batches."""
    results = []
    for b in self.val_batches:
      results.append(self.eval_step(params, shard_batch(b, self.mesh)))
      if self.one_step_at_a_time:
        jax.block_until_ready(results[-1])
    host = jax.device_get(results)
    out = {f"val_{k}": float(np.mean([r[k] for r in host])) for k in host[0]}
    if "scored_tokens" in host[0]:  # packed: the loss over all the val batches' scored targets
      counts = [float(r["scored_tokens"]) for r in host]
      out["val_loss"] = float(np.dot([r["loss"] for r in host], counts) / max(sum(counts), 1))
      out["val_scored_tokens"] = sum(counts)
    if "pairs" in host[0]:  # DPO: every metric a mean over all the val batches' pairs
      counts = [float(r["pairs"]) for r in host]
      out = {f"val_{k}": float(np.dot([r[k] for r in host], counts) / max(sum(counts), 1))
             for k in host[0]}
      out["val_pairs"] = sum(counts)
    if self.match_pairs:
      out["val_exact_match"] = exact_match(params, self.run_.model, self.match_pairs)
    return out

  def _save(self, state, step: int) -> None:
    run = self.run_
    meta = {"step": step, "data_position": step, "model": run.model.to_dict(),
            "tokenizer": run.source.tokenizer, "config": run.config.to_dict(),
            "mesh": list(run.mesh_shape)}
    if run.frozen_meta_key:  # what trains, and the name of the frozen part's weights
      state = state.replace(params=trainable_params(run.model, state.params))
      meta[run.frozen_meta_key] = self.base_meta
    self.ckpt.save(step, state, meta)
