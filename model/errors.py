"""The one error type for user mistakes, raised by every package (model, sharding, training).

A bad config value, a missing file, an unknown name: str(error) is one sentence naming the bad
value and what is allowed. launch/ catches UserError and prints `error: <message>` with exit
status 2 instead of a traceback. It lives in `model`, the bottom layer, so that every package
can raise it without importing a higher one.

UserError is a ValueError, and NotFoundError (a path or checkpoint that does not exist) is also
a FileNotFoundError, so callers that catch the built-in types keep working.
"""


class UserError(ValueError):
  """A problem with the user's inputs; str(error) is one sentence naming the bad value."""


class NotFoundError(UserError, FileNotFoundError):
  """A file, directory or checkpoint named by the user that does not exist."""
