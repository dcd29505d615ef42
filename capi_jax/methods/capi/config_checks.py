"""CAPI's config checks: `model` (the EncoderDecoder), `data` (crops, masks), `optim` (the
student's AdamW and schedules), `capi` (heads, clustering optimiser), `efficiency.remat_policy`.
They never raise, whatever the values (see `base.problems.Problems`)."""

from typing import Any

import ml_collections

from capi_jax.base import problems as problems_lib
from capi_jax.data import masking
from capi_jax.models import layers


def _check_model(p: problems_lib.Problems, m: ml_collections.ConfigDict) -> None:
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
            "'edge' register coordinates need model.n_registers divisible by 4, got "
            f'{m.n_registers}.')
  if p.number('model.encoder_depth', m.encoder_depth, 1, integer=True):
    p.number('model.out_layer', m.out_layer, -m.encoder_depth - 1, m.encoder_depth, integer=True)
  p.number('model.decoder_depth', m.decoder_depth, 1, integer=True)
  p.number('model.drop_path_rate', m.drop_path_rate, 0, 1, high_open=True)
  p.number('model.drop_path_groups', m.drop_path_groups, 1, integer=True)


def _check_data(p: problems_lib.Problems, d: ml_collections.ConfigDict, patch_size: Any) -> None:
  size_ok = p.number('data.image_size', d.image_size, 1, integer=True)
  if size_ok and problems_lib.is_int(patch_size) and patch_size >= 1:
    size_ok = p.check(d.image_size % patch_size == 0, f'data.image_size={d.image_size} must be '
                      f'divisible by model.patch_size={patch_size}.')
  else:
    size_ok = False
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
  p.choice('data.masking_generator', d.masking_generator, masking.GENERATORS)
  p.boolean('data.masking_roll', d.masking_roll)


def _check_optim(p: problems_lib.Problems, o: ml_collections.ConfigDict,
                 drop_path_groups: Any) -> None:
  if (problems_lib.is_int(o.global_batch_size) and problems_lib.is_int(drop_path_groups)
      and drop_path_groups >= 1):
    p.check(o.global_batch_size % drop_path_groups == 0,
            f'optim.global_batch_size={o.global_batch_size} must be divisible by '
            f'model.drop_path_groups={drop_path_groups}.')
  p.adamw('optim', o)
  p.schedule('optim.lr_schedule', o.lr_schedule, o.total_iters)
  p.schedule('optim.momentum_schedule', o.momentum_schedule, o.total_iters, high=1)
  for name in ('patch_embed_lr_mult', 'rope_lr_mult', 'layernorm_wd_mult'):
    p.number(f'optim.{name}', o[name], 0)


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
  _check_model(p, config.model)
  _check_data(p, config.data, config.model.patch_size)
  _check_optim(p, config.optim, config.model.drop_path_groups)
  _check_capi(p, config.capi, config.optim.total_iters)
  p.choice('efficiency.remat_policy', config.efficiency.remat_policy,
           layers.REMAT_POLICIES)
  return p.found
