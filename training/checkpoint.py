"""Orbax checkpoints of a run: TrainState + JSON metadata, saved asynchronously.

A checkpoint <workdir>/checkpoints/<step>/ holds
  state/  the TrainState (parameters, optimizer state, step, RNG), restorable onto any mesh;
  meta/   JSON: the resolved config, the model config, the tokenizer (a character model's whole
          vocabulary) and the data position (the index of the next training batch).
Orbax writes into a temporary directory and renames it when complete, and only complete
checkpoints are listed, so a checkpoint half-written by a killed process is never loaded.

    read_run_meta(workdir) -> (step, meta)   # no arrays read
    load_for_inference(workdir) -> (ModelConfig, params, tokenizer_dict | None, step)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from model.config import ModelConfig
from model.errors import UserError
from model.transformer import abstract_params
from sharding import DEFAULT_RULES, make_mesh, param_shardings

CHECKPOINT_DIR = "checkpoints"


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
               read_only: bool = False, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=0 if read_only else 1, create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start saving; returns once the arrays are copied off the accelerators."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self._step(step)
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of a checkpoint, placed with the shardings of `abstract_state`
    (ShapeDtypeStructs with shardings), whatever mesh it was saved from."""
    step = self._step(step)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out.state, out.meta

  def restore_params(self, abstract: Any, step: int | None = None) -> Any:
    """Only the parameters (no optimizer state is read)."""
    step = self._step(step)
    item = {"params": abstract}
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return out.state["params"]

  def _step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise UserError(f"No complete checkpoint in {self.directory}.")
    elif step not in self.all_steps():
      raise UserError(f"No checkpoint of step {step} in {self.directory}; there are: "
                      f"{', '.join(map(str, self.all_steps())) or 'none'}.")
    return step

  def wait(self) -> None:
    """Block until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _open_run(workdir: str | os.PathLike) -> Checkpointer:
  """A read-only Checkpointer of a training workdir; UserError if it has no checkpoints."""
  if "://" not in os.fspath(workdir) and not os.path.exists(workdir):
    raise UserError(f"--workdir {os.fspath(workdir)!r} does not exist.")
  if not checkpoint_dir(workdir).is_dir():
    raise UserError(f"--workdir {os.fspath(workdir)!r} has no {CHECKPOINT_DIR}/ directory; "
                    f"train first with python -m launch.train --workdir {workdir}.")
  return Checkpointer(workdir, read_only=True)


def read_run_meta(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of a training workdir's latest (or given) checkpoint, without reading any
  arrays: the model config, the tokenizer, the resolved config. UserError if there is none."""
  ckpt = _open_run(workdir)
  try:
    step = ckpt._step(step)  # pylint: disable=protected-access
    return step, ckpt.read_meta(step)
  finally:
    ckpt.close()


def load_for_inference(workdir: str | os.PathLike, step: int | None = None,
                       mesh: Mesh | None = None, rules=DEFAULT_RULES
                       ) -> tuple[ModelConfig, Any, dict | None, int]:
  """(ModelConfig, params, tokenizer dict or None, step) from a training workdir's latest (or
  given) checkpoint. Parameters only; placed on `mesh` (default: the first device) with the
  model's logical shardings. `model.tokenizer.tokenizer_from_dict` turns the dict back into a
  tokenizer."""
  ckpt = _open_run(workdir)
  try:
    step = ckpt._step(step)  # pylint: disable=protected-access
    meta = ckpt.read_meta(step)
    cfg = ModelConfig(**meta["model"])
    if mesh is None:
      mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    shardings = param_shardings(cfg, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_params(cfg), shardings)
    params = ckpt.restore_params(abstract, step)
  finally:
    ckpt.close()
  return cfg, params, meta.get("tokenizer"), step
