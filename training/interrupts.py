"""Ctrl-C around the moments that must not be cut in half: putting a finished output in place.

    with uninterrupted(f"{out} was written completely"):
      os.rename(tmp, out)            # a Ctrl-C meanwhile waits for the block to end

A SIGINT that comes inside the block is held until the block is done and then raised as
`Interrupted(note)` (a KeyboardInterrupt whose note says what was kept), so an output is
either wholly in place or not at all, and what the program prints about it is true.
launch/cli.py prints one line for any KeyboardInterrupt ("interrupted; <note>") and exits 130.
Only the main thread can hold signals; elsewhere the block runs as it is.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, raised after a step that could not be cut short; `note` says what it left."""

  def __init__(self, note: str):
    super().__init__(note)
    self.note = note


@contextlib.contextmanager
def uninterrupted(note: str) -> Iterator[None]:
  """Hold SIGINT during the block; one that came is raised at its end as Interrupted(note). A
  block that fails keeps its own error (the output was not put in place)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  came = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if came:
    raise Interrupted(note)
