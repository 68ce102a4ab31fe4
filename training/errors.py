"""User mistakes (bad config, missing data, wrong workdir) as one exception type.

launch/ catches UserError and prints `error: <message>` to stderr with exit status 2, so a
mistake reads as one sentence instead of a traceback.
"""


class UserError(Exception):
  """A problem with the user's inputs; str(error) is one sentence naming the bad value."""


class TrainingDiverged(UserError):
  """The loss or gradient norm became NaN or Inf; the last good checkpoint is kept."""
