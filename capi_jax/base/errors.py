"""The one error type users see as a message: `UserError`.

A `UserError` is a problem the user fixes (a config value, a path, a file, a busy workdir, a
diverged run): its message says what is wrong and what to do, and the command lines
(`capi_jax.base.cli.run`) print it alone, with no traceback, and exit non-zero. Anything else
is a bug and keeps its traceback. Each layer subclasses it where it raises (`ConfigError`,
`CheckpointMismatchError`, ...), so callers can tell the kinds apart.
"""


class UserError(Exception):
  """A problem with the user's input or environment; the message names it and the fix."""


def summary(error: BaseException) -> str:
  """'TypeName: first line of the message' ('TypeName' for an empty message): an error for a
  one-line report."""
  text = str(error).strip()
  return f'{type(error).__name__}: {text.splitlines()[0]}' if text else type(error).__name__
