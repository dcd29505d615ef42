"""CAE v2's config checks: `caev2.model` (the student encoder), `caev2.data` (the crop) at
`data.image_size`, `caev2.optim` over `train.total_iters`, the rest of `caev2` (masks, regressor,
teacher) and `init`; one sentence per problem, never raising."""

import dataclasses
import numbers

import ml_collections

from capi_jax.data import transforms
from capi_jax.methods.caev2 import teacher as teacher_lib
from capi_jax.models import layers
from capi_jax.models import vit
from capi_jax.weights import vit as vit_weights

_VIT_FIELDS = {f.name for f in dataclasses.fields(vit.ViT)} - {
    'parent', 'name', *vit.EFFICIENCY_FIELDS}
_CAPI_MODEL_KEYS = ('patch_size', 'embed_dim', 'num_heads', 'mlp_ratio', 'encoder_depth',
                    'decoder_depth', 'n_registers')


def _vit_problems(section: str, m: ml_collections.ConfigDict,
                  read_from_file: bool = False) -> list[str]:
  """Problems of a `vit.ViT` config section named `section` (`read_from_file`: its weights come
  from a checkpoint, which may say its activation: '' allowed)."""
  unknown = sorted(set(m) - _VIT_FIELDS)
  if unknown:
    return [f'{section} has unknown ViT field(s) {unknown}; valid: {sorted(_VIT_FIELDS)}.']
  found = []
  for key in ('patch_size', 'image_size', 'embed_dim', 'depth', 'num_heads'):
    if not isinstance(m.get(key), int) or m.get(key) < 1:
      found.append(f'{section}.{key}={m.get(key)!r} must be a positive integer.')
  if found:
    return found
  activations = (*vit.ACTIVATIONS, vit_weights.FROM_FILE) if read_from_file else tuple(
      vit.ACTIVATIONS)
  choices = {'pos_embed': vit.POS_EMBEDS, 'pos_resize': vit.POS_RESIZES,
             'qkv_bias': layers.QKV_BIASES, 'block': vit.BLOCKS, 'activation': activations}
  for key, valid in choices.items():
    if key in m and m[key] not in valid:
      found.append(f'{section}.{key}={m[key]!r} must be one of {valid}.')
  if m.embed_dim % m.num_heads:
    found.append(f'{section}.embed_dim={m.embed_dim} must be divisible by {section}.num_heads='
                 f'{m.num_heads}.')
  if m.image_size % m.patch_size:
    found.append(f'{section}.image_size={m.image_size} must be divisible by '
                 f'{section}.patch_size={m.patch_size}.')
  if m.get('pos_embed', 'sincos_row_col') != 'learned' and m.embed_dim % 4:
    found.append(f'{section}.embed_dim={m.embed_dim} must be divisible by 4 for a sin-cos '
                 'position table.')
  return found


def _teacher_problems(config: ml_collections.ConfigDict, grid: int | None) -> list[str]:
  t = config.caev2.teacher
  found = []
  if t.backbone not in teacher_lib.BACKBONES:
    return [f'caev2.teacher.backbone={t.backbone!r} must be one of {teacher_lib.BACKBONES}.']
  if t.backbone == teacher_lib.CAPI:
    missing = [k for k in _CAPI_MODEL_KEYS if k not in t.model]
    if missing:
      return [f'caev2.teacher.model misses {missing}: the capi backbone takes CAPI\'s '
              'model section (config.capi.model, e.g. configs/tiny.py\'s).']
    if t.model.embed_dim % (4 * t.model.num_heads):
      found.append(f'caev2.teacher.model.embed_dim={t.model.embed_dim} must be divisible by 4 x '
                   f'caev2.teacher.model.num_heads={t.model.num_heads} (2-D RoPE per head).')
  else:
    found += _vit_problems('caev2.teacher.model', t.model, read_from_file=True)
  if not t.checkpoint:
    found.append('caev2.teacher.checkpoint is empty: CAE v2 regresses a pretrained teacher\'s '
                 'features; pass --config.caev2.teacher.checkpoint=PATH (an official CLIP '
                 'file such as ViT-B-16.pt, a capi_jax run or a capi_jax.convert output).')
  if t.normalization not in transforms.NORMALIZATIONS:
    found.append(f'caev2.teacher.normalization={t.normalization!r} must be one of '
                 f'{sorted(transforms.NORMALIZATIONS)}.')
  patch = t.model.get('patch_size', 0)
  if not isinstance(t.image_size, int) or not patch or t.image_size % patch:
    found.append(f'caev2.teacher.image_size={t.image_size!r} must be a multiple of '
                 f'caev2.teacher.model.patch_size={patch}.')
  elif grid is not None and t.image_size // patch != grid:
    found.append(f'The teacher sees a {t.image_size // patch}x{t.image_size // patch} patch grid '
                 f'(caev2.teacher.image_size={t.image_size}, patch {patch}) but the student a '
                 f'{grid}x{grid} one: the targets are per patch, so the grids must match.')
  return found


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid value of the keys CAE v2 reads, as sentences; [] when usable."""
  c, image_size = config.caev2, config.data.image_size
  m, d, o, r = c.model, c.data, c.optim, c.regressor
  found = _vit_problems('caev2.model', m)
  grid = None
  if not found and image_size == m.image_size:
    grid = image_size // m.patch_size

  def check(ok: bool, message: str) -> None:
    if not ok:
      found.append(message)

  check(bool(found) or grid is not None,
        f'data.image_size={image_size} must equal caev2.model.image_size={m.image_size}: the '
        'release builds its position table at the training resolution.')
  check(0.0 <= m.get('drop_path_rate', 0.0) < 1.0,
        f'caev2.model.drop_path_rate={m.get("drop_path_rate")} must be in [0, 1).')
  check(not m.get('out_dim', 0), f'caev2.model.out_dim={m.get("out_dim")} must be 0: the student '
        'encoder has no projection (the decoder head maps to the teacher\'s width).')
  # The release's head width is embed_dim // num_heads, the rest of the width unused.
  check(1 <= r.num_heads <= r.embed_dim, f'caev2.regressor.num_heads={r.num_heads} must be in '
        f'[1, caev2.regressor.embed_dim={r.embed_dim}].')
  check(r.embed_dim % 4 == 0, f'caev2.regressor.embed_dim={r.embed_dim} must be divisible by 4 '
        '(its sin-cos position table).')
  check(r.depth >= 1, f'caev2.regressor.depth={r.depth} must be >= 1.')
  if grid is not None:
    check(grid >= 2, f'The {grid}x{grid} patch grid is too small for block masks (needs 2x2).')
    check(0 < c.num_mask_patches < grid * grid,
          f'caev2.num_mask_patches={c.num_mask_patches} must be in [1, {grid * grid - 1}]: some '
          f'of the {grid * grid} patches must be masked and some visible.')
  check(1 <= c.min_mask_patches_per_block <= max(c.num_mask_patches, 1),
        f'caev2.min_mask_patches_per_block={c.min_mask_patches_per_block} must be in [1, '
        f'caev2.num_mask_patches={c.num_mask_patches}].')
  check(c.max_mask_patches_per_block >= 0, f'caev2.max_mask_patches_per_block='
        f'{c.max_mask_patches_per_block} must be >= 0 (0: no cap).')
  check(0.0 < c.mask_min_aspect <= 1.0,
        f'caev2.mask_min_aspect={c.mask_min_aspect} must be in (0, 1].')
  check(c.loss_weight > 0, f'caev2.loss_weight={c.loss_weight} must be > 0.')
  found += _teacher_problems(config, grid)

  lo, hi = d.crop_scale
  check(0.0 < lo <= hi <= 1.0,
        f'caev2.data.crop_scale={tuple(d.crop_scale)} must satisfy 0 < min <= max <= 1.')
  check(d.color_jitter >= 0, f'caev2.data.color_jitter={d.color_jitter} must be >= 0.')
  check(isinstance(o.weight_decay, numbers.Real),
        f'caev2.optim.weight_decay={o.weight_decay!r} must be a number: CAE v2 decays with a '
        'constant (every recipe\'s schedule is constant).')
  check(0 <= o.lr_schedule.warmup_iters <= config.train.total_iters,
        f'caev2.optim.lr_schedule.warmup_iters={o.lr_schedule.warmup_iters} must be in [0, '
        f'train.total_iters={config.train.total_iters}].')
  check(o.clip_grad is None or o.clip_grad > 0,
        f'caev2.optim.clip_grad={o.clip_grad} must be > 0 (or None: no clipping).')
  check(not config.get('init', {}).get('checkpoint'),
        f'init.checkpoint={config.get("init", {}).get("checkpoint")!r}: CAE v2 trains its '
        'student from scratch; the teacher comes from caev2.teacher.checkpoint.')
  check(config.efficiency.remat_policy in layers.REMAT_POLICIES,
        f'efficiency.remat_policy={config.efficiency.remat_policy!r} must be one of '
        f'{layers.REMAT_POLICIES}.')
  return found
