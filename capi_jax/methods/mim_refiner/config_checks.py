"""MIM-Refiner's config checks: `mim_refiner` (stage, encoder, heads, queue, views, ...),
`mim_refiner.model` (the encoder's sizes), `data.image_size` (the global views),
`mim_refiner.optim` and the training lengths it schedules over (`train`)."""

import dataclasses
import math

import ml_collections

from capi_jax.methods.mim_refiner import augment
from capi_jax.methods.mim_refiner import encoder
from capi_jax.models import layers
from capi_jax.models import vit

_POSITIVE_INTS = ('proj_hidden_dim', 'pred_hidden_dim', 'output_dim', 'queue_size', 'topk')
_VIEW_KEYS = sorted({f.name for f in dataclasses.fields(augment.MultiCrop)} - {'global_size'})


def _model_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The encoder's sizes: heads divide the width, crops divide into patches, known fields."""
  m, found = config.mim_refiner.model, []
  kind = config.mim_refiner.encoder
  if kind != encoder.CAPI:
    fields = {f.name for f in dataclasses.fields(vit.ViT)} - {
        'parent', 'name', *vit.EFFICIENCY_FIELDS}
    unknown = sorted(set(m) - fields)
    if unknown:
      return [f'mim_refiner.model has keys {unknown} that vit.ViT does not have '
              f'(mim_refiner.encoder={kind!r} builds a vit.ViT); valid: {sorted(fields)}.']
  get = lambda key, default=None: m.get(key, default)
  dim, heads, patch = get('embed_dim', 768), get('num_heads', 12), get('patch_size', 16)
  if not (isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads == 0):
    found.append(f'mim_refiner.model.embed_dim={dim} must be divisible by '
                 f'mim_refiner.model.num_heads={heads}.')
  if not isinstance(patch, int) or patch < 1:
    return found + [f'mim_refiner.model.patch_size={patch} must be a positive integer.']
  sizes = {'data.image_size': config.data.image_size,
           'mim_refiner.views.local_size': config.mim_refiner.views.get('local_size', 96)}
  if kind != encoder.CAPI:
    sizes['mim_refiner.model.image_size'] = get('image_size', 224)
  for key, size in sizes.items():
    if not isinstance(size, int) or size < patch or size % patch:
      found.append(f'{key}={size} must be a positive multiple of mim_refiner.model.patch_size='
                   f'{patch}.')
  if kind == encoder.CAPI:
    if dim % heads == 0 and (dim // heads) % 4:
      found.append(f'2-D RoPE needs a head dim (embed_dim / num_heads = {dim // heads}) '
                   'divisible by 4.')
    if get('register_coordinates') == 'edge' and get('n_registers', 0) % 4:
      found.append("'edge' register coordinates need mim_refiner.model.n_registers divisible by "
                   "4, got "
                   f"{get('n_registers')}.")
  return found


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid value of the keys MIM-Refiner reads, as sentences; [] when usable."""
  cfg, t = config.mim_refiner, config.train
  o = cfg.optim
  found = []

  def check(ok: bool, message: str) -> None:
    if not ok:
      found.append(message)

  check(cfg.stage in (2, 3), f'mim_refiner.stage={cfg.stage!r} must be 2 (heads only, encoder '
        'frozen) or 3 (everything).')
  check(cfg.encoder in encoder.ENCODERS,
        f'mim_refiner.encoder={cfg.encoder!r} must be one of {encoder.ENCODERS}.')
  if cfg.encoder in encoder.ENCODERS:
    found += _model_problems(config)
  depth = cfg.model.get('encoder_depth' if cfg.encoder == encoder.CAPI else 'depth', 0)
  heads = list(cfg.heads) if isinstance(cfg.heads, (list, tuple)) else []
  check(bool(heads), f'mim_refiner.heads={cfg.heads!r} must name at least one head '
        "('main' or 'cls<N>').")
  check(len(set(heads)) == len(heads), f'mim_refiner.heads={tuple(heads)} has repeated names.')
  for name in heads:
    try:
      block = encoder.head_block(name)
    except (TypeError, ValueError) as e:
      found.append(f'mim_refiner.heads: {e}')
      continue
    check(block is None or block < depth,
          f'mim_refiner.heads: {name!r} reads block {block}, but the encoder has blocks '
          f'0..{depth - 1}.')
  check(cfg.pooling in encoder.POOLINGS,
        f'mim_refiner.pooling={cfg.pooling!r} must be one of {encoder.POOLINGS}.')
  check(cfg.temperature > 0, f'mim_refiner.temperature={cfg.temperature} must be > 0.')
  for key in _POSITIVE_INTS:
    check(isinstance(cfg[key], int) and cfg[key] >= 1,
          f'mim_refiner.{key}={cfg[key]!r} must be a positive integer.')
  for key in ('proj_hidden_layers', 'pred_hidden_layers'):
    check(isinstance(cfg[key], int) and cfg[key] >= 0,
          f'mim_refiner.{key}={cfg[key]!r} must be a non-negative integer.')
  check(cfg.topk <= cfg.queue_size,
        f'mim_refiner.topk={cfg.topk} must not exceed mim_refiner.queue_size={cfg.queue_size}.')
  check(cfg.queue_size >= t.global_batch_size,
        f'mim_refiner.queue_size={cfg.queue_size} must be at least train.global_batch_size='
        f'{t.global_batch_size}: every step enqueues one row per sample.')
  check(0.0 <= cfg.ema <= 1.0, f'mim_refiner.ema={cfg.ema} must be in [0, 1].')
  check(0.0 < cfg.layer_decay <= 1.0,
        f'mim_refiner.layer_decay={cfg.layer_decay} must be in (0, 1] (1: no decay).')
  check(cfg.freeze_end_percent is None or 0.0 <= cfg.freeze_end_percent <= 1.0,
        f'mim_refiner.freeze_end_percent={cfg.freeze_end_percent} must be None (no freezer) or '
        'in [0, 1].')
  unknown = sorted(set(cfg.views) - set(_VIEW_KEYS))
  check(not unknown, f'mim_refiner.views has unknown keys {unknown}; valid: {_VIEW_KEYS} (the '
        'global view size is data.image_size).')
  if not unknown:
    try:
      augment.MultiCrop(global_size=config.data.image_size, **dict(cfg.views))
    except (TypeError, ValueError) as e:
      found.append(f'mim_refiner.views: {e}')
  finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)
  check(finite(o.base_lr) and o.base_lr > 0,
        f'mim_refiner.optim.base_lr={o.base_lr} must be a finite number > 0.')
  check(finite(o.end_lr) and o.end_lr >= 0,
        f'mim_refiner.optim.end_lr={o.end_lr} must be a finite number >= 0.')
  check(0 <= o.warmup_iters < t.total_iters,
        f'mim_refiner.optim.warmup_iters={o.warmup_iters} must be in [0, train.total_iters='
        f'{t.total_iters}).')
  check(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
        f'mim_refiner.optim.betas={tuple(o.betas)} must be two values in [0, 1).')
  check(finite(o.eps) and o.eps > 0, f'mim_refiner.optim.eps={o.eps} must be a finite number > 0.')
  check(finite(o.weight_decay) and finite(o.head_weight_decay) and o.weight_decay >= 0
        and o.head_weight_decay >= 0,
        f'mim_refiner.optim.weight_decay={o.weight_decay} and mim_refiner.optim.'
        f'head_weight_decay={o.head_weight_decay} must be finite numbers >= 0.')
  check(t.global_batch_size >= 2,
        f'train.global_batch_size={t.global_batch_size} must be >= 2: the heads\' BatchNorm '
        'normalises over the batch.')
  check(config.efficiency.remat_policy in layers.REMAT_POLICIES,
        f'efficiency.remat_policy={config.efficiency.remat_policy!r} must be one of '
        f'{layers.REMAT_POLICIES}.')
  return found
