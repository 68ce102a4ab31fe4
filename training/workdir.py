"""What a training run's workdir is, recognised by its files: the one place that answers "is
this path a run's workdir, inside one, or holding one" (launch.export never writes there).

A workdir holds checkpoints/ (orbax), run.lock (training/lock.py) while a run lives,
metrics.jsonl, or a config.json that launch.train wrote (a JSON object with the `model` and
`train` sections; a Hugging Face checkpoint's config.json is not one).

    enclosing_workdir("runs/x/checkpoints")   # "/abs/runs/x": the path is inside that run
    workdir_within("runs")                    # a run somewhere under runs/, or None
"""

from __future__ import annotations

import json
import os

CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_NAME = "run.lock"
METRICS_NAME = "metrics.jsonl"


def is_workdir(path: str | os.PathLike) -> bool:
  """Whether the local folder `path` is a training run's workdir."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return False
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
    return True
  if any(os.path.isfile(os.path.join(path, name)) for name in (LOCK_NAME, METRICS_NAME)):
    return True
  config = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config):
    return False
  try:
    with open(config, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and "model" in data and "train" in data


def enclosing_workdir(path: str | os.PathLike) -> str | None:
  """The workdir that `path` (local; it need not exist) is, or lies inside, as a real path;
  None when neither it nor any folder above it is a workdir."""
  current = os.path.realpath(os.fspath(path))
  while True:
    if is_workdir(current):
      return current
    parent = os.path.dirname(current)
    if parent == current:
      return None
    current = parent


def workdir_within(path: str | os.PathLike) -> str | None:
  """A workdir somewhere inside the local folder `path` (itself included), as a real path, or
  None. Symbolic links are not followed (deleting the folder would delete the links only)."""
  root = os.path.realpath(os.fspath(path))
  for folder, subfolders, _ in os.walk(root):
    if is_workdir(folder):
      return folder
    subfolders.sort()
  return None


def missing_folders(workdir: str | os.PathLike) -> list[str]:
  """The folders a new run in the local `workdir` would create (its checkpoints/, itself, the
  missing folders above it), deepest first; [] for a remote workdir."""
  path = os.fspath(workdir)
  if "://" in path:
    return []
  path = os.path.abspath(os.path.expanduser(path))
  folders = []
  for folder in (os.path.join(path, CHECKPOINT_DIR), path):
    if not os.path.exists(folder):
      folders.append(folder)
  parent = os.path.dirname(path)
  while not os.path.exists(parent) and os.path.dirname(parent) != parent:
    folders.append(parent)
    parent = os.path.dirname(parent)
  return folders


def remove_empty(folders: list[str]) -> None:
  """Removes each folder of `folders` (deepest first) that is empty; keeps the rest."""
  for folder in folders:
    try:
      os.rmdir(folder)
    except OSError:
      pass
