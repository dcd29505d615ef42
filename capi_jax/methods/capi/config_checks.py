"""CAPI's config checks: `model` (the EncoderDecoder), `data` (crops, masks), `optim` (the
student's schedules), `capi` (heads, clustering optimiser), `efficiency.remat_policy`."""

import ml_collections

from capi_jax.data import masking
from capi_jax.models import encoder_decoder


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid value of the keys CAPI reads, as sentences; [] when usable."""
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
  check(o.global_batch_size % m.drop_path_groups == 0,
        f'optim.global_batch_size={o.global_batch_size} must be divisible by '
        f'model.drop_path_groups={m.drop_path_groups}.')
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
  check(d.masking_generator in masking.GENERATORS,
        f'data.masking_generator={d.masking_generator!r} must be one of {masking.GENERATORS}.')
  for name, sched in (('optim.lr_schedule', o.lr_schedule),
                      ('capi.clustering_optimizer.lr_schedule',
                       config.capi.clustering_optimizer.lr_schedule),
                      ('optim.momentum_schedule', o.momentum_schedule)):
    check(0 <= sched.warmup_iters <= o.total_iters,
          f'{name}.warmup_iters={sched.warmup_iters} must be in [0, optim.total_iters={o.total_iters}].')
  ck = config.capi.clustering_kwargs
  for name, value in (('capi.student_temp', config.capi.student_temp),
                      ('capi.clustering_kwargs.target_temp', ck.target_temp),
                      ('capi.clustering_kwargs.pred_temp', ck.pred_temp)):
    check(value > 0, f'{name}={value} must be > 0.')
  check(ck.n_sk_iter >= 1, f'capi.clustering_kwargs.n_sk_iter={ck.n_sk_iter} must be >= 1.')
  check(config.capi.num_clusters >= 2, f'capi.num_clusters={config.capi.num_clusters} must be >= 2.')
  check(config.efficiency.remat_policy in encoder_decoder.REMAT_POLICIES,
        f'efficiency.remat_policy={config.efficiency.remat_policy!r} must be one of '
        f'{encoder_decoder.REMAT_POLICIES}.')
  return found
