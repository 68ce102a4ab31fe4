"""Where training numbers go: metrics.jsonl, TensorBoard, and a console line.

metrics.jsonl (on gs://: parts, see METRICS_PARTS) holds one JSON object per logged step:
step, loss, lr, grad_norm,
tokens_per_sec, mfu (null where the device's peak is unknown); rows of evaluation steps add
val_loss. Runs of packed examples (training/lm_inputs.py) add scored_tokens (the targets the
loss counted), padding_share (of the step's input tokens) and useful_tokens_per_sec (the
tokens that are not padding, per second: tokens_per_sec x (1 - padding_share)). A mixture of
experts (model/moe.py) adds moe_aux_loss, moe_z_loss, moe_dropped and moe_load (a list: each
expert's share of the routed assignments, averaged over the sparse layers); its `loss` is the
cross-entropy (the objective adds the weighted aux and z losses). `step` counts optimizer
updates: the row of step s describes the s-th update (the loss of its batch before the update,
the learning rate it used) and val_loss is measured on the parameters after it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from etils import epath

from training.workdir import METRICS_NAME

# A remote workdir (gs://...): objects cannot be appended to, so each flush writes the rows
# logged since the last one as a new object METRICS_PARTS/<seq>.jsonl (O(new rows) per flush);
# a resumed run first writes a part holding only {"resume_from": step}, and readers drop the
# rows after that step that earlier parts hold (logged after the checkpoint it resumed from).
METRICS_PARTS = "metrics"
_TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu",
            "useful_tokens_per_sec": "perf/useful_tokens_per_sec",
            "padding_share": "perf/padding_share", "val_loss": "eval/val_loss",
            "moe_aux_loss": "moe/aux_loss", "moe_z_loss": "moe/z_loss",
            "moe_dropped": "moe/dropped"}


def _rows(text: str) -> list[dict[str, Any]]:
  """The JSON lines of `text`; a last line cut short by a killed process is skipped."""
  rows = []
  for line in text.splitlines():
    if line.strip():
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue
  return rows


def _apply(rows: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
  for row in new:
    if "resume_from" in row:
      rows = [r for r in rows if r.get("step", 0) <= row["resume_from"]]
    else:
      rows.append(row)
  return rows


def _parts(workdir: epath.Path) -> list[epath.Path]:
  folder = workdir / METRICS_PARTS
  if not folder.is_dir():
    return []
  return sorted((p for p in folder.iterdir() if p.name.endswith(".jsonl")), key=lambda p: p.name)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Every logged row of a run, in order, each step once: <workdir>/metrics.jsonl, or on a
  remote workdir its metrics/ parts."""
  workdir = epath.Path(workdir)
  if "://" in os.fspath(workdir):
    from training import storage  # pylint: disable=import-outside-toplevel
    storage.forget_listings()
  rows: list[dict[str, Any]] = []
  path = workdir / METRICS_NAME
  if path.exists():
    rows = _apply(rows, _rows(path.read_text()))
  for part in _parts(workdir):
    rows = _apply(rows, _rows(part.read_text()))
  return rows


class MetricsWriter:
  """Appends rows to <workdir>/metrics.jsonl and TensorBoard event files in <workdir>.

  On a resumed run, rows after the resume step (logged by the interrupted run after its last
  checkpoint) and a last line cut short by a kill are dropped first, so the file holds each
  step once. A remote workdir (gs://...) gets a new part object per `flush()` (the loop calls
  it when it saves a checkpoint) and at `close()`: see METRICS_PARTS."""

  def __init__(self, workdir: str | os.PathLike, start_step: int, tensorboard: bool = True):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / METRICS_NAME
    self.remote = "://" in os.fspath(self.path)
    self._pending: list[str] = []
    self._file = None
    if self.remote:
      parts = _parts(self.workdir)
      self._seq = int(parts[-1].name.split(".")[0]) + 1 if parts else 0
      if parts or self.path.exists():
        self._pending.append(json.dumps({"resume_from": start_step}))
        self.flush_rows()
    else:
      lines = []
      if self.path.exists():
        lines = [line for line in self.path.read_text().splitlines()
                 if (step := _row_step(line)) is not None and step <= start_step]
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(line + "\n" for line in lines))
      os.replace(tmp, self.path)
      self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      try:
        self._tb = _summary_writer_cls()(logdir=os.fspath(self.path.parent),
                                         purge_step=start_step + 1)
      except Exception as e:  # pylint: disable=broad-except  (e.g. no GCS client installed)
        print(f"warning: no TensorBoard events ({e})", file=sys.stderr)

  def write(self, row: dict[str, Any]) -> None:
    line = json.dumps(row)
    if self._file is not None:
      self._file.write(line + "\n")
      self._file.flush()
    else:
      self._pending.append(line)
    if self._tb is not None:
      for key, tag in _TB_TAGS.items():
        if row.get(key) is not None:
          self._tb.add_scalar(tag, row[key], row["step"])

  def flush_rows(self) -> None:
    """Remote: the rows since the last flush as the next part object."""
    if self.remote and self._pending:
      part = self.workdir / METRICS_PARTS / f"{self._seq:06d}.jsonl"
      part.write_text("".join(line + "\n" for line in self._pending))
      self._seq += 1
      self._pending = []

  def flush(self) -> None:
    self.flush_rows()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      record = _gcs_record_writer(self._tb) if self.remote else None
      self._tb.close()
      if record is not None:
        # tensorboardX's GCS writer re-uploads its whole file whenever it is flushed, and its
        # __del__ closes (flushes) it again after close(): one upload at close is enough.
        record.flush = lambda: None


def _gcs_record_writer(tb):
  """The object tensorboardX writes a gs:// event file through (None where it differs)."""
  try:
    return tb._get_file_writer().event_writer._ev_writer._py_recordio_writer._writer  # pylint: disable=protected-access
  except AttributeError:
    return None


def _summary_writer_cls():
  """tensorboardX.SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed (seconds) only to accept torch tensors, which scalars from jax never are."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it handles
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
    finally:
      del sys.modules["torch"]
  import tensorboardX  # pylint: disable=import-outside-toplevel,reimported
  return tensorboardX.SummaryWriter


def _row_step(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line cut short by a killed process."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_count(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class Console:
  """One line per logged step (at most one every `interval` seconds, except evaluations):
  step, loss, val loss, tokens/s, MFU and the estimated time left. Silent when quiet."""

  def __init__(self, total_steps: int, start_step: int, quiet: bool = False,
               interval: float = 1.0, stream=None):
    self.total, self.start = total_steps, start_step
    self.quiet, self.interval = quiet, interval
    self.stream = sys.stdout if stream is None else stream
    self._t0 = time.perf_counter()
    self._last = -math.inf

  def info(self, message: str) -> None:
    if not self.quiet:
      print(message, file=self.stream, flush=True)

  def row(self, row: dict[str, Any], train_seconds: float) -> None:
    now = time.perf_counter()
    if self.quiet or ("val_loss" not in row and now - self._last < self.interval):
      return
    self._last = now
    step = row["step"]
    done = step - self.start
    eta = train_seconds / done * (self.total - step) if done > 0 else float("nan")
    parts = [f"step {step}/{self.total}"]
    if row.get("loss") is not None:
      parts.append(f"loss {row['loss']:.4f}")
    if row.get("accuracy") is not None:
      parts.append(f"acc {100 * row['accuracy']:.1f}%")
    if row.get("moe_aux_loss") is not None:  # a mixture of experts (J when balanced)
      parts.append(f"aux {row['moe_aux_loss']:.3f}")
    if row.get("moe_dropped"):
      parts.append(f"dropped {100 * row['moe_dropped']:.1f}%")
    if row.get("val_loss") is not None:
      parts.append(f"val {row['val_loss']:.4f}")
    if row.get("val_accuracy") is not None:
      parts.append(f"val acc {100 * row['val_accuracy']:.1f}%")
    if row.get("val_accuracy/reward") is not None:  # DPO (training/dpo.py: ACCURACIES)
      parts.append(f"val pref acc {100 * row['val_accuracy/reward']:.1f}%")
    if row.get("val_exact_match") is not None:
      parts.append(f"exact match {100 * row['val_exact_match']:.1f}%")
    if row.get("tokens_per_sec") is not None:
      parts.append(f"{format_count(row['tokens_per_sec'])} tok/s")
    if row.get("useful_tokens_per_sec") is not None:
      parts.append(f"{format_count(row['useful_tokens_per_sec'])} useful tok/s "
                   f"({100 * row['padding_share']:.0f}% padding)")
    if row.get("mfu") is not None:
      parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if not math.isnan(eta):
      parts.append(f"ETA {format_duration(eta)}")
    self.info(" | ".join(parts))
