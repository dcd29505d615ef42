"""What every command line shares: user errors end in one line, mistyped config keys are named.

`run` prints a `errors.UserError` alone, with no traceback, and exits non-zero; anything else
is a bug and keeps its traceback. It also keeps the libraries quiet: their INFO logs (Orbax logs
every save and restore step) are hidden unless `--verbosity` asks for them; capi_jax's own
progress stays at INFO.
"""

from collections.abc import Callable
import logging
import re
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from capi_jax.base import errors


# The exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130


def _innermost_message(error: BaseException) -> str:
  """ml_collections wraps its KeyError in an AttributeError; both hold the text as args[0]."""
  reason: object = error
  while isinstance(reason, BaseException) and reason.args:
    reason = reason.args[0]
  return str(reason)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that a `--config.KEY=...` naming no config key is one line.

  ml_collections raises a bare AttributeError / KeyError (a long traceback) for those; the
  message here names the flag and keeps ml_collections' "Did you mean ..." hint.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    reason = _innermost_message(e)
    missing = re.match(r"'([^']+)'", reason)
    flags = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    if missing:
      flags = [f for f in flags if missing.group(1) in f.split('.')] or flags
    hint = ' '.join(line for line in reason.splitlines()[1:] if line)
    sys.exit(f'error: {" ".join(flags) or "a --config flag"} names no config key'
             + (f': {hint}' if hint else f' ({reason})'))


def quiet_libraries() -> None:
  """Libraries at WARNING, capi_jax at INFO, unless the command line set --verbosity."""
  if flags.FLAGS['verbosity'].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('capi_jax').setLevel(logging.INFO)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with `parse_flags`; a UserError or Ctrl-C exits with a short message."""

  def checked(argv: list[str]) -> None:
    quiet_libraries()
    try:
      main(argv)
    except errors.UserError as e:
      sys.exit(f'error: {e}')
    except KeyboardInterrupt:
      print('Interrupted.', file=sys.stderr)
      sys.exit(INTERRUPTED_EXIT_CODE)

  app.run(checked, flags_parser=parse_flags)
