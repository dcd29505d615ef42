r"""Pretrains with the config's method (CAPI, MIM-Refiner, CAE v2, ...):

  python -m capi_jax.main --config=configs/tiny.py --workdir=/tmp/capi_tiny

Override any config value on the command line, e.g.
`--config.capi.optim.lr_schedule.base_value=3e-4` or `--config.train.global_batch_size=256`.
Rerunning with the same --workdir resumes from its latest intact checkpoint. Mistakes (a bad
value, a mistyped key, a busy workdir, a diverged run) end with a one-line message and a non-zero
exit status; Ctrl-C checkpoints first and exits with 130.
"""

if __name__ == '__main__':  # First, before jax is imported: this may restart the process.
  from capi_jax.base import huge_pages
  huge_pages.reexec_with_huge_pages()

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from capi_jax.base import cli
from capi_jax.engine import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # capi_jax's own progress at INFO; libraries (Orbax logs every save step) at WARNING.
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger('capi_jax').setLevel(std_logging.INFO)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
