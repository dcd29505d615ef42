"""Up-front checks of a config's values, so a bad value fails in one second with a clear message.

Without them a bad value surfaces minutes later, deep inside Grain workers or jit tracing, or
never (a negative learning rate trains "fine"). `validate(config)` raises one `ConfigError`
listing every problem found, each naming the key, its value and what would be valid.
`problems` never raises, whatever the values (wrong types, wrong tuple lengths, zeros).
Evaluation settings (`evals.*`) are checked by `capi_jax.evaluators`.
"""

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
import ml_collections

from capi_jax.core import cli
from capi_jax.core import sharding
from capi_jax.data import masking
from capi_jax.models import encoder_decoder

_DTYPES = ('float32', 'bfloat16', 'float16')
_SHARDING_STRATEGIES = ('fsdp', 'replicate')


class ConfigError(cli.UserError, ValueError):
  """One or more config values are invalid; the message lists each with its fix."""


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
  if low is not None and high is not None:
    return f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  if low is not None:
    return f'{">" if low_open else ">="} {low}'
  return f'{"<" if high_open else "<="} {high}'


class _Problems:
  """Collects one sentence per invalid value."""

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
    ok = (_is_int(value) if integer else _is_number(value))
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    return self.check(ok, f'{key}={value!r} must be {" ".join(what) or "a number"}.')

  def choice(self, key: str, value: Any, options: Sequence[Any]) -> bool:
    return self.check(value in options, f'{key}={value!r} must be one of {tuple(options)}.')

  def boolean(self, key: str, value: Any) -> bool:
    return self.check(isinstance(value, bool), f'{key}={value!r} must be True or False.')

  def pair(self, key: str, value: Any, description: str) -> bool:
    """`value` is a pair of finite numbers; `description` says what else they must satisfy."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(_is_number(v) for v in value))
    return self.check(ok, f'{key}={value!r} must be a pair of numbers ({description}).')


def _check_adamw(p: _Problems, key: str, cfg: ml_collections.ConfigDict) -> None:
  if p.pair(f'{key}.betas', cfg.betas, 'each in [0, 1)'):
    p.check(all(0 <= b < 1 for b in cfg.betas), f'{key}.betas={tuple(cfg.betas)} must each be '
            'in [0, 1).')
  p.number(f'{key}.eps', cfg.eps, 0, low_open=True)
  p.number(f'{key}.weight_decay', cfg.weight_decay, 0)


def _check_schedule(p: _Problems, key: str, cfg: ml_collections.ConfigDict, total_iters: Any,
                    high: float | None = None) -> None:
  """A `schedules.from_config` section; values in [0, high] (learning rates: >= 0)."""
  for name in ('base_value', 'final_value', 'start_warmup_value'):
    if name in cfg:
      p.number(f'{key}.{name}', cfg[name], 0, high)
  if _is_int(total_iters) and total_iters >= 1:
    p.number(f'{key}.warmup_iters', cfg.warmup_iters, 0, total_iters, integer=True)
  if 'truncate_cos' in cfg:
    p.number(f'{key}.truncate_cos', cfg.truncate_cos, 0, 1)


def _check_model(p: _Problems, m: ml_collections.ConfigDict) -> None:
  p.number('model.patch_size', m.patch_size, 1, integer=True)
  p.number('model.norm_eps', m.norm_eps, 0, low_open=True)
  p.number('model.mlp_ratio', m.mlp_ratio, 0, low_open=True)
  p.boolean('model.scale_reg_to_visible', m.scale_reg_to_visible)
  heads_ok = p.number('model.num_heads', m.num_heads, 1, integer=True)
  if p.number('model.embed_dim', m.embed_dim, 1, integer=True) and heads_ok:
    if p.check(m.embed_dim % m.num_heads == 0, f'model.embed_dim={m.embed_dim} must be divisible '
               f'by model.num_heads={m.num_heads}.'):
      head_dim = m.embed_dim // m.num_heads
      p.check(head_dim % 4 == 0, f'2-D RoPE needs a head dim (embed_dim / num_heads = {head_dim}) '
              'divisible by 4.')
  if (p.choice('model.register_coordinates', m.register_coordinates, ('edge', 'zeros'))
      and p.number('model.n_registers', m.n_registers, 0, integer=True)):
    p.check(m.register_coordinates != 'edge' or m.n_registers % 4 == 0,
            f"'edge' register coordinates need model.n_registers divisible by 4, got "
            f'{m.n_registers}.')
  encoder_ok = p.number('model.encoder_depth', m.encoder_depth, 1, integer=True)
  p.number('model.decoder_depth', m.decoder_depth, 1, integer=True)
  if encoder_ok:
    p.number('model.out_layer', m.out_layer, -m.encoder_depth - 1, m.encoder_depth, integer=True)
  p.number('model.drop_path_rate', m.drop_path_rate, 0, 1, high_open=True)
  p.number('model.drop_path_groups', m.get('drop_path_groups', 1), 1, integer=True)


def _check_data(p: _Problems, d: ml_collections.ConfigDict, patch_size: Any) -> None:
  for name in ('dataset', 'split'):
    p.check(isinstance(d[name], str) and d[name] != '', f'data.{name}={d[name]!r} must be a '
            'non-empty string.')
  p.check(isinstance(d.data_dir, str), f'data.data_dir={d.data_dir!r} must be a string.')
  patch_ok = _is_int(patch_size) and patch_size >= 1
  size_ok = p.number('data.image_size', d.image_size, 1, integer=True) and patch_ok
  if size_ok:
    size_ok = p.check(d.image_size % patch_size == 0, f'data.image_size={d.image_size} must be '
                      f'divisible by model.patch_size={patch_size}.')
  ratio_ok = p.number('data.mask_ratio', d.mask_ratio, 0, 1, low_open=True, high_open=True)
  subsampling_ok = p.number('data.prediction_subsampling', d.prediction_subsampling, 0, 1,
                            low_open=True)
  if size_ok and ratio_ok and subsampling_ok:
    try:  # The pipeline's own count, so the two can never disagree.
      masking.mask_counts((d.image_size // patch_size) ** 2, d.mask_ratio,
                          d.prediction_subsampling)
    except ValueError as e:
      p.found.append(str(e))
  if p.pair('data.crop_scale', d.crop_scale, 'min, max with 0 < min <= max <= 1'):
    lo, hi = d.crop_scale
    p.check(0.0 < lo <= hi <= 1.0, f'data.crop_scale={tuple(d.crop_scale)} must satisfy '
            '0 < min <= max <= 1.')
  p.boolean('data.do_hflip', d.do_hflip)
  p.choice('data.masking_generator', d.masking_generator, ('InverseBlock', 'Block', 'Uniform'))
  p.boolean('data.masking_roll', d.masking_roll)
  p.number('data.num_workers', d.num_workers, 0, integer=True)
  p.number('data.prefetch_buffer_size', d.prefetch_buffer_size, 0, integer=True)


def _check_optim(p: _Problems, o: ml_collections.ConfigDict, device_count: int | None,
                 drop_path_groups: Any) -> None:
  p.number('optim.total_iters', o.total_iters, 1, integer=True)
  if p.number('optim.global_batch_size', o.global_batch_size, 1, integer=True):
    if device_count:
      p.check(o.global_batch_size % device_count == 0,
              f'optim.global_batch_size={o.global_batch_size} must be divisible by the '
              f'{device_count} devices the batch is split over.')
    if _is_int(drop_path_groups) and drop_path_groups >= 1:
      p.check(o.global_batch_size % drop_path_groups == 0,
              f'optim.global_batch_size={o.global_batch_size} must be divisible by '
              f'model.drop_path_groups={drop_path_groups}.')
  _check_adamw(p, 'optim', o)
  _check_schedule(p, 'optim.lr_schedule', o.lr_schedule, o.total_iters)
  _check_schedule(p, 'optim.momentum_schedule', o.momentum_schedule, o.total_iters, high=1)
  for name in ('patch_embed_lr_mult', 'rope_lr_mult', 'layernorm_wd_mult'):
    p.number(f'optim.{name}', o[name], 0)


def _check_capi(p: _Problems, c: ml_collections.ConfigDict, total_iters: Any) -> None:
  ck = c.clustering_kwargs
  for key, value in (('capi.student_temp', c.student_temp),
                     ('capi.clustering_kwargs.target_temp', ck.target_temp),
                     ('capi.clustering_kwargs.pred_temp', ck.pred_temp)):
    p.number(key, value, 0, low_open=True)
  p.number('capi.clustering_kwargs.n_sk_iter', ck.n_sk_iter, 1, integer=True)
  p.boolean('capi.clustering_kwargs.bias', ck.bias)
  p.number('capi.num_clusters', c.num_clusters, 2, integer=True)
  _check_adamw(p, 'capi.clustering_optimizer', c.clustering_optimizer)
  _check_schedule(p, 'capi.clustering_optimizer.lr_schedule', c.clustering_optimizer.lr_schedule,
                  total_iters)


def _check_sharding(p: _Problems, s: ml_collections.ConfigDict, device_count: int | None) -> None:
  mesh = s.mesh
  mesh_ok = p.check(
      isinstance(mesh, (tuple, list)) and len(mesh) >= 1
      and all(isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str)
              and _is_int(a[1]) and (a[1] >= 1 or a[1] == -1) for a in mesh)
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


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
  """Every invalid value of `config` as a sentence; [] when the config is usable."""
  p = _Problems()
  m, t = config.model, config.train
  _check_model(p, m)
  _check_data(p, config.data, m.patch_size)
  _check_optim(p, config.optim, device_count, m.get('drop_path_groups', 1))
  _check_capi(p, config.capi, config.optim.total_iters)
  e = config.efficiency
  p.choice('efficiency.compute_dtype', e.compute_dtype, _DTYPES)
  p.choice('efficiency.param_dtype', e.param_dtype, _DTYPES)
  # Gradients are reduced in the master weights' dtype (see train_step.init_fn).
  p.check(e.reduce_dtype == e.param_dtype, f'efficiency.reduce_dtype={e.reduce_dtype!r} must '
          f'equal efficiency.param_dtype={e.param_dtype!r}.')
  p.choice('efficiency.remat_policy', e.remat_policy, encoder_decoder.REMAT_POLICIES)
  _check_sharding(p, config.sharding, device_count)
  p.number('train.seed', t.seed, integer=True)
  p.number('train.log_loss_every', t.log_loss_every, 1, integer=True)
  p.number('train.nan_check_period', t.nan_check_period, 1, integer=True)
  p.boolean('train.auto_resume', t.auto_resume)
  p.number('train.checkpointing.period', t.checkpointing.period, 1, integer=True)
  p.number('train.checkpointing.max_to_keep', t.checkpointing.max_to_keep, 1, integer=True)
  p.boolean('train.checkpointing.async_save', t.checkpointing.async_save)
  p.choice('evals.model', config.evals.model, ('student', 'ema'))
  return p.found


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises `ConfigError` listing every invalid value (see `problems`)."""
  found = problems(config, jax.device_count() if device_count is None else device_count)
  if found:
    raise ConfigError('Invalid config (fix on the command line, e.g. --config.data.mask_ratio=0.65, '
                      'or in the config file):\n  - ' + '\n  - '.join(found))
