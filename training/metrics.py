"""Where training numbers go: metrics.jsonl, TensorBoard, and a console line.

metrics.jsonl holds one JSON object per logged step: step, loss, lr, grad_norm,
tokens_per_sec, mfu (null where the device's peak is unknown); rows of evaluation steps add
val_loss. `step` counts optimizer updates: the row of step s describes the s-th update (the
loss of its batch before the update, the learning rate it used) and val_loss is measured on the
parameters after it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from etils import epath

METRICS_NAME = "metrics.jsonl"
_TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "tokens_per_sec": "perf/tokens_per_sec", "mfu": "perf/mfu",
            "val_loss": "eval/val_loss"}


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  path = epath.Path(workdir) / METRICS_NAME
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
  """Appends rows to <workdir>/metrics.jsonl and TensorBoard event files in <workdir>.

  On a resumed run, rows after the resume step (logged by the interrupted run after its last
  checkpoint) and a last line cut short by a kill are dropped first, so the file holds each
  step once. A remote workdir (gs://...), where files cannot be appended to, gets the whole file
  rewritten at each `flush()` (the loop calls it when it saves a checkpoint) and at `close()`."""

  def __init__(self, workdir: str | os.PathLike, start_step: int, tensorboard: bool = True):
    self.path = epath.Path(workdir) / METRICS_NAME
    self.remote = "://" in os.fspath(self.path)
    self._lines: list[str] = []
    if self.path.exists():
      self._lines = [line for line in self.path.read_text().splitlines()
                     if (step := _row_step(line)) is not None and step <= start_step]
    self._file = None
    if not self.remote:
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(line + "\n" for line in self._lines))
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
      self._lines.append(line)
    if self._tb is not None:
      for key, tag in _TB_TAGS.items():
        if row.get(key) is not None:
          self._tb.add_scalar(tag, row[key], row["step"])

  def flush(self) -> None:
    if self.remote:
      self.path.write_text("".join(line + "\n" for line in self._lines))
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


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
    if row.get("val_loss") is not None:
      parts.append(f"val {row['val_loss']:.4f}")
    if row.get("tokens_per_sec") is not None:
      parts.append(f"{format_count(row['tokens_per_sec'])} tok/s")
    if row.get("mfu") is not None:
      parts.append(f"mfu {100 * row['mfu']:.1f}%")
    if not math.isnan(eta):
      parts.append(f"ETA {format_duration(eta)}")
    self.info(" | ".join(parts))
