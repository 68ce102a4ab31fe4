"""Orbax checkpoints of a run: TrainState + JSON metadata, saved asynchronously.

A checkpoint <workdir>/checkpoints/<step>/ holds
  state/  the TrainState (parameters, optimizer state, step, RNG), restorable onto any mesh;
  meta/   JSON: the resolved config, the model config, the tokenizer (a character model's whole
          vocabulary), the data position (the index of the next training batch) and a content
          fingerprint of every array (training/fingerprint.py), checked when it is restored.
Orbax writes into a temporary directory and renames it when complete, and only complete
checkpoints are listed, so a checkpoint half-written by a killed process is never loaded.

A complete checkpoint that cannot be read back (an item missing, a file truncated or
unreadable, invalid metadata, arrays whose fingerprint differs) is damaged: restoring without a
step warns in one line and falls back to the newest one that restores. Training moves the
damaged ones aside to <step>.damaged-<n> (kept for inspection, no longer listed, and out of the
way of the step numbers the resumed run saves again); readers leave them where they are.

A failed asynchronous save is noticed at the next `check_save()` (the loop calls it after every
step): CheckpointWriteFailed, one sentence, and the failed step's temporary directory removed.

    read_run_meta(workdir) -> (step, meta)   # no arrays read
    load_for_inference(workdir) -> (ModelConfig, params, tokenizer_dict | None, step)
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from model.config import ModelConfig
from model.config import from_dict as model_config_from_dict
from model.errors import UserError
from model.families import abstract_params
from model.lora import split_adapters
from sharding import DEFAULT_RULES, make_mesh, param_shardings
from training import fingerprint
from training.checkpoint_errors import (QUIET_FAILED_SAVES, CheckpointWriteFailed, Damaged,
                                        damage_reason, first_line, is_tree_mismatch, warn,
                                        write_failure_reason)
from training.workdir import CHECKPOINT_DIR

# The longest an asynchronous save may take in the background before it counts as failed.
SAVE_TIMEOUT_SECONDS = 1200
__all__ = ["CHECKPOINT_DIR", "CheckpointWriteFailed", "Checkpointer", "checkpoint_dir",
           "load_for_inference", "read_run_meta", "resolve_workdir", "warn"]


def resolve_workdir(workdir: str | os.PathLike) -> epath.Path:
  """A workdir as an absolute local path, or a remote one (gs://...) as given."""
  text = os.fspath(workdir)
  if "://" not in text:
    text = os.path.abspath(os.path.expanduser(text))
  return epath.Path(text)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  return resolve_workdir(workdir) / CHECKPOINT_DIR


class Checkpointer:
  """Saves (asynchronously) and restores the checkpoints of one workdir, keeping `keep`."""

  def __init__(self, workdir: str | os.PathLike, keep: int | None = None, *,
               read_only: bool = False, async_save: bool = True,
               save_timeout: int = SAVE_TIMEOUT_SECONDS):
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=0 if read_only else 1, create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        # Directories created in save() itself: a directory that cannot be created fails there
        # (orbax's asynchronous creation leaves its other threads waiting for it, ~300 s).
        async_options=ocp.AsyncOptions(timeout_secs=save_timeout,
                                       create_directories_asynchronously=False))
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: tuple[int, int] | None = None  # (step, state bytes) of the save in flight
    if not read_only:
      logging.getLogger("absl").addFilter(QUIET_FAILED_SAVES)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # --- saving -------------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start saving; returns once the arrays are copied off the accelerators. The arrays'
    fingerprints are added to `meta`. CheckpointWriteFailed if the previous save failed."""
    self.wait(step)
    meta = dict(meta, fingerprints=fingerprint.fingerprints(state))
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    self._pending = (step, nbytes)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except  (e.g. the directory cannot be made)
      self._failed(e, step)

  def check_save(self, at_step: int | None = None) -> None:
    """Without blocking: CheckpointWriteFailed if the save in flight has failed (the run is at
    `at_step`, for the message). On several processes only the next save (which all of them
    reach at the same step) checks: each would notice the failure at a step of its own, and one
    stopping alone would leave the others waiting in the next collective."""
    if (self._pending is not None and jax.process_count() == 1
        and not self._manager.is_saving_in_progress()):
      self.wait(at_step)

  def wait(self, at_step: int | None = None) -> None:
    """Block until the pending asynchronous save is complete (orbax bounds it by
    save_timeout); CheckpointWriteFailed if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e, at_step)
    if self._pending is not None:
      step = self._pending[0]
      if not (self.directory / str(step)).exists():  # orbax logged and skipped finalizing
        self._failed(None, at_step)
      self._pending = None

  def _failed(self, error: BaseException | None, at_step: int | None = None) -> None:
    step, nbytes = self._pending if self._pending is not None else (None, 0)
    self._pending = None
    reason = write_failure_reason(error)
    removed = self._remove_tmp(step)
    space = ""
    if "://" not in str(self.directory):
      try:
        free = shutil.disk_usage(self.directory).free
        space = (f"; it needs up to {nbytes / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are "
                 f"free there")
      except OSError:
        pass
    last = self._last_complete()
    stopped = f"the run stopped at step {at_step}" if at_step is not None else "the run stopped"
    raise CheckpointWriteFailed(
        f"Saving the checkpoint of step {step} in {self.directory} failed ({reason}{space}); "
        f"{stopped}{removed}, and the last good checkpoint "
        f"({'step ' + str(last) if last is not None else 'none'}) is kept.") from None

  def _remove_tmp(self, step: int | None) -> str:
    """Remove what the failed save of `step` left (the workdir's lock makes it ours)."""
    if step is None or jax.process_index() != 0 or not self.directory.exists():
      return ""
    junk = [p for p in self.directory.iterdir()
            if p.name.startswith(f"{step}.orbax-checkpoint-tmp")]
    for p in junk:
      try:
        shutil.rmtree(os.fspath(p)) if "://" not in str(p) else p.rmtree()
      except OSError as e:
        return f"; its temporary {p.name} could not be removed ({e.strerror})"
    return f" and {junk[0].name} was removed" if junk else ""

  def _last_complete(self) -> int | None:
    steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()
             ] if self.directory.exists() else []
    return max(steps) if steps else None

  # --- restoring ----------------------------------------------------------------------------

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._step(step)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, abstract_state: Any, step: int | None = None,
              meta: dict | None = None) -> tuple[Any, dict]:
    """(state, meta) of a checkpoint, placed with the shardings of `abstract_state`
    (ShapeDtypeStructs with shardings), whatever mesh it was saved from; the arrays' content
    checked against the saved fingerprints (of `meta`, when the caller has read it already)."""
    step = self._step(step)
    meta = self.read_meta(step) if meta is None else meta
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    _check_content(out.state, meta)
    return out.state, meta

  def restore_params(self, abstract: Any, step: int | None = None,
                     meta: dict | None = None) -> Any:
    """Only the parameters (no optimizer state is read), checked against `meta`'s
    fingerprints when given."""
    step = self._step(step)
    item = {"params": abstract}
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    if meta is not None:
      _check_content({"params": out.state["params"]}, meta)
    return out.state["params"]

  def restore_newest(self, attempt: Callable[[int], Any], *, move_aside: bool = False,
                     what: str = "restored") -> tuple[int, Any] | None:
    """(step, attempt(step)) for the newest step where `attempt` succeeds, trying older steps
    when one is damaged (a one-line warning each); None when there are no checkpoints.
    UserError (from `attempt`, e.g. a different model) is not damage and propagates. With
    move_aside the damaged steps newer than the one restored become <step>.damaged-<n>."""
    steps = self.all_steps()
    damaged: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        result = attempt(step)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if is_tree_mismatch(e):
          raise UserError(
              f"The checkpoint of step {step} in {self.directory} does not fit this config's "
              f"training state ({first_line(e)}); resume with the settings it was saved with "
              f"or use another --workdir.") from None
        reason = damage_reason(e)
        damaged.append((step, reason))
        where = ""
        if move_aside and not self.read_only:
          where = f"; moved aside to {self._move_aside(step)}"
        warn(f"the checkpoint of step {step} in {self.directory} is damaged ({reason}){where}; "
             f"trying the previous one.")
        continue
      if damaged and move_aside:
        self._manager.reload()
      return step, result
    if damaged:
      step, reason = damaged[0]
      raise UserError(f"No checkpoint in {self.directory} can be restored: the newest, step "
                      f"{step}, is damaged ({reason}), and so are the {len(damaged) - 1} older "
                      f"one(s); use another --workdir.")
    return None

  def _move_aside(self, step: int) -> str:
    src = self.directory / str(step)
    n = 1
    while (self.directory / f"{step}.damaged-{n}").exists():
      n += 1
    dst = self.directory / f"{step}.damaged-{n}"
    if jax.process_index() == 0:
      src.rename(dst)
    return dst.name

  def _step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise UserError(f"No complete checkpoint in {self.directory}.")
    elif step not in self.all_steps():
      raise UserError(f"No checkpoint of step {step} in {self.directory}; there are: "
                      f"{', '.join(map(str, self.all_steps())) or 'none'}.")
    return step

  def close(self) -> None:
    self._manager.close()
    if not self.read_only:
      logging.getLogger("absl").removeFilter(QUIET_FAILED_SAVES)


def _check_content(tree: Any, meta: dict) -> None:
  expected = meta.get("fingerprints")
  if not expected:  # saved before fingerprints existed
    return
  bad = fingerprint.mismatches(tree, expected)
  if bad:
    more = f" and {len(bad) - 1} more array(s)" if len(bad) > 1 else ""
    raise Damaged(f"the content of {bad[0]}{more} differs from the fingerprint saved with it")


def _open_run(workdir: str | os.PathLike) -> Checkpointer:
  """A read-only Checkpointer of a training workdir; UserError if it has no checkpoints."""
  if "://" not in os.fspath(workdir) and not os.path.exists(workdir):
    raise UserError(f"--workdir {os.fspath(workdir)!r} does not exist.")
  if not checkpoint_dir(workdir).is_dir():
    raise UserError(f"--workdir {os.fspath(workdir)!r} has no {CHECKPOINT_DIR}/ directory; "
                    f"train first with python -m launch.train --workdir {workdir}.")
  return Checkpointer(workdir, read_only=True)


def _read_checked_meta(ckpt: Checkpointer, step: int) -> dict:
  """The meta of `step`, after checking that its state item is there (no arrays read)."""
  meta = ckpt.read_meta(step)
  if not (ckpt.directory / str(step) / "state" / "_METADATA").exists():
    raise Damaged("its state/ item is missing")
  if not isinstance(meta, dict) or "model" not in meta:
    raise Damaged("its meta/metadata has no model config")
  return meta


def _newest_or_given(ckpt: Checkpointer, step: int | None, attempt: Callable[[int], Any]):
  if step is None:
    found = ckpt.restore_newest(attempt)
    if found is None:
      raise UserError(f"No complete checkpoint in {ckpt.directory}.")
    return found
  step = ckpt._step(step)  # pylint: disable=protected-access
  try:
    return step, attempt(step)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = damage_reason(e)
    others = [s for s in ckpt.all_steps() if s != step]
    raise UserError(f"The checkpoint of step {step} in {ckpt.directory} is damaged ({reason}); "
                    f"choose another step ({', '.join(map(str, others)) or 'there is none'})."
                    ) from None


def read_run_meta(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of a training workdir's latest (or given) checkpoint, without reading any
  arrays: the model config, the tokenizer, the resolved config. UserError if there is none.
  Without a step, a newest checkpoint whose metadata or state item is missing or unreadable is
  skipped with a warning."""
  ckpt = _open_run(workdir)
  try:
    return _newest_or_given(ckpt, step, lambda s: _read_checked_meta(ckpt, s))
  finally:
    ckpt.close()


def load_for_inference(workdir: str | os.PathLike, step: int | None = None,
                       mesh: Mesh | None = None, rules=DEFAULT_RULES
                       ) -> tuple[ModelConfig, Any, dict | None, int]:
  """(ModelConfig, params, tokenizer dict or None, step) from a training workdir's latest (or
  given) checkpoint. Parameters only (a LoRA run's: its adapters; training/weights.py adds
  their base), checked against their fingerprints; placed on `mesh`
  (default: the first device) with the model's logical shardings. Without a step a damaged
  newest checkpoint is skipped with a warning; a damaged given step is a UserError.
  `model.tokenizer.tokenizer_from_dict` turns the dict back into a tokenizer."""
  ckpt = _open_run(workdir)
  if mesh is None:
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])

  def attempt(s: int):
    meta = _read_checked_meta(ckpt, s)
    cfg = model_config_from_dict(meta["model"])
    shardings = param_shardings(cfg, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        abstract_params(cfg), shardings)
    if cfg.lora_rank:  # the base is not in the checkpoint
      abstract = split_adapters(abstract)[0]
    return cfg, ckpt.restore_params(abstract, s, meta), meta

  try:
    step, (cfg, params, meta) = _newest_or_given(ckpt, step, attempt)
  finally:
    ckpt.close()
  return cfg, params, meta.get("tokenizer"), step
