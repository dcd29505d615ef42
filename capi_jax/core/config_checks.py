"""Up-front checks of a config's values, so a bad value fails in one second with a clear message.

Without them a bad value surfaces minutes later, deep inside Grain workers or jit tracing.
`validate(config)` raises one `ConfigError` listing every problem found, each naming the key,
its value and what would be valid.
"""

import jax
import ml_collections

from capi_jax import methods

_DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """One or more config values are invalid; the message lists each with its fix."""


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
  """Every invalid value of `config` as a sentence; [] when the config is usable.

  The engine's keys (method, optim.total_iters / global_batch_size, efficiency dtypes, train,
  evals.model) here; the method's own keys by `Method.config_problems`.
  """
  o = config.optim
  found = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      found.append(message)

  try:
    method_cls = methods.get(config.method)
  except ValueError as e:
    return [str(e)]
  check(o.global_batch_size >= 1, f'optim.global_batch_size={o.global_batch_size} must be >= 1.')
  if device_count:
    check(o.global_batch_size % device_count == 0,
          f'optim.global_batch_size={o.global_batch_size} must be divisible by the {device_count} '
          'devices the batch is split over.')
  check(o.total_iters >= 1, f'optim.total_iters={o.total_iters} must be >= 1.')
  e = config.efficiency
  check(e.compute_dtype in _DTYPES, f'efficiency.compute_dtype={e.compute_dtype!r} must be one of {_DTYPES}.')
  check(e.param_dtype in _DTYPES, f'efficiency.param_dtype={e.param_dtype!r} must be one of {_DTYPES}.')
  check(config.train.log_loss_every >= 1 and config.train.nan_check_period >= 1,
        'train.log_loss_every and train.nan_check_period must be >= 1.')
  check(config.train.checkpointing.period >= 1 and config.train.checkpointing.max_to_keep >= 1,
        'train.checkpointing.period and train.checkpointing.max_to_keep must be >= 1.')
  check(config.evals.model in ('student', 'ema'),
        f"evals.model={config.evals.model!r} must be 'student' or 'ema'.")
  return found + method_cls.config_problems(config)


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises `ConfigError` listing every invalid value (see `problems`)."""
  found = problems(config, jax.device_count() if device_count is None else device_count)
  if found:
    raise ConfigError('Invalid config (fix on the command line, e.g. --config.data.mask_ratio=0.65, '
                      'or in the config file):\n  - ' + '\n  - '.join(found))
