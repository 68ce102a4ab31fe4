"""Text of a sequence as its tokens arrive: never half a character, never a stop string.

    text = IncrementalText(tokenizer, prompt_ids, stop=("\\n\\n", "END"))
    piece = text.push(token_id)      # new text that is final ("" while held back)
    if text.stopped: ...             # a stop string appeared; text.text ends before it
    rest = text.finish()             # at the end: whatever was held back (not a stop string)

Decoding. A byte-level BPE token may hold part of a character's UTF-8 bytes, and a
sentencepiece-style tokenizer decodes a token differently after others (its leading-space
marker). So each new piece is the difference between the decoding of a short window of recent
ids with and without the newest ones (vLLM's scheme: the window starts a few ids back, in the
prompt at first), released only once it does not end in U+FFFD (an incomplete character):
the pieces join to the decoding of all the ids.

Stop strings. Released text is searched for each stop string; on a match the text ends before
it and `stopped` is set. The longest end of the unreleased text that could still grow into a
stop string is held back, so a stop string split across tokens never leaks to a client: a
match can only start in held-back text.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT_CHAR = "\ufffd"
# Ids of the prompt the first window starts with (a tokenizer may decode a token differently
# at the start of a text).
CONTEXT_IDS = 5


class IncrementalText:
  """The text of one generated sequence (module docstring). `text` is everything released."""

  def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
    self._tokenizer = tokenizer
    self._ids = [int(i) for i in prompt_ids[-CONTEXT_IDS:]]
    self._prefix = 0            # the window: ids[_prefix:]; ids[_prefix:_read] were decoded
    self._read = len(self._ids)
    self._stops = tuple(s for s in stop if s)
    self._pending = ""          # decoded, not yet released (could start a stop string)
    self.text = ""              # released
    self.stopped = False        # a stop string was found

  def push(self, token_id: int) -> str:
    """Add one token; the text it releases ("" while the character or a possible stop string
    is incomplete, and after a stop)."""
    if self.stopped:
      return ""
    self._ids.append(int(token_id))
    before = self._tokenizer.decode(self._ids[self._prefix:self._read])
    after = self._tokenizer.decode(self._ids[self._prefix:])
    if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
      return ""  # an incomplete character: wait for the next token
    self._pending += after[len(before):]
    self._prefix, self._read = self._read, len(self._ids)
    return self._release(final=False)

  def finish(self) -> str:
    """The end of the sequence: the held-back text (with U+FFFD for bytes that never formed a
    character, as a full decoding shows them)."""
    if not self.stopped and self._read < len(self._ids):
      before = self._tokenizer.decode(self._ids[self._prefix:self._read])
      self._pending += self._tokenizer.decode(self._ids[self._prefix:])[len(before):]
      self._read = len(self._ids)
    return self._release(final=True)

  def _release(self, final: bool) -> str:
    if self.stopped:
      return ""
    hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
    if hits:
      out, self._pending, self.stopped = self._pending[:min(hits)], "", True
    else:
      keep = 0 if final else held_back(self._pending, self._stops)
      out = self._pending[:len(self._pending) - keep]
      self._pending = self._pending[len(out):]
    self.text += out
    return out


def held_back(text: str, stops: Sequence[str]) -> int:
  """The length of the longest end of `text` that is a proper beginning of a stop string."""
  longest = 0
  for stop in stops:
    for n in range(min(len(stop) - 1, len(text)), longest, -1):
      if text.endswith(stop[:n]):
        longest = n
        break
  return longest
