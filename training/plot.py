"""Loss curves of training runs as a figure (behind `launch.plot`), and a mixture of experts'
load.

    runs = read_runs(["runs/a", "runs/b"])   # metrics through training.metrics.read_metrics
    plot_runs(runs, "loss.png", x="tokens")
    plot_expert_load(read_runs(["runs/moe"], "moe_load"), "load.png")   # each expert's share
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from model.errors import UserError
from training.metrics import METRICS_NAME, read_metrics
from training.run import CONFIG_NAME

FORMATS = (".png", ".svg", ".pdf")


@dataclasses.dataclass(frozen=True)
class RunCurves:
  label: str
  steps: list[int]
  loss: list[float]
  val_steps: list[int]
  val_loss: list[float]
  tokens_per_step: int | None  # from config.json; None if it has none
  # a mixture of experts: the logged steps' moe_load (each expert's share of the assignments)
  load_steps: list[int] = dataclasses.field(default_factory=list)
  load: list[list[float]] = dataclasses.field(default_factory=list)


def check_out(out: str) -> str:
  """`out` if an image can be written there: a known extension, an existing folder."""
  ext = os.path.splitext(out)[1].lower()
  if ext not in FORMATS:
    raise UserError(f"--out {out!r} must end in {', '.join(FORMATS)}.")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise UserError(f"--out {out!r}: the folder {folder!r} does not exist.")
  if os.path.isdir(out):
    raise UserError(f"--out {out!r} is a folder.")
  return out


def _tokens_per_step(run_dir: str) -> int | None:
  from etils import epath  # pylint: disable=import-outside-toplevel  (local or gs://)
  try:
    c = json.loads((epath.Path(run_dir) / CONFIG_NAME).read_text())
    return int(c["train"]["batch_size"]) * int(c["model"]["block_size"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


# The metric a mixture of experts logs as a list (each expert's share of the routed tokens):
# drawn by plot_expert_load, one line per expert.
LOAD_METRIC = "moe_load"


def read_runs(run_dirs: Sequence[str], metric: str = "loss") -> list[RunCurves]:
  """Each run's logged train and validation losses (or `metric` and val_`metric`, e.g. DPO's
  rewards/accuracies), and a mixture of experts' load; UserError for a missing folder, one
  without metrics or one that logs no `metric`."""
  runs = []
  for run_dir in run_dirs:
    if "://" not in run_dir and not os.path.isdir(run_dir):
      raise UserError(f"Run folder {run_dir!r} does not exist.")
    try:
      rows = read_metrics(run_dir)
    except ValueError as e:
      raise UserError(f"{run_dir}/{METRICS_NAME} is not readable as JSON lines ({e}).") from None
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    if not rows:
      raise UserError(f"Run folder {run_dir!r} has no metrics ({METRICS_NAME} is missing or "
                      f"empty); train first with python -m launch.train --workdir {run_dir}.")
    load = [r for r in rows if isinstance(r.get(LOAD_METRIC), list)]
    if metric == LOAD_METRIC and not load:
      raise UserError(f"Run folder {run_dir!r} logged no expert load ({LOAD_METRIC}): it is not "
                      f"a mixture of experts (model.num_experts is 0).")
    scalar = metric != LOAD_METRIC
    train = [r for r in rows if scalar and r.get(metric) is not None]
    val = [r for r in rows if scalar and r.get(f"val_{metric}") is not None]
    if scalar and not train and not val:
      raise UserError(f"Run folder {run_dir!r} logs no {metric!r} (nor val_{metric}).")
    label = os.path.basename(os.path.normpath(run_dir)) or run_dir
    runs.append(RunCurves(label, [r["step"] for r in train], [r[metric] for r in train],
                          [r["step"] for r in val], [r[f"val_{metric}"] for r in val],
                          _tokens_per_step(run_dir), [r["step"] for r in load],
                          [r[LOAD_METRIC] for r in load]))
  labels = [r.label for r in runs]
  if len(set(labels)) < len(labels):  # same folder names: use the paths
    runs = [dataclasses.replace(r, label=d) for r, d in zip(runs, run_dirs)]
  return runs


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _check_tokens(runs: Sequence[RunCurves], x: str) -> None:
  if x == "tokens":
    missing = [r.label for r in runs if r.tokens_per_step is None]
    if missing:
      raise UserError(f"--x tokens needs each run's {CONFIG_NAME}; {missing[0]!r} has none.")


def plot_runs(runs: Sequence[RunCurves], out: str, *, x: str = "step",
              title: str | None = None, metric: str = "loss") -> None:
  """Train loss (lines) and val loss (markers) of each run against step or tokens; written to
  `out` through a temporary file, so a failed draw leaves nothing."""
  plt = _pyplot()
  _check_tokens(runs, x)
  fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, r in enumerate(runs):
    scale = r.tokens_per_step if x == "tokens" else 1
    color = colors[i % len(colors)]
    ax.plot([s * scale for s in r.steps], r.loss, color=color, linewidth=1.2,
            label=f"{r.label} train")
    if r.val_steps:
      ax.plot([s * scale for s in r.val_steps], r.val_loss, color=color, linestyle="--",
              marker="o", markersize=4, label=f"{r.label} val")
  ax.set_xlabel("tokens" if x == "tokens" else "step")
  ax.set_ylabel("loss (nats per token)" if metric == "loss" else metric)
  ax.grid(True, alpha=0.3)
  ax.legend()
  if len(runs) == 1 and runs[0].tokens_per_step:
    k = runs[0].tokens_per_step
    forward, inverse = ((lambda s: s * k), (lambda t: t / k)) if x == "step" else (
        (lambda t: t / k), (lambda s: s * k))
    top = ax.secondary_xaxis("top", functions=(forward, inverse))
    top.set_xlabel("tokens" if x == "step" else "step")
  if title:
    ax.set_title(title)
  _save(plt, fig, out)


def plot_expert_load(runs: Sequence[RunCurves], out: str, *, x: str = "step",
                     title: str | None = None) -> None:
  """One panel per run: each expert's share of the routed assignments (averaged over the sparse
  layers) against step or tokens, the even share 1 / E dashed; UserError for a run that logged
  no load (a dense model, or one trained before the metric existed)."""
  missing = [r.label for r in runs if not r.load]
  if missing:
    raise UserError(f"Run {missing[0]!r} logged no expert load ({LOAD_METRIC}): it is not a "
                    f"mixture of experts (model.num_experts is 0).")
  _check_tokens(runs, x)
  plt = _pyplot()
  fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3.5 * len(runs)), dpi=100, squeeze=False)
  for ax, r in zip(axes[:, 0], runs):
    scale = r.tokens_per_step if x == "tokens" else 1
    steps = [s * scale for s in r.load_steps]
    experts = len(r.load[0])
    for e in range(experts):
      ax.plot(steps, [row[e] for row in r.load], linewidth=1.0, label=f"expert {e}")
    ax.axhline(1 / experts, color="black", linestyle="--", linewidth=0.8, label="even share")
    ax.set_ylabel("share of routed tokens")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_title(f"{r.label}: expert load" if not title else f"{title} ({r.label})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=min(experts + 1, 5))
  _save(plt, fig, out)


def _save(plt, fig, out: str) -> None:
  """Writes the figure to `out` through a temporary file (a failed draw leaves nothing)."""
  fig.tight_layout()
  ext = os.path.splitext(out)[1]
  tmp = f"{out}.tmp-{os.getpid()}{ext}"
  try:
    fig.savefig(tmp)
    os.replace(tmp, out)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
