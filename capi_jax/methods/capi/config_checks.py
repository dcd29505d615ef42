"""CAPI's config checks: `capi.model` (the EncoderDecoder), `capi.data` (crops, masks) at
`data.image_size`, `capi.optim` (the student's AdamW and schedules over `train.total_iters`),
`capi` (heads, clustering optimiser), `efficiency.remat_policy`.
They never raise, whatever the values (see `base.problems.Problems`)."""

from typing import Any

import ml_collections

from capi_jax.base import problems as problems_lib
from capi_jax.data import masking
from capi_jax.models import layers


def _check_model(p: problems_lib.Problems, m: ml_collections.ConfigDict) -> None:
  p.number('capi.model.patch_size', m.patch_size, 1, integer=True)
  p.number('capi.model.norm_eps', m.norm_eps, 0, low_open=True)
  p.number('capi.model.mlp_ratio', m.mlp_ratio, 0, low_open=True)
  p.boolean('capi.model.scale_reg_to_visible', m.scale_reg_to_visible)
  heads_ok = p.number('capi.model.num_heads', m.num_heads, 1, integer=True)
  if p.number('capi.model.embed_dim', m.embed_dim, 1, integer=True) and heads_ok:
    if p.check(m.embed_dim % m.num_heads == 0, f'capi.model.embed_dim={m.embed_dim} must be '
               f'divisible by capi.model.num_heads={m.num_heads}.'):
      head_dim = m.embed_dim // m.num_heads
      p.check(head_dim % 4 == 0, f'2-D RoPE needs a head dim (embed_dim / num_heads = {head_dim}) '
              'divisible by 4.')
  if (p.choice('capi.model.register_coordinates', m.register_coordinates, ('edge', 'zeros'))
      and p.number('capi.model.n_registers', m.n_registers, 0, integer=True)):
    p.check(m.register_coordinates != 'edge' or m.n_registers % 4 == 0,
            "'edge' register coordinates need capi.model.n_registers divisible by 4, got "
            f'{m.n_registers}.')
  if p.number('capi.model.encoder_depth', m.encoder_depth, 1, integer=True):
    p.number('capi.model.out_layer', m.out_layer, -m.encoder_depth - 1, m.encoder_depth,
             integer=True)
  p.number('capi.model.decoder_depth', m.decoder_depth, 1, integer=True)
  p.number('capi.model.drop_path_rate', m.drop_path_rate, 0, 1, high_open=True)
  p.number('capi.model.drop_path_groups', m.drop_path_groups, 1, integer=True)


def _check_data(p: problems_lib.Problems, image_size: Any, d: ml_collections.ConfigDict,
                patch_size: Any) -> None:
  size_ok = p.number('data.image_size', image_size, 1, integer=True)
  if size_ok and problems_lib.is_int(patch_size) and patch_size >= 1:
    size_ok = p.check(image_size % patch_size == 0, f'data.image_size={image_size} must be '
                      f'divisible by capi.model.patch_size={patch_size}.')
  else:
    size_ok = False
  ratio_ok = p.number('capi.data.mask_ratio', d.mask_ratio, 0, 1, low_open=True, high_open=True)
  subsampling_ok = p.number('capi.data.prediction_subsampling', d.prediction_subsampling, 0,
                            1, low_open=True)
  if size_ok and ratio_ok and subsampling_ok:
    try:  # The pipeline's own count, so the two can never disagree.
      masking.mask_counts((image_size // patch_size) ** 2, d.mask_ratio,
                          d.prediction_subsampling)
    except ValueError as e:
      p.found.append(str(e))
  if p.pair('capi.data.crop_scale', d.crop_scale, 'min, max with 0 < min <= max <= 1'):
    lo, hi = d.crop_scale
    p.check(0.0 < lo <= hi <= 1.0, f'capi.data.crop_scale={tuple(d.crop_scale)} must satisfy '
            '0 < min <= max <= 1.')
  p.boolean('capi.data.do_hflip', d.do_hflip)
  p.choice('capi.data.masking_generator', d.masking_generator, masking.GENERATORS)
  p.boolean('capi.data.masking_roll', d.masking_roll)


def _check_optim(p: problems_lib.Problems, o: ml_collections.ConfigDict,
                 t: ml_collections.ConfigDict, drop_path_groups: Any) -> None:
  if (problems_lib.is_int(t.global_batch_size) and problems_lib.is_int(drop_path_groups)
      and drop_path_groups >= 1):
    p.check(t.global_batch_size % drop_path_groups == 0,
            f'train.global_batch_size={t.global_batch_size} must be divisible by '
            f'capi.model.drop_path_groups={drop_path_groups}.')
  p.adamw('capi.optim', o)
  p.schedule('capi.optim.lr_schedule', o.lr_schedule, t.total_iters)
  p.schedule('capi.optim.momentum_schedule', o.momentum_schedule, t.total_iters, high=1)
  for name in ('patch_embed_lr_mult', 'rope_lr_mult', 'layernorm_wd_mult'):
    p.number(f'capi.optim.{name}', o[name], 0)


def _check_capi(p: problems_lib.Problems, c: ml_collections.ConfigDict, total_iters: Any) -> None:
  ck = c.clustering_kwargs
  for key, value in (('capi.student_temp', c.student_temp),
                     ('capi.clustering_kwargs.target_temp', ck.target_temp),
                     ('capi.clustering_kwargs.pred_temp', ck.pred_temp)):
    p.number(key, value, 0, low_open=True)
  p.number('capi.clustering_kwargs.n_sk_iter', ck.n_sk_iter, 1, integer=True)
  p.boolean('capi.clustering_kwargs.bias', ck.bias)
  p.number('capi.num_clusters', c.num_clusters, 2, integer=True)
  p.adamw('capi.clustering_optimizer', c.clustering_optimizer)
  p.schedule('capi.clustering_optimizer.lr_schedule', c.clustering_optimizer.lr_schedule,
             total_iters)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid value of the keys CAPI reads, as sentences; [] when usable."""
  p = problems_lib.Problems()
  c = config.capi
  _check_model(p, c.model)
  _check_data(p, config.data.image_size, c.data, c.model.patch_size)
  _check_optim(p, c.optim, config.train, c.model.drop_path_groups)
  _check_capi(p, c, config.train.total_iters)
  p.choice('efficiency.remat_policy', config.efficiency.remat_policy,
           layers.REMAT_POLICIES)
  return p.found
