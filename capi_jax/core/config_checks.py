"""Up-front checks of a config's values, so a bad value fails in one second with a clear message.

Without them a bad value surfaces minutes later, deep inside Grain workers or jit tracing.
`validate(config)` raises one `ConfigError` listing every problem found, each naming the key,
its value and what would be valid.
"""

import jax
import ml_collections

from capi_jax.data import masking
from capi_jax.models import encoder_decoder

_DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """One or more config values are invalid; the message lists each with its fix."""


def problems(config: ml_collections.ConfigDict, device_count: int | None = None) -> list[str]:
  """Every invalid value of `config` as a sentence; [] when the config is usable."""
  m, d, o = config.model, config.data, config.optim
  found = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      found.append(message)

  check(m.embed_dim % m.num_heads == 0,
        f'model.embed_dim={m.embed_dim} must be divisible by model.num_heads={m.num_heads}.')
  if m.embed_dim % m.num_heads == 0:
    head_dim = m.embed_dim // m.num_heads
    check(head_dim % 4 == 0, f'2-D RoPE needs a head dim (embed_dim / num_heads = {head_dim}) '
          'divisible by 4.')
  check(m.register_coordinates in ('edge', 'zeros'),
        f"model.register_coordinates={m.register_coordinates!r} must be 'edge' or 'zeros'.")
  check(m.register_coordinates != 'edge' or m.n_registers % 4 == 0,
        f"'edge' register coordinates need model.n_registers divisible by 4, got {m.n_registers}.")
  check(m.encoder_depth >= 1 and m.decoder_depth >= 1,
        f'model.encoder_depth={m.encoder_depth} and model.decoder_depth={m.decoder_depth} must be '
        '>= 1.')
  check(-m.encoder_depth - 1 <= m.out_layer <= m.encoder_depth,
        f'model.out_layer={m.out_layer} must be in [-{m.encoder_depth + 1}, {m.encoder_depth}].')
  check(0.0 <= m.drop_path_rate < 1.0, f'model.drop_path_rate={m.drop_path_rate} must be in [0, 1).')
  check(d.image_size % m.patch_size == 0,
        f'data.image_size={d.image_size} must be divisible by model.patch_size={m.patch_size}.')
  check(0.0 < d.mask_ratio < 1.0,
        f'data.mask_ratio={d.mask_ratio} must be in (0, 1): some tokens must stay visible.')
  check(0.0 < d.prediction_subsampling <= 1.0,
        f'data.prediction_subsampling={d.prediction_subsampling} must be in (0, 1].')
  if d.image_size % m.patch_size == 0 and 0.0 < d.mask_ratio < 1.0:
    try:  # The pipeline's own count, so the two can never disagree.
      masking.mask_counts((d.image_size // m.patch_size) ** 2, d.mask_ratio,
                          d.prediction_subsampling)
    except ValueError as e:
      found.append(str(e))
  lo, hi = d.crop_scale
  check(0.0 < lo <= hi <= 1.0, f'data.crop_scale={tuple(d.crop_scale)} must satisfy 0 < min <= max <= 1.')
  check(d.masking_generator in ('InverseBlock', 'Block', 'Uniform'),
        f"data.masking_generator={d.masking_generator!r} must be 'InverseBlock', 'Block' or "
        "'Uniform'.")
  check(o.global_batch_size >= 1, f'optim.global_batch_size={o.global_batch_size} must be >= 1.')
  if device_count:
    check(o.global_batch_size % device_count == 0,
          f'optim.global_batch_size={o.global_batch_size} must be divisible by the {device_count} '
          'devices the batch is split over.')
  check(o.global_batch_size % m.drop_path_groups == 0,
        f'optim.global_batch_size={o.global_batch_size} must be divisible by '
        f'model.drop_path_groups={m.drop_path_groups}.')
  for name, sched in (('optim.lr_schedule', o.lr_schedule),
                      ('capi.clustering_optimizer.lr_schedule',
                       config.capi.clustering_optimizer.lr_schedule),
                      ('optim.momentum_schedule', o.momentum_schedule)):
    check(0 <= sched.warmup_iters <= o.total_iters,
          f'{name}.warmup_iters={sched.warmup_iters} must be in [0, optim.total_iters={o.total_iters}].')
  check(o.total_iters >= 1, f'optim.total_iters={o.total_iters} must be >= 1.')
  ck = config.capi.clustering_kwargs
  for name, value in (('capi.student_temp', config.capi.student_temp),
                      ('capi.clustering_kwargs.target_temp', ck.target_temp),
                      ('capi.clustering_kwargs.pred_temp', ck.pred_temp)):
    check(value > 0, f'{name}={value} must be > 0.')
  check(ck.n_sk_iter >= 1, f'capi.clustering_kwargs.n_sk_iter={ck.n_sk_iter} must be >= 1.')
  check(config.capi.num_clusters >= 2, f'capi.num_clusters={config.capi.num_clusters} must be >= 2.')
  e = config.efficiency
  check(e.compute_dtype in _DTYPES, f'efficiency.compute_dtype={e.compute_dtype!r} must be one of {_DTYPES}.')
  check(e.param_dtype in _DTYPES, f'efficiency.param_dtype={e.param_dtype!r} must be one of {_DTYPES}.')
  check(e.remat_policy in encoder_decoder.REMAT_POLICIES,
        f'efficiency.remat_policy={e.remat_policy!r} must be one of {encoder_decoder.REMAT_POLICIES}.')
  check(config.train.log_loss_every >= 1 and config.train.nan_check_period >= 1,
        'train.log_loss_every and train.nan_check_period must be >= 1.')
  check(config.train.checkpointing.period >= 1 and config.train.checkpointing.max_to_keep >= 1,
        'train.checkpointing.period and train.checkpointing.max_to_keep must be >= 1.')
  check(config.evals.model in ('student', 'ema'),
        f"evals.model={config.evals.model!r} must be 'student' or 'ema'.")
  return found


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Raises `ConfigError` listing every invalid value (see `problems`)."""
  found = problems(config, jax.device_count() if device_count is None else device_count)
  if found:
    raise ConfigError('Invalid config (fix on the command line, e.g. --config.data.mask_ratio=0.65, '
                      'or in the config file):\n  - ' + '\n  - '.join(found))
