"""What can go wrong with a checkpoint, in words: why one cannot be restored (damage, one
clause), why a save failed, and the one-line warnings and errors built from them.
(training/checkpoint.py raises and catches these.)"""

from __future__ import annotations

import json
import logging
import re
import sys

import jax


class CheckpointWriteFailed(RuntimeError):
  """An asynchronous save failed; the run stops, the last good checkpoint is kept."""


class _QuietFailedSaves(logging.Filter):
  """Drops orbax's ERROR records (tracebacks of a failed background save, several per failure):
  the failure reaches the caller as one CheckpointWriteFailed sentence instead."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


QUIET_FAILED_SAVES = _QuietFailedSaves()


class Damaged(Exception):
  """A checkpoint that cannot be restored; str() says why, as a clause."""


def warn(message: str) -> None:
  """One `warning:` line on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(e: BaseException, limit: int = 160) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= limit else text[:limit] + "..."


def damage_reason(e: BaseException) -> str:
  """Why reading a checkpoint failed, as a short clause (a Damaged error says it itself)."""
  text = str(e)
  if isinstance(e, Damaged):
    return text
  if isinstance(e, json.JSONDecodeError):
    return f"its meta/metadata is not valid JSON ({e.msg} at character {e.pos})"
  missing = re.search(r'Item "(\w+)" was not found', text)
  if missing:
    return f"its {missing.group(1)}/ item is missing"
  if "error while reading array" in text:
    paths = [p for p in re.findall(r"'path': '([^']*)'", text) if not p.startswith("/")]
    name = paths[-1].rstrip("/") if paths else "an array"
    return f"array {name} could not be read"
  if isinstance(e, OSError) and e.filename:
    return f"{e.filename}: {e.strerror or type(e).__name__}"
  return f"{type(e).__name__}: {first_line(e)}"


def is_tree_mismatch(e: BaseException) -> bool:
  """A restore target that does not fit the saved tree (a user's config change, not damage)."""
  return (isinstance(e, (ValueError, TypeError)) and not isinstance(e, json.JSONDecodeError)
          and "error while reading array" not in str(e))


def write_failure_reason(error: BaseException | None) -> str:
  """Why a save failed, as a short clause (the OS error under orbax's wrappers)."""
  cause = error
  while cause is not None and cause.__cause__ is not None and not isinstance(cause, OSError):
    cause = cause.__cause__
  text = str(cause) if cause is not None else ""
  if "RESOURCE_EXHAUSTED" in text or "No space left" in text or (
      isinstance(cause, OSError) and cause.errno == 28):
    return "no space left on the device"
  if "Read-only file system" in text or (isinstance(cause, OSError) and cause.errno == 30):
    return "read-only file system"
  if "PERMISSION_DENIED" in text or "Permission denied" in text:
    return "permission denied"
  if isinstance(cause, OSError):
    return cause.strerror or type(cause).__name__
  if cause is not None:
    return first_line(cause, 120)
  return "orbax did not finalize it (see the log above)"
