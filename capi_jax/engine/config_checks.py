"""Up-front checks of a config's values, so a bad value fails in one second with a clear message.

Without them a bad value surfaces minutes later, deep inside Grain workers or jit tracing, or
never (a negative learning rate trains "fine"). `validate(config)` raises one `ConfigError`
listing every problem found, each naming the key, its value and what would be valid.
`problems` never raises, whatever the values (wrong types, wrong tuple lengths, zeros): the
engine's keys are checked here, the method's by `Method.config_problems` and the evaluation
settings (`evals.*`) by `capi_jax.evaluators.config_problems` (each protocol its own section,
against the method's evaluation model), all with `base.problems`.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections

from capi_jax import evaluators
from capi_jax import methods
from capi_jax.base import errors
from capi_jax.base import problems as problems_lib
from capi_jax.base import sharding
from capi_jax.engine import evaluation
from capi_jax.models import layers

_DTYPES = ('float32', 'bfloat16', 'float16')
_SHARDING_STRATEGIES = ('fsdp', 'replicate')


class ConfigError(errors.UserError, ValueError):
  """One or more config values are invalid; the message lists each with its fix."""


def _check_sharding(p: problems_lib.Problems, s: ml_collections.ConfigDict,
                    device_count: int | None) -> None:
  mesh = s.mesh
  mesh_ok = p.check(
      isinstance(mesh, (tuple, list)) and len(mesh) >= 1
      and all(isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str)
              and problems_lib.is_int(a[1]) and (a[1] >= 1 or a[1] == -1) for a in mesh)
      and len({a[0] for a in mesh}) == len(mesh),
      f'sharding.mesh={mesh!r} must be distinct (axis name, size) pairs, sizes >= 1 or -1, '
      "e.g. (('data', 1), ('fsdp', -1)).")
  if mesh_ok and device_count:
    try:
      sharding.mesh_shape(mesh, device_count)
    except ValueError as e:
      p.found.append(f'sharding.mesh: {e}')
  dcn = s.get('dcn_mesh') or ()
  if p.check(isinstance(dcn, (tuple, list)) and all(
      isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str)
      and problems_lib.is_int(a[1]) and a[1] >= 1 for a in dcn),
             f'sharding.dcn_mesh={dcn!r} must be (mesh axis name, number of slices >= 1) pairs, '
             "e.g. (('data', 2),).") and mesh_ok:
    sizes = [a[1] for a in mesh]
    if device_count:
      try:
        sizes = list(sharding.mesh_shape(mesh, device_count)[1])
      except ValueError:
        pass  # Reported above.
    try:  # A size still -1 (no device count yet) is checked when the mesh is made.
      sharding.dcn_shape(dcn, [a[0] for a in mesh], [max(n, 0) for n in sizes])
    except ValueError as e:
      p.found.append(f'sharding.dcn_mesh: {e}')
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
  logical = s.get('logical_rules', ())
  p.check(isinstance(logical, (tuple, list)) and all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
      and (isinstance(r[1], str) or (isinstance(r[1], (tuple, list))
                                     and all(isinstance(a, str) for a in r[1])))
      for r in logical),
          f'sharding.logical_rules={logical!r} must be (logical axis, mesh axis or axes) pairs, '
          "e.g. (('heads', 'tensor'), ('mlp', 'tensor')).")


def _engine_problems(p: problems_lib.Problems, config: ml_collections.ConfigDict,
                     device_count: int | None) -> None:
  """The keys the engine reads (state, loop, checkpoints, input pipeline, sharding)."""
  d, e, t = config.data, config.efficiency, config.train
  p.number('train.total_iters', t.total_iters, 1, integer=True)
  if p.number('train.global_batch_size', t.global_batch_size, 1, integer=True) and device_count:
    p.check(t.global_batch_size % device_count == 0,
            f'train.global_batch_size={t.global_batch_size} must be divisible by the '
            f'{device_count} devices the batch is split over.')
  p.choice('efficiency.compute_dtype', e.compute_dtype, _DTYPES)
  p.choice('efficiency.param_dtype', e.param_dtype, _DTYPES)
  # Gradient reductions run in reduce_dtype, at most the master weights' (see state.py).
  if p.choice('efficiency.reduce_dtype', e.reduce_dtype, _DTYPES):
    p.check(jnp.dtype(e.reduce_dtype).itemsize <= jnp.dtype(e.param_dtype).itemsize,
            f'efficiency.reduce_dtype={e.reduce_dtype!r} must not be wider than '
            f'efficiency.param_dtype={e.param_dtype!r}.')
  if 'scan_layers' in e:
    p.boolean('efficiency.scan_layers', e.scan_layers)
  if 'attention' in e:
    p.choice('efficiency.attention', e.attention, layers.ATTENTION_IMPLEMENTATIONS)
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
  steps = t.get('profile_steps', ())
  p.check(steps == () or (isinstance(steps, (tuple, list)) and len(steps) == 2
                          and all(problems_lib.is_int(n) for n in steps) and 0 <= steps[0] < steps[1]),
          f'train.profile_steps={steps!r} must be () (no profile) or (START, STOP) with '
          '0 <= START < STOP: steps START..STOP-1 are traced, e.g. (10, 12).')
  p.number('train.checkpointing.period', t.checkpointing.period, 1, integer=True)
  p.number('train.checkpointing.max_to_keep', t.checkpointing.max_to_keep, 1, integer=True)
  p.boolean('train.checkpointing.async_save', t.checkpointing.async_save)


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
  """Every invalid value of `config` as a sentence; [] when the config is usable."""
  try:
    method_cls = methods.get(config.method)
  except ValueError as e:
    return [str(e)]
  p = problems_lib.Problems()
  _engine_problems(p, config, device_count)
  try:
    found = method_cls.config_problems(config)
  except Exception as e:  # pylint: disable=broad-except  (a method's checks must not raise)
    found = [f'config.method={config.method!r} could not check its keys ({type(e).__name__}: '
             f'{e}); fix its values, see the problems above.']
  model = evaluation.model_shape(config) if not found else None
  return p.found + found + evaluators.config_problems(config.evals, model)


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises `ConfigError` listing every invalid value (see `problems`)."""
  found = problems(config, jax.device_count() if device_count is None else device_count)
  if found:
    raise ConfigError('Invalid config (fix on the command line, e.g. '
                      '--config.train.global_batch_size=256, or in the config file):\n  - '
                      + '\n  - '.join(found))
