"""Up-front checks of a config's values, so a bad value fails in one second with a clear message.

Without them a bad value surfaces minutes later, deep inside Grain workers or jit tracing, or
never (a negative learning rate trains "fine"). `validate(config)` raises one `ConfigError`
listing every problem found, each naming the key, its value and what would be valid.
`problems` never raises, whatever the values (wrong types, wrong tuple lengths, zeros): the
engine's keys are checked here, the method's by `Method.config_problems`, which may use
`Problems` and the section checks below, the evaluation settings (`evals.*`) by
`capi_jax.evaluators.config_problems`.
"""

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
import ml_collections

from capi_jax import evaluators
from capi_jax import methods
from capi_jax.core import cli
from capi_jax.core import sharding

_DTYPES = ('float32', 'bfloat16', 'float16')
_SHARDING_STRATEGIES = ('fsdp', 'replicate')


class ConfigError(cli.UserError, ValueError):
  """One or more config values are invalid; the message lists each with its fix."""


def is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
  if low is not None and high is not None:
    return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  if low is not None:
    return f'{">" if low_open else ">="} {low}'
  return f'{"<" if high_open else "<="} {high}'


class Problems:
  """Collects one sentence per invalid value; each check returns whether the value is valid
  (so that checks depending on it run only then, and never raise)."""

  def __init__(self):
    self.found: list[str] = []

  def check(self, ok: bool, message: str) -> bool:
    if not ok:
      self.found.append(message)
    return ok

  def number(self, key: str, value: Any, low: float | None = None, high: float | None = None,
             *, low_open: bool = False, high_open: bool = False, integer: bool = False) -> bool:
    """`value` is a finite number (an integer if `integer`) in the given interval."""
    what = ['an integer'] if integer else []
    if low is not None or high is not None:
      what.append(_interval(low, high, low_open, high_open))
    ok = is_int(value) if integer else _is_number(value)
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    return self.check(ok, f'{key}={value!r} must be {" ".join(what) or "a number"}.')

  def choice(self, key: str, value: Any, options: Sequence[Any]) -> bool:
    return self.check(value in options, f'{key}={value!r} must be one of {tuple(options)}.')

  def boolean(self, key: str, value: Any) -> bool:
    return self.check(isinstance(value, bool), f'{key}={value!r} must be True or False.')

  def string(self, key: str, value: Any, nonempty: bool = True) -> bool:
    return self.check(isinstance(value, str) and (value or not nonempty),
                      f'{key}={value!r} must be a {"non-empty " if nonempty else ""}string.')

  def pair(self, key: str, value: Any, description: str) -> bool:
    """`value` is a pair of finite numbers; `description` says what else they must satisfy."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(_is_number(v) for v in value))
    return self.check(ok, f'{key}={value!r} must be a pair of numbers ({description}).')

  def adamw(self, key: str, cfg: ml_collections.ConfigDict) -> None:
    """An AdamW section: `betas` in [0, 1), `eps` > 0, `weight_decay` >= 0."""
    if self.pair(f'{key}.betas', cfg.betas, 'each in [0, 1)'):
      self.check(all(0 <= b < 1 for b in cfg.betas),
                 f'{key}.betas={tuple(cfg.betas)} must each be in [0, 1).')
    self.number(f'{key}.eps', cfg.eps, 0, low_open=True)
    self.number(f'{key}.weight_decay', cfg.weight_decay, 0)

  def schedule(self, key: str, cfg: ml_collections.ConfigDict, total_iters: Any,
               high: float | None = None) -> None:
    """A `schedules.from_config` section: values in [0, high] (learning rates: >= 0)."""
    for name in ('base_value', 'final_value', 'start_warmup_value'):
      if name in cfg:
        self.number(f'{key}.{name}', cfg[name], 0, high)
    if is_int(total_iters) and total_iters >= 1:
      self.number(f'{key}.warmup_iters', cfg.warmup_iters, 0, total_iters, integer=True)
    if 'truncate_cos' in cfg:
      self.number(f'{key}.truncate_cos', cfg.truncate_cos, 0, 1)


def _check_sharding(p: Problems, s: ml_collections.ConfigDict, device_count: int | None) -> None:
  mesh = s.mesh
  mesh_ok = p.check(
      isinstance(mesh, (tuple, list)) and len(mesh) >= 1
      and all(isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str)
              and is_int(a[1]) and (a[1] >= 1 or a[1] == -1) for a in mesh)
      and len({a[0] for a in mesh}) == len(mesh),
      f'sharding.mesh={mesh!r} must be distinct (axis name, size) pairs, sizes >= 1 or -1, '
      "e.g. (('data', 1), ('fsdp', -1)).")
  if mesh_ok and device_count:
    try:
      sharding.mesh_shape(mesh, device_count)
    except ValueError as e:
      p.found.append(f'sharding.mesh: {e}')
  rules = s.param_rules
  if p.check(isinstance(rules, (tuple, list))
             and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in rules),
             f'sharding.param_rules={rules!r} must be (regex, strategy) pairs.'):
    for pattern, strategy in rules:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        p.found.append(f'sharding.param_rules: {pattern!r} is not a regular expression ({e}).')
      p.choice(f'sharding.param_rules strategy of {pattern!r}', strategy, _SHARDING_STRATEGIES)
  p.number('sharding.min_shard_bytes', s.min_shard_bytes, 0, integer=True)


def _engine_problems(p: Problems, config: ml_collections.ConfigDict,
                     device_count: int | None) -> None:
  """The keys the engine reads (state, loop, checkpoints, input pipeline, sharding)."""
  o, d, e, t = config.optim, config.data, config.efficiency, config.train
  p.number('optim.total_iters', o.total_iters, 1, integer=True)
  if p.number('optim.global_batch_size', o.global_batch_size, 1, integer=True) and device_count:
    p.check(o.global_batch_size % device_count == 0,
            f'optim.global_batch_size={o.global_batch_size} must be divisible by the '
            f'{device_count} devices the batch is split over.')
  p.choice('efficiency.compute_dtype', e.compute_dtype, _DTYPES)
  p.choice('efficiency.param_dtype', e.param_dtype, _DTYPES)
  # Gradients are reduced in the master weights' dtype (see state.py).
  p.check(e.reduce_dtype == e.param_dtype, f'efficiency.reduce_dtype={e.reduce_dtype!r} must '
          f'equal efficiency.param_dtype={e.param_dtype!r}.')
  p.string('data.dataset', d.dataset)
  p.string('data.split', d.split)
  p.string('data.data_dir', d.data_dir, nonempty=False)
  p.number('data.num_workers', d.num_workers, 0, integer=True)
  p.number('data.prefetch_buffer_size', d.prefetch_buffer_size, 0, integer=True)
  _check_sharding(p, config.sharding, device_count)
  p.number('train.seed', t.seed, integer=True)
  p.number('train.log_loss_every', t.log_loss_every, 1, integer=True)
  p.number('train.nan_check_period', t.nan_check_period, 1, integer=True)
  p.boolean('train.auto_resume', t.auto_resume)
  p.number('train.checkpointing.period', t.checkpointing.period, 1, integer=True)
  p.number('train.checkpointing.max_to_keep', t.checkpointing.max_to_keep, 1, integer=True)
  p.boolean('train.checkpointing.async_save', t.checkpointing.async_save)


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
  """Every invalid value of `config` as a sentence; [] when the config is usable."""
  try:
    method_cls = methods.get(config.method)
  except ValueError as e:
    return [str(e)]
  p = Problems()
  _engine_problems(p, config, device_count)
  try:
    found = method_cls.config_problems(config)
  except Exception as e:  # pylint: disable=broad-except  (a method's checks must not raise)
    found = [f'config.method={config.method!r} could not check its keys ({type(e).__name__}: '
             f'{e}); fix its values, see the problems above.']
  return p.found + found + evaluators.config_problems(config)


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises `ConfigError` listing every invalid value (see `problems`)."""
  found = problems(config, jax.device_count() if device_count is None else device_count)
  if found:
    raise ConfigError('Invalid config (fix on the command line, e.g. --config.data.mask_ratio=0.65, '
                      'or in the config file):\n  - ' + '\n  - '.join(found))
