r"""CAE v2's evaluation protocols' parity suite (`python -m capi_jax.check_reference`).

The fixture format is `tests/fixtures/caev2_eval/README.md` (the release's `run_linear.py`
path and its `run_class_finetuning.py` path on a small ViT). Every size (image, patch, width,
depth, heads, batch, schedule lengths, lr) is read from the fixture. The linear probe is
compared: the class-token forward, the train transform (the release's crop boxes replayed), the
evaluation transform, the schedule and the LARS run of the BatchNorm + Linear head. The
end-to-end fine-tuning part (`ft/`): the cosine schedule, the layer-decay parameter groups, the
relative position index, Mixup / CutMix (the recorded draws replayed), RandAugment's level
arguments, RandomErasing's boxes, and the optimiser steps of `methods/finetune` (drop-path masks,
Mixup draws and inputs replayed) against the float32 and float64 runs, then the validation
logits.
"""

from collections.abc import Mapping
import contextlib
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from capi_jax.base import optim
from capi_jax.base import schedules
from capi_jax.data import augment
from capi_jax.evaluators import caev2_linear
from capi_jax.evaluators import transforms
from capi_jax.methods.finetune import mixing
from capi_jax.methods.finetune import model as ft_model
from capi_jax.methods.finetune import steps as ft_steps
from capi_jax.models import layers
from capi_jax.models import stack
from capi_jax.models import vit
from capi_jax.reference import harness
from capi_jax.reference.harness import compare, Result
from capi_jax.weights import vit as vit_weights

FORWARD_TOL = 1e-5  # Class tokens, head parameters, statistics, logits.
PIXEL_TOL = 1e-5  # Transforms after normalisation (PIL's resampling, as torchvision calls it).
SCHEDULE_TOL = 1e-12
LOSS_TOL = 1e-5
MIX_TOL = 1e-6  # Mixed inputs and soft targets.
LOGITS_TOL = 1e-4  # Fine-tuned model's validation logits.
EXACT = 0.0


class Context:
  """The fixture's arrays and meta."""

  def __init__(self, arrays: Mapping[str, np.ndarray], scan_layers: bool = False):
    self.arrays = arrays
    self.meta = json.loads(str(arrays['meta_json']))
    self.scan_layers = scan_layers

  def group(self, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in self.arrays.items() if k.startswith(prefix)}

  @property
  def lp_args(self) -> dict[str, Any]:
    return self.meta['lp']['args']

  @property
  def ft_args(self) -> dict[str, Any]:
    return self.meta['ft']['args']

  @functools.cached_property
  def ft_classifier(self) -> tuple[ft_model.Classifier, Any]:
    """The release's fine-tuning model (mean pooling, fc_norm, relative position bias) at the
    fixture's sizes, as a `Classifier` with the fixture's initial weights. Its blocks are
    looped: the release's drop-path masks are replayed call by call (with `scan_layers`, the
    final weights are also run scanned on the validation images)."""
    sd = self.group('ft/params/')
    backbone_sd = {k: v for k, v in sd.items() if not k.startswith(('fc_norm.', 'head.'))
                   and not k.endswith('relative_position_index')}
    dim, _, patch, _ = sd['patch_embed.proj.weight'].shape
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    n_patches = sd['pos_embed'].shape[1] - 1
    backbone = vit.ViT(**{**vit.FAMILIES['caev2'], 'final_norm': False}, patch_size=patch,
                       image_size=int(round(n_patches ** 0.5)) * patch, embed_dim=dim,
                       depth=depth, num_heads=self.meta['config']['heads'],
                       mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / dim,
                       drop_path_rate=self.ft_args['drop_path'], rel_pos_bias=True)
    model = ft_model.Classifier(backbone, num_classes=sd['head.weight'].shape[0],
                                init_scale=self.ft_args['init_scale'])
    params = {'backbone': vit_weights.official_to_params(backbone_sd, backbone, 'caev2'),
              'fc_norm': {'scale': sd['fc_norm.weight'], 'bias': sd['fc_norm.bias']},
              'head': {'kernel': sd['head.weight'].T, 'bias': sd['head.bias']}}
    return model, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)

  @functools.cached_property
  def encoder(self) -> tuple[vit.ViT, Any]:
    """The release's fine-tuning ViT with the probe's weights, as a 'caev2' family `vit.ViT`."""
    sd = {k: v for k, v in self.group('lp/params/').items() if not k.startswith('head.')}
    dim, _, patch, _ = sd['patch_embed.proj.weight'].shape
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    n_patches = sd['pos_embed'].shape[1] - 1
    model = vit.ViT(**vit.FAMILIES['caev2'], patch_size=patch,
                    image_size=int(round(n_patches ** 0.5)) * patch, embed_dim=dim, depth=depth,
                    num_heads=self.meta['config']['heads'],
                    mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / dim,
                    scan_layers=self.scan_layers)
    params = vit_weights.official_to_params(sd, model, 'caev2')
    return model, jax.tree.map(jnp.asarray, params)


def _matches(arrays: Mapping[str, np.ndarray]) -> bool:
  return (any(k.startswith('lp/params/') for k in arrays)
          and any(k.startswith('ft/params/') for k in arrays))


SUITE = harness.Suite('caev2_eval', _matches, Context)


@SUITE.register('linear probe: class token forward', requires=(
    'lp/params/patch_embed.proj.weight', 'lp/inputs_step0', 'lp/f32/features'))
def _lp_forward(ctx: Context) -> list[Result]:
  model, params = ctx.encoder
  images = jnp.asarray(ctx.arrays['lp/inputs_step0'].transpose(0, 2, 3, 1))
  tokens = model.apply({'params': params}, images, method=model.encode).tokens
  out = [compare('lp/f32/features[step 0]', tokens[:, 0], ctx.arrays['lp/f32/features'][0],
                 FORWARD_TOL)]
  if 'lp/f64/features' in ctx.arrays:
    out.append(compare('lp/f64/features[step 0]', tokens[:, 0],
                       ctx.arrays['lp/f64/features'][0], FORWARD_TOL))
  return out


@SUITE.register('linear probe: train transform (crop boxes replayed)', requires=(
    'lp/transform/images', 'lp/transform/crops', 'lp/inputs_step0'))
def _lp_transform(ctx: Context) -> list[Result]:
  inputs = ctx.arrays['lp/inputs_step0'].transpose(0, 2, 3, 1)
  size = inputs.shape[1]
  n = min(len(ctx.arrays['lp/transform/crops']), len(inputs))
  errors = []
  for k in range(n):
    image = Image.fromarray(ctx.arrays['lp/transform/images'][k])
    box = tuple(int(v) for v in ctx.arrays['lp/transform/crops'][k])
    # The flip's draw is not stored: the image must match one of the two.
    errors.append(min(float(np.max(np.abs(caev2_linear.train_image(image, size, box, flip)
                                          - inputs[k]))) for flip in (False, True)))
  return [harness.Result('lp/inputs_step0 (crop, resize, flip, normalise)', max(errors),
                         float(np.max(np.abs(inputs[:n]))), PIXEL_TOL)]


@SUITE.register('linear probe: evaluation transform', requires=('lp/val_images',
                                                                 'lp/val_inputs'))
def _lp_eval_transform(ctx: Context) -> list[Result]:
  expected = ctx.arrays['lp/val_inputs'].transpose(0, 2, 3, 1)
  size = expected.shape[1]
  ours = np.stack([transforms.classif_eval(Image.fromarray(v), size)
                   for v in ctx.arrays['lp/val_images']])
  return [compare('lp/val_inputs', ours, expected, PIXEL_TOL)]


def _lp_schedule(ctx: Context, steps: int) -> np.ndarray:
  a = ctx.lp_args
  per_epoch = steps // a['epochs']
  return caev2_linear.schedule(a['lr'], a['warmup_epochs'], a['epochs'], per_epoch, a['min_lr'])


@SUITE.register('linear probe: schedule, BatchNorm + Linear head, LARS', requires=(
    'lp/params/head.1.weight', 'lp/targets', 'lp/f32/features', 'lp/f32/lr'))
def _lp_run(ctx: Context) -> list[Result]:
  targets = ctx.arrays['lp/targets']
  steps = len(targets)
  lrs = _lp_schedule(ctx, steps)
  step = jax.jit(caev2_linear.train_step)
  out = []
  for run in ('f32', 'f64'):
    if f'lp/{run}/features' not in ctx.arrays:
      continue
    params = {'kernel': jnp.asarray(ctx.arrays['lp/params/head.1.weight'].T, jnp.float32),
              'bias': jnp.asarray(ctx.arrays['lp/params/head.1.bias'], jnp.float32)}
    stats = caev2_linear.init_stats(params['kernel'].shape[0])
    mu = jax.tree.map(jnp.zeros_like, params)
    losses, weights = [], []
    for u in range(steps):
      params, mu, stats, loss = step(params, mu, stats,
                                     jnp.asarray(ctx.arrays[f'lp/{run}/features'][u], jnp.float32),
                                     jnp.asarray(targets[u]), jnp.float32(lrs[u]))
      losses.append(float(loss))
      weights.append(np.asarray(params['kernel']).T)
    ref_lr = ctx.arrays[f'lp/{run}/lr']
    out.append(compare(f'lp/{run}/lr', lrs, ref_lr, SCHEDULE_TOL * max(1.0, np.abs(ref_lr).max())))
    out.append(compare(f'lp/{run}/loss', losses, ctx.arrays[f'lp/{run}/loss'], LOSS_TOL))
    out.append(compare(f'lp/{run}/head_weight_steps', np.stack(weights),
                       ctx.arrays[f'lp/{run}/head_weight_steps'], FORWARD_TOL))
    out.append(compare(f'lp/{run}/final/head.1.bias', params['bias'],
                       ctx.arrays[f'lp/{run}/final/head.1.bias'], FORWARD_TOL))
    for stat, key in (('mean', 'running_mean'), ('var', 'running_var')):
      out.append(compare(f'lp/{run}/final/head.0.{key}', stats[stat],
                         ctx.arrays[f'lp/{run}/final/head.0.{key}'], FORWARD_TOL))
    if f'lp/{run}/val_features' in ctx.arrays:
      logits = caev2_linear.logits_eval(params, stats,
                                        jnp.asarray(ctx.arrays[f'lp/{run}/val_features']))
      ref = ctx.arrays[f'lp/{run}/val_logits']
      out.append(compare(f'lp/{run}/val_logits', logits, ref, FORWARD_TOL))
      out.append(compare(f'lp/{run}/val predictions', np.argmax(np.asarray(logits), -1),
                         np.argmax(ref, -1), EXACT, absolute=True))
  return out


# ------------------------------------------------------------------------------ fine-tuning
def _ft_official_name(path: str) -> str:
  """'/'-joined `Classifier` parameter path -> the release's state-dict name."""
  part, _, rest = path.partition('/')
  if part == 'backbone':
    return vit_weights.official_name(rest, 'caev2')
  return f'{part}.' + {'kernel': 'weight', 'scale': 'weight'}.get(rest, rest)


def _ft_recipe(ctx: Context) -> ft_steps.Recipe:
  a = ctx.ft_args
  steps = len(ctx.arrays['ft/targets'])
  per_epoch = steps // a['epochs']
  return ft_steps.Recipe(lr=a['lr'], min_lr=a['min_lr'], total_iters=steps,
                         warmup_iters=a['warmup_epochs'] * per_epoch,
                         weight_decay=a['weight_decay'], layer_decay=a['layer_decay'],
                         num_classes=a['nb_classes'], smoothing=a['smoothing'])


def _ft_mix(ctx: Context, step: int) -> mixing.MixParams:
  """The recorded Mixup / CutMix draw of `step`."""
  if not ctx.arrays['ft/mix_use_cutmix'][step]:
    return mixing.params(ctx.arrays['ft/mix_lam'][step])
  box = tuple(int(v) for v in ctx.arrays['ft/cutmix_bbox'][step])
  return mixing.params(ctx.arrays['ft/mix_lam'][step], True, box)


def _ft_groups(ctx: Context) -> dict[str, optim.Group]:
  model, params = ctx.ft_classifier
  tree = ft_steps.groups(params, model.backbone.depth, ctx.ft_args['layer_decay'])
  return {_ft_official_name(optim.path_name(path)): g
          for path, g in jax.tree_util.tree_leaves_with_path(
              tree, is_leaf=lambda x: isinstance(x, optim.Group))}


@SUITE.register('fine-tuning: cosine schedule (per iteration, warm-up from 0)', requires=(
    'ft/lr_schedule', 'ft/cosine_scheduler_example'))
def _ft_schedule(ctx: Context) -> list[Result]:
  r = _ft_recipe(ctx)
  ours = schedules.warmup_cosine(r.lr, r.min_lr, r.total_iters, r.warmup_iters)
  example = schedules.warmup_cosine(4e-4, 1e-6, 7 * 5, 2 * 5)
  traced = [float(ft_steps.lr_schedule(r)(i)) for i in range(r.total_iters)]
  ref = ctx.arrays['ft/lr_schedule']
  return [compare('ft/lr_schedule', ours, ref, SCHEDULE_TOL * max(1.0, np.abs(ref).max())),
          compare('ft/cosine_scheduler_example', example, ctx.arrays['ft/cosine_scheduler_example'],
                  SCHEDULE_TOL),
          compare('ft/lr_schedule (float32 step function)', traced, ref, 1e-7)]


@SUITE.register('fine-tuning: layer-decay parameter groups', requires=('ft/params/cls_token',))
def _ft_param_groups(ctx: Context) -> list[Result]:
  ours = _ft_groups(ctx)
  lr_err, wd_err, missing = 0.0, 0.0, []
  wd = ctx.ft_args['weight_decay']
  named = set()
  for group in ctx.meta['ft']['param_groups']:
    for name in group['params']:
      named.add(name)
      if name not in ours or ours[name].frozen:
        missing.append(name)
        continue
      lr_err = max(lr_err, abs(ours[name].lr_mult - group['lr_scale']))
      wd_err = max(wd_err, abs(ours[name].wd_mult * wd - group['weight_decay']))
  # Parameters we train that the release does not (and the reverse) count as errors.
  extra = [n for n, g in ours.items() if not g.frozen and n not in named]
  return [Result('param_groups lr_scale', lr_err, 1.0, 1e-12),
            Result('param_groups weight_decay', wd_err, 1.0, 1e-12),
            Result(f'trained parameters missing {missing} / extra {extra}',
                   float(len(missing) + len(extra)), 1.0, EXACT, absolute=True)]


@SUITE.register('fine-tuning: relative position index', requires=(
    'ft/params/blocks.0.attn.relative_position_index',))
def _ft_rel_index(ctx: Context) -> list[Result]:
  model, _ = ctx.ft_classifier
  ours = vit.relative_position_index(model.backbone.grid, model.backbone.grid)
  return [compare('blocks.0.attn.relative_position_index', ours,
                  ctx.arrays['ft/params/blocks.0.attn.relative_position_index'], EXACT,
                  absolute=True)]


@SUITE.register('fine-tuning: Mixup / CutMix with label smoothing (draws replayed)', requires=(
    'ft/inputs', 'ft/soft_targets', 'ft/mixed_inputs_step0', 'ft/mix_lam'))
def _ft_mixup(ctx: Context) -> list[Result]:
  r = _ft_recipe(ctx)
  inputs = ctx.arrays['ft/inputs'].transpose(0, 1, 3, 4, 2)
  h, w = inputs.shape[2:4]
  soft, lam_err = [], 0.0
  for t in range(len(inputs)):
    p = _ft_mix(ctx, t)
    if bool(p.cutmix):
      lam_err = max(lam_err, abs(mixing.corrected_lam(tuple(int(v) for v in p.box), h, w)
                                 - ctx.arrays['ft/mix_lam'][t]))
    mixed, targets = mixing.mix(jnp.asarray(inputs[t]), jnp.asarray(ctx.arrays['ft/targets'][t]),
                                p, r.num_classes, r.smoothing)
    soft.append(targets)
    if t == 0:
      out = [compare('ft/mixed_inputs_step0', mixed,
                     ctx.arrays['ft/mixed_inputs_step0'].transpose(0, 2, 3, 1), MIX_TOL)]
  return out + [compare('ft/soft_targets', np.stack(soft), ctx.arrays['ft/soft_targets'],
                        MIX_TOL),
                Result('ft/mix_lam (CutMix box-area correction)', lam_err, 1.0, 1e-12)]


@SUITE.register('fine-tuning: RandAugment rand-m9-mstd0.5-inc1 (ops, level arguments)',
                requires=('ft/inputs',))
def _ft_randaug(ctx: Context) -> list[Result]:
  draws = [d for image in ctx.meta['ft']['randaug'] for d in image]
  if ctx.meta['ft']['args']['aa'] != 'rand-m9-mstd0.5-inc1':
    raise harness.Skipped(f"the fixture's policy is {ctx.meta['ft']['args']['aa']!r}")
  unknown = sorted({d['op'] for d in draws} - set(augment.INCREASING_OPS))
  err, magnitudes = 0.0, []
  for d in draws:
    if d['op'] in unknown or not d['applied']:
      continue
    magnitudes.append(d['magnitude'])
    # The fixture's recorder drew the sign again when it logged the arguments: compare the
    # distances from the neutral value (1 for the enhancements, 0 otherwise).
    neutral = 1.0 if d['op'] in ('color', 'contrast', 'brightness', 'sharpness') else 0.0
    ours = np.abs(np.asarray(augment.level_args(d['op'], d['magnitude'])) - neutral)
    ref = np.abs(np.asarray(d['level_args']) - neutral)
    err = max(err, float(np.max(np.abs(ours - ref), initial=0.0)))
  per_image = {len(image) for image in ctx.meta['ft']['randaug']}
  return [Result(f'randaug level_args ({len(magnitudes)} applied ops, |arg|)', err, 1.0, 1e-12),
          Result(f'randaug ops outside the increasing set {unknown}, ops per image {per_image}',
                 float(len(unknown) + (per_image != {2})), 1.0, EXACT, absolute=True),
          Result('randaug magnitudes outside [0, 10]',
                 float(sum(not 0 <= m <= augment.MAX_LEVEL for m in magnitudes)), 1.0, EXACT,
                 absolute=True)]


@SUITE.register('fine-tuning: RandomErasing (pixel mode) boxes', requires=(
    'ft/transform/before_erasing', 'ft/transform/outputs'))
def _ft_erasing(ctx: Context) -> list[Result]:
  before = ctx.arrays['ft/transform/before_erasing'].transpose(0, 2, 3, 1)
  after = ctx.arrays['ft/transform/outputs'].transpose(0, 2, 3, 1)
  _, height, width, _ = before.shape
  err, bad_boxes = 0.0, 0
  for k in range(len(before)):
    changed = np.any(before[k] != after[k], axis=-1)
    if not changed.any():
      box = None
    else:
      rows, cols = np.nonzero(changed.any(1))[0], np.nonzero(changed.any(0))[0]
      box = (int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))
      top, left, h, w = box
      area = h * w / (height * width)
      # round() of sqrt(area x aspect) moves the area a little past its drawn range.
      slack = (h + w + 1) / (height * width)
      bad_boxes += not (h < height and w < width and 0.02 - slack <= area <= 1 / 3 + slack)
    values = None if box is None else after[k, top:top + h, left:left + w]
    err = max(err, float(np.max(np.abs(augment.erase(before[k], box, values) - after[k]))))
  return [compare('ft/transform/outputs (erased box replayed)', err, 0.0, EXACT, absolute=True),
          Result('erased boxes outside the sampler\'s range', float(bad_boxes), 1.0, EXACT,
                 absolute=True)]


@contextlib.contextmanager
def _replayed_drop_path(masks: jax.Array):
  """Makes `layers.drop_path` use masks[k] (batch,) on its k-th drawing call, in trace order.

  The release's drop-path masks are recorded per call (block by block, attention then MLP,
  zero-rate blocks drawing nothing), as ours are traced; timm's (x / keep) * mask.
  """
  original, calls = layers.drop_path, iter(range(masks.shape[0]))

  def replay(x, rate, deterministic, make_rng):
    if deterministic or (isinstance(rate, int | float) and rate == 0):
      return original(x, rate, deterministic, make_rng)
    mask = masks[next(calls)].reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return (x / np.float32(1.0 - rate)) * mask.astype(x.dtype)

  layers.drop_path = replay
  try:
    yield
  finally:
    layers.drop_path = original


@SUITE.register('fine-tuning: AdamW steps (drop path, Mixup replayed), validation logits',
                requires=('ft/params/cls_token', 'ft/inputs', 'ft/drop_masks', 'ft/f32/loss'))
def _ft_run(ctx: Context) -> list[Result]:
  model, init = ctx.ft_classifier
  r = _ft_recipe(ctx)
  tx = ft_steps.optimizer(r, init, model.backbone.depth)

  def step(params, opt_state, images, labels, mix, masks):
    with _replayed_drop_path(masks):
      return ft_steps.train_step(model, tx, r, params, opt_state, images, labels, mix,
                                 jax.random.key(0))

  step = jax.jit(step)
  inputs = ctx.arrays['ft/inputs'].transpose(0, 1, 3, 4, 2)
  lr_scales = np.asarray([g['lr_scale'] for g in ctx.meta['ft']['param_groups']])
  wd_values = np.asarray([g['weight_decay'] for g in ctx.meta['ft']['param_groups']])
  schedule = schedules.warmup_cosine(r.lr, r.min_lr, r.total_iters, r.warmup_iters)
  out = []
  for run in ('f32', 'f64'):
    if f'ft/{run}/loss' not in ctx.arrays:
      continue
    params, opt_state = init, tx.init(init)
    losses, norms = [], []
    for t in range(len(inputs)):
      params, opt_state, metrics = step(params, opt_state, jnp.asarray(inputs[t]),
                                        jnp.asarray(ctx.arrays['ft/targets'][t]), _ft_mix(ctx, t),
                                        jnp.asarray(ctx.arrays['ft/drop_masks'][t]))
      losses.append(float(metrics['loss']))
      norms.append(float(metrics['grad_norm']))
      if t == 0:
        out.append(_ft_compare_params(ctx, f'ft/{run}/after_step0/', params))
    ref_lr = ctx.arrays[f'ft/{run}/lr']
    out.append(compare(f'ft/{run}/lr (schedule x lr_scale per group)',
                       schedule[:, None] * lr_scales[None], ref_lr,
                       SCHEDULE_TOL * max(1.0, np.abs(ref_lr).max())))
    out.append(compare(f'ft/{run}/weight_decay', np.broadcast_to(wd_values, ref_lr.shape),
                       ctx.arrays[f'ft/{run}/weight_decay'], SCHEDULE_TOL))
    out.append(compare(f'ft/{run}/loss', losses, ctx.arrays[f'ft/{run}/loss'], LOSS_TOL))
    out.append(compare(f'ft/{run}/grad_norm', norms, ctx.arrays[f'ft/{run}/grad_norm'], LOSS_TOL))
    out.append(_ft_compare_params(ctx, f'ft/{run}/final/', params))
    val_images = jnp.asarray(ctx.arrays['ft/val_inputs'].transpose(0, 2, 3, 1))
    logits = model.apply({'params': params}, val_images)
    ref = ctx.arrays[f'ft/{run}/val_logits']
    out.append(compare(f'ft/{run}/val_logits', logits, ref, LOGITS_TOL))
    out.append(compare(f'ft/{run}/val predictions', np.argmax(np.asarray(logits), -1),
                       np.argmax(ref, -1), EXACT, absolute=True))
    if ctx.scan_layers:
      scanned = model.clone(backbone=model.backbone.clone(scan_layers=True))
      logits = scanned.apply({'params': stack.to_scan_layout(params)}, val_images)
      out.append(compare(f'ft/{run}/val_logits (scanned blocks)', logits, ref, LOGITS_TOL))
  return out


def _ft_official(params: Any) -> dict[str, np.ndarray]:
  """`Classifier` params -> the release's state dict (names and layouts)."""
  sd = dict(vit_weights.params_to_official(params['backbone'], 'caev2'))
  sd.update({'fc_norm.weight': params['fc_norm']['scale'], 'fc_norm.bias': params['fc_norm']['bias'],
             'head.weight': np.asarray(params['head']['kernel']).T,
             'head.bias': params['head']['bias']})
  return sd


def _ft_compare_params(ctx: Context, prefix: str, params: Any) -> Result:
  """Worst error over every parameter against the reference state dict under `prefix`."""
  worst, scale, worst_name = -1.0, 0.0, ''
  for name, ours in _ft_official(params).items():
    ref = ctx.arrays[prefix + name]
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - ref)))
    if err > worst:
      worst, worst_name = err, name
    scale = max(scale, float(np.max(np.abs(ref))))
  return Result(f'{prefix}* (worst: {worst_name})', worst, scale, FORWARD_TOL)
